"""Reference tree attention in plain XLA: a scan over key blocks with the mask built per block.

Same semantics as every other implementation (see ``kat_jax.model.attention``): key k is visible
to query q iff ``tin[k] <= tin[q] < tout[k]``; rows with no visible key return exactly 0 with zero
gradient; scale 1/sqrt(D); softmax statistics in float32; GQA by grouping query heads.

It never materializes the [T, T] mask: the forward pass scans key blocks of ``block_k`` tokens
with an online softmax (memory O(T · block_k) per head), and a custom VJP re-scans them in the
backward pass from the saved log-sum-exp (flash-attention style), so the gradient is O(T · block_k)
in memory too. Every key block is visited — this is the correctness yardstick, not the fast path.

Usage: ``tree_attention(q_bthd, k_bshd, v_bshd, mask)``; ``mask.blocks`` is ignored.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.tree_attention import blockwise
from kernels.tree_attention.layout import DEFAULT_BLOCK, PAD_INTERVAL, num_blocks


def tree_attention(q_bthd, k_bshd, v_bshd, mask, *, block_k: int = DEFAULT_BLOCK):
  """Tree self-attention, [B, T, Hq, D] x [B, T, Hkv, D] -> [B, T, Hq, D] (dtype of q)."""
  check_inputs(q_bthd, k_bshd, v_bshd, mask)
  return _attend(q_bthd, k_bshd, v_bshd, mask.tin.astype(jnp.int32),
                 mask.tout.astype(jnp.int32), block_k)


def check_inputs(q, k, v, mask):
  """Raises a ValueError naming the offending shape unless the inputs fit the signature."""
  b, t, hq, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
    raise ValueError(f"self-attention needs k, v of shape [B={b}, T={t}, Hkv, D={d}]; "
                     f"got k {k.shape}, v {v.shape}")
  if hq % k.shape[2]:
    raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[2]})")
  if mask.tin.shape != (b, t) or mask.tout.shape != (b, t):
    raise ValueError(f"mask.tin / mask.tout must be [B={b}, T={t}]; "
                     f"got {mask.tin.shape}, {mask.tout.shape}")


def _key_blocks(k, v, tin, tout, block_k):
  """Keys padded to whole blocks, stacked block-major for the scan: [nk, B, Hkv, block_k, D]."""
  nk = num_blocks(tin.shape[1], block_k)
  to_scan = lambda x: jnp.moveaxis(x, 2, 0)
  k_tin = blockwise.pad_axis(tin, 1, nk * block_k, PAD_INTERVAL).reshape(-1, nk, block_k)
  k_tout = blockwise.pad_axis(tout, 1, nk * block_k, PAD_INTERVAL).reshape(-1, nk, block_k)
  return (to_scan(blockwise.to_key_blocks(k, block_k, nk)),
          to_scan(blockwise.to_key_blocks(v, block_k, nk)),
          jnp.moveaxis(k_tin, 1, 0), jnp.moveaxis(k_tout, 1, 0))


def _forward(q, k, v, tin, tout, block_k):
  t, hkv, d = q.shape[1], k.shape[2], q.shape[3]
  scale = 1.0 / (d ** 0.5)
  q_heads = blockwise.to_query_blocks(q, hkv, t)[:, :, 0]  # [B, Hkv, G, T, D]
  k_blocks, v_blocks, tin_blocks, tout_blocks = _key_blocks(k, v, tin, tout, block_k)

  def step(carry, block):
    k_j, v_j, tin_j, tout_j = block
    vis = blockwise.tile_visible(tin, tin_j, tout_j)[:, None, None]  # [B, 1, 1, T, block_k]
    return blockwise.merge(carry, blockwise.tile_forward(q_heads, k_j, v_j, vis, scale)), None

  init = blockwise.empty_partial(q_heads.shape[:4], d)
  partial, _ = jax.lax.scan(step, init, (k_blocks, v_blocks, tin_blocks, tout_blocks))
  out, lse = blockwise.finalize(*partial)  # [B, Hkv, G, T, D], [B, Hkv, G, T]
  return blockwise.from_query_blocks(out[:, :, None], t).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, tin, tout, block_k):
  return _forward(q, k, v, tin, tout, block_k)[0]


def _attend_fwd(q, k, v, tin, tout, block_k):
  out, lse = _forward(q, k, v, tin, tout, block_k)
  return out, (q, k, v, tin, tout, out, lse)


def _attend_bwd(block_k, residuals, do):
  q, k, v, tin, tout, out, lse = residuals
  t, hkv, d = q.shape[1], k.shape[2], q.shape[3]
  scale = 1.0 / (d ** 0.5)
  heads = lambda x: blockwise.to_query_blocks(x, hkv, t)[:, :, 0]
  q_heads, do_heads = heads(q), heads(do)
  delta = heads(blockwise.row_delta(out, do))  # [B, Hkv, G, T]
  k_blocks, v_blocks, tin_blocks, tout_blocks = _key_blocks(k, v, tin, tout, block_k)

  def step(dq, block):
    k_j, v_j, tin_j, tout_j = block
    vis_t = blockwise.tile_visible_t(tin, tin_j, tout_j)[:, None, :, None]  # [B,1,block_k,1,T]
    dq_j, dk_j, dv_j = blockwise.tile_backward(q_heads, k_j, v_j, do_heads, lse, delta, vis_t,
                                               scale)
    return dq + dq_j, (dk_j, dv_j)

  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q_heads.shape, jnp.float32),
                              (k_blocks, v_blocks, tin_blocks, tout_blocks))
  unscan = lambda x: blockwise.from_key_blocks(jnp.moveaxis(x, 0, 2), t)
  return (blockwise.from_query_blocks(dq[:, :, None], t).astype(q.dtype),
          unscan(dk).astype(k.dtype), unscan(dv).astype(v.dtype), None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)
