"""The one train/eval step skeleton all stages share: loss → grads (optionally accumulated over
micro-batches) → optax update, compiled with explicit in/out shardings and a donated state.

A stage only chooses the ``Loss`` (see kat_jax.train.losses); the step never changes. A step whose loss
or gradient norm is not finite leaves the state untouched and reports ``finite = 0`` so the loop can stop
with the last good state and checkpoint.

LoRA (``frozen_shardings``): the state holds the adapters only and the step takes the frozen base as
a fourth argument — never differentiated, never donated, no optimizer state — and the model sees
``combine(frozen, state.params)``; gradients exist for the adapters alone.

Distillation (``teacher_shardings``): the frozen teacher's params are the step's last argument —
never differentiated, never donated — and reach the loss as ``LossContext.teacher``
(``kat_jax.train.distill``), which runs the teacher on each micro-batch.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from kat_jax import sharding as sharding_lib
from kat_jax.train.distill import Teacher
from kat_jax.train.losses import Loss, LossContext
from kat_jax.train.state import TrainState


def _microbatches(batch: dict, accum: int) -> dict:
  """[B, ...] -> [accum, B/accum, ...], micro-batch i taking rows i, i+accum, ... so that every
  micro-batch stays spread over all data shards."""
  def split(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // accum, accum) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def loss_and_grads(params, batch, loss: Loss, ctx: LossContext, accum: int = 1):
  """(loss, metric sums, grads) of ``sum(numerator) / denominator`` over the global batch."""
  denom = jnp.maximum(loss.denominator(batch, ctx.config).astype(jnp.float32), 1e-9)

  def scaled(p, mb):
    num, metrics = loss.numerator(p, mb, ctx)
    return num / denom, metrics

  grad_fn = jax.value_and_grad(scaled, has_aux=True)
  if accum == 1:
    (value, metrics), grads = grad_fn(params, batch)
  else:
    mbs = _microbatches(batch, accum)

    def body(carry, mb):
      (v, m), g = grad_fn(params, mb)
      acc_v, acc_m, acc_g = carry
      return (acc_v + v, jax.tree.map(jnp.add, acc_m, m), jax.tree.map(jnp.add, acc_g, g)), None

    first = jax.tree.map(lambda x: x[0], mbs)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first))
    (_, m0), g0 = zeros
    (value, metrics, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), m0, g0), mbs)
  return value, metrics, denom, grads


def token_entropies(apply_fn: Callable, params, batch: dict,
                    logits_chunk: int = 0) -> jax.Array:
  """Per tree token, the entropy of the distribution it was sampled from [B, T].

  Taken from the rollout when the batch carries it (per-trajectory field ``entropy``, scattered to
  tree tokens through the row maps — shared tokens share their context, hence their entropy), else
  computed by a stop-gradient forward pass of the current policy (entropy at the parent's row; 0 at
  roots)."""
  if "field/entropy" in batch:
    b = jnp.arange(batch["row_map"].shape[0])[:, None, None]
    values = jnp.where(batch["row_valid"], batch["field/entropy"], 0.0)
    return jnp.zeros(batch["tokens"].shape, jnp.float32).at[b, batch["row_map"]].max(values)
  from kat_jax.tree.logprobs import tree_logprobs
  row_entropy = jax.lax.stop_gradient(
      tree_logprobs(apply_fn, params, batch, logits_chunk=logits_chunk)["row_entropy"])
  parent = batch["parent"]
  ent = jnp.take_along_axis(row_entropy, jnp.maximum(parent, 0), axis=1)
  return jnp.where((parent >= 0) & batch["token_valid"], ent, 0.0)


def maybe_prune(apply_fn: Callable, params, batch: dict, train_cfg) -> tuple[dict, dict]:
  """Adds the entropy-budget keep mask (``keep`` [B, T]) to a tree batch when
  ``config.train.prune.enabled``; the tree losses gate pairs and their normalizer by it."""
  if not train_cfg.prune.enabled or "tin" not in batch:
    return batch, {}
  from kat_jax.tree.prune import prune_tree_batch
  entropies = token_entropies(apply_fn, params, batch, train_cfg.logits_chunk)
  keep, m = prune_tree_batch(batch, entropies, train_cfg.prune)
  metrics = {f"prune/{k}": jnp.mean(jnp.asarray(m[k], jnp.float32))
             for k in ("kept_fraction", "kept_entropy_fraction", "kept_trajectories",
                       "kept_tokens", "mandatory_exceeds_budget")}
  return {**batch, "keep": keep}, metrics


def make_train_step(apply_fn: Callable, loss: Loss, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, train_cfg, state_shardings, mesh, rules, *,
                    frozen_shardings: Any = None,
                    combine: Optional[Callable[[Any, Any], Any]] = None,
                    dropout_rng: bool = False, teacher_apply: Optional[Callable] = None,
                    teacher_shardings: Any = None):
  """The jitted ``(state, batch, rng) -> (state, metrics)``; with ``frozen_shardings`` (LoRA)
  ``(state, batch, rng, frozen)``, the model's params being ``combine(frozen, state.params)``.
  ``dropout_rng``: the loss's forward passes get a per-step ``dropout`` RNG (LoRA dropout).
  ``teacher_shardings`` (distillation): the teacher's params come last, ``(..., teacher)``, and
  the loss gets ``Teacher(teacher_apply, teacher)``."""
  accum = int(train_cfg.grad_accum_steps)
  if frozen_shardings is not None and combine is None:
    raise ValueError("make_train_step: frozen_shardings needs combine(frozen, trainable)")
  if teacher_shardings is not None and teacher_apply is None:
    raise ValueError("make_train_step: teacher_shardings needs teacher_apply (the teacher's apply)")
  lora = frozen_shardings is not None

  def step(state: TrainState, batch: dict, rng: jax.Array, *extra: Any):
    frozen = extra[0] if lora else None
    teacher_params = extra[1 if lora else 0] if teacher_shardings is not None else None
    teacher = _teacher(teacher_apply, teacher_params)
    step_rng = jax.random.fold_in(rng, state.step)
    full = (lambda p: p) if frozen is None else (lambda p: combine(frozen, p))
    loss_apply = apply_fn
    if dropout_rng:
      loss_apply = functools.partial(apply_fn, rngs={"dropout": jax.random.fold_in(step_rng, 1)})
    ctx = LossContext(apply_fn=loss_apply, config=train_cfg, rng=step_rng, teacher=teacher)
    batch, prune_metrics = maybe_prune(apply_fn, full(state.params), batch, train_cfg)
    trained_loss = loss if frozen is None else Loss(
        numerator=lambda p, mb, c: loss.numerator(full(p), mb, c), denominator=loss.denominator)
    value, metric_sums, denom, grads = loss_and_grads(state.params, batch, trained_loss, ctx,
                                                      accum)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {"loss": value, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "weight_sum": denom, "finite": finite.astype(jnp.float32)}
    metrics.update({k.removesuffix("_sum"): v / denom for k, v in metric_sums.items()})
    metrics.update(prune_metrics)
    return new, metrics

  batch_sh = sharding_lib.batch_sharding(mesh, rules)
  rep = sharding_lib.replicated(mesh)
  in_shardings = (state_shardings, batch_sh, rep)
  if frozen_shardings is not None:
    in_shardings += (frozen_shardings,)
  if teacher_shardings is not None:
    in_shardings += (teacher_shardings,)
  return jax.jit(step, in_shardings=in_shardings, out_shardings=(state_shardings, rep),
                 donate_argnums=(0,))


def _teacher(teacher_apply: Optional[Callable], params: Any) -> Optional[Teacher]:
  return None if params is None else Teacher(apply_fn=teacher_apply, params=params)


def make_eval_step(apply_fn: Callable, loss: Loss, train_cfg, state_shardings, mesh, rules, *,
                   teacher_apply: Optional[Callable] = None, teacher_shardings: Any = None):
  """Returns jitted ``(params, batch) -> (numerator sum, denominator)`` for a held-out split;
  with ``teacher_shardings`` (distillation) ``(params, batch, teacher)``."""

  def step(params, batch, teacher_params=None):
    ctx = LossContext(apply_fn=apply_fn, config=train_cfg,
                      teacher=_teacher(teacher_apply, teacher_params))
    num, metrics = loss.numerator(params, batch, ctx)
    return {"numerator": num, "denominator": loss.denominator(batch, train_cfg), **metrics}

  batch_sh = sharding_lib.batch_sharding(mesh, rules)
  in_shardings = (state_shardings.params, batch_sh)
  if teacher_shardings is not None:
    in_shardings += (teacher_shardings,)
  return jax.jit(step, in_shardings=in_shardings, out_shardings=sharding_lib.replicated(mesh))
