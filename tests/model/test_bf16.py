"""bfloat16 compute (``ModelConfig.dtype="bfloat16"``, float32 params) gives the float32 model's
logits at every position, to a tolerance derived from bf16's precision — and a broken bf16 path
(a mask or RoPE dropped, the softmax scale lost) is caught by that same check.

Why logits per position: the loss is an average over positions and vocabulary, so a bug that
rewires attention moves it little (dropping the causal mask moves this model's loss by 1.0%,
inside the former loss-only check's rtol of 3e-2), while the logit vector of an affected position
moves by more than its own size (median 1.14 relative here, against a tolerance of 0.038).
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.model import ModelConfig, Transformer, attention, get_preset, intervals_from_segment_ids
from kat_jax.model import transformer

# bfloat16 keeps 8 significand bits (7 stored + the implicit one): round-to-nearest has relative
# error |delta| <= u = 2**-8.
BF16_UNIT_ROUNDOFF = 2.0 ** -8
# bf16 roundings an activation meets per layer on its way to the logits: attention — attn_norm
# output, q/k/v weight casts, q/k/v projections, RoPE outputs, softmax probabilities, attention
# output, o_proj weight cast, o_proj output, residual add (9); MLP — mlp_norm output, gate/up
# weight casts, gate/up outputs, SiLU, gate*up product, down weight cast, down output, residual
# add (8).
ROUNDINGS_PER_LAYER = 17
ROUNDINGS_OUTSIDE_LAYERS = 3   # embedding lookup cast, final_norm output, output-head weight cast


def bf16_logits_tolerance(cfg: ModelConfig) -> float:
  """Bound on ``|logits_bf16[b, t] - logits_f32[b, t]| / |logits_f32[b, t]|`` (vector norms over
  the vocabulary), for every position.

  Derivation: treat each of the n roundings as an independent relative perturbation uniform in
  [-u, u] (variance u**2 / 3; the exact round-to-nearest variance is smaller, ~0.18 u**2).
  Independent perturbations add in variance; RMSNorm is scale-invariant and random-feature
  matmuls and residual adds carry a relative error through with gain ~1, so the relative error of
  a position's logit vector has rms u * sqrt(n / 3). A logit vector averages V = vocab_size
  entries, so its relative error concentrates near that rms at every position; a factor 2 covers
  the largest position and layer gains above 1. For the tiny preset (4 layers, n = 71):
  2 * 2**-8 * sqrt(71 / 3) = 0.038; measured: median 0.013, max 0.022.
  """
  n = ROUNDINGS_PER_LAYER * cfg.num_layers + ROUNDINGS_OUTSIDE_LAYERS
  return 2.0 * BF16_UNIT_ROUNDOFF * math.sqrt(n / 3.0)


def position_relative_errors(logits, reference) -> np.ndarray:
  """[B, T]: relative error of each position's logit vector."""
  logits, reference = np.asarray(logits, np.float64), np.asarray(reference, np.float64)
  return np.linalg.norm(logits - reference, axis=-1) / np.linalg.norm(reference, axis=-1)


def assert_bf16_matches_float32(bf16_logits, f32_logits, cfg: ModelConfig) -> None:
  errors = position_relative_errors(bf16_logits, f32_logits)
  tol = bf16_logits_tolerance(cfg)
  worst = np.unravel_index(np.argmax(errors), errors.shape)
  assert errors.max() <= tol, (f"bf16 logits differ from float32 by {errors.max():.4f} "
                               f"(relative, position {worst}) > bf16 tolerance {tol:.4f}")


def _tiny(**kw):
  c = get_preset("tiny")
  c.update(kw)
  return ModelConfig.from_config(c)


def _inputs(cfg, b=2, t=32, seed=4):
  """Two packed documents per row (so a lost segment boundary is visible), positions restart."""
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
  seg = np.ones((b, t), np.int32)
  seg[:, t // 2:] = 2
  pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0)
  return tokens, jnp.asarray(pos, jnp.int32), intervals_from_segment_ids(jnp.asarray(seg))


@functools.lru_cache(maxsize=None)
def _setup(kw: tuple):
  base = _tiny(**dict(kw))
  tokens, pos, mask = _inputs(base)
  params = nn.unbox(Transformer(base).init(jax.random.key(0), tokens, pos, mask)["params"])
  # qkv biases start at zero; give them values so their bf16 casts are exercised too.
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
      if path[-1].key.endswith("_bias") else x, params)
  return base, (tokens, pos, mask), params


def _logits(cfg, kw):
  _, (tokens, pos, mask), params = _setup(tuple(sorted(kw.items())))
  return np.asarray(Transformer(cfg).apply({"params": params}, tokens, pos, mask).logits)


def _logits_f32_and_bf16(kw):
  """float32 and bf16-compute logits of the same float32 params (traced now: patches apply)."""
  bf16_cfg = _tiny(dtype="bfloat16", **kw)
  return _logits(_tiny(**kw), kw), _logits(bf16_cfg, kw), bf16_cfg


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "qkv_bias": True, "tie_embeddings": False},
                                {"num_layers": 2, "num_kv_heads": 2}])
def test_bf16_logits_match_float32_at_every_position(kw):
  f32, bf16, cfg = _logits_f32_and_bf16(kw)
  assert bf16.dtype == np.float32 and bf16.shape == f32.shape
  assert not np.array_equal(bf16, f32)   # bf16 really ran
  assert_bf16_matches_float32(bf16, f32, cfg)


# Broken bf16 paths, each injected only where the compute dtype is bfloat16 (the float32
# reference stays correct), as a bug in a bf16-specific branch would be.
def _segment_starts(mask):
  """[B, T]: index of the first token of each token's document (packed rows: tout is constant
  within a document and changes between documents)."""
  first = jnp.concatenate([jnp.ones_like(mask.tout[:, :1], bool),
                           mask.tout[:, 1:] != mask.tout[:, :-1]], axis=1)
  return jax.lax.cummax(jnp.where(first, mask.tin, 0), axis=1)


def _no_causal(dense):
  def fn(q, k, v, mask):   # every key of the same document visible, future ones included
    return attention.dense_attention_general(q, k, v, mask.tin, _segment_starts(mask),
                                             mask.tout)
  return fn


def _no_segments(dense):
  def fn(q, k, v, mask):   # causal over the whole row: document 2 sees document 1
    t = mask.tin.shape[1]
    return attention.dense_attention_general(q, k, v, mask.tin, mask.tin,
                                             jnp.full_like(mask.tout, t))
  return fn


def _no_softmax_scale(dense):
  def fn(q, k, v, mask):   # q·k instead of q·k/sqrt(d)
    return dense(q * jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype)), k, v, mask)
  return fn


_BREAKS = {"causal_mask_dropped": _no_causal, "segment_mask_dropped": _no_segments,
           "softmax_scale_dropped": _no_softmax_scale}


@pytest.mark.parametrize("name", [*_BREAKS, "rope_dropped"])
def test_a_broken_bf16_path_fails_the_check(monkeypatch, name):
  if name == "rope_dropped":
    rope = transformer.rope
    monkeypatch.setattr(transformer, "rope", lambda x, p, f: x if x.dtype == jnp.bfloat16
                        else rope(x, p, f))
  else:
    dense = attention.dense_attention
    broken = _BREAKS[name](dense)
    monkeypatch.setattr(attention, "dense_attention", lambda q, k, v, mask: (
        broken if q.dtype == jnp.bfloat16 else dense)(q, k, v, mask))
  f32, bf16, cfg = _logits_f32_and_bf16({})
  # The float32 path is untouched: it still equals the unpatched model exactly.
  monkeypatch.undo()
  f32_clean, _, _ = _logits_f32_and_bf16({})
  np.testing.assert_array_equal(f32, f32_clean)
  with pytest.raises(AssertionError, match="bf16 tolerance"):
    assert_bf16_matches_float32(bf16, f32, cfg)
  # Not by a hair: the broken path is off by several tolerances at its worst position.
  assert position_relative_errors(bf16, f32).max() > 5 * bf16_logits_tolerance(cfg)
