"""Per-trajectory log-probs and entropies from ONE forward pass over a serialized tree.

The model runs once over the tree's unique tokens (positions = depth, attention by DFS intervals), and
every prediction pair (row, label) of every trajectory is read off the logits — including the first
token of each branch, predicted from the parent's last row (one row, several labels). The result is
aligned with the trajectories, ``[B, K, L-1]``, exactly as a flat batch of K separate sequences would
give it after the usual shift; autodiff through the gather sums the contributions of shared rows.

``pairs_from_flat`` builds the same arrays from a flat batch (the degenerate tree), so one loss
reducer (``kat_jax.tree.losses``) serves both.
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


def tree_logprobs(apply_fn: Callable, params, batch: dict, *, return_values: bool = False):
  """Runs the model over the tree batch; returns a dict with ``logp``, ``entropy`` [B, K, L-1] and,
  with ``return_values``, the value head's prediction at each pair's row (``values``)."""
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
