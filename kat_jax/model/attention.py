"""Attention behind one signature, with the implementation chosen by config name.

Every implementation computes ``softmax(q·kᵀ/√d + mask)·v`` where key ``k`` is visible to query ``q``
iff ``tin[k] <= tin[q] < tout[k]`` — DFS entry/exit numbers of a serialized trajectory tree. A packed
batch of flat sequences is the special case ``tin = index``, ``tout = end of the token's segment``
(see ``intervals_from_segment_ids``), so causal+segment masking, trees and padding share one rule.
Padding tokens get ``tout == tin``: nobody attends to them, and a query that may attend to no key
returns zeros (never NaN).

Implementations are looked up by name (``model.attention_impl`` in the config):

* ``xla``          dense masked attention in plain XLA (this module; the universal fallback),
* ``reference``    kernels.tree_attention reference (blockwise-materialized mask),
* ``blocksparse``  kernels.tree_attention plain-XLA path that skips invisible key blocks,
* ``pallas``       kernels.tree_attention Pallas kernel (TPU / GPU, interpret mode on CPU),

or by a ``"package.module:function"`` path, so a new kernel plugs in without editing the model.
An implementation has the signature ``fn(q_bthd, k_bshd, v_bshd, mask: AttentionMask) -> out_bthd``
(self-attention, S == T; GQA: the number of query heads is a multiple of the number of kv heads).
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

_NEG_INF = -1e30  # finite, so fully masked rows stay NaN-free before the explicit zeroing


@flax.struct.dataclass
class AttentionMask:
  """Visibility of keys to queries, as DFS intervals (int32 [B, T] each).

  ``blocks`` is an optional pytree of precomputed block metadata (for example per query block the
  key blocks it must visit) that block-skipping implementations may use; others ignore it.
  """
  tin: jax.Array
  tout: jax.Array
  blocks: Optional[dict] = None


AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, AttentionMask], jax.Array]

_BUILTIN = {
    "reference": "kernels.tree_attention.reference:tree_attention",
    "blocksparse": "kernels.tree_attention.blocksparse:tree_attention",
    "pallas": "kernels.tree_attention.pallas:tree_attention",
}


def intervals_from_segment_ids(segment_ids: jax.Array) -> AttentionMask:
  """Causal+segment masking of packed sequences as DFS intervals. Segment id 0 is padding.

  ``tin[i] = i`` and ``tout[i]`` = one past the last index of i's (contiguous) segment, so
  ``tin[k] <= tin[q] < tout[k]`` iff k <= q and both lie in the same segment.
  """
  b, t = segment_ids.shape
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  next_seg = jnp.concatenate([segment_ids[:, 1:], jnp.full((b, 1), -1, segment_ids.dtype)], axis=1)
  is_last = segment_ids != next_seg
  # End of segment: the first index j >= i that is a segment's last token, plus one.
  end = jnp.where(is_last, idx + 1, t + 1)
  end = jax.lax.cummin(end, axis=1, reverse=True)
  tout = jnp.where(segment_ids == 0, idx, end).astype(jnp.int32)
  return AttentionMask(tin=idx, tout=tout)


def visible(q_tin: jax.Array, k_tin: jax.Array, k_tout: jax.Array) -> jax.Array:
  """Boolean [B, T, S]: key s visible to query t."""
  q = q_tin[:, :, None]
  return (k_tin[:, None, :] <= q) & (q < k_tout[:, None, :])


def dense_attention_general(q, k, v, q_tin, k_tin, k_tout, kv_heads_major: bool = False):
  """Dense masked attention where queries and keys may differ (used with a KV cache).

  q: [B, T, Hq, D]; k, v: [B, S, Hkv, D], or [B, Hkv, S, D] with ``kv_heads_major`` (the KV
  cache's layout); q_tin: [B, T]; k_tin, k_tout: [B, S]. Softmax in float32; output in q's dtype.
  """
  b, t, hq, d = q.shape
  hkv = k.shape[1 if kv_heads_major else 2]
  kv = "bksd" if kv_heads_major else "bskd"
  if hq % hkv:
    raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
  g = hq // hkv
  qg = q.reshape(b, t, hkv, g, d)
  logits = jnp.einsum(f"btkgd,{kv}->bkgts", qg, k, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / jnp.sqrt(jnp.float32(d)))
  vis = visible(q_tin, k_tin, k_tout)[:, None, None, :, :]
  logits = jnp.where(vis, logits, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(vis, probs, 0.0)  # rows with no visible key -> exactly zero
  if kv_heads_major:
    # probs @ v as written: as ``->btkgd`` XLA:CPU takes v as the left operand, contracting a
    # non-minor dimension, on its slow generic dot (docs/PERFORMANCE.md, sampling vs Tunix).
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v).transpose(0, 3, 1, 2, 4)
  else:
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
  return out.reshape(b, t, hq, d).astype(q.dtype)


def dense_attention(q, k, v, mask: AttentionMask):
  """Self-attention with a dense [T, T] mask from intervals."""
  return dense_attention_general(q, k, v, mask.tin, mask.tin, mask.tout)


def get_attention_fn(name: str) -> AttentionFn:
  """Resolves ``xla``, a built-in kernel name, or a ``module:function`` path."""
  if name == "xla":
    return dense_attention
  path = _BUILTIN.get(name, name)
  if ":" not in path:
    raise ValueError(
        f"unknown attention implementation {name!r}: use one of "
        f"{['xla', *_BUILTIN]} or a 'package.module:function' path")
  module_name, fn_name = path.split(":", 1)
  module = importlib.import_module(module_name)
  return getattr(module, fn_name)
