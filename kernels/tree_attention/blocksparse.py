"""Block-sparse tree attention in plain XLA: only the visited key blocks are computed.

This is the fast path on CPU. The host-side layout (``layout.block_layout``, passed in
``AttentionMask.blocks``) lists, per query block, the key blocks that hold at least one visible
key. Padding every query block's list to the global maximum wastes ~30% on trees (a prompt block
needs one key block, a deep leaf block dozens), so the lists are cut into *chunks* of W key blocks
instead: the forward pass gathers every chunk's query block and W key blocks, computes the chunks
a few at a time (``chunks_per_step``, a sequential map: with all chunks at once the logits fall
out of cache and it runs several times slower), and merges the partial softmax results of the
chunks of each query block with a segment max / segment sum (flash-decoding style). Padding is at
most W-1 key blocks per query block plus the capacity rounding of the chunk count.

The custom VJP (flash-attention style: the forward saves the log-sum-exp) recomputes the same
chunks once and gets dQ, dK and dV from each; dQ is summed over the chunks of a query block, dK
and dV over the chunk slots holding a key block. These segment sums scatter whole [block, D]
tiles, so they cost a small fraction of the matmuls (a key-major second pass, as in the Pallas
kernels, would recompute the logits instead). Tiles are head-major, with the G query heads of a
kv head side by side in a tile (see ``blockwise``), so the matmuls need no transposing copies and
the token-level mask is computed once per chunk, not per head. Rows with no visible key give 0
and zero gradient; statistics are float32.

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

LAYOUT_KEYS = ("kv_ids", "fwd_chunk_q", "fwd_chunk_kv")
CHUNKS_PER_STEP = 2  # per step of the sequential map; measured: 1, 2, 4 alike, all at once 3x+ slower


def tree_attention(q_bthd, k_bshd, v_bshd, mask, *, block_sizes: Optional[BlockSizes] = None,
                   chunks_per_step: int = CHUNKS_PER_STEP):
  """Tree self-attention, [B, T, Hq, D] x [B, T, Hkv, D] -> [B, T, Hq, D] (dtype of q)."""
  block_sizes = block_sizes or BlockSizes()
  reference.check_inputs(q_bthd, k_bshd, v_bshd, mask)
  if mask.blocks is None:
    return reference.tree_attention(q_bthd, k_bshd, v_bshd, mask, block_k=block_sizes.block_k)
  b, t = mask.tin.shape
  check_layout(mask.blocks, b, t, block_sizes, LAYOUT_KEYS)
  chunks = tuple(jnp.asarray(mask.blocks[key], jnp.int32) for key in LAYOUT_KEYS[1:])
  return _attend(q_bthd, k_bshd, v_bshd, mask.tin.astype(jnp.int32),
                 mask.tout.astype(jnp.int32), chunks, (block_sizes, chunks_per_step))


def _take(x, ids):
  """Per row, blocks on axis 2: x [B, Hkv, n, ...], ids [B, C(, W)] -> [B, Hkv, C(, W), ...]."""
  return jax.vmap(lambda x_b, i_b: x_b[:, i_b])(x, ids)


def _take_intervals(x, ids):
  """Per row: x [B, n, block], ids [B, C, W] -> [B, C, W*block]; ids [B, C] -> [B, C, block]."""
  x = jax.vmap(lambda x_b, i_b: x_b[i_b])(x, ids)
  return x.reshape(*ids.shape[:2], -1)


def _segment_sum(data, ids, num):
  """Sums data [B, Hkv, C, ...] over chunks with equal ids (ids [B, C]) -> [B, Hkv, num, ...]."""
  per_head = jax.vmap(lambda x, i: jax.ops.segment_sum(x, i, num), in_axes=(0, None))
  return jax.vmap(per_head)(data, ids)


def _segment_max(data, ids, num):
  per_head = jax.vmap(lambda x, i: jax.ops.segment_max(x, i, num), in_axes=(0, None))
  return jax.vmap(per_head)(data, ids)


def _merge_w(x):
  """[B, Hkv, C, W, block, D] -> [B, Hkv, C, W*block, D] (free: adjacent dims)."""
  return x.reshape(*x.shape[:3], x.shape[3] * x.shape[4], x.shape[5])


class _Tiles:
  """Block-major, head-major views of the inputs, from which chunks are gathered."""

  def __init__(self, q, k, v, tin, tout, block_sizes):
    b, t = tin.shape
    hkv = k.shape[2]
    self.bq, self.bk = block_sizes.block_q, block_sizes.block_k
    self.nq, self.nk = num_blocks(t, self.bq), num_blocks(t, self.bk)
    self.hkv = hkv
    # Key block nk is a dummy (zeros, intervals that nobody sees) for the padding slots of chunks.
    self.k = blockwise.to_key_blocks(k, self.bk, self.nk + 1)  # [B, Hkv, nk+1, bk, D]
    self.v = blockwise.to_key_blocks(v, self.bk, self.nk + 1)
    kpad = lambda x: blockwise.pad_axis(x, 1, (self.nk + 1) * self.bk, PAD_INTERVAL)
    self.k_tin = kpad(tin).reshape(b, self.nk + 1, self.bk)
    self.k_tout = kpad(tout).reshape(b, self.nk + 1, self.bk)
    self.q = blockwise.to_query_blocks(q, hkv, self.bq)  # [B, Hkv, nq, G, bq, D]
    self.q_tin = blockwise.pad_axis(tin, 1, self.nq * self.bq, PAD_INTERVAL).reshape(
        b, self.nq, self.bq)

  def chunk(self, fwd_q, fwd_kv):
    """Gathered tiles of every chunk: q [B,Hkv,C,G,bq,D], k, v [B,Hkv,C,W*bk,D], intervals."""
    intervals = (_take_intervals(self.q_tin, fwd_q), _take_intervals(self.k_tin, fwd_kv),
                 _take_intervals(self.k_tout, fwd_kv))  # [B, C, bq], [B, C, W*bk] x 2
    return (_take(self.q, fwd_q), _merge_w(_take(self.k, fwd_kv)),
            _merge_w(_take(self.v, fwd_kv)), intervals)


def _map_chunks(fn, fwd_q, fwd_kv, chunks_per_step, dummy_kv):
  """``fn(fwd_q [B, S], fwd_kv [B, S, W]) -> arrays [B, Hkv, S, ...]`` over groups of S chunks.

  A sequential map keeps each step's tiles small enough to stay in cache (all chunks at once
  materialize logits of C x the tile size). Chunks added to fill the last group are harmless
  dummies (query block 0, dummy key blocks). Returns the results concatenated: [B, Hkv, C', ...].
  """
  b, c, w = fwd_kv.shape
  steps = -(-c // chunks_per_step)
  pad = steps * chunks_per_step - c
  if pad:
    fwd_q = jnp.pad(fwd_q, ((0, 0), (0, pad)))
    fwd_kv = jnp.pad(fwd_kv, ((0, 0), (0, pad), (0, 0)), constant_values=dummy_kv)
  grouped_q = jnp.moveaxis(fwd_q.reshape(b, steps, chunks_per_step), 1, 0)
  grouped_kv = jnp.moveaxis(fwd_kv.reshape(b, steps, chunks_per_step, w), 1, 0)
  out = jax.lax.map(lambda ids: fn(*ids), (grouped_q, grouped_kv))
  merge = lambda x: jnp.moveaxis(x, 0, 2).reshape(*x.shape[1:3], steps * chunks_per_step,
                                                  *x.shape[4:])
  return jax.tree.map(merge, out), fwd_q, fwd_kv


def _forward(q, k, v, tin, tout, chunks, config):
  fwd_q, fwd_kv = chunks
  block_sizes, chunks_per_step = config
  t, d = q.shape[1], q.shape[3]
  tiles = _Tiles(q, k, v, tin, tout, block_sizes)

  def partials(ids_q, ids_kv):
    q_c, k_c, v_c, intervals = tiles.chunk(ids_q, ids_kv)
    vis = blockwise.tile_visible(*intervals)[:, None, :, None]  # [B, 1, S, 1, bq, W*bk]
    return blockwise.tile_forward(q_c, k_c, v_c, vis, 1.0 / d ** 0.5)  # [B, Hkv, S, G, bq(, D)]

  (m_c, l_c, acc_c), fwd_q, _ = _map_chunks(partials, fwd_q, fwd_kv, chunks_per_step, tiles.nk)
  # Merge the chunks of each query block. Query blocks without chunks get max = -inf from the
  # empty segment; clamping to NEG keeps exp() finite, and their l = 0 gives output 0.
  m = jnp.maximum(_segment_max(m_c, fwd_q, tiles.nq), blockwise.NEG)  # [B, Hkv, nq, G, bq]
  rescale = jnp.exp(m_c - _take(m, fwd_q))
  l = _segment_sum(l_c * rescale, fwd_q, tiles.nq)
  acc = _segment_sum(acc_c * rescale[..., None], fwd_q, tiles.nq)
  out, lse = blockwise.finalize(m, l, acc)  # [B, Hkv, nq, G, bq, D], [B, Hkv, nq, G, bq]
  return blockwise.from_query_blocks(out, t).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend(q, k, v, tin, tout, chunks, config):
  return _forward(q, k, v, tin, tout, chunks, config)[0]


def _attend_fwd(q, k, v, tin, tout, chunks, config):
  out, lse = _forward(q, k, v, tin, tout, chunks, config)
  return out, (q, k, v, tin, tout, chunks, out, lse)


def _attend_bwd(config, residuals, do):
  q, k, v, tin, tout, chunks, out, lse = residuals
  fwd_q, fwd_kv = chunks
  block_sizes, chunks_per_step = config
  t, hkv, d = q.shape[1], k.shape[2], q.shape[3]
  tiles = _Tiles(q, k, v, tin, tout, block_sizes)
  do_blocks = blockwise.to_query_blocks(do, hkv, tiles.bq)
  delta = blockwise.to_query_blocks(blockwise.row_delta(out, do), hkv, tiles.bq)

  def gradients(ids_q, ids_kv):
    q_c, k_c, v_c, intervals = tiles.chunk(ids_q, ids_kv)
    vis_t = blockwise.tile_visible_t(*intervals)[:, None, :, :, None]  # [B, 1, S, W*bk, 1, bq]
    return blockwise.tile_backward(q_c, k_c, v_c, _take(do_blocks, ids_q), _take(lse, ids_q),
                                   _take(delta, ids_q), vis_t, 1.0 / d ** 0.5)

  (dq_c, dk_c, dv_c), fwd_q, fwd_kv = _map_chunks(gradients, fwd_q, fwd_kv, chunks_per_step,
                                                  tiles.nk)
  # dQ: sum over the chunks of each query block. dK, dV: sum over every chunk slot that holds the
  # key block; padding slots point at the dummy block nk, which is dropped.
  dq = _segment_sum(dq_c, fwd_q, tiles.nq)  # [B, Hkv, nq, G, bq, D]
  b, c, w = fwd_kv.shape
  slots = lambda x: x.reshape(b, hkv, c * w, tiles.bk, d)
  dk = _segment_sum(slots(dk_c), fwd_kv.reshape(b, c * w), tiles.nk + 1)[:, :, :tiles.nk]
  dv = _segment_sum(slots(dv_c), fwd_kv.reshape(b, c * w), tiles.nk + 1)[:, :, :tiles.nk]
  return (blockwise.from_query_blocks(dq, t).astype(q.dtype),
          blockwise.from_key_blocks(dk, t).astype(k.dtype),
          blockwise.from_key_blocks(dv, t).astype(v.dtype), None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)
