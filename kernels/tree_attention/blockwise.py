"""Flash-attention math on one (query tile, key tile) pair, in plain jnp, shared by the XLA paths.

The reference (scan over key blocks) and the block-sparse path (all visited chunks at once) both
cut attention into tiles and combine them with the online-softmax rule; this module holds that
math once.

Layout: a tile is ``q [..., R, D]`` (R query rows: the G query heads of one kv head times the
query tokens, so GQA needs no broadcast of keys) against ``k, v [..., K, D]``, with the same
leading dims ``...`` (batch, kv head, chunk). In this head-major layout every dot_general has its
batch dims leading and its contraction last, so XLA on CPU runs them without transposing copies.
``vis`` is a bool mask broadcastable to [..., R, K]; softmax statistics are [..., R] float32.

A tile's partial result is ``(m, l, acc)``: running max, sum of exp and unnormalized output, all
float32. Masked logits are replaced by ``NEG`` before the max, so ``exp(NEG - m)`` is exactly 0
for every row that sees a key; a row that sees none keeps ``m = NEG`` and is given ``l = 0``
explicitly, hence output 0 and zero gradient (``lse = +inf``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity": exp(NEG - m) == 0 for any real m, and NEG - NEG == 0


def tile_visible(q_tin: jax.Array, k_tin: jax.Array, k_tout: jax.Array) -> jax.Array:
  """bool [..., Tq, Tk]: ``k_tin <= q_tin < k_tout`` (intervals [..., Tq] and [..., Tk])."""
  q = q_tin[..., :, None]
  return (k_tin[..., None, :] <= q) & (q < k_tout[..., None, :])


def rows_visible(vis: jax.Array, group: int) -> jax.Array:
  """Token mask [B, ..., Tq, Tk] -> row mask [B, 1, ..., G*Tq, Tk] (rows are (head in group, token)).

  The inserted 1 broadcasts over the kv-head axis of the head-major tiles.
  """
  *lead, tq, tk = vis.shape
  vis = jnp.broadcast_to(vis[..., None, :, :], (*lead, group, tq, tk))
  return vis.reshape(lead[0], 1, *lead[1:], group * tq, tk)


def _masked_logits(q, k, vis, scale):
  s = jnp.einsum("...rd,...kd->...rk", q, k, preferred_element_type=jnp.float32)
  return jnp.where(vis, s * scale, NEG)


def tile_forward(q, k, v, vis, scale):
  """Partial softmax of one tile: (m, l [..., R], acc [..., R, D]) float32."""
  s = _masked_logits(q, k, vis, scale)
  m = jnp.max(s, axis=-1)
  seen = m > NEG / 2  # the row has a visible key in this tile
  p = jnp.exp(s - jnp.where(seen, m, 0.0)[..., None])  # masked entries: exp(NEG - m) = 0
  l = jnp.sum(p, axis=-1)
  acc = jnp.einsum("...rk,...kd->...rd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return m, l, acc


def empty_partial(shape_m, head_dim):
  """The neutral partial result for ``merge`` (no key seen yet)."""
  return (jnp.full(shape_m, NEG, jnp.float32), jnp.zeros(shape_m, jnp.float32),
          jnp.zeros((*shape_m, head_dim), jnp.float32))


def merge(a, b):
  """Combines two partial results of the same query rows (online-softmax rescaling)."""
  m_a, l_a, acc_a = a
  m_b, l_b, acc_b = b
  m = jnp.maximum(m_a, m_b)
  alpha, beta = jnp.exp(m_a - m), jnp.exp(m_b - m)
  return m, alpha * l_a + beta * l_b, alpha[..., None] * acc_a + beta[..., None] * acc_b


def finalize(m, l, acc):
  """(out [..., R, D], lse [..., R]) float32; rows with l == 0 give out 0 and lse = +inf.

  ``lse = +inf`` makes every ``exp(s - lse)`` of such a row exactly 0 in the backward pass.
  """
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  return acc / l_safe[..., None], jnp.where(seen, m + jnp.log(l_safe), jnp.inf)


def row_delta(out, do):
  """``sum_d out * do`` per query row, float32 (the softmax-backward correction term)."""
  return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)


def tile_backward(q, k, v, do, lse, delta, vis, scale):
  """Gradient pieces of one tile: (dq [..., R, D], dk, dv [..., K, D]) float32.

  ``lse`` and ``delta`` are [..., R]; ``do`` is laid out like ``q``; ``vis`` as in tile_forward.
  """
  # The tile is worked on transposed, [..., K, R]: dK = dSᵀ·Q and dV = Pᵀ·dO are then matmuls
  # with the contraction on the last axis of the left operand, XLA:CPU's fast path; only dQ
  # contracts the other way (measured faster than transposing dS explicitly, or than the row
  # orientation where two of the three products contract the other way).
  s_t = jnp.einsum("...kd,...rd->...kr", k, q, preferred_element_type=jnp.float32)
  s_t = jnp.where(jnp.swapaxes(vis, -1, -2), s_t * scale, NEG)
  p_t = jnp.exp(s_t - lse[..., None, :])  # masked: exp(NEG - lse) = 0; empty rows: lse = +inf
  dp_t = jnp.einsum("...kd,...rd->...kr", v, do, preferred_element_type=jnp.float32)
  ds_t = p_t * (dp_t - delta[..., None, :]) * scale
  dv = jnp.einsum("...kr,...rd->...kd", p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
  dk = jnp.einsum("...kr,...rd->...kd", ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)
  dq = jnp.einsum("...kr,...kd->...rd", ds_t.astype(k.dtype), k, preferred_element_type=jnp.float32)
  return dq, dk, dv


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """Pads ``axis`` of ``x`` at the end up to ``size``."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def to_rows(x_bthd: jax.Array, num_kv_heads: int, block: int) -> jax.Array:
  """[B, T, Hq, D] -> [B, Hkv, n, G*block, D]: head-major query rows per block of tokens (padded).

  Row r of block i is query head ``kv_head * G + r // block`` at token ``i * block + r % block``.
  Works for any trailing shape after Hq (e.g. [B, T, Hq] -> [B, Hkv, n, G*block]).
  """
  b, t, hq = x_bthd.shape[:3]
  rest = x_bthd.shape[3:]
  if hq % num_kv_heads:
    raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({num_kv_heads})")
  g = hq // num_kv_heads
  n = -(-t // block)
  x = pad_axis(x_bthd, 1, n * block).reshape(b, n, block, num_kv_heads, g, *rest)
  x = jnp.moveaxis(x, (3, 4), (1, 3))  # [B, Hkv, n, G, block, ...]
  return x.reshape(b, num_kv_heads, n, g * block, *rest)


def from_rows(x: jax.Array, t: int, group: int) -> jax.Array:
  """Inverse of ``to_rows``: [B, Hkv, n, G*block, ...] -> [B, T, Hq, ...]."""
  b, hkv, n, rows = x.shape[:4]
  rest = x.shape[4:]
  block = rows // group
  x = x.reshape(b, hkv, n, group, block, *rest)
  x = jnp.moveaxis(x, (1, 3), (3, 4))  # [B, n, block, Hkv, G, ...]
  return x.reshape(b, n * block, hkv * group, *rest)[:, :t]


def to_key_blocks(x_bshd: jax.Array, block: int, num_blocks: int) -> jax.Array:
  """[B, S, Hkv, D] -> [B, Hkv, num_blocks, block, D] (zero padded)."""
  b, _, hkv, d = x_bshd.shape
  x = pad_axis(x_bshd, 1, num_blocks * block).reshape(b, num_blocks, block, hkv, d)
  return jnp.moveaxis(x, 3, 1)


def from_key_blocks(x: jax.Array, s: int) -> jax.Array:
  """Inverse of ``to_key_blocks``: [B, Hkv, n, block, D] -> [B, S, Hkv, D]."""
  b, hkv, n, block, d = x.shape
  return jnp.moveaxis(x, 1, 3).reshape(b, n * block, hkv, d)[:, :s]
