"""Prefix trees (tries) of trajectories, serialized once per unique token for tree training.

A group of trajectories that share prefixes (one prompt, many rollouts; multi-turn rollouts that fork
after a tool result) is merged into a trie, single-child chains are compressed into nodes, and the trie
is serialized in DFS pre-order (children ordered by token id, so the result does not depend on the
order of the input trajectories). Per tree token:

* ``tokens``     the token id (each unique prefix-token appears exactly once),
* ``positions``  its index on its own root path (= depth), so RoPE equals the unshared computation,
* ``tin, tout``  DFS interval: query q may attend key k iff ``tin[k] <= tin[q] < tout[k]``
                 (``tin`` is the serialized index; ``tout`` is one past the end of the token's subtree,
                 which inside a node includes the node's later tokens and all descendant nodes),
* ``tags``       event tag (0 plain, 1 tool_call, 2 tool_result, 3 memory), per tree token,
* ``parent``     serialized index of the previous token on the root path (-1 for a root token).

Per node (a maximal chain of tokens with one child each, split where a trajectory ends and — by
default — where the event tag changes): token span, parent node, depth (in nodes) and the
trajectories through it. Per trajectory: ``row_map[k, j]`` = serialized index of its j-th token.
Per-trajectory per-token values (loss weight, advantage, old log-prob, ...) stay per trajectory,
aligned with the row maps (``fields[name][k, j]``): two trajectories sharing a token may carry
different values there.

Usage::

  tree = build_tree(trajectories, tags=tags, fields={"advantage": advantages})
  tree.por                                   # 1 - N_tree / N_flat
  rows, label_rows, labels, valid = prediction_index(tree)

``kat_jax.tree.batch`` pads trees into fixed-size arrays for jit; ``kat_jax.tree.reference`` holds
the plain-Python references the tests compare against.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence, Union

import numpy as np

TAG_PLAIN = 0
TAG_TOOL_CALL = 1
TAG_TOOL_RESULT = 2
TAG_MEMORY = 3
EVENT_TAGS = (TAG_TOOL_CALL, TAG_TOOL_RESULT, TAG_MEMORY)

FieldValues = Sequence[Union[float, Sequence[float], np.ndarray]]


@dataclasses.dataclass(frozen=True)
class TrajectoryTree:
  """A serialized prefix tree. N = tree tokens, M = nodes, K = trajectories, L = longest trajectory.

  Token arrays are int32 [N]; node arrays int32 [M] (nodes are numbered in DFS pre-order, so a
  parent's index is smaller than its children's and a subtree is the contiguous node range
  ``[n, node_subtree_end[n])``); ``row_map`` is int32 [K, L] padded with -1; ``fields`` maps a name
  to float32 [K, L] (0 where padded).
  """
  tokens: np.ndarray
  positions: np.ndarray
  tin: np.ndarray
  tout: np.ndarray
  tags: np.ndarray
  parent: np.ndarray
  token_node: np.ndarray
  token_traj_count: np.ndarray   # trajectories through each token
  node_start: np.ndarray         # first serialized index of the node
  node_size: np.ndarray          # tokens in the node (>= 1)
  node_parent: np.ndarray        # -1 for a root node
  node_depth: np.ndarray         # number of ancestor nodes
  node_subtree_end: np.ndarray   # one past the last node index of the subtree
  node_traj_count: np.ndarray
  node_tag_bits: np.ndarray      # OR of (1 << tag) over the node's tokens
  node_traj_ptr: np.ndarray      # [M + 1] CSR offsets into node_traj_index
  node_traj_index: np.ndarray    # trajectory indices through each node, ascending
  row_map: np.ndarray
  lengths: np.ndarray            # [K]
  traj_ids: np.ndarray           # [K] caller-given ids (default 0..K-1)
  fields: Mapping[str, np.ndarray]

  @property
  def n_tree(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def n_flat(self) -> int:
    return int(self.lengths.sum())

  @property
  def por(self) -> float:
    """Prefix overlap ratio 1 - N_tree / N_flat (0 for no sharing)."""
    return 1.0 - self.n_tree / self.n_flat

  @property
  def num_traj(self) -> int:
    return int(self.lengths.shape[0])

  @property
  def num_nodes(self) -> int:
    return int(self.node_start.shape[0])

  @property
  def max_len(self) -> int:
    return int(self.row_map.shape[1])

  def node_trajectories(self, node: int) -> np.ndarray:
    """Indices (into the input list) of the trajectories through ``node``."""
    return self.node_traj_index[self.node_traj_ptr[node]:self.node_traj_ptr[node + 1]]

  def trajectory_tokens(self, k: int) -> np.ndarray:
    """Tokens of trajectory k, read back through its row map."""
    return self.tokens[self.row_map[k, :self.lengths[k]]]


def _as_int_arrays(seqs, what: str) -> list:
  out = []
  for i, s in enumerate(seqs):
    a = np.asarray(s)
    if a.ndim != 1:
      raise ValueError(f"{what}[{i}] must be a 1-D sequence of ints, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"{what}[{i}] must hold ints, got dtype {a.dtype}")
    out.append(a.astype(np.int32))
  return out


def _per_traj_values(name: str, values: FieldValues, lengths: np.ndarray, width: int) -> np.ndarray:
  """[K, L] float32 from one scalar or one per-token sequence per trajectory."""
  k = lengths.shape[0]
  if len(values) != k:
    raise ValueError(f"field {name!r} has {len(values)} entries but there are {k} trajectories")
  out = np.zeros((k, width), np.float32)
  for i, v in enumerate(values):
    a = np.asarray(v, np.float32)
    if a.ndim == 0:
      out[i, :lengths[i]] = a
    elif a.shape == (lengths[i],):
      out[i, :lengths[i]] = a
    else:
      raise ValueError(
          f"field {name!r}[{i}] has shape {a.shape}; expected a scalar or ({lengths[i]},) to match "
          f"trajectory {i}")
  return out


def build_tree(
    trajectories: Sequence[Sequence[int]],
    *,
    tags: Optional[Sequence[Sequence[int]]] = None,
    fields: Optional[Mapping[str, FieldValues]] = None,
    traj_ids: Optional[Sequence[int]] = None,
    split_on_tags: bool = True,
    max_node_tokens: Optional[int] = None,
) -> TrajectoryTree:
  """Merges tokenized trajectories into a serialized prefix tree.

  Args:
    trajectories: K non-empty int sequences (token ids).
    tags: optional per-token event tags, one sequence per trajectory (default all 0). Tags belong to
      tree tokens, so trajectories sharing a token must agree on its tag.
    fields: optional per-trajectory values, name -> K entries, each a scalar (broadcast over the
      trajectory) or one value per token; returned as [K, L] arrays aligned with ``row_map``.
    traj_ids: optional K ints carried along (e.g. ids from the trajectory manager).
    split_on_tags: also start a new node where the tag changes, so that tool-call / tool-result /
      memory spans are nodes of their own (what pruning keeps as events).
    max_node_tokens: optionally cut nodes into chunks of at most this many tokens (finer pruning).

  Returns:
    The TrajectoryTree (numpy arrays).
  """
  seqs = _as_int_arrays(trajectories, "trajectories")
  k = len(seqs)
  if k == 0:
    raise ValueError("build_tree needs at least one trajectory; got an empty list")
  for i, s in enumerate(seqs):
    if s.size == 0:
      raise ValueError(
          f"trajectory {i} is empty: every trajectory needs at least one token (drop empty "
          "rollouts before building the tree)")
  lengths = np.array([s.size for s in seqs], np.int32)
  width = int(lengths.max())
  if tags is None:
    tag_seqs = [np.zeros(n, np.int32) for n in lengths]
  else:
    if len(tags) != k:
      raise ValueError(f"tags has {len(tags)} entries but there are {k} trajectories")
    tag_seqs = _as_int_arrays(tags, "tags")
    for i, (t, n) in enumerate(zip(tag_seqs, lengths)):
      if t.size != n:
        raise ValueError(f"tags[{i}] has {t.size} entries but trajectory {i} has {n} tokens")
      if t.size and (t.min() < 0 or t.max() > 30):
        bad = int(t.min()) if t.min() < 0 else int(t.max())
        raise ValueError(f"tags[{i}] holds the tag {bad}; tags are ints in [0, 30]")
  if max_node_tokens is not None and max_node_tokens < 1:
    raise ValueError(f"max_node_tokens must be >= 1 or None, got {max_node_tokens}")

  # Sorted order: the trie's DFS pre-order (children by token id) emits, for each trajectory in
  # lexicographic order, exactly its tokens past the longest common prefix with the previous one.
  as_lists = [s.tolist() for s in seqs]
  order = sorted(range(k), key=as_lists.__getitem__)
  row_map = np.full((k, width), -1, np.int32)
  tok_parts, pos_parts, tag_parts, par_parts = [], [], [], []
  offset = 0
  prev = -1
  for i in order:
    s, n = seqs[i], int(lengths[i])
    lcp = 0
    if prev >= 0:
      p = seqs[prev]
      m = min(n, p.size)
      diff = np.flatnonzero(p[:m] != s[:m])
      lcp = int(diff[0]) if diff.size else m
      if lcp:
        bad = np.flatnonzero(tag_seqs[prev][:lcp] != tag_seqs[i][:lcp])
        if bad.size:
          j = int(bad[0])
          raise ValueError(
              f"trajectories {prev} and {i} share their first {lcp} tokens but disagree on the tag "
              f"of token {j} ({int(tag_seqs[prev][j])} vs {int(tag_seqs[i][j])}); tags belong to "
              "tree tokens, so a shared prefix must be tagged identically")
        row_map[i, :lcp] = row_map[prev, :lcp]
    new = n - lcp
    if new:
      rows = offset + np.arange(new, dtype=np.int32)
      row_map[i, lcp:n] = rows
      tok_parts.append(s[lcp:])
      pos_parts.append(np.arange(lcp, n, dtype=np.int32))
      tag_parts.append(tag_seqs[i][lcp:])
      first_parent = row_map[i, lcp - 1] if lcp else -1
      par_parts.append(np.concatenate([[first_parent], rows[:-1]]).astype(np.int32))
      offset += new
    prev = i
  tokens = np.concatenate(tok_parts)
  positions = np.concatenate(pos_parts)
  tag_arr = np.concatenate(tag_parts)
  parent = np.concatenate(par_parts)
  n_tree = tokens.shape[0]

  valid = row_map >= 0
  flat_rows = row_map[valid]
  flat_traj = np.broadcast_to(np.arange(k, dtype=np.int32)[:, None], row_map.shape)[valid]
  token_traj_count = np.bincount(flat_rows, minlength=n_tree).astype(np.int32)

  # Node starts: a root token, a token whose parent forks or ends a trajectory, or (optionally) a
  # tag change / chunk boundary. A token with exactly one child has it at the next serialized index,
  # so nodes are contiguous ranges.
  has_parent = parent >= 0
  safe_parent = np.where(has_parent, parent, 0)
  child_count = np.bincount(parent[has_parent], minlength=n_tree)
  ends = np.zeros(n_tree, bool)
  ends[row_map[np.arange(k), lengths - 1]] = True
  start = ~has_parent | (child_count[safe_parent] != 1) | ends[safe_parent]
  if split_on_tags:
    start |= tag_arr != tag_arr[safe_parent]
  if max_node_tokens is not None:
    first = np.flatnonzero(start)[np.cumsum(start) - 1]
    offset_in_node = np.arange(n_tree) - first
    start |= (offset_in_node > 0) & (offset_in_node % max_node_tokens == 0)
  node_start = np.flatnonzero(start).astype(np.int32)
  num_nodes = node_start.shape[0]
  token_node = (np.cumsum(start) - 1).astype(np.int32)
  node_size = np.diff(np.append(node_start, n_tree)).astype(np.int32)
  first_parent = parent[node_start]
  node_parent = np.where(first_parent >= 0, token_node[np.maximum(first_parent, 0)], -1)
  node_parent = node_parent.astype(np.int32)

  # Depth and subtree end (pre-order: parent index < child index). O(M) host loops.
  par_list = node_parent.tolist()
  depth = [0] * num_nodes
  for n in range(num_nodes):
    if par_list[n] >= 0:
      depth[n] = depth[par_list[n]] + 1
  sub_end = list(range(1, num_nodes + 1))
  for n in range(num_nodes - 1, -1, -1):
    p = par_list[n]
    if p >= 0 and sub_end[n] > sub_end[p]:
      sub_end[p] = sub_end[n]
  node_depth = np.array(depth, np.int32)
  node_subtree_end = np.array(sub_end, np.int32)
  tout_of_node = np.append(node_start, n_tree)[node_subtree_end].astype(np.int32)
  tout = tout_of_node[token_node]
  tin = np.arange(n_tree, dtype=np.int32)

  # Trajectories through each node: (node, trajectory) pairs at node starts, CSR by node.
  at_start = start[flat_rows]
  pair_node = token_node[flat_rows[at_start]]
  pair_traj = flat_traj[at_start]
  by_node = np.lexsort((pair_traj, pair_node))
  node_traj_index = pair_traj[by_node].astype(np.int32)
  node_traj_count = np.bincount(pair_node, minlength=num_nodes).astype(np.int32)
  node_traj_ptr = np.concatenate([[0], np.cumsum(node_traj_count)]).astype(np.int32)
  node_tag_bits = np.bitwise_or.reduceat(np.left_shift(1, tag_arr), node_start).astype(np.int32)

  if traj_ids is None:
    ids = np.arange(k, dtype=np.int32)
  else:
    ids = np.asarray(traj_ids, np.int32)
    if ids.shape != (k,):
      raise ValueError(f"traj_ids has shape {ids.shape}; expected ({k},), one id per trajectory")
  field_arrays = {name: _per_traj_values(name, vals, lengths, width)
                  for name, vals in (fields or {}).items()}

  return TrajectoryTree(
      tokens=tokens, positions=positions, tin=tin, tout=tout, tags=tag_arr, parent=parent,
      token_node=token_node, token_traj_count=token_traj_count, node_start=node_start,
      node_size=node_size, node_parent=node_parent, node_depth=node_depth,
      node_subtree_end=node_subtree_end, node_traj_count=node_traj_count,
      node_tag_bits=node_tag_bits,
      node_traj_ptr=node_traj_ptr, node_traj_index=node_traj_index, row_map=row_map,
      lengths=lengths, traj_ids=ids, fields=field_arrays)


def prediction_index(tree: TrajectoryTree):
  """Next-token prediction pairs of every trajectory, as index arrays aligned with the row maps.

  For trajectory k and j in [0, L-1): the logits at serialized row ``rows[k, j]`` (its token j)
  predict ``labels[k, j]`` (its token j + 1), which sits at serialized index ``label_rows[k, j]``.
  At a fork the parent's last row appears once per child with different labels; every pair of every
  trajectory is present (``valid.sum() == sum(len_k - 1)``). Per-trajectory fields of the predicted
  token are ``fields[name][k, j + 1]``. A pruning keep mask gates a pair by ``keep[label_rows]``.

  Returns:
    rows, label_rows, labels: int32 [K, L-1] (0 where invalid); valid: bool [K, L-1].
  """
  rm = tree.row_map
  valid = rm[:, 1:] >= 0
  rows = np.where(valid, rm[:, :-1], 0).astype(np.int32)
  label_rows = np.where(valid, rm[:, 1:], 0).astype(np.int32)
  labels = np.where(valid, tree.tokens[label_rows], 0).astype(np.int32)
  return rows, label_rows, labels, valid


def interval_mask(tin: np.ndarray, tout: np.ndarray) -> np.ndarray:
  """Dense bool [N, N] attention mask from intervals: [q, k] = tin[k] <= tin[q] < tout[k]."""
  q = tin[:, None]
  return (tin[None, :] <= q) & (q < tout[None, :])
