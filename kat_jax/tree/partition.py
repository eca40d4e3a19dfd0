"""Trees larger than one step's token budget: split at node boundaries, relay K/V forward and their
gradients back, so that the parts' combined loss and parameter gradients equal the whole tree's.

``partition_nodes`` cuts the DFS node order greedily into parts of at most ``budget`` tokens (a node
larger than the budget gets a part of its own and is reported). Because ancestors precede
descendants in DFS pre-order, every ancestor of a part's tokens lies in that part or an earlier one.

``partitioned_value_and_grad`` runs the parts in order through the model's KV-cache path: part i
writes its keys/values into cache slots ``tin`` (the global serialized index) and attends over the
whole cache with the global DFS intervals, so it sees exactly its ancestors in earlier parts. Each
part scores the prediction pairs whose *row* it holds (a fork's first child token, predicted by the
parent's last row, is scored in the parent's part) with the whole tree's normalizer. The backward
pass walks the parts in reverse, adding each part's cotangent for the cache it received to the
cotangent of the cache the previous part produced (``jax.vjp``), in float32.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.model.attention import AttentionMask
from kat_jax.model.transformer import KVCache, ModelConfig
from kat_jax.tree.build import TrajectoryTree


def partition_nodes(tree: TrajectoryTree, budget: int) -> list[tuple[int, int]]:
  """Greedy DFS cut into token ranges ``[start, end)`` of the serialization, each a run of whole
  nodes holding at most ``budget`` tokens (or a single node larger than the budget)."""
  if budget < 1:
    raise ValueError(f"budget={budget} must be a positive number of tokens")
  parts, start, size = [], 0, 0
  for node_start, node_size in zip(tree.node_start.tolist(), tree.node_size.tolist()):
    if size and size + node_size > budget:
      parts.append((start, node_start))
      start, size = node_start, 0
    size += node_size
  parts.append((start, tree.n_tree))
  return parts


def _part_arrays(tree: TrajectoryTree, start: int, end: int, width: int, scratch: int):
  """Token arrays of one part padded to ``width``; padding writes to scratch cache slots and is
  invisible (tout == tin)."""
  n = end - start
  pad = width - n
  slots = np.concatenate([tree.tin[start:end], scratch + np.arange(pad)]).astype(np.int32)
  tout = np.concatenate([tree.tout[start:end], scratch + np.arange(pad)]).astype(np.int32)
  tokens = np.concatenate([tree.tokens[start:end], np.zeros(pad, np.int32)]).astype(np.int32)
  positions = np.concatenate([tree.positions[start:end], np.zeros(pad, np.int32)]).astype(np.int32)
  return dict(tokens=tokens[None], positions=positions[None], tin=slots[None], tout=tout[None])


def partitioned_value_and_grad(
    apply_fn: Callable, cfg: ModelConfig, params, tree: TrajectoryTree, parts, pair_loss_fn,
    pairs: dict):
  """Loss and parameter gradients of the whole tree, computed part by part.

  Args:
    apply_fn: ``model.apply``.
    cfg: the model config (cache shapes).
    parts: output of ``partition_nodes``.
    pair_loss_fn: ``(logp [K, L-1]) -> per-pair loss [K, L-1]`` (e.g. NLL or clipped PPO).
    pairs: ``rows``, ``labels``, ``weights`` [K, L-1] (weights already include validity and
      the normalizer's per-pair factor: the loss is ``sum(weights · loss)``).
  Returns:
    (loss, grads).
  """
  width = max(e - s for s, e in parts)
  scratch = tree.n_tree
  slots = tree.n_tree + width
  rows = jnp.asarray(pairs["rows"])
  labels = jnp.asarray(pairs["labels"])
  weights = jnp.asarray(pairs["weights"])

  @jax.jit
  def part_fn(p, kv, intervals, arrays, start, end):
    cache = KVCache(k=kv[0], v=kv[1], tin=intervals[0], tout=intervals[1])
    mask = AttentionMask(tin=arrays["tin"], tout=arrays["tout"])
    out = apply_fn({"params": p}, arrays["tokens"], arrays["positions"], mask, kv_cache=cache)
    logits = out.logits[0].astype(jnp.float32)                     # [width, V]
    in_part = (rows >= start) & (rows < end)
    local = jnp.clip(rows - start, 0, width - 1)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    logp = logits[local, labels] - log_z[local]
    loss = jnp.sum(jnp.where(in_part, weights * pair_loss_fn(logp), 0.0))
    new = out.kv_cache
    return (loss, (new.k, new.v)), (new.tin, new.tout)

  empty = KVCache.empty(cfg, 1, slots)
  kv, intervals = (empty.k, empty.v), (empty.tin, empty.tout)
  vjps, total = [], 0.0
  for start, end in parts:
    arrays = jax.tree.map(jnp.asarray, _part_arrays(tree, start, end, width, scratch))
    fn = lambda p, c, a=arrays, s=start, e=end, i=intervals: part_fn(p, c, i, a, s, e)
    (loss, kv), vjp, intervals = jax.vjp(fn, params, kv, has_aux=True)
    vjps.append(vjp)
    total = total + loss
  grads = jax.tree.map(jnp.zeros_like, params)
  d_kv = jax.tree.map(jnp.zeros_like, kv)
  for vjp in reversed(vjps):
    g_params, d_kv = vjp((jnp.ones((), jnp.float32), d_kv))
    grads = jax.tree.map(jnp.add, grads, g_params)
  return total, grads
