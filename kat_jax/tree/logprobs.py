"""Per-trajectory log-probs and entropies from ONE forward pass over a serialized tree.

The model runs once over the tree's unique tokens (positions = depth, attention by DFS intervals), and
every prediction pair (row, label) of every trajectory is read off the logits — including the first
token of each branch, predicted from the parent's last row (one row, several labels). The result is
aligned with the trajectories, ``[B, K, L-1]``, exactly as a flat batch of K separate sequences would
give it after the usual shift; autodiff through the gather sums the contributions of shared rows.

``pairs_from_flat`` builds the same arrays from a flat batch (the degenerate tree), so one loss
reducer (``kat_jax.tree.losses``) serves both.

With ``logits_chunk > 0`` the [B, T, V] logits are never materialized: the output head runs on
``logits_chunk`` rows at a time inside a sequential map whose steps are rematerialized in the
backward pass, keeping only each row's log Z and entropy; a pair's label logit is the dot product of
its row's hidden state with the label's head weights, computed once per tree token (a token's
label logit comes from its parent row). Same values and gradients up to float rounding; memory
O(chunk × V) instead of O(T × V) — what a 152k vocabulary needs.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from kat_jax.model.attention import AttentionMask


def tree_mask(batch: dict) -> AttentionMask:
  return AttentionMask(tin=batch["tin"], tout=batch["tout"], blocks=batch.get("attention_blocks"))


def row_statistics(logits_btv: jax.Array):
  """log Z and entropy of the softmax at each row, float32 [B, T]."""
  logits = logits_btv.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  probs = jnp.exp(logits - log_z[..., None])
  entropy = log_z - jnp.sum(probs * logits, axis=-1)
  return log_z, entropy


def gather_pairs(logits_btv: jax.Array, rows_bkl: jax.Array, labels_bkl: jax.Array):
  """(log p(label | row), entropy at row), [B, K, L-1], without materializing [B, K, L, V]."""
  log_z, entropy = row_statistics(logits_btv)
  b = jnp.arange(logits_btv.shape[0])[:, None, None]
  label_logit = logits_btv[b, rows_bkl, labels_bkl].astype(jnp.float32)
  return label_logit - log_z[b, rows_bkl], entropy[b, rows_bkl]


def chunked_rows(fn: Callable, hidden_btd: jax.Array, chunk: int):
  """``fn(hidden [B, c, d]) -> tuple of [B, c] arrays`` applied ``chunk`` rows at a time in a
  sequential map whose steps are rematerialized in the backward pass (so only one chunk's
  [B, chunk, V] logits are ever live); returns the results as [B, T] arrays."""
  b, t, d = hidden_btd.shape
  n = -(-t // chunk)
  padded = jnp.pad(hidden_btd, ((0, 0), (0, n * chunk - t), (0, 0)))
  pieces = jnp.moveaxis(padded.reshape(b, n, chunk, d), 1, 0)          # [n, B, chunk, d]
  out = jax.lax.map(jax.checkpoint(fn), pieces)
  return tuple(jnp.moveaxis(x, 0, 1).reshape(b, n * chunk)[:, :t] for x in out)


def chunked_row_statistics(head_fn: Callable, hidden_btd: jax.Array, chunk: int):
  """``row_statistics(head_fn(hidden))`` — log Z, entropy [B, T] — ``chunk`` rows at a time."""
  return chunked_rows(lambda h: row_statistics(head_fn(h)), hidden_btd, chunk)


def _fused_pairs(apply_fn, params, hidden_btd, batch, chunk):
  """(logp, entropy [B, K, L-1], row entropy [B, T]) without [B, T, V] logits."""
  head = lambda h: apply_fn({"params": params}, h, method="output_head")
  log_z, row_entropy = chunked_row_statistics(head, hidden_btd, chunk)
  rows, label_rows = batch["pred_rows"], batch["pred_label_rows"]
  b_idx = jnp.arange(hidden_btd.shape[0])[:, None, None]
  # One label logit per tree token, from its parent's row (every pair predicting that token
  # shares it); roots and padding read row 0 and are never gathered by a valid pair.
  parent_hidden = jnp.take_along_axis(hidden_btd, jnp.maximum(batch["parent"], 0)[..., None],
                                      axis=1)
  label_logit_t = apply_fn({"params": params}, parent_hidden, batch["tokens"],
                           method="output_head")                              # [B, T]
  logp = label_logit_t[b_idx, label_rows] - log_z[b_idx, rows]
  return logp, row_entropy[b_idx, rows], row_entropy


def tree_logprobs(apply_fn: Callable, params, batch: dict, *, return_values: bool = False,
                  logits_chunk: int = 0):
  """Runs the model over the tree batch; returns a dict with ``logp``, ``entropy`` [B, K, L-1] and,
  with ``return_values``, the value head's prediction at each pair's row (``values``).
  ``logits_chunk > 0``: the fused path (module docstring), never materializing [B, T, V]."""
  if logits_chunk:
    out = apply_fn({"params": params}, batch["tokens"], batch["positions"], tree_mask(batch),
                   return_hidden=True, compute_logits=False)
    logp, entropy, row_entropy = _fused_pairs(apply_fn, params, out.hidden, batch, logits_chunk)
    result = {"logp": logp, "entropy": entropy, "row_entropy": row_entropy}
  else:
    out = apply_fn({"params": params}, batch["tokens"], batch["positions"], tree_mask(batch))
    logp, entropy = gather_pairs(out.logits, batch["pred_rows"], batch["pred_labels"])
    result = {"logp": logp, "entropy": entropy, "row_entropy": row_statistics(out.logits)[1]}
  if return_values and out.values is not None:
    b = jnp.arange(out.values.shape[0])[:, None, None]
    result["values"] = out.values[b, batch["pred_rows"]]
  return result


def pairs_from_flat(logits_ktv: jax.Array, tokens_kt: jax.Array):
  """The flat counterpart: K separate sequences -> (logp, entropy) [K, T-1] of token t+1 at row t."""
  log_z, entropy = row_statistics(logits_ktv[:, :-1])
  label_logit = jnp.take_along_axis(logits_ktv[:, :-1].astype(jnp.float32),
                                    tokens_kt[:, 1:, None], axis=-1)[..., 0]
  return label_logit - log_z, entropy


def batch_to_arrays(tree_batch, blocks: Optional[dict] = None) -> dict:
  """A ``kat_jax.tree.batch.TreeBatch`` as a flat dict of arrays (per-trajectory fields under
  ``field/<name>``) — the form the jitted train step takes."""
  import dataclasses
  out = {f.name: getattr(tree_batch, f.name) for f in dataclasses.fields(tree_batch)
         if f.name != "fields"}
  out.update({f"field/{k}": v for k, v in tree_batch.fields.items()})
  if blocks is not None:
    out["attention_blocks"] = blocks
  return out
