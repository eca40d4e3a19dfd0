"""One train step on 2×4, 4×2 and 8×1 (fsdp×tensor) meshes equals the single-device step.
(Gradient accumulation against the full batch: tests/train/test_grad_accum.py.)"""
import jax
import ml_collections
import numpy as np
import pytest

from kat_jax import sharding
from kat_jax.model import ModelConfig, Transformer, get_preset
from kat_jax.train import losses, optimizer, state as state_lib, step as step_lib
from configs.base import train_config


def _train_cfg():
  return train_config(steps=10, warmup_steps=2, learning_rate=1e-3, min_lr_ratio=0.1,
                      grad_clip=1.0, weight_decay=0.1, z_loss=1e-4, grad_accum_steps=1)


def _batch(cfg, b=8, t=32, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[:, t // 2:] = 2          # two packed documents per row
  seg[0, -3:] = 0              # some padding
  pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0)
  weights = (seg > 0).astype(np.float32)
  weights[:, t // 2 - 1] = 0.0
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=pos.astype(np.int32),
              segment_ids=seg, weights=weights)


def _run_step(mesh_cfg, devices):
  cfg = ModelConfig.from_config(get_preset("tiny"))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_cfg), devices)
  rules = sharding.DEFAULT_RULES
  model = Transformer(cfg, mesh=mesh, rules=rules)
  train_cfg = _train_cfg()
  tx, schedule = optimizer.make_optimizer(train_cfg)
  batch = _batch(cfg)
  example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  state, shardings = state_lib.create_sharded_state(model, tx, example, mesh, rules,
                                                    jax.random.key(0))
  step = step_lib.make_train_step(model.apply, losses.get_loss("lm"), tx, schedule, train_cfg,
                                  shardings, mesh, rules)
  gbatch = sharding.host_to_global(batch, mesh, rules)
  new_state, metrics = step(state, gbatch, jax.random.key(1))
  return jax.device_get(new_state), jax.device_get(metrics), new_state


@pytest.fixture(scope="module")
def single_device():
  return _run_step(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


@pytest.mark.parametrize("fsdp,tensor", [(2, 4), (4, 2), (8, 1)])
def test_sharded_step_equals_single_device(single_device, fsdp, tensor):
  ref_state, ref_metrics, _ = single_device
  state, metrics, live = _run_step(dict(data=1, fsdp=fsdp, tensor=tensor), jax.devices())
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Every large parameter is really split across devices.
  q = live.params["layer_0"]["attn"]["q_proj"]
  assert len(q.sharding.device_set) == 8
  assert q.addressable_shards[0].data.size * 8 == q.size
