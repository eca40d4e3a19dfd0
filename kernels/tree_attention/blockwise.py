"""Flash-attention math on one (query tile, key tile) pair, in plain jnp, shared by the XLA paths.

The reference (scan over key blocks) and the block-sparse path (all visited chunks at once) both
cut attention into tiles and combine them with the online-softmax rule; this module holds that
math once. Every function takes arbitrary leading batch dims (``...``) so the callers can vmap,
scan or gather freely.

Layout: queries are grouped by kv head, ``q [..., Tq, Hkv, G, D]`` (GQA: G query heads per kv
head), keys and values are ``[..., Tk, Hkv, D]``, and softmax statistics are ``[..., Hkv, G, Tq]``
float32. A tile's partial result is ``(m, l, acc)``: running max, sum of exp and unnormalized
output, all float32. Masked entries are removed with an explicit ``where`` (never by relying on a
large negative logit), so a query row that sees no key gets ``l = 0``, output 0 and zero gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity" for running maxima: exp(NEG - NEG) stays finite


def group_heads(x_bthd: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B, T, Hq, D] -> [B, T, Hkv, G, D] with query head h = kv_head * G + g."""
  b, t, hq, d = x_bthd.shape
  if hq % num_kv_heads:
    raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({num_kv_heads})")
  return x_bthd.reshape(b, t, num_kv_heads, hq // num_kv_heads, d)


def tile_visible(q_tin: jax.Array, k_tin: jax.Array, k_tout: jax.Array) -> jax.Array:
  """bool [..., Tq, Tk]: ``k_tin <= q_tin < k_tout`` (intervals [..., Tq] and [..., Tk])."""
  q = q_tin[..., :, None]
  return (k_tin[..., None, :] <= q) & (q < k_tout[..., None, :])


def _logits(q, k, scale):
  s = jnp.einsum("...qhgd,...khd->...hgqk", q, k, preferred_element_type=jnp.float32)
  return s * scale


def tile_forward(q, k, v, vis, scale):
  """Partial softmax of one tile: (m, l [..., Hkv, G, Tq], acc [..., Hkv, G, Tq, D]) float32."""
  s = _logits(q, k, scale)
  vis = vis[..., None, None, :, :]
  m = jnp.max(jnp.where(vis, s, NEG), axis=-1)
  p = jnp.where(vis, jnp.exp(s - m[..., None]), 0.0)
  l = jnp.sum(p, axis=-1)
  acc = jnp.einsum("...hgqk,...khd->...hgqd", p.astype(v.dtype), v,
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
  """(out [..., Hkv, G, Tq, D], lse [..., Hkv, G, Tq]) float32; rows with l == 0 give out 0, lse +inf.

  ``lse = +inf`` makes every ``exp(s - lse)`` of such a row exactly 0 in the backward pass.
  """
  seen = l > 0
  out = acc / jnp.where(seen, l, 1.0)[..., None]
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
  return out, lse


def row_delta(out, do):
  """``sum_d out * do`` per query row, float32 (the softmax-backward correction term)."""
  return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)


def tile_backward(q, k, v, do, lse, delta, vis, scale):
  """Gradient pieces of one tile: (dq [..., Tq, Hkv, G, D], dk, dv [..., Tk, Hkv, D]) float32.

  ``lse`` and ``delta`` are [..., Hkv, G, Tq]; ``do`` is laid out like ``q``.
  """
  s = _logits(q, k, scale)
  vis = vis[..., None, None, :, :]
  p = jnp.where(vis, jnp.exp(s - lse[..., None]), 0.0)
  dv = jnp.einsum("...hgqk,...qhgd->...khd", p.astype(do.dtype), do,
                  preferred_element_type=jnp.float32)
  dp = jnp.einsum("...qhgd,...khd->...hgqk", do, v, preferred_element_type=jnp.float32)
  ds = p * (dp - delta[..., None]) * scale
  dq = jnp.einsum("...hgqk,...khd->...qhgd", ds.astype(k.dtype), k,
                  preferred_element_type=jnp.float32)
  dk = jnp.einsum("...hgqk,...qhgd->...khd", ds.astype(q.dtype), q,
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
