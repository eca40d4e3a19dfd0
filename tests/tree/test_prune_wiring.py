"""Pruning switched on in a tree-mode train step: a full budget leaves the loss and update unchanged;
a partial budget trains exactly the kept pairs with an adjusted normalizer and reports the metrics."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kat_jax import sharding
from kat_jax.model import ModelConfig, Transformer, get_preset
from kat_jax.train import losses, optimizer, state as state_lib, step as step_lib
from kat_jax.tree import batch as tree_batch, build
from kat_jax.tree.logprobs import batch_to_arrays
from kat_jax.tree.prune import default_prune_config, prune_tree_batch
from configs.base import train_config


def _batch(vocab, with_entropy):
  rng = np.random.default_rng(0)
  trees = []
  for _ in range(2):
    prompt = list(rng.integers(0, vocab, 10))
    trajs = [prompt + list(rng.integers(0, vocab, int(rng.integers(3, 12)))) for _ in range(3)]
    fields = dict(weight=[np.ones(len(t), np.float32) for t in trajs])
    if with_entropy:   # entropies recorded at rollout time: shared tokens share them
      fields["entropy"] = [np.asarray([(7 * x) % 5 * 0.3 for x in t], np.float32) for t in trajs]
    trees.append(build.build_tree(trajs, fields=fields))
  return batch_to_arrays(tree_batch.batch_trees(trees, max_tokens=64, max_nodes=16, max_traj=4,
                                                max_len=24))


def _run(prune_cfg, with_entropy):
  cfg = ModelConfig.from_config(get_preset("tiny"))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                            jax.devices()[:1])
  model = Transformer(cfg, mesh=mesh)
  train_cfg = train_config(steps=5, warmup_steps=1, learning_rate=1e-3, objective="nll")
  if prune_cfg is not None:
    train_cfg.prune = prune_cfg
  tx, schedule = optimizer.make_optimizer(train_cfg)
  batch = _batch(cfg.vocab_size, with_entropy)
  example = {"inputs": jax.ShapeDtypeStruct(batch["tokens"].shape, np.int32)}
  state, sh = state_lib.create_sharded_state(model, tx, example, mesh, sharding.DEFAULT_RULES,
                                             jax.random.key(0))
  params0 = jax.device_get(state.params)
  step = step_lib.make_train_step(model.apply, losses.get_loss("tree"), tx, schedule, train_cfg,
                                  sh, mesh, sharding.DEFAULT_RULES)
  new, metrics = step(state, jax.tree.map(jnp.asarray, batch), jax.random.key(1))
  return jax.device_get(new), jax.device_get(metrics), batch, model, params0


def test_full_budget_equals_unpruned():
  off_state, off_m, *_ = _run(None, True)
  c = default_prune_config()
  c.enabled, c.budget_fraction = True, 1.0
  for with_entropy in (True, False):
    on_state, on_m, *_ = _run(c, with_entropy)
    np.testing.assert_allclose(on_m["loss"], off_m["loss"], rtol=1e-6)
    assert on_m["prune/kept_fraction"] == 1.0
    for a, b in zip(jax.tree.leaves(on_state.params), jax.tree.leaves(off_state.params)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_partial_budget_trains_exactly_the_kept_pairs():
  c = default_prune_config()
  c.enabled, c.budget_fraction, c.event_window = True, 0.6, 0
  _, m, batch, model, params = _run(c, True)
  entropies = step_lib.token_entropies(model.apply, params, jax.tree.map(jnp.asarray, batch))
  keep, pm = prune_tree_batch(batch, entropies, c)
  assert 0 < float(np.mean(pm["kept_fraction"])) < 1
  np.testing.assert_allclose(m["prune/kept_fraction"], np.mean(pm["kept_fraction"]), rtol=1e-6)
  pruned = dict(batch, keep=keep)
  loss = losses.get_loss("tree")
  ctx = losses.LossContext(apply_fn=model.apply, config=train_config(objective="nll"))
  num, _ = loss.numerator(params, jax.tree.map(jnp.asarray, pruned), ctx)
  den = loss.denominator(jax.tree.map(jnp.asarray, pruned))
  assert float(den) < float(loss.denominator(jax.tree.map(jnp.asarray, batch)))
  np.testing.assert_allclose(m["loss"], num / den, rtol=1e-5)
