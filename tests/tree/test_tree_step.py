"""Tree batches go through the same sharded jitted train step as flat batches: on a 2×4
(fsdp×tensor) mesh the tree step (with or without the chunked output head) equals the
single-device step."""
import jax
import ml_collections
import numpy as np
import pytest

from kat_jax import sharding
from kat_jax.model import ModelConfig, Transformer, get_preset
from kat_jax.train import losses, optimizer, state as state_lib, step as step_lib
from kat_jax.tree import batch as tree_batch, build
from kat_jax.tree.logprobs import batch_to_arrays
from configs.base import train_config


def _trees(cfg, n=8, seed=0):
  rng = np.random.default_rng(seed)
  trees = []
  for _ in range(n):
    prompt = list(rng.integers(0, cfg.vocab_size, 12))
    trajs = [prompt + list(rng.integers(0, cfg.vocab_size, int(rng.integers(1, 10))))
             for _ in range(3)]
    fields = dict(weight=[(np.arange(len(t)) >= 12).astype(np.float32) for t in trajs],
                  advantage=[np.full(len(t), rng.normal(), np.float32) for t in trajs])
    trees.append(build.build_tree(trajs, fields=fields))
  return batch_to_arrays(tree_batch.batch_trees(trees, max_tokens=48, max_nodes=8, max_traj=4,
                                                max_len=24))


def _step(mesh_cfg, devices, logits_chunk=0):
  cfg = ModelConfig.from_config(get_preset("tiny"))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_cfg), devices)
  rules = sharding.DEFAULT_RULES
  model = Transformer(cfg, mesh=mesh, rules=rules)
  train_cfg = train_config(steps=10, warmup_steps=1, learning_rate=1e-3, objective="ppo",
                           clip_eps=0.2, logits_chunk=logits_chunk)
  tx, schedule = optimizer.make_optimizer(train_cfg)
  batch = _trees(cfg)
  example = {"inputs": jax.ShapeDtypeStruct(batch["tokens"].shape, np.int32)}
  state, shardings = state_lib.create_sharded_state(model, tx, example, mesh, rules,
                                                    jax.random.key(0))
  step = step_lib.make_train_step(model.apply, losses.get_loss("tree"), tx, schedule, train_cfg,
                                  shardings, mesh, rules)
  new_state, metrics = step(state, sharding.host_to_global(batch, mesh, rules), jax.random.key(1))
  return jax.device_get(new_state), jax.device_get(metrics)


@pytest.mark.parametrize("logits_chunk", [0, 20])
def test_tree_step_on_2x4_mesh_equals_single_device(logits_chunk):
  # logits_chunk=20: the chunked output head (48 rows: 20 + 20 + 8) on the mesh equals the plain
  # single-device step.
  ref_state, ref_metrics = _step(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  state, metrics = _step(dict(data=1, fsdp=2, tensor=4), jax.devices(), logits_chunk)
  assert ref_metrics["weight_sum"] > 0
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
