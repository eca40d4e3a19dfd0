"""Flash-attention math on one (query tile, key tile) pair, in plain jnp, shared by the XLA paths.

The reference (scan over key blocks) and the block-sparse path (all visited chunks at once) both
cut attention into tiles and combine them with the online-softmax rule; this module holds that
math once.

Layout (head-major): a tile is ``q [..., G, Q, D]`` (the G query heads that share a kv head, Q
query tokens) against ``k, v [..., K, D]``, with the same leading dims ``...`` (batch, kv head,
chunk). Every dot_general then has its batch dims leading and, except for dQ, its contraction on
the last axis of the left operand — XLA:CPU's fast matmul path — so no transposing copies are
made. The visibility mask is computed once per token pair and broadcast over heads: ``vis`` is
[..., 1, Q, K] in the forward pass and ``vis_t`` [..., K, 1, Q] in the backward pass, which works
on the transposed tile (see ``tile_backward``). Softmax statistics are [..., G, Q] float32.

A tile's partial result is ``(m, l, acc)``: running max, sum of exp and unnormalized output, all
float32. Masked logits are replaced by ``NEG`` before the max, so ``exp(NEG - m)`` is exactly 0
for every row that sees a key; a row that sees none keeps ``m = NEG`` and gets ``l = 0``, hence
output 0 and zero gradient (``lse = +inf``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity": exp(NEG - m) == 0 for any real m, and NEG - NEG == 0


def tile_visible(q_tin: jax.Array, k_tin: jax.Array, k_tout: jax.Array) -> jax.Array:
  """bool [..., Q, K]: ``k_tin <= q_tin < k_tout`` (intervals [..., Q] and [..., K])."""
  q = q_tin[..., :, None]
  return (k_tin[..., None, :] <= q) & (q < k_tout[..., None, :])


def tile_visible_t(q_tin: jax.Array, k_tin: jax.Array, k_tout: jax.Array) -> jax.Array:
  """bool [..., K, Q]: the transpose of ``tile_visible``."""
  q = q_tin[..., None, :]
  return (k_tin[..., :, None] <= q) & (q < k_tout[..., :, None])


def tile_forward(q, k, v, vis, scale):
  """Partial softmax of one tile: (m, l [..., G, Q], acc [..., G, Q, D]) float32."""
  s = jnp.einsum("...gqd,...kd->...gqk", q, k, preferred_element_type=jnp.float32)
  s = jnp.where(vis, s * scale, NEG)
  m = jnp.max(s, axis=-1)
  seen = m > NEG / 2  # the row has a visible key in this tile
  p = jnp.exp(s - jnp.where(seen, m, 0.0)[..., None])  # masked entries: exp(NEG - m) = 0
  l = jnp.sum(p, axis=-1)
  acc = jnp.einsum("...gqk,...kd->...gqd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
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
  """(out [..., D], lse) float32 from a partial result; rows with l == 0: out 0, lse = +inf.

  ``lse = +inf`` makes every ``exp(s - lse)`` of such a row exactly 0 in the backward pass.
  """
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  return acc / l_safe[..., None], jnp.where(seen, m + jnp.log(l_safe), jnp.inf)


def row_delta(out, do):
  """``sum_d out * do`` per query row, float32 (the softmax-backward correction term)."""
  return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)


def tile_backward(q, k, v, do, lse, delta, vis_t, scale):
  """Gradient pieces of one tile: (dq [..., G, Q, D], dk, dv [..., K, D]) float32.

  ``lse`` and ``delta`` are [..., G, Q]; ``do`` is laid out like ``q``; ``vis_t`` is [..., K, 1, Q].
  """
  # The tile is worked on transposed, [..., K, G, Q]: dK = dSᵀ·Q and dV = Pᵀ·dO contract its last
  # two axes (XLA:CPU's fast path); only dQ contracts the other way. Measured faster than the row
  # orientation (two products the slow way) and than transposing dS explicitly.
  s_t = jnp.einsum("...kd,...gqd->...kgq", k, q, preferred_element_type=jnp.float32)
  s_t = jnp.where(vis_t, s_t * scale, NEG)
  p_t = jnp.exp(s_t - lse[..., None, :, :])  # masked: exp(NEG - lse) = 0; empty rows: lse = +inf
  dp_t = jnp.einsum("...kd,...gqd->...kgq", v, do, preferred_element_type=jnp.float32)
  ds_t = p_t * (dp_t - delta[..., None, :, :]) * scale
  dv = jnp.einsum("...kgq,...gqd->...kd", p_t.astype(do.dtype), do,
                  preferred_element_type=jnp.float32)
  dk = jnp.einsum("...kgq,...gqd->...kd", ds_t.astype(q.dtype), q,
                  preferred_element_type=jnp.float32)
  dq = jnp.einsum("...kgq,...kd->...gqd", ds_t.astype(k.dtype), k,
                  preferred_element_type=jnp.float32)
  return dq, dk, dv


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """Pads ``axis`` of ``x`` at the end up to ``size``."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def to_query_blocks(x_bthd: jax.Array, num_kv_heads: int, block: int) -> jax.Array:
  """[B, T, Hq, ...] -> [B, Hkv, n, G, block, ...]: head-major query blocks (zero padded).

  Query head ``h`` is kv head ``h // G``, member ``h % G`` of its group (GQA).
  """
  b, t, hq = x_bthd.shape[:3]
  rest = x_bthd.shape[3:]
  if hq % num_kv_heads:
    raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({num_kv_heads})")
  n = -(-t // block)
  x = pad_axis(x_bthd, 1, n * block).reshape(b, n, block, num_kv_heads, hq // num_kv_heads, *rest)
  return jnp.moveaxis(x, (3, 4), (1, 3))  # [B, Hkv, n, G, block, ...]


def from_query_blocks(x: jax.Array, t: int) -> jax.Array:
  """Inverse of ``to_query_blocks``: [B, Hkv, n, G, block, ...] -> [B, T, Hq, ...]."""
  b, hkv, n, g, block = x.shape[:5]
  x = jnp.moveaxis(x, (1, 3), (3, 4))  # [B, n, block, Hkv, G, ...]
  return x.reshape(b, n * block, hkv * g, *x.shape[5:])[:, :t]


def to_key_blocks(x_bshd: jax.Array, block: int, num_blocks: int) -> jax.Array:
  """[B, S, Hkv, D] -> [B, Hkv, num_blocks, block, D] (zero padded)."""
  b, _, hkv, d = x_bshd.shape
  x = pad_axis(x_bshd, 1, num_blocks * block).reshape(b, num_blocks, block, hkv, d)
  return jnp.moveaxis(x, 3, 1)


def from_key_blocks(x: jax.Array, s: int) -> jax.Array:
  """Inverse of ``to_key_blocks``: [B, Hkv, n, block, D] -> [B, S, Hkv, D]."""
  b, hkv, n, block, d = x.shape
  return jnp.moveaxis(x, 1, 3).reshape(b, n * block, hkv, d)[:, :s]
