"""Shared test inputs for the tree-attention kernel tests: random forests as DFS intervals.

``forest_intervals`` is a hypothesis strategy for one batch row: a forest of random tries in DFS
preorder (each token is a child of the previous token or of one of its ancestors, or starts a new
tree), followed by padding (``tout == tin``). ``brute_force_visible`` is the token-level rule.
"""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from kernels.tree_attention.synthetic import intervals_from_parents


def intervals_from_climbs(climbs, num_real: int, t: int):
  """Row intervals [t]: token i > 0 climbs ``climbs[i-1]`` levels up from token i-1, then becomes
  the child of the node it reached (a climb past the root starts a new tree); tokens from
  ``num_real`` on are padding (tin = tout = index)."""
  parents, path = [], []
  for i in range(num_real):
    if i > 0:
      up = climbs[(i - 1) % len(climbs)] if climbs else 0
      del path[max(len(path) - up, 0):]
    parents.append(path[-1] if path else -1)
    path.append(i)
  tin = np.arange(t, dtype=np.int32)
  tout = tin.copy()
  if num_real:
    tree_tin, tree_tout = intervals_from_parents(parents)
    tin[:num_real], tout[:num_real] = tree_tin, tree_tout
  return tin, tout


@st.composite
def forest_intervals(draw, t: int, min_real: int = 1):
  num_real = draw(st.integers(min_real, t))
  # Mostly 0 (deep chains, like trajectories), sometimes a climb (a fork) or a new tree.
  climbs = draw(st.lists(st.sampled_from([0, 0, 0, 0, 0, 1, 2, 3, 8, 100]), min_size=1,
                         max_size=t))
  return intervals_from_climbs(climbs, num_real, t)


def forest_batch(rows):
  tin = np.stack([r[0] for r in rows])
  tout = np.stack([r[1] for r in rows])
  return tin, tout


def brute_force_visible(tin, tout):
  """bool [B, T(q), T(k)] from the rule tin[k] <= tin[q] < tout[k]."""
  q = tin[:, :, None]
  return (tin[:, None, :] <= q) & (q < tout[:, None, :])
