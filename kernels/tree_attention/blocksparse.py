"""Block-sparse tree attention in plain XLA: only the visited key blocks are computed.

This is the fast path on CPU. The host-side layout (``layout.block_layout``, passed in
``AttentionMask.blocks``) lists, per query block, the key blocks that hold at least one visible
key. Padding every query block's list to the global maximum wastes ~30% on trees (a prompt block
needs one key block, a deep leaf block dozens), so the lists are cut into *chunks* of W key blocks
instead: the forward pass gathers every chunk's query block and W key blocks, computes all chunks
as one batched tile computation, and merges the partial softmax results of the chunks of each
query block with a segment max / segment sum (flash-decoding style). Padding is at most W-1 key
blocks per query block plus the capacity rounding of the chunk count.

The custom VJP keeps the same shape of work and needs no scatter over keys or queries of the size
of the attention: dQ is computed on the forward (query-major) chunks and summed per query block;
dK and dV on the transposed (key-major) chunks — per key block, the query blocks that see it — and
summed per key block. Rows with no visible key give 0 and zero gradient; statistics are float32.

Usage: ``tree_attention(q_bthd, k_bshd, v_bshd, mask)`` with
``mask.blocks = block_layout(tin, tout, block_q, block_k)`` built with the same block sizes
(default 64 x 64). With ``mask.blocks is None`` no sizes are known on the host, so it falls back to
the reference (every key block visited, same result).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from kernels.tree_attention import blockwise, reference
from kernels.tree_attention.layout import PAD_INTERVAL, BlockSizes, check_layout, num_blocks

LAYOUT_KEYS = ("kv_ids", "fwd_chunk_q", "fwd_chunk_kv", "bwd_chunk_kv", "bwd_chunk_q")


def tree_attention(q_bthd, k_bshd, v_bshd, mask, *, block_sizes: Optional[BlockSizes] = None):
  """Tree self-attention, [B, T, Hq, D] x [B, T, Hkv, D] -> [B, T, Hq, D] (dtype of q)."""
  block_sizes = block_sizes or BlockSizes()
  reference._check_inputs(q_bthd, k_bshd, v_bshd, mask)
  if mask.blocks is None:
    return reference.tree_attention(q_bthd, k_bshd, v_bshd, mask, block_k=block_sizes.block_k)
  b, t = mask.tin.shape
  check_layout(mask.blocks, b, t, block_sizes, LAYOUT_KEYS)
  chunks = tuple(jnp.asarray(mask.blocks[key], jnp.int32) for key in LAYOUT_KEYS[1:])
  return _attend(q_bthd, k_bshd, v_bshd, mask.tin.astype(jnp.int32),
                 mask.tout.astype(jnp.int32), chunks, block_sizes)


def _take(blocks, ids):
  """Per batch row: blocks [B, n, ...] indexed by ids [B, ...] -> [B, *ids.shape[1:], ...]."""
  return jax.vmap(lambda x, i: x[i])(blocks, ids)


def _segment(op, data, ids, num):
  """Per batch row: ``op`` (segment_sum / segment_max) of data [B, C, ...] by ids [B, C]."""
  return jax.vmap(lambda x, i: op(x, i, num_segments=num))(data, ids)


def _blocked(x, block, n, value=0, extra_block=False):
  """[B, T, ...] -> [B, n (+1), block, ...], padded with ``value`` (and one all-``value`` block)."""
  x = blockwise.pad_axis(x, 1, (n + int(extra_block)) * block, value)
  return x.reshape(x.shape[0], -1, block, *x.shape[2:])


def _merge_rows(x):
  """[B, C, W, blk, ...] -> [B, C, W * blk, ...]."""
  return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3], *x.shape[4:])


def _forward(q, k, v, tin, tout, chunks, block_sizes):
  fwd_q, fwd_kv, _, _ = chunks
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  nq, nk = num_blocks(t, bq), num_blocks(t, bk)
  scale = 1.0 / (d ** 0.5)
  # Key block nk is a dummy (zeros, intervals that nobody sees) for the padding slots of chunks.
  k_blocks = _blocked(k, bk, nk, extra_block=True)
  v_blocks = _blocked(v, bk, nk, extra_block=True)
  k_tin_blocks = _blocked(tin, bk, nk, PAD_INTERVAL, extra_block=True)
  k_tout_blocks = _blocked(tout, bk, nk, PAD_INTERVAL, extra_block=True)
  q_blocks = _blocked(blockwise.group_heads(q, hkv), bq, nq)  # [B, nq, bq, Hkv, G, D]
  q_tin_blocks = _blocked(tin, bq, nq, PAD_INTERVAL)

  q_c = _take(q_blocks, fwd_q)                      # [B, C, bq, Hkv, G, D]
  k_c = _merge_rows(_take(k_blocks, fwd_kv))        # [B, C, W*bk, Hkv, D]
  v_c = _merge_rows(_take(v_blocks, fwd_kv))
  vis = blockwise.tile_visible(_take(q_tin_blocks, fwd_q),
                               _merge_rows(_take(k_tin_blocks, fwd_kv)),
                               _merge_rows(_take(k_tout_blocks, fwd_kv)))
  m_c, l_c, acc_c = blockwise.tile_forward(q_c, k_c, v_c, vis, scale)  # [B, C, Hkv, G, bq(, D)]

  # Merge the chunks of each query block. Query blocks without chunks get max = -inf from the
  # empty segment; clamping to NEG keeps exp() finite, and their l = 0 gives output 0.
  m = jnp.maximum(_segment(jax.ops.segment_max, m_c, fwd_q, nq), blockwise.NEG)
  rescale = jnp.exp(m_c - _take(m, fwd_q))
  l = _segment(jax.ops.segment_sum, l_c * rescale, fwd_q, nq)
  acc = _segment(jax.ops.segment_sum, acc_c * rescale[..., None], fwd_q, nq)
  out, lse = blockwise.finalize(m, l, acc)  # [B, nq, Hkv, G, bq, D], [B, nq, Hkv, G, bq]
  out = jnp.moveaxis(out, 4, 2).reshape(b, nq * bq, hq, d)[:, :t].astype(q.dtype)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend(q, k, v, tin, tout, chunks, block_sizes):
  return _forward(q, k, v, tin, tout, chunks, block_sizes)[0]


def _attend_fwd(q, k, v, tin, tout, chunks, block_sizes):
  out, lse = _forward(q, k, v, tin, tout, chunks, block_sizes)
  return out, (q, k, v, tin, tout, chunks, out, lse)


def _attend_bwd(block_sizes, residuals, do):
  q, k, v, tin, tout, chunks, out, lse = residuals
  fwd_q, fwd_kv, bwd_kv, bwd_q = chunks
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  nq, nk = num_blocks(t, bq), num_blocks(t, bk)
  scale = 1.0 / (d ** 0.5)
  qg = blockwise.group_heads(q, hkv)
  dog = blockwise.group_heads(do, hkv)
  delta = blockwise.row_delta(blockwise.group_heads(out, hkv), dog)  # [B, T, Hkv, G]
  delta = jnp.moveaxis(_blocked(delta, bq, nq), 2, 4)  # [B, nq, Hkv, G, bq], like lse

  k_blocks = _blocked(k, bk, nk, extra_block=True)
  v_blocks = _blocked(v, bk, nk, extra_block=True)
  k_tin_blocks = _blocked(tin, bk, nk, PAD_INTERVAL, extra_block=True)
  k_tout_blocks = _blocked(tout, bk, nk, PAD_INTERVAL, extra_block=True)
  # Query block nq is a dummy for the padding slots of key-major chunks: it sees no key, and its
  # do = 0 and lse = +inf make its contribution exactly zero as well.
  q_blocks = _blocked(qg, bq, nq, extra_block=True)
  do_blocks = _blocked(dog, bq, nq, extra_block=True)
  q_tin_blocks = _blocked(tin, bq, nq, PAD_INTERVAL, extra_block=True)
  lse_blocks = jnp.concatenate([lse, jnp.full_like(lse[:, :1], jnp.inf)], axis=1)
  delta_blocks = jnp.concatenate([delta, jnp.zeros_like(delta[:, :1])], axis=1)

  # dQ on the query-major chunks, summed per query block.
  vis = blockwise.tile_visible(_take(q_tin_blocks, fwd_q),
                               _merge_rows(_take(k_tin_blocks, fwd_kv)),
                               _merge_rows(_take(k_tout_blocks, fwd_kv)))
  dq_c, _, _ = blockwise.tile_backward(
      _take(q_blocks, fwd_q), _merge_rows(_take(k_blocks, fwd_kv)),
      _merge_rows(_take(v_blocks, fwd_kv)), _take(do_blocks, fwd_q),
      _take(lse_blocks, fwd_q), _take(delta_blocks, fwd_q), vis, scale)
  dq = _segment(jax.ops.segment_sum, dq_c, fwd_q, nq)  # [B, nq, bq, Hkv, G, D]

  # dK, dV on the key-major chunks: per key block, W query blocks side by side.
  def query_rows(x):  # [B, Cb, W, ..., bq] -> [B, Cb, ..., W*bq] for lse / delta
    x = jnp.moveaxis(x, 2, -2)
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])

  vis = blockwise.tile_visible(_merge_rows(_take(q_tin_blocks, bwd_q)),
                               _take(k_tin_blocks, bwd_kv), _take(k_tout_blocks, bwd_kv))
  _, dk_c, dv_c = blockwise.tile_backward(
      _merge_rows(_take(q_blocks, bwd_q)), _take(k_blocks, bwd_kv), _take(v_blocks, bwd_kv),
      _merge_rows(_take(do_blocks, bwd_q)), query_rows(_take(lse_blocks, bwd_q)),
      query_rows(_take(delta_blocks, bwd_q)), vis, scale)
  dk = _segment(jax.ops.segment_sum, dk_c, bwd_kv, nk)  # [B, nk, bk, Hkv, D]
  dv = _segment(jax.ops.segment_sum, dv_c, bwd_kv, nk)

  def unblock(x, shape):
    return x.reshape(b, -1, *shape)[:, :t]

  return (unblock(dq, (hq, d)).astype(q.dtype), unblock(dk, (hkv, d)).astype(k.dtype),
          unblock(dv, (hkv, d)).astype(v.dtype), None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)
