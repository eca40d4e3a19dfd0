"""Fixed-size padded batches of serialized trees, for jit.

``batch_trees(trees, max_tokens=T, max_nodes=M, max_traj=K, max_len=L)`` stacks B trees into a
``TreeBatch`` (a pytree of numpy arrays; ``jax.device_put`` it or pass it to a jitted step):

* per tree token ``[B, T]``: tokens, positions, tin, tout, tags, parent, token_node, token_traj_count,
  token_valid;
* per node ``[B, M]``: node_start, node_size, node_parent, node_depth, node_subtree_end,
  node_traj_count, node_tag_bits (the inputs of entropy-budget pruning);
* per trajectory ``[B, K, L]``: row_map, row_valid and the per-trajectory fields; ``[B, K]``:
  lengths, traj_ids, traj_valid;
* prediction pairs ``[B, K, L-1]``: pred_rows, pred_label_rows, pred_labels, pred_valid (see
  ``build.prediction_index``).

Padding tokens sit after the real ones with ``tin = index >= N_tree`` and ``tout = tin``: their
interval is empty (nobody attends to them) and their ``tin`` lies past every real ``tout`` (they attend
to nobody, not even themselves). Padded rows and pairs point at index 0 with a false validity mask;
padded tokens belong to node ``M`` (out of range, dropped by ``segment_sum``). Several trees can also
share one row as a forest: ``concat_trees`` gives them disjoint intervals.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.tree.build import TrajectoryTree, prediction_index


@flax.struct.dataclass
class TreeBatch:
  """B padded trees; shapes in the module docstring."""
  tokens: np.ndarray
  positions: np.ndarray
  tin: np.ndarray
  tout: np.ndarray
  tags: np.ndarray
  parent: np.ndarray
  token_node: np.ndarray
  token_traj_count: np.ndarray
  token_valid: np.ndarray
  node_start: np.ndarray
  node_size: np.ndarray
  node_parent: np.ndarray
  node_depth: np.ndarray
  node_subtree_end: np.ndarray
  node_traj_count: np.ndarray
  node_tag_bits: np.ndarray
  row_map: np.ndarray
  row_valid: np.ndarray
  lengths: np.ndarray
  traj_ids: np.ndarray
  traj_valid: np.ndarray
  pred_rows: np.ndarray
  pred_label_rows: np.ndarray
  pred_labels: np.ndarray
  pred_valid: np.ndarray
  fields: dict


def _check_fits(what: str, index: int, size: int, limit: int, flag: str):
  if size > limit:
    raise ValueError(
        f"tree {index} has {size} {what} but the batch allows {limit}: raise {flag} to at least "
        f"{size}, or split the tree / prune before batching")


def batch_trees(
    trees: Sequence[TrajectoryTree],
    *,
    max_tokens: Optional[int] = None,
    max_nodes: Optional[int] = None,
    max_traj: Optional[int] = None,
    max_len: Optional[int] = None,
) -> TreeBatch:
  """Pads and stacks trees; each limit defaults to the largest value among ``trees``.

  Raises ValueError naming the tree and both sizes when a tree does not fit, and when the trees
  carry different field names.
  """
  if not trees:
    raise ValueError("batch_trees needs at least one tree")
  t_max = max_tokens or max(t.n_tree for t in trees)
  m_max = max_nodes or max(t.num_nodes for t in trees)
  k_max = max_traj or max(t.num_traj for t in trees)
  l_max = max_len or max(t.max_len for t in trees)
  if l_max < 2:
    l_max = 2  # keep the prediction arrays at least one wide
  names = sorted(trees[0].fields)
  for i, t in enumerate(trees):
    _check_fits("tokens", i, t.n_tree, t_max, "max_tokens")
    _check_fits("nodes", i, t.num_nodes, m_max, "max_nodes")
    _check_fits("trajectories", i, t.num_traj, k_max, "max_traj")
    _check_fits("tokens in its longest trajectory", i, t.max_len, l_max, "max_len")
    if sorted(t.fields) != names:
      raise ValueError(
          f"tree {i} carries fields {sorted(t.fields)} but tree 0 carries {names}; give every tree "
          "the same per-trajectory fields")

  b = len(trees)
  idx_t = np.arange(t_max, dtype=np.int32)
  out = {
      "tokens": np.zeros((b, t_max), np.int32),
      "positions": np.zeros((b, t_max), np.int32),
      "tin": np.tile(idx_t, (b, 1)),
      "tout": np.tile(idx_t, (b, 1)),
      "tags": np.zeros((b, t_max), np.int32),
      "parent": np.full((b, t_max), -1, np.int32),
      "token_node": np.full((b, t_max), m_max, np.int32),
      "token_traj_count": np.zeros((b, t_max), np.int32),
      "token_valid": np.zeros((b, t_max), bool),
      "node_start": np.zeros((b, m_max), np.int32),
      "node_size": np.zeros((b, m_max), np.int32),
      "node_parent": np.full((b, m_max), -1, np.int32),
      "node_depth": np.zeros((b, m_max), np.int32),
      "node_subtree_end": np.tile(np.arange(1, m_max + 1, dtype=np.int32), (b, 1)),
      "node_traj_count": np.zeros((b, m_max), np.int32),
      "node_tag_bits": np.zeros((b, m_max), np.int32),
      "row_map": np.zeros((b, k_max, l_max), np.int32),
      "row_valid": np.zeros((b, k_max, l_max), bool),
      "lengths": np.zeros((b, k_max), np.int32),
      "traj_ids": np.full((b, k_max), -1, np.int32),
      "traj_valid": np.zeros((b, k_max), bool),
      "pred_rows": np.zeros((b, k_max, l_max - 1), np.int32),
      "pred_label_rows": np.zeros((b, k_max, l_max - 1), np.int32),
      "pred_labels": np.zeros((b, k_max, l_max - 1), np.int32),
      "pred_valid": np.zeros((b, k_max, l_max - 1), bool),
  }
  fields = {name: np.zeros((b, k_max, l_max), np.float32) for name in names}
  for i, t in enumerate(trees):
    n, m, k, l = t.n_tree, t.num_nodes, t.num_traj, t.max_len
    for name in ("tokens", "positions", "tin", "tout", "tags", "parent", "token_node",
                 "token_traj_count"):
      out[name][i, :n] = getattr(t, name)
    out["token_valid"][i, :n] = True
    for name in ("node_start", "node_size", "node_parent", "node_depth", "node_subtree_end",
                 "node_traj_count", "node_tag_bits"):
      out[name][i, :m] = getattr(t, name)
    valid = t.row_map >= 0
    out["row_map"][i, :k, :l] = np.where(valid, t.row_map, 0)
    out["row_valid"][i, :k, :l] = valid
    out["lengths"][i, :k] = t.lengths
    out["traj_ids"][i, :k] = t.traj_ids
    out["traj_valid"][i, :k] = True
    rows, label_rows, labels, pvalid = prediction_index(t)
    out["pred_rows"][i, :k, :l - 1] = rows
    out["pred_label_rows"][i, :k, :l - 1] = label_rows
    out["pred_labels"][i, :k, :l - 1] = labels
    out["pred_valid"][i, :k, :l - 1] = pvalid
    for name in names:
      fields[name][i, :k, :l] = t.fields[name]
  return TreeBatch(fields=fields, **out)


def per_tree_token(batch, values_bkl: jax.Array, fill=0.0) -> jax.Array:
  """[B, T] per-tree-token values from per-trajectory ones [B, K, L] (jittable).

  For values that belong to a tree token rather than to a trajectory — the sampler's entropy or
  log-prob of each generated token, which trajectories sharing a token share too (same context, same
  policy) — e.g. to feed ``prune_tree_batch``. Where trajectories disagree on a shared token, one of
  their values is taken. Padding tokens get ``fill``.
  """
  get = batch.get if isinstance(batch, dict) else lambda k: getattr(batch, k)
  row_map, row_valid = jnp.asarray(get("row_map")), jnp.asarray(get("row_valid"))
  b, t = jnp.shape(get("token_valid"))
  values = jnp.asarray(values_bkl)
  rows = jnp.where(row_valid, row_map, t).reshape(b, -1)   # invalid -> out of range, dropped
  out = jnp.full((b, t), fill, values.dtype)
  return jax.vmap(lambda o, r, v: o.at[r].set(v, mode="drop"))(out, rows, values.reshape(b, -1))


def concat_trees(trees: Sequence[TrajectoryTree]) -> TrajectoryTree:
  """Packs trees into one forest (one batch row) without merging their prefixes.

  Tokens, nodes and trajectories of tree i follow those of trees < i; intervals are shifted, so the
  trees' intervals are disjoint and no token of one tree sees a token of another.
  """
  if not trees:
    raise ValueError("concat_trees needs at least one tree")
  names = sorted(trees[0].fields)
  for i, t in enumerate(trees):
    if sorted(t.fields) != names:
      raise ValueError(f"tree {i} carries fields {sorted(t.fields)} but tree 0 carries {names}")
  width = max(t.max_len for t in trees)
  tok_off = np.cumsum([0] + [t.n_tree for t in trees])
  node_off = np.cumsum([0] + [t.num_nodes for t in trees])
  traj_off = np.cumsum([0] + [t.num_traj for t in trees])

  def shift(a, off):
    return np.where(a >= 0, a + off, a).astype(np.int32)

  def cat(fn):
    return np.concatenate([fn(i, t) for i, t in enumerate(trees)])

  def pad_rows(a, fill):
    out = np.full((a.shape[0], width), fill, a.dtype)
    out[:, :a.shape[1]] = a
    return out

  return TrajectoryTree(
      tokens=cat(lambda i, t: t.tokens),
      positions=cat(lambda i, t: t.positions),
      tin=cat(lambda i, t: t.tin + tok_off[i]).astype(np.int32),
      tout=cat(lambda i, t: t.tout + tok_off[i]).astype(np.int32),
      tags=cat(lambda i, t: t.tags),
      parent=cat(lambda i, t: shift(t.parent, tok_off[i])),
      token_node=cat(lambda i, t: t.token_node + node_off[i]).astype(np.int32),
      token_traj_count=cat(lambda i, t: t.token_traj_count),
      node_start=cat(lambda i, t: t.node_start + tok_off[i]).astype(np.int32),
      node_size=cat(lambda i, t: t.node_size),
      node_parent=cat(lambda i, t: shift(t.node_parent, node_off[i])),
      node_depth=cat(lambda i, t: t.node_depth),
      node_subtree_end=cat(lambda i, t: t.node_subtree_end + node_off[i]).astype(np.int32),
      node_traj_count=cat(lambda i, t: t.node_traj_count),
      node_tag_bits=cat(lambda i, t: t.node_tag_bits),
      node_traj_ptr=np.concatenate(
          [[0]] + [t.node_traj_ptr[1:] + t_ptr for t, t_ptr in
                   zip(trees, np.cumsum([0] + [t.node_traj_ptr[-1] for t in trees]))]
      ).astype(np.int32),
      node_traj_index=cat(lambda i, t: t.node_traj_index + traj_off[i]).astype(np.int32),
      row_map=cat(lambda i, t: pad_rows(shift(t.row_map, tok_off[i]), -1)),
      lengths=cat(lambda i, t: t.lengths),
      traj_ids=cat(lambda i, t: t.traj_ids),
      fields={name: cat(lambda i, t: pad_rows(t.fields[name], 0.0)) for name in names},
  )
