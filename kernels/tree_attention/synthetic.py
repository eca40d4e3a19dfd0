"""Synthetic trajectory trees as DFS intervals, for the kernel tests and the attention benchmark.

The real tree builder lives in ``kat_jax.tree``; this module only makes masks of a known shape:
``trie_intervals`` serializes a set of token sequences (shared prefixes stored once) in DFS
order, ``random_trajectory_tree`` makes trajectories that fork from each other at random depths,
and ``pack_rows`` places trees and padding into a [B, T] batch with the intervals the attention
kernels read (``tin = index``, ``tout`` = end of the token's subtree; padding ``tout == tin``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def intervals_from_parents(parent: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """DFS intervals of a forest given in preorder: ``parent[i] < i`` or -1 for a root.

  Returns ``tin = i`` and ``tout = i + size of i's subtree`` (int32 [N]).
  """
  parent = np.asarray(parent, np.int64)
  n = parent.size
  size = np.ones(n, np.int64)
  for i in range(n - 1, -1, -1):
    if parent[i] >= i:
      raise ValueError(f"parent[{i}] = {parent[i]} is not an earlier token: not a preorder")
    if parent[i] >= 0:
      size[parent[i]] += size[i]
  tin = np.arange(n, dtype=np.int64)
  tout = tin + size
  # Preorder check: a subtree must be contiguous, i.e. nested inside its parent's interval.
  has_parent = parent >= 0
  if np.any(tout[has_parent] > tout[parent[has_parent]]):
    raise ValueError("parents do not describe a DFS preorder (a subtree is not contiguous)")
  return tin.astype(np.int32), tout.astype(np.int32)


def trie_intervals(paths: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Serializes token sequences as a trie in DFS order.

  Returns (tokens [N], tin [N], tout [N]); each shared prefix appears once, children in order of
  first appearance.
  """
  children: list[dict] = [{}]  # node 0 is a virtual root
  token_of = [-1]
  for path in paths:
    node = 0
    for token in path:
      nxt = children[node].get(token)
      if nxt is None:
        nxt = len(children)
        children[node][token] = nxt
        children.append({})
        token_of.append(token)
      node = nxt
  tokens, parents = [], []
  stack = [(child, -1) for child in reversed(list(children[0].values()))]
  while stack:
    node, parent_pos = stack.pop()
    pos = len(tokens)
    tokens.append(token_of[node])
    parents.append(parent_pos)
    stack.extend((child, pos) for child in reversed(list(children[node].values())))
  tin, tout = intervals_from_parents(parents)
  return np.asarray(tokens, np.int32), tin, tout


def random_trajectory_tree(rng: np.random.Generator, num_trajectories: int, length: int,
                           fork_range: tuple[float, float] = (0.3, 0.9)) -> list[list[int]]:
  """Trajectories of ``length`` tokens; each forks from an earlier one at a random depth.

  Trajectory i > 0 copies the first ``d`` tokens of a random earlier trajectory, ``d`` uniform in
  ``fork_range`` x length, and continues with fresh tokens. Larger forks mean more sharing (POR).
  """
  next_token = 0
  paths: list[list[int]] = []
  for i in range(num_trajectories):
    if i == 0:
      prefix: list[int] = []
    else:
      base = paths[rng.integers(i)]
      depth = int(rng.uniform(*fork_range) * length)
      prefix = base[:depth]
    fresh = list(range(next_token, next_token + length - len(prefix)))
    next_token += len(fresh)
    paths.append(prefix + fresh)
  return paths


def prefix_overlap_ratio(paths: Sequence[Sequence[int]]) -> float:
  """POR = 1 - N_tree / N_flat (tokens of the trie over tokens of the flat batch)."""
  n_tree = trie_intervals(paths)[0].size
  return 1.0 - n_tree / sum(len(p) for p in paths)


def pack_rows(rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], t: int):
  """Packs per-row lists of (tin, tout) trees into [B, t] intervals; the rest is padding.

  Each tree is offset to its position in the row, so trees of one row never see each other.
  """
  tin = np.tile(np.arange(t, dtype=np.int32), (len(rows), 1))
  tout = tin.copy()
  for r, trees in enumerate(rows):
    pos = 0
    for tree_tin, tree_tout in trees:
      n = len(tree_tin)
      if pos + n > t:
        raise ValueError(f"row {r} holds {pos + n} tokens but T = {t}")
      tin[r, pos:pos + n] = np.asarray(tree_tin) + pos
      tout[r, pos:pos + n] = np.asarray(tree_tout) + pos
      pos += n
  return tin, tout
