"""Model invariants: interval masks equal segment masks, GQA equals repeated-head MHA, the KV-cache
path equals the full forward, RoPE makes attention depend on relative positions only."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.model import (AttentionMask, KVCache, ModelConfig, Transformer, get_preset,
                           intervals_from_segment_ids)
from kat_jax.model import attention


def _tiny(**kw):
  c = get_preset("tiny")
  c.update(kw)
  return ModelConfig.from_config(c)


def test_intervals_equal_causal_segment_mask():
  rng = np.random.default_rng(0)
  for _ in range(20):
    t = 24
    lengths = rng.integers(1, 8, size=10)
    seg = np.repeat(np.arange(1, 11), lengths)[:t]
    seg = np.pad(seg, (0, t - len(seg)))
    seg[rng.integers(t // 2, t):] = 0       # trailing padding
    m = intervals_from_segment_ids(jnp.asarray(seg[None]))
    vis = np.asarray(attention.visible(m.tin, m.tin, m.tout))[0]
    q, k = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    expected = (k <= q) & (seg[q] == seg[k]) & (seg[q] != 0)
    np.testing.assert_array_equal(vis, expected)


def test_gqa_equals_mha_with_repeated_kv_heads_and_masked_rows_are_zero():
  rng = np.random.default_rng(1)
  b, t, hkv, g, d = 2, 10, 2, 3, 8
  q = jnp.asarray(rng.normal(size=(b, t, hkv * g, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, t, hkv, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, hkv, d)), jnp.float32)
  seg = jnp.asarray([[1] * 6 + [2] * 2 + [0] * 2, [1] * 10])
  m = intervals_from_segment_ids(seg)
  out = attention.dense_attention(q, k, v, m)
  out_mha = attention.dense_attention(q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2), m)
  np.testing.assert_allclose(out, out_mha, atol=1e-6)
  # Explicit softmax reference for one head.
  vis = np.asarray(attention.visible(m.tin, m.tin, m.tout))
  logits = np.einsum("btd,bsd->bts", q[:, :, 4], k[:, :, 4 // g]) / np.sqrt(d)
  logits = np.where(vis, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True, initial=-1e30))
  p = np.where(vis, p, 0)
  ref = np.einsum("bts,bsd->btd", p / np.maximum(p.sum(-1, keepdims=True), 1e-30), v[:, :, 4 // g])
  np.testing.assert_allclose(out[:, :, 4], ref, atol=1e-5)
  np.testing.assert_array_equal(out[0, 8:], 0.0)   # padding rows: no visible key -> zeros


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "qkv_bias": True, "tie_embeddings": False}])
def test_kv_cache_prefill_and_decode_equal_full_forward(kw):
  cfg = _tiny(**kw)
  model = Transformer(cfg)
  b, t, p_len = 2, 12, 5
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  full_mask = intervals_from_segment_ids(jnp.ones((b, t), jnp.int32))
  params = nn.unbox(model.init(jax.random.key(0), tokens, pos, full_mask)["params"])
  full = model.apply({"params": params}, tokens, pos, full_mask).logits
  never = jnp.full((b, p_len), t, jnp.int32)
  out = model.apply({"params": params}, tokens[:, :p_len], pos[:, :p_len],
                    AttentionMask(tin=pos[:, :p_len], tout=never), kv_cache=KVCache.empty(cfg, b, t))
  np.testing.assert_allclose(out.logits, full[:, :p_len], atol=1e-4, rtol=1e-4)
  cache = out.kv_cache
  for i in range(p_len, t):
    step = AttentionMask(tin=pos[:, i:i + 1], tout=jnp.full((b, 1), t, jnp.int32))
    out = model.apply({"params": params}, tokens[:, i:i + 1], pos[:, i:i + 1], step, kv_cache=cache)
    cache = out.kv_cache
    np.testing.assert_allclose(out.logits[:, 0], full[:, i], atol=1e-4, rtol=1e-4)


def test_rope_shift_invariance_and_value_head():
  cfg = _tiny(value_head=True)
  model = Transformer(cfg)
  t = 9
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, t)), jnp.int32)
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  mask = intervals_from_segment_ids(jnp.ones((1, t), jnp.int32))
  params = nn.unbox(model.init(jax.random.key(0), tokens, pos, mask)["params"])
  a = model.apply({"params": params}, tokens, pos, mask)
  b = model.apply({"params": params}, tokens, pos + 17, mask)
  np.testing.assert_allclose(a.logits, b.logits, atol=2e-4, rtol=2e-4)
  assert a.values.shape == (1, t)
  np.testing.assert_array_equal(a.values, 0.0)   # zero-initialized critic head


def test_remat_matches_no_remat_values_and_gradients():
  # (bf16 compute against float32: tests/model/test_bf16.py)
  base = _tiny()
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, base.vocab_size, (2, 16)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
  mask = intervals_from_segment_ids(jnp.ones((2, 16), jnp.int32))
  params = nn.unbox(Transformer(base).init(jax.random.key(0), tokens, pos, mask)["params"])

  def loss(cfg, p):
    logits = Transformer(cfg).apply({"params": p}, tokens, pos, mask).logits
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  ref_v, ref_g = jax.value_and_grad(lambda p: loss(base, p))(params)
  remat_v, remat_g = jax.value_and_grad(lambda p: loss(_tiny(remat="full"), p))(params)
  np.testing.assert_allclose(remat_v, ref_v, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(remat_g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [5, 8, 64])
def test_token_chunk_slices_give_the_same_logits_values_and_gradients(chunk):
  # T = 16: chunk 5 leaves a ragged last slice (5+5+5+1), 8 divides it, 64 >= T is no slicing.
  base = _tiny(value_head=True, tie_embeddings=False)
  sliced = _tiny(value_head=True, tie_embeddings=False, token_chunk=chunk)
  rng = np.random.default_rng(5)
  tokens = jnp.asarray(rng.integers(0, base.vocab_size, (2, 16)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
  mask = intervals_from_segment_ids(jnp.asarray(np.repeat([[1] * 9 + [2] * 7], 2, 0)))
  params = nn.unbox(Transformer(base).init(jax.random.key(0), tokens, pos, mask)["params"])
  params["value_head"] = jnp.asarray(rng.normal(size=params["value_head"].shape), jnp.float32)

  def loss(cfg, p):
    out = Transformer(cfg).apply({"params": p}, tokens, pos, mask)
    return jnp.mean(jax.nn.logsumexp(out.logits, -1) - out.logits[..., 3]) + jnp.mean(out.values)

  ref = Transformer(base).apply({"params": params}, tokens, pos, mask)
  out = Transformer(sliced).apply({"params": params}, tokens, pos, mask)
  np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.values, ref.values, rtol=1e-5, atol=1e-6)
  ref_v, ref_g = jax.value_and_grad(lambda p: loss(base, p))(params)
  v, g = jax.value_and_grad(lambda p: loss(sliced, p))(params)
  np.testing.assert_allclose(v, ref_v, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_negative_token_chunk_is_rejected_naming_the_field():
  from kat_jax import config as config_lib
  with pytest.raises(config_lib.ConfigError, match=r"config.model.token_chunk=-1 must be >= 0"):
    _tiny(token_chunk=-1)


def test_logits_at_selects_positions_of_the_full_output():
  cfg = _tiny(value_head=True, token_chunk=4)
  model = Transformer(cfg)
  rng = np.random.default_rng(6)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 11)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), (3, 11))
  mask = intervals_from_segment_ids(jnp.ones((3, 11), jnp.int32))
  params = nn.unbox(model.init(jax.random.key(0), tokens, pos, mask)["params"])
  params["value_head"] = jnp.asarray(rng.normal(size=params["value_head"].shape), jnp.float32)
  full = model.apply({"params": params}, tokens, pos, mask)
  at = jnp.asarray([[10, 0], [3, 3], [7, 9]], jnp.int32)
  out = model.apply({"params": params}, tokens, pos, mask, logits_at=at)
  assert out.logits.shape == (3, 2, cfg.vocab_size) and out.values.shape == (3, 2)
  rows = np.arange(3)[:, None]
  np.testing.assert_allclose(out.logits, np.asarray(full.logits)[rows, np.asarray(at)],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.values, np.asarray(full.values)[rows, np.asarray(at)],
                             rtol=1e-5, atol=1e-6)
