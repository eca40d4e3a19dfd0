"""Gradient accumulation is exact: with ``grad_accum_steps = k`` the step's gradients, its
``grad_norm``, its loss and one un-clipped SGD step equal those of the full batch (k = 1), and an
accumulation bug that scales or re-normalizes the gradients is caught by the same check.

Why not compare params after one AdamW step (the former test): Adam's first update is
``g / (|g| + eps)`` per element — nearly sign(g) — and clipping rescales to a fixed norm, so a
gradient off by a factor k gives almost the same params. Gradients, their norm and an SGD step
(update = -lr * g) all move linearly with such a bug.

The full-batch reference runs on one device; k = 2 runs on a 2×2×2 (data×fsdp×tensor) mesh, so
micro-batching composes with data and tensor parallelism, k = 4 on one device. Gradients are read
exactly (not from a params difference): the optimizer is ``chain(capture, sgd)``, where capture
keeps the gradient it was given as its state.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kat_jax import sharding
from kat_jax.model import ModelConfig, Transformer, get_preset
from kat_jax.train import losses, optimizer, state as state_lib, step as step_lib
from configs.base import train_config

_LR = 0.5            # SGD: params_after = params - _LR * grads, no clipping, no decay
_B, _T = 8, 16


def _model_cfg():
  cfg = get_preset("tiny")
  cfg.num_layers = 1
  return ModelConfig.from_config(cfg)


def _train_cfg(accum):
  return train_config(steps=10, warmup_steps=0, learning_rate=_LR, min_lr_ratio=1.0,
                      grad_clip=0.0, weight_decay=0.0, z_loss=1e-4, grad_accum_steps=accum)


def _batch(cfg, seed=0):
  """Packed rows with uneven loss weights, so micro-batches have different denominators (a
  per-micro-batch normalization would then weight tokens wrongly)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (_B, _T + 1)).astype(np.int32)
  seg = np.ones((_B, _T), np.int32)
  seg[:, _T // 2:] = 2
  seg[0, 3:] = 0                       # row 0: mostly padding
  seg[5, -6:] = 0
  pos = np.concatenate([np.arange(_T // 2), np.arange(_T - _T // 2)])[None].repeat(_B, 0)
  weights = (seg > 0).astype(np.float32)
  weights[:, _T // 2 - 1] = 0.0
  weights[2, :] *= 0.25               # a down-weighted row
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=pos.astype(np.int32),
              segment_ids=seg, weights=weights)


def _capture_gradients() -> optax.GradientTransformation:
  """Keeps the raw gradient the step computed as its optimizer state (updates pass through), so
  one compiled train step yields grads, grad_norm and the SGD update together."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (grads, grads))


def _run(accum, mesh_cfg, devices):
  """One SGD train step (``make_train_step``): its gradients, metrics and params."""
  cfg = _model_cfg()
  mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_cfg), devices)
  rules = sharding.DEFAULT_RULES
  model = Transformer(cfg, mesh=mesh, rules=rules)
  train_cfg = _train_cfg(accum)
  _, schedule = optimizer.make_optimizer(train_cfg)
  tx = optax.chain(_capture_gradients(), optax.sgd(_LR))
  batch = _batch(cfg)
  example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  state, shardings = state_lib.create_sharded_state(model, tx, example, mesh, rules,
                                                    jax.random.key(0))
  params_before = jax.device_get(state.params)
  step = step_lib.make_train_step(model.apply, losses.get_loss("lm"), tx, schedule, train_cfg,
                                  shardings, mesh, rules)
  new_state, metrics = step(state, sharding.host_to_global(batch, mesh, rules),
                            jax.random.key(1))
  new_state = jax.device_get(new_state)
  return dict(grads=new_state.opt_state[0], metrics=jax.device_get(metrics),
              before=params_before, after=new_state.params)


def max_gradient_error(run, ref) -> float:
  """Largest gradient difference, relative to the largest element of its parameter's gradient."""
  return max(float(np.abs(g - r).max() / np.abs(r).max())
             for g, r in zip(jax.tree.leaves(run["grads"]), jax.tree.leaves(ref["grads"])))


def assert_accumulation_matches(run, ref):
  """The accumulated step equals the full-batch one: gradients (every element), grad_norm, the
  loss, and the SGD params. Tolerances are float32 summation-order noise (measured: gradients
  within 1e-6 of each leaf's largest element, grad_norm and loss within 1e-7), far below a
  factor-of-k or re-weighting error."""
  np.testing.assert_allclose(run["metrics"]["weight_sum"], ref["metrics"]["weight_sum"],
                             rtol=1e-6)
  np.testing.assert_allclose(run["metrics"]["loss"], ref["metrics"]["loss"], rtol=1e-5)
  np.testing.assert_allclose(run["metrics"]["grad_norm"], ref["metrics"]["grad_norm"], rtol=1e-5)
  leaves, ref_leaves = jax.tree.leaves(run["grads"]), jax.tree.leaves(ref["grads"])
  assert len(leaves) == len(ref_leaves)
  for g, r in zip(leaves, ref_leaves):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max())
  # The SGD step moved every parameter by -lr * (the full-batch gradient).
  for after, before, r in zip(jax.tree.leaves(run["after"]), jax.tree.leaves(run["before"]),
                              ref_leaves):
    np.testing.assert_allclose((before - after) / _LR, r, rtol=1e-3,
                               atol=1e-4 * np.abs(r).max() + 4e-7)


@pytest.fixture(scope="module")
def full_batch():
  return _run(1, _ONE_DEVICE, jax.devices()[:1])


_MESH = dict(data=2, fsdp=2, tensor=2)
_ONE_DEVICE = dict(data=1, fsdp=1, tensor=1)


def test_reference_is_meaningful(full_batch):
  # The check below is not vacuous: a real gradient, the step really moved the params, and
  # grad_norm is the norm of these gradients.
  grads = jax.tree.leaves(full_batch["grads"])
  norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads))
  np.testing.assert_allclose(full_batch["metrics"]["grad_norm"], norm, rtol=1e-5)
  assert norm > 1e-2
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(full_batch["after"]),
                                                  jax.tree.leaves(full_batch["before"]))]
  assert min(moved) > 0


@pytest.mark.parametrize("k,mesh", [(2, _MESH), (4, _ONE_DEVICE)])
def test_accumulated_gradients_grad_norm_and_sgd_step_equal_full_batch(full_batch, k, mesh):
  devices = jax.devices() if mesh is _MESH else jax.devices()[:1]
  assert_accumulation_matches(_run(k, mesh, devices), full_batch)


# Accumulation bugs, injected by wrapping ``step.loss_and_grads`` (the step looks it up when traced).
def _grads_summed_not_averaged(real):
  """Sum-vs-mean: the loss is right, the gradients are k times too large."""
  def fn(params, batch, loss, ctx, accum=1):
    value, metrics, denom, grads = real(params, batch, loss, ctx, accum)
    return value, metrics, denom, jax.tree.map(lambda g: g * accum, grads)
  return fn


def _mean_of_microbatch_means(real):
  """Each micro-batch normalized by its own weight sum, then averaged: tokens of light
  micro-batches weigh too much."""
  def fn(params, batch, loss, ctx, accum=1):
    if accum == 1:
      return real(params, batch, loss, ctx, 1)
    mbs = step_lib._microbatches(batch, accum)
    outs = [real(params, jax.tree.map(lambda x, i=i: x[i], mbs), loss, ctx, 1)
            for i in range(accum)]
    value = sum(o[0] for o in outs) / accum
    metrics = jax.tree.map(lambda *m: sum(m), *[o[1] for o in outs])
    denom = sum(o[2] for o in outs)
    grads = jax.tree.map(lambda *g: sum(g) / accum, *[o[3] for o in outs])
    return value, metrics, denom, grads
  return fn


@pytest.mark.parametrize("bug", [_grads_summed_not_averaged, _mean_of_microbatch_means])
def test_an_accumulation_bug_fails_the_check(monkeypatch, full_batch, bug):
  monkeypatch.setattr(step_lib, "loss_and_grads", bug(step_lib.loss_and_grads))
  broken = _run(2, _ONE_DEVICE, jax.devices()[:1])
  with pytest.raises(AssertionError):
    assert_accumulation_matches(broken, full_batch)
  # Off on the gradient itself by far more than the tolerance (sum-vs-mean: 1.0, mean of
  # micro-batch means: 0.23 here), not by a hair or only on a side value.
  assert max_gradient_error(broken, full_batch) > 1e-2
