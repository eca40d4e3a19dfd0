"""Tree attention as a Pallas TPU kernel (Mosaic), with a flash-attention custom VJP.

Semantics as everywhere in this package: key k visible to query q iff ``tin[k] <= tin[q] <
tout[k]``, scale 1/sqrt(D), float32 softmax statistics, rows with no visible key -> 0.

How it works:

* The mask is computed *in the kernel* from the interval arrays, like segment ids in the stock
  flash attention: query entry numbers come in lane-broadcast as a [block_q, 128] tile, key entry
  and exit numbers as [8, block_k] sublane-broadcast tiles, and ``vis = (k_tin <= q_tin) & (q_tin <
  k_tout)`` is one compare per logit.
* Block skipping uses *visit lists* passed as scalar prefetch (SMEM): per query block, the key
  blocks that hold a visible key (``kv_ids`` / ``kv_counts``), and per key block the query blocks
  that see it (``q_ids`` / ``q_counts``, for dK/dV). The grid's last axis walks the list: step j
  loads key block ``kv_ids[b, i, j]`` and computes only while ``j < kv_counts[b, i]``. Past the
  count the list repeats its last id, so the pipeline issues no new DMA and the step costs only
  the grid overhead. The lists come from ``layout.block_layout`` (exact, host side) or, when
  ``mask.blocks is None``, from ``layout.block_mask_from_bounds`` in the graph (per-block min/max:
  a key block is skipped if all its keys start after the last query of the block — in DFS order
  that is the causal skip — or if all their subtrees ended before the block's first query —
  left sibling branches; see that function).
* Forward saves the log-sum-exp (lane-broadcast [T, 128], as the stock kernel does); backward
  runs a dQ kernel over the query-major lists and a dK/dV kernel over the key-major lists, whose
  grid also walks the G query heads of a kv head (GQA) as a reduction axis.

``tree_attention(q, k, v, mask, block_sizes=..., interpret=...)``; the Mosaic compiler wants
block_k a multiple of 128 (block_k < 128 is accepted for interpret mode) and block_q a multiple
of 8. On CPU use ``interpret=True`` (the HLO interpreter; what ``pallas.tree_attention`` does)
or ``interpret=pltpu.InterpretParams()`` (the TPU-faithful simulator: about ten times slower, but
it poisons uninitialized memory and checks bounds).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.tree_attention import blockwise, reference
from kernels.tree_attention.layout import (PAD_INTERVAL, BlockSizes, mask_visit_lists,
                                           num_blocks)
# The plain-XLA reference with the same signature, kept beside the kernel as in pallas/ops.
from kernels.tree_attention.reference import tree_attention as tree_attention_reference  # noqa

LANES = 128
SUBLANES = 8
NEG = blockwise.NEG
_TRANS_B = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T


def default_block_sizes() -> BlockSizes:
  return BlockSizes(block_q=128, block_k=128)


def tree_attention(q_bthd, k_bshd, v_bshd, mask, *, block_sizes: Optional[BlockSizes] = None,
                   interpret: Any = False):
  """Tree self-attention, [B, T, Hq, D] x [B, T, Hkv, D] -> [B, T, Hq, D] (dtype of q)."""
  block_sizes = block_sizes or default_block_sizes()
  reference.check_inputs(q_bthd, k_bshd, v_bshd, mask)
  lists = mask_visit_lists(mask, block_sizes)
  return _attend(q_bthd, k_bshd, v_bshd, mask.tin.astype(jnp.int32),
                 mask.tout.astype(jnp.int32), lists, block_sizes, interpret)


# ------------------------------------------------------------------------------------------------
# In-kernel helpers.


def _lanes(x, n):
  """A lane-broadcast [rows, 128] tile as [rows, n] (n a multiple of 128, or n < 128)."""
  if n == LANES:
    return x
  if n % LANES == 0:
    return jnp.tile(x, (1, n // LANES))
  if n < LANES:
    return x[:, :n]
  raise NotImplementedError(f"size {n} must be < 128 or a multiple of 128")


def _visible(q_tin_ref, k_tin_ref, k_tout_ref, block_k):
  q_tin = _lanes(q_tin_ref[...], block_k)  # [block_q, block_k], every column the same
  k_tin = k_tin_ref[:1, :]                 # [1, block_k]
  k_tout = k_tout_ref[:1, :]
  return (k_tin <= q_tin) & (q_tin < k_tout)


def _fwd_kernel(kv_ids_ref, kv_counts_ref,  # scalar prefetch
                q_ref, k_ref, v_ref, q_tin_ref, k_tin_ref, k_tout_ref,  # inputs
                o_ref, lse_ref,  # outputs
                m_scr, l_scr, acc_scr,  # scratch
                *, scale, num_q_blocks, num_visits):
  del kv_ids_ref  # used by the index maps only
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  block_k, head_dim = k_ref.shape

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, NEG, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  # Only the first kv_counts[b, i] steps hold a key block that this query block may attend.
  @pl.when(j < kv_counts_ref[b * num_q_blocks + i])
  def _visit():
    s = lax.dot_general(q_ref[...], k_ref[...], _TRANS_B,
                        preferred_element_type=jnp.float32) * scale  # [block_q, block_k]
    vis = _visible(q_tin_ref, k_tin_ref, k_tout_ref, block_k)
    m_prev = m_scr[...]  # [block_q, 128]
    m_next = jnp.maximum(m_prev, jnp.max(jnp.where(vis, s, NEG), axis=1, keepdims=True))
    p = jnp.where(vis, jnp.exp(s - _lanes(m_next, block_k)), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_next
    v = v_ref[...]
    acc_scr[...] = acc_scr[...] * _lanes(alpha, head_dim) + lax.dot(
        p.astype(v.dtype), v, preferred_element_type=jnp.float32)

  @pl.when(j == num_visits - 1)
  def _store():
    l = l_scr[...]
    seen = l > 0  # a row that saw no key: output 0, lse +inf (so backward p = 0)
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_scr[...] / _lanes(l_safe, head_dim)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(l_safe), jnp.inf)


def _dq_kernel(kv_ids_ref, kv_counts_ref,
               q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_tin_ref, k_tin_ref, k_tout_ref,
               dq_ref, dq_scr, *, scale, num_q_blocks, num_visits):
  del kv_ids_ref
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  block_k = k_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when(j < kv_counts_ref[b * num_q_blocks + i])
  def _visit():
    k = k_ref[...]
    s = lax.dot_general(q_ref[...], k, _TRANS_B, preferred_element_type=jnp.float32) * scale
    vis = _visible(q_tin_ref, k_tin_ref, k_tout_ref, block_k)
    p = jnp.where(vis, jnp.exp(s - _lanes(lse_ref[...], block_k)), 0.0)
    dp = lax.dot_general(do_ref[...], v_ref[...], _TRANS_B, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(delta_ref[...], block_k)) * scale
    dq_scr[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(j == num_visits - 1)
  def _store():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(q_ids_ref, q_counts_ref,
                q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_tin_ref, k_tin_ref, k_tout_ref,
                dk_ref, dv_ref, dk_scr, dv_scr, *, scale, num_k_blocks, num_visits, group):
  del q_ids_ref
  b, kj, g, j = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  block_k = k_ref.shape[0]

  @pl.when((g == 0) & (j == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  # Step j visits the j-th query block that sees key block kj, for query head g of the group.
  @pl.when(j < q_counts_ref[b * num_k_blocks + kj])
  def _visit():
    q, do = q_ref[...], do_ref[...]
    s = lax.dot_general(q, k_ref[...], _TRANS_B, preferred_element_type=jnp.float32) * scale
    vis = _visible(q_tin_ref, k_tin_ref, k_tout_ref, block_k)
    p = jnp.where(vis, jnp.exp(s - _lanes(lse_ref[...], block_k)), 0.0)  # [block_q, block_k]
    dv_scr[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v_ref[...], _TRANS_B, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(delta_ref[...], block_k)) * scale
    dk_scr[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

  @pl.when((g == group - 1) & (j == num_visits - 1))
  def _store():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays are head-major inside: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D].


def _interval_tiles(tin, tout, tq_pad, tk_pad):
  """q_tin lane-broadcast [B, Tq, 128]; k_tin, k_tout sublane-broadcast [B, 8, Tk]."""
  b = tin.shape[0]
  q_tin = blockwise.pad_axis(tin, 1, tq_pad, PAD_INTERVAL)
  k_tin = blockwise.pad_axis(tin, 1, tk_pad, PAD_INTERVAL)
  k_tout = blockwise.pad_axis(tout, 1, tk_pad, PAD_INTERVAL)
  return (jnp.broadcast_to(q_tin[:, :, None], (b, tq_pad, LANES)),
          jnp.broadcast_to(k_tin[:, None, :], (b, SUBLANES, tk_pad)),
          jnp.broadcast_to(k_tout[:, None, :], (b, SUBLANES, tk_pad)))


def _forward(q, k, v, tin, tout, lists, block_sizes, interpret):
  """q [B, Hq, Tq, D] etc. (padded, head-major) -> out [B, Hq, Tq, D], lse [B, Hq, Tq, 128]."""
  kv_ids, kv_counts, _, _ = lists
  b, hq, tq, d = q.shape
  hkv, tk = k.shape[1], k.shape[2]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  nq, nk = tq // bq, tk // bk
  group = hq // hkv
  q_tin, k_tin, k_tout = _interval_tiles(tin, tout, tq, tk)

  def kv_map(bi, h, i, j, ids, counts):
    return bi, h // group, ids[(bi * nq + i) * nk + j], 0

  def k_interval_map(bi, h, i, j, ids, counts):
    return bi, 0, ids[(bi * nq + i) * nk + j]

  q_map = lambda bi, h, i, j, ids, counts: (bi, h, i, 0)
  kernel = functools.partial(_fwd_kernel, scale=1.0 / d ** 0.5, num_q_blocks=nq, num_visits=nk)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, hq, nq, nk),
          in_specs=[
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, bq, LANES), lambda bi, h, i, j, ids, counts: (bi, i, 0)),
              pl.BlockSpec((None, SUBLANES, bk), k_interval_map),
              pl.BlockSpec((None, SUBLANES, bk), k_interval_map),
          ],
          out_specs=[pl.BlockSpec((None, None, bq, d), q_map),
                     pl.BlockSpec((None, None, bq, LANES), q_map)],
          scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, d), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, tq, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="tree_attention_fwd",
  )(kv_ids.reshape(-1), kv_counts.reshape(-1), q, k, v, q_tin, k_tin, k_tout)


def _backward(q, k, v, tin, tout, lists, out, lse, do, block_sizes, interpret):
  kv_ids, kv_counts, q_ids, q_counts = lists
  b, hq, tq, d = q.shape
  hkv, tk = k.shape[1], k.shape[2]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  nq, nk = tq // bq, tk // bk
  group = hq // hkv
  scale = 1.0 / d ** 0.5
  q_tin, k_tin, k_tout = _interval_tiles(tin, tout, tq, tk)
  delta = blockwise.row_delta(out, do)  # [B, Hq, Tq]
  delta = jnp.broadcast_to(delta[..., None], (*delta.shape, LANES))

  # dQ: the forward's query-major walk.
  def kv_map(bi, h, i, j, ids, counts):
    return bi, h // group, ids[(bi * nq + i) * nk + j], 0

  def k_interval_map(bi, h, i, j, ids, counts):
    return bi, 0, ids[(bi * nq + i) * nk + j]

  q_map = lambda bi, h, i, j, ids, counts: (bi, h, i, 0)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, num_q_blocks=nq, num_visits=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, hq, nq, nk),
          in_specs=[
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bq, LANES), q_map),
              pl.BlockSpec((None, None, bq, LANES), q_map),
              pl.BlockSpec((None, bq, LANES), lambda bi, h, i, j, ids, counts: (bi, i, 0)),
              pl.BlockSpec((None, SUBLANES, bk), k_interval_map),
              pl.BlockSpec((None, SUBLANES, bk), k_interval_map),
          ],
          out_specs=pl.BlockSpec((None, None, bq, d), q_map),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="tree_attention_dq",
  )(kv_ids.reshape(-1), kv_counts.reshape(-1), q, k, v, do, lse, delta, q_tin, k_tin, k_tout)

  # dK, dV: per key block, walk the G query heads of its kv head and the query blocks that see it.
  def q_side_map(bi, h, kj, g, j, ids, counts):
    return bi, h * group + g, ids[(bi * nk + kj) * nq + j], 0

  def q_interval_map(bi, h, kj, g, j, ids, counts):
    return bi, ids[(bi * nk + kj) * nq + j], 0

  kv_map = lambda bi, h, kj, g, j, ids, counts: (bi, h, kj, 0)
  k_interval_map = lambda bi, h, kj, g, j, ids, counts: (bi, 0, kj)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, num_k_blocks=nk, num_visits=nq, group=group),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, hkv, nk, group, nq),
          in_specs=[
              pl.BlockSpec((None, None, bq, d), q_side_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bq, d), q_side_map),
              pl.BlockSpec((None, None, bq, LANES), q_side_map),
              pl.BlockSpec((None, None, bq, LANES), q_side_map),
              pl.BlockSpec((None, bq, LANES), q_interval_map),
              pl.BlockSpec((None, SUBLANES, bk), k_interval_map),
              pl.BlockSpec((None, SUBLANES, bk), k_interval_map),
          ],
          out_specs=[pl.BlockSpec((None, None, bk, d), kv_map),
                     pl.BlockSpec((None, None, bk, d), kv_map)],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="tree_attention_dkv",
  )(q_ids.reshape(-1), q_counts.reshape(-1), q, k, v, do, lse, delta, q_tin, k_tin, k_tout)
  return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# Custom VJP in the model's layout ([B, T, H, D], unpadded).


def _to_kernel_layout(x, t_pad):
  return jnp.swapaxes(blockwise.pad_axis(x, 1, t_pad), 1, 2)


def _from_kernel_layout(x, t):
  return jnp.swapaxes(x, 1, 2)[:, :t]


def _padded_lengths(t, block_sizes):
  return (num_blocks(t, block_sizes.block_q) * block_sizes.block_q,
          num_blocks(t, block_sizes.block_k) * block_sizes.block_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attend(q, k, v, tin, tout, lists, block_sizes, interpret):
  return _attend_fwd(q, k, v, tin, tout, lists, block_sizes, interpret)[0]


def _attend_fwd(q, k, v, tin, tout, lists, block_sizes, interpret):
  t = q.shape[1]
  tq, tk = _padded_lengths(t, block_sizes)
  qh, kh, vh = _to_kernel_layout(q, tq), _to_kernel_layout(k, tk), _to_kernel_layout(v, tk)
  out, lse = _forward(qh, kh, vh, tin, tout, lists, block_sizes, interpret)
  return _from_kernel_layout(out, t), (qh, kh, vh, tin, tout, lists, out, lse)


def _attend_bwd(block_sizes, interpret, residuals, do):
  qh, kh, vh, tin, tout, lists, out, lse = residuals
  t = do.shape[1]
  doh = _to_kernel_layout(do, qh.shape[2])
  dq, dk, dv = _backward(qh, kh, vh, tin, tout, lists, out, lse, doh, block_sizes, interpret)
  return (_from_kernel_layout(dq, t), _from_kernel_layout(dk, t), _from_kernel_layout(dv, t),
          None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)
