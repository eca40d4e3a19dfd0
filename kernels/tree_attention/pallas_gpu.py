"""Tree attention as a Pallas GPU kernel (Triton backend of JAX 0.10), with a flash-attention VJP.

Semantics as everywhere in this package: key k visible to query q iff ``tin[k] <= tin[q] <
tout[k]``, scale 1/sqrt(D), float32 softmax statistics, rows with no visible key -> 0.

How it works (one program per (query block, batch, query head), as in the stock
``jax.experimental.pallas.ops.gpu.attention``):

* The program keeps its query tile, entry numbers and running (max, sum, output) in registers and
  loops over its *visit list* — the key blocks that hold at least one key visible to some query of
  the block (``kv_ids[b, i, :kv_counts[b, i]]``, from ``layout.block_layout`` or, when
  ``mask.blocks is None``, from the per-block min/max bounds in the graph: a key block is skipped
  when all its keys start after the block's last query — in DFS order, the causal skip — or when
  all their subtrees ended before the block's first query — left sibling branches). The loop
  length is the count, so skipped blocks cost nothing.
* The mask is computed in the kernel from the interval vectors, ``(k_tin <= q_tin) & (q_tin <
  k_tout)``, like segment ids.
* Forward saves the log-sum-exp; the backward runs a dQ kernel over the same lists and a dK/dV
  kernel over the transposed lists (per key block, the query blocks that see it). dK/dV are
  computed per *query* head and summed over the G heads of each kv head outside the kernel (GQA),
  which keeps every program free of cross-program reductions.

Triton wants power-of-two tiles: block sizes and the head dim (padded here) must be powers of two,
>= 16 for tensor-core dots. Float32 inputs get Triton's default dot precision (TF32 on GPUs that
have it). On CPU run it with ``interpret=True``.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.tree_attention import blockwise, reference
from kernels.tree_attention.layout import PAD_INTERVAL, BlockSizes, mask_visit_lists, num_blocks
# The plain-XLA reference with the same signature, kept beside the kernel as in pallas/ops.
from kernels.tree_attention.reference import tree_attention as tree_attention_reference  # noqa

NEG = blockwise.NEG


def default_block_sizes() -> BlockSizes:
  return BlockSizes(block_q=64, block_k=64)


def tree_attention(q_bthd, k_bshd, v_bshd, mask, *, block_sizes: Optional[BlockSizes] = None,
                   interpret: bool = False, num_warps: int = 4, num_stages: int = 2):
  """Tree self-attention, [B, T, Hq, D] x [B, T, Hkv, D] -> [B, T, Hq, D] (dtype of q)."""
  block_sizes = block_sizes or default_block_sizes()
  reference.check_inputs(q_bthd, k_bshd, v_bshd, mask)
  kv_ids, kv_counts, q_ids, q_counts = mask_visit_lists(mask, block_sizes)
  # Triton refs like power-of-two shapes: pad the list width (entries past the count are unread)
  # and give each count a trailing axis of 1.
  pow2 = lambda ids: blockwise.pad_axis(ids, 2, pl.next_power_of_2(ids.shape[2]))
  lists = (pow2(kv_ids), kv_counts[..., None], pow2(q_ids), q_counts[..., None])
  params = (block_sizes, interpret, num_warps, num_stages)
  return _attend(q_bthd, k_bshd, v_bshd, mask.tin.astype(jnp.int32),
                 mask.tout.astype(jnp.int32), lists, params)


# ------------------------------------------------------------------------------------------------
# Kernels. Refs hold one (batch, head) slice: q [Tq, D] or one block of it, intervals [T] vectors.


def _visible(q_tin, k_tin, k_tout):
  return (k_tin[None, :] <= q_tin[:, None]) & (q_tin[:, None] < k_tout[None, :])


def _fwd_kernel(q_ref, k_ref, v_ref, q_tin_ref, k_tin_ref, k_tout_ref, ids_ref, count_ref,
                o_ref, lse_ref, *, scale, block_k):
  block_q, head_dim = q_ref.shape
  q = q_ref[...]
  q_tin = q_tin_ref[...]

  def visit(j, carry):
    m_prev, l_prev, acc_prev = carry
    keys = pl.ds(ids_ref[j] * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = plgpu.dot(q, k, trans_b=True) * scale  # [block_q, block_k] float32
    vis = _visible(q_tin, k_tin_ref[keys], k_tout_ref[keys])
    m_next = jnp.maximum(m_prev, jnp.max(jnp.where(vis, s, NEG), axis=1))
    p = jnp.where(vis, jnp.exp(s - m_next[:, None]), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    acc_next = alpha[:, None] * acc_prev + plgpu.dot(p.astype(v.dtype), v)
    return m_next, l_next, acc_next

  init = (jnp.full((block_q,), NEG, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros((block_q, head_dim), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, count_ref[0], visit, init)
  seen = l > 0  # a row that saw no key: output 0, lse +inf (so backward p = 0)
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_tin_ref, k_tin_ref, k_tout_ref,
               ids_ref, count_ref, dq_ref, *, scale, block_k):
  q, do = q_ref[...], do_ref[...]
  lse, delta, q_tin = lse_ref[...], delta_ref[...], q_tin_ref[...]

  def visit(j, dq):
    keys = pl.ds(ids_ref[j] * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    s = plgpu.dot(q, k, trans_b=True) * scale
    vis = _visible(q_tin, k_tin_ref[keys], k_tout_ref[keys])
    p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
    dp = plgpu.dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None]) * scale
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(0, count_ref[0], visit, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_tin_ref, k_tin_ref, k_tout_ref,
                ids_ref, count_ref, dk_ref, dv_ref, *, scale, block_q):
  k, v = k_ref[...], v_ref[...]
  k_tin, k_tout = k_tin_ref[...], k_tout_ref[...]

  def visit(j, carry):
    dk, dv = carry
    rows = pl.ds(ids_ref[j] * block_q, block_q)
    q, do = q_ref[rows, :], do_ref[rows, :]
    s = plgpu.dot(q, k, trans_b=True) * scale  # [block_q, block_k]
    vis = _visible(q_tin_ref[rows], k_tin, k_tout)
    p = jnp.where(vis, jnp.exp(s - lse_ref[rows][:, None]), 0.0)
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
    dp = plgpu.dot(do, v, trans_b=True)
    ds = p * (dp - delta_ref[rows][:, None]) * scale
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, count_ref[0], visit, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays stay [B, T, H, D] (padded in T and D); intervals [B, T].


def _compiler_params(params):
  _, _, num_warps, num_stages = params
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _forward(q, k, v, q_tin, k_tin, k_tout, lists, params, scale):
  kv_ids, kv_counts, _, _ = lists
  block_sizes, interpret = params[0], params[1]
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  nq = tq // bq
  group = hq // hkv
  q_block = pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0))
  kv_whole = pl.BlockSpec((None, tk, None, d), lambda i, bi, h: (bi, 0, h // group, 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, block_k=bk),
      grid=(nq, b, hq),
      in_specs=[
          q_block, kv_whole, kv_whole,
          pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i)),
          pl.BlockSpec((None, tk), lambda i, bi, h: (bi, 0)),
          pl.BlockSpec((None, tk), lambda i, bi, h: (bi, 0)),
          pl.BlockSpec((None, None, kv_ids.shape[2]), lambda i, bi, h: (bi, i, 0)),
          pl.BlockSpec((None, None, 1), lambda i, bi, h: (bi, i, 0)),
      ],
      out_specs=[q_block, pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, tq), jnp.float32)],
      compiler_params=_compiler_params(params),
      interpret=interpret,
      name="tree_attention_fwd",
  )(q, k, v, q_tin, k_tin, k_tout, kv_ids, kv_counts)


def _backward(q, k, v, q_tin, k_tin, k_tout, lists, out, lse, do, params, scale):
  kv_ids, kv_counts, q_ids, q_counts = lists
  block_sizes, interpret = params[0], params[1]
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  nq, nk = tq // bq, tk // bk
  group = hq // hkv
  delta = jnp.swapaxes(blockwise.row_delta(out, do), 1, 2)  # [B, Hq, Tq], like lse

  q_block = pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0))
  kv_whole = pl.BlockSpec((None, tk, None, d), lambda i, bi, h: (bi, 0, h // group, 0))
  row_block = pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_k=bk),
      grid=(nq, b, hq),
      in_specs=[
          q_block, kv_whole, kv_whole, q_block, row_block, row_block,
          pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i)),
          pl.BlockSpec((None, tk), lambda i, bi, h: (bi, 0)),
          pl.BlockSpec((None, tk), lambda i, bi, h: (bi, 0)),
          pl.BlockSpec((None, None, kv_ids.shape[2]), lambda i, bi, h: (bi, i, 0)),
          pl.BlockSpec((None, None, 1), lambda i, bi, h: (bi, i, 0)),
      ],
      out_specs=q_block,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(params),
      interpret=interpret,
      name="tree_attention_dq",
  )(q, k, v, do, lse, delta, q_tin, k_tin, k_tout, kv_ids, kv_counts)

  # dK/dV per query head h (its kv head is h // group), summed over the group below.
  q_whole = pl.BlockSpec((None, tq, None, d), lambda j, bi, h: (bi, 0, h, 0))
  kv_block = pl.BlockSpec((None, bk, None, d), lambda j, bi, h: (bi, j, h // group, 0))
  rows_whole = pl.BlockSpec((None, None, tq), lambda j, bi, h: (bi, h, 0))
  dkv_block = pl.BlockSpec((None, bk, None, d), lambda j, bi, h: (bi, j, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, block_q=bq),
      grid=(nk, b, hq),
      in_specs=[
          q_whole, kv_block, kv_block, q_whole, rows_whole, rows_whole,
          pl.BlockSpec((None, tq), lambda j, bi, h: (bi, 0)),
          pl.BlockSpec((None, bk), lambda j, bi, h: (bi, j)),
          pl.BlockSpec((None, bk), lambda j, bi, h: (bi, j)),
          pl.BlockSpec((None, None, q_ids.shape[2]), lambda j, bi, h: (bi, j, 0)),
          pl.BlockSpec((None, None, 1), lambda j, bi, h: (bi, j, 0)),
      ],
      out_specs=[dkv_block, dkv_block],
      out_shape=[jax.ShapeDtypeStruct((b, tk, hq, d), jnp.float32)] * 2,
      compiler_params=_compiler_params(params),
      interpret=interpret,
      name="tree_attention_dkv",
  )(q, k, v, do, lse, delta, q_tin, k_tin, k_tout, q_ids, q_counts)
  dk = dk.reshape(b, tk, hkv, group, d).sum(3)
  dv = dv.reshape(b, tk, hkv, group, d).sum(3)
  return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# Custom VJP in the model's layout ([B, T, H, D], unpadded).


def _prepare(q, k, v, tin, tout, block_sizes):
  t, d = q.shape[1], q.shape[3]
  tq = num_blocks(t, block_sizes.block_q) * block_sizes.block_q
  tk = num_blocks(t, block_sizes.block_k) * block_sizes.block_k
  d_pad = pl.next_power_of_2(d)  # zero columns change no dot product
  pad = lambda x, tp: blockwise.pad_axis(blockwise.pad_axis(x, 1, tp), 3, d_pad)
  return (pad(q, tq), pad(k, tk), pad(v, tk),
          blockwise.pad_axis(tin, 1, tq, PAD_INTERVAL),
          blockwise.pad_axis(tin, 1, tk, PAD_INTERVAL),
          blockwise.pad_axis(tout, 1, tk, PAD_INTERVAL))


def _unpad(x, t, d):
  return x[:, :t, :, :d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend(q, k, v, tin, tout, lists, params):
  return _attend_fwd(q, k, v, tin, tout, lists, params)[0]


def _attend_fwd(q, k, v, tin, tout, lists, params):
  t, d = q.shape[1], q.shape[3]
  qp, kp, vp, q_tin, k_tin, k_tout = _prepare(q, k, v, tin, tout, params[0])
  # The scale is 1/sqrt(D) of the unpadded head dim.
  out, lse = _forward(qp, kp, vp, q_tin, k_tin, k_tout, lists, params, 1.0 / d ** 0.5)
  return _unpad(out, t, d), (qp, kp, vp, q_tin, k_tin, k_tout, lists, out, lse)


def _attend_bwd(params, residuals, do):
  qp, kp, vp, q_tin, k_tin, k_tout, lists, out, lse = residuals
  t, d = do.shape[1], do.shape[3]
  dop = blockwise.pad_axis(blockwise.pad_axis(do, 1, qp.shape[1]), 3, qp.shape[3])
  dq, dk, dv = _backward(qp, kp, vp, q_tin, k_tin, k_tout, lists, out, lse, dop, params,
                         1.0 / d ** 0.5)
  return (_unpad(dq, t, d), _unpad(dk, t, d).astype(kp.dtype), _unpad(dv, t, d).astype(vp.dtype),
          None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)
