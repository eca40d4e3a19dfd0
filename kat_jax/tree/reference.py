"""Plain-Python references for trees and pruning, written independently of the vectorized code.

* ``reference_serialization(trajectories)`` builds a dict trie, serializes it in DFS pre-order
  (children by token id) and returns tokens, positions and the dense ancestor-or-self mask computed
  from the trie itself (not from intervals) — the tree tests compare ``build_tree`` against it.
* ``reference_units``, ``reference_node_scores`` and ``reference_prune`` implement the entropy-budget
  pruning rule of ``kat_jax.tree.prune`` with explicit child lists, root-path walks and a
  heap-driven best-first expansion over units — the pruning tests compare the jitted code with them.

Slow by design (Python loops over tokens and nodes); for tests and benchmarks only.
"""
from __future__ import annotations

import heapq
import math
from typing import Optional, Sequence

import numpy as np

from kat_jax.tree.build import TrajectoryTree
from kat_jax.tree.prune import settings_from_config


def reference_serialization(trajectories: Sequence[Sequence[int]]):
  """Returns (tokens [N], positions [N], mask bool [N, N]) with mask[q, k] = k ancestor-or-self of q."""
  root: dict = {}
  for traj in trajectories:
    if len(traj) == 0:
      raise ValueError("empty trajectory")
    node = root
    for tok in traj:
      node = node.setdefault(int(tok), {})
  tokens, positions, ancestors = [], [], []
  stack = [(tok, child, 0, ()) for tok, child in sorted(root.items(), reverse=True)]
  while stack:
    tok, children, depth, path = stack.pop()
    index = len(tokens)
    tokens.append(tok)
    positions.append(depth)
    path = path + (index,)
    ancestors.append(path)
    for ctok, cchildren in sorted(children.items(), reverse=True):
      stack.append((ctok, cchildren, depth + 1, path))
  n = len(tokens)
  mask = np.zeros((n, n), bool)
  for q, path in enumerate(ancestors):
    mask[q, list(path)] = True
  return np.array(tokens, np.int32), np.array(positions, np.int32), mask


def _children(tree: TrajectoryTree):
  kids = [[] for _ in range(tree.num_nodes)]
  for n, p in enumerate(tree.node_parent.tolist()):
    if p >= 0:
      kids[p].append(n)
  return kids


def _log(x: float) -> float:
  return math.log(x) if x > 0 else -math.inf


def _event_prefix(tree: TrajectoryTree, s) -> list:
  """Event nodes whole; window-covered prefixes of the nodes below them (child-list walks)."""
  m = tree.num_nodes
  kids = _children(tree)
  starts, sizes = tree.node_start.tolist(), tree.node_size.tolist()
  pos0 = [int(tree.positions[a]) for a in starts]
  tags = tree.tags.tolist()
  is_event = [any(tags[a + i] in s.event_tags for i in range(z)) for a, z in zip(starts, sizes)]
  prefix = [0] * m
  w = s.event_window
  for e in range(m):
    if not is_event[e]:
      continue
    prefix[e] = sizes[e]
    if s.event_window_unit == "tokens":
      end = pos0[e] + sizes[e] + w
      stack = list(kids[e])
      while stack:
        d = stack.pop()
        prefix[d] = max(prefix[d], min(sizes[d], max(0, end - pos0[d])))
        if pos0[d] + sizes[d] < end:
          stack.extend(kids[d])
    else:
      frontier = list(kids[e])
      for _ in range(w):
        for d in frontier:
          prefix[d] = sizes[d]
        frontier = [c for d in frontier for c in kids[d]]
  return prefix


def reference_units(tree: TrajectoryTree, config) -> dict:
  """Per node: mandatory / attached prefix lengths, head node (-1 none), is_unit (lists)."""
  s = settings_from_config(config)
  m = tree.num_nodes
  sizes = tree.node_size.tolist()
  parents = tree.node_parent.tolist()
  prefix = _event_prefix(tree, s)
  mandatory, attached, head = [0] * m, [0] * m, [-1] * m
  if s.event_mode == "mandatory":
    mandatory = list(prefix)
    for n in range(m):
      if prefix[n] > 0:
        p = parents[n]
        while p >= 0:
          mandatory[p] = sizes[p]
          p = parents[p]
  else:
    for n in range(m):
      if prefix[n] == 0:
        continue
      p = parents[n]
      while p >= 0 and prefix[p] >= sizes[p]:   # skip wholly attached ancestors
        p = parents[p]
      if p >= 0:
        head[n], attached[n] = p, prefix[n]
      else:
        mandatory[n] = prefix[n]
  is_unit = [sizes[n] > attached[n] for n in range(m)]
  return {"mandatory": mandatory, "attached": attached, "head": head, "is_unit": is_unit}


def _unit_tokens(tree: TrajectoryTree, units: dict) -> list:
  """For each node-as-unit, the (node, offset) tokens it owns."""
  owned = [[] for _ in range(tree.num_nodes)]
  for n, z in enumerate(tree.node_size.tolist()):
    for o in range(z):
      owner = units["head"][n] if o < units["attached"][n] else n
      owned[owner].append((n, o))
  return owned


def reference_node_scores(tree: TrajectoryTree, entropies: np.ndarray, config,
                          logprobs: Optional[np.ndarray] = None) -> np.ndarray:
  """float64 [M] scores of the entropy rule (log domain), from child lists and root-path walks."""
  s = settings_from_config(config)
  m = tree.num_nodes
  kids = _children(tree)
  starts, sizes = tree.node_start.tolist(), tree.node_size.tolist()
  parents = tree.node_parent.tolist()
  if s.entropy_scope == "subtree":
    ent = [float(np.sum(np.asarray(entropies[a:a + z], np.float64))) for a, z in zip(starts, sizes)]
    count = [float(z) for z in sizes]
    for n in range(m - 1, -1, -1):      # children after parents in pre-order
      for c in kids[n]:
        ent[n] += ent[c]
        count[n] += count[c]
  else:
    owned = _unit_tokens(tree, reference_units(tree, s))
    ent = [sum(float(entropies[starts[n] + o]) for n, o in toks) for toks in owned]
    count = [float(len(toks)) for toks in owned]
  scores = []
  k = tree.num_traj
  counts = tree.node_traj_count.tolist()
  for n in range(m):
    agg = (ent[n] / count[n] if count[n] else 0.0) if s.entropy_agg == "mean" else ent[n]
    score = _log(agg)
    if s.reach == "fraction":
      score += _log(counts[n] / k)
    elif s.reach == "branch":
      node = n
      while node >= 0:
        p = parents[node]
        siblings = kids[p] if p >= 0 else [r for r in range(m) if parents[r] < 0]
        score += _log(counts[node] / sum(counts[x] for x in siblings))
        node = p
    elif s.reach == "policy":
      node = n
      while node >= 0:
        a, z = starts[node], sizes[node]
        score += float(np.sum(np.asarray(logprobs[a:a + z], np.float64)))
        node = parents[node]
    scores.append(score)
  return np.array(scores, np.float64)


def reference_longest_path_scores(tree: TrajectoryTree) -> np.ndarray:
  """log of the longest trajectory (tokens) through each node."""
  longest = [0] * tree.num_nodes
  for n in range(tree.num_nodes):
    longest[n] = max(int(tree.lengths[k]) for k in tree.node_trajectories(n))
  return np.log(np.array(longest, np.float64))


def reference_budget(tree: TrajectoryTree, config) -> int:
  s = settings_from_config(config)
  if s.budget_tokens >= 0:
    return s.budget_tokens
  return int(np.floor(np.float32(s.budget_fraction) * np.float32(tree.n_tree)))


def reference_prune(tree: TrajectoryTree, entropies: Optional[np.ndarray], config, *,
                    node_scores: Optional[np.ndarray] = None,
                    logprobs: Optional[np.ndarray] = None):
  """Heap best-first expansion of units. Returns (keep bool [N], node_kept int [M], exceeds).

  The heap holds the frontier of units keyed by (-bottleneck, node index), bottleneck = min score
  of the units on the root path. ``node_scores`` overrides the entropy scores (exact comparisons
  with the jitted code, free of float32-vs-float64 rounding).
  """
  s = settings_from_config(config)
  scores = (reference_node_scores(tree, entropies, s, logprobs) if node_scores is None
            else np.asarray(node_scores, np.float64))
  units = reference_units(tree, s)
  mandatory, attached, head = units["mandatory"], units["attached"], units["head"]
  is_unit = units["is_unit"]
  budget = reference_budget(tree, s)
  m = tree.num_nodes
  sizes = tree.node_size.tolist()
  parents = tree.node_parent.tolist()
  owned = _unit_tokens(tree, units)
  cost = [sum(1 for n, o in toks if o >= mandatory[n]) for toks in owned]
  unit_parent = [-1] * m
  unit_kids = [[] for _ in range(m)]
  roots = []
  for n in range(m):
    if not is_unit[n]:
      continue
    p = parents[n]
    while p >= 0 and not is_unit[p]:
      p = parents[p]
    unit_parent[n] = p
    (unit_kids[p] if p >= 0 else roots).append(n)
  kept = list(mandatory)
  remaining = max(budget - sum(mandatory), 0)
  heap = [(-float(scores[n]), n) for n in roots]
  heapq.heapify(heap)
  while heap:
    neg_bottleneck, n = heapq.heappop(heap)
    if cost[n] <= remaining:
      remaining -= cost[n]
      for node, _ in owned[n]:
        kept[node] = max(kept[node], sizes[node] if node == n else attached[node])
      for c in unit_kids[n]:
        heapq.heappush(heap, (max(neg_bottleneck, -float(scores[c])), c))
      continue
    if s.truncate_last_node and remaining > 0:
      base = max(mandatory[n], attached[n])
      kept[n] = max(kept[n], base + min(remaining, sizes[n] - base))
    break
  keep = np.zeros(tree.n_tree, bool)
  for a, k in zip(tree.node_start.tolist(), kept):
    keep[a:a + k] = True
  return keep, np.array(kept, np.int64), sum(mandatory) > budget
