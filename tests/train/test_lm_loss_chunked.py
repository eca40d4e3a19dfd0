"""The mid-training loss with ``config.train.logits_chunk`` (output head a few rows at a time, no
[B, T, V] logits) equals the plain loss: numerator, every metric and the parameter gradients, for a
tied and an untied head, with packed segments, loss masks and z-loss."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
from kat_jax.train import losses
from configs.base import train_config


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_lm_loss_equals_full(tied):
  c = get_preset("tiny")
  c.update(dict(vocab_size=96, num_layers=2, tie_embeddings=tied))
  model = Transformer(ModelConfig.from_config(c))
  rng = np.random.default_rng(int(tied))
  b, t = 2, 30
  inputs = jnp.asarray(rng.integers(0, 96, (b, t)), jnp.int32)
  seg = np.ones((b, t), np.int32)
  seg[0, 12:] = 2
  seg[1, 25:] = 0                                     # trailing padding
  batch = dict(inputs=inputs, targets=jnp.asarray(rng.integers(0, 96, (b, t)), jnp.int32),
               segment_ids=jnp.asarray(seg), positions=jnp.asarray(
                   np.where(seg[0] == 2, np.arange(t) - 12, np.arange(t))[None].repeat(b, 0)),
               weights=jnp.asarray((rng.random((b, t)) < 0.8) * (seg > 0), jnp.float32))
  params = nn.unbox(model.init(jax.random.key(0), inputs[:, :4], batch["positions"][:, :4],
                               intervals_from_segment_ids(jnp.ones((b, 4), jnp.int32)))["params"])
  loss = losses.get_loss("lm")

  def run(chunk):
    ctx = losses.LossContext(apply_fn=model.apply,
                             config=train_config(z_loss=1e-2, logits_chunk=chunk))
    return jax.value_and_grad(lambda p: loss.numerator(p, batch, ctx), has_aux=True)(params)

  (full, full_m), full_g = run(0)
  (chunked, chunked_m), chunked_g = run(7)           # 30 rows: 7 + 7 + 7 + 7 + 2
  np.testing.assert_allclose(chunked, full, rtol=1e-5)
  for key in ("ce_sum", "z_sum"):
    np.testing.assert_allclose(chunked_m[key], full_m[key], rtol=1e-5)
  assert float(chunked_m["correct_sum"]) == float(full_m["correct_sum"])
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(full_g))
  for x, y in zip(jax.tree.leaves(chunked_g), jax.tree.leaves(full_g)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * scale)
