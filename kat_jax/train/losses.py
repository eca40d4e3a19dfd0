"""Losses as (numerator, denominator) pairs, registered by name and chosen by ``config.train.loss``.

A loss splits into ``numerator(params, batch, ctx) -> (scalar, metrics)``, differentiable, and
``denominator(batch) -> scalar`` that depends on the data only. The step computes the denominator of the
whole global batch once, so gradient accumulation and data parallelism give exactly the full-batch loss
``sum(numerators) / denominator`` — the same reducer serves SFT means, token means and sequence means.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kat_jax.model.attention import intervals_from_segment_ids


@dataclasses.dataclass(frozen=True)
class LossContext:
  """What a loss needs besides params and batch."""
  apply_fn: Callable[..., Any]          # model.apply
  config: Any                           # config.train (ConfigDict)
  rng: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Loss:
  numerator: Callable[[Any, dict, LossContext], tuple[jax.Array, dict]]
  denominator: Callable[[dict], jax.Array]


_LOSSES: dict[str, Loss] = {}


def register(name: str, loss: Loss) -> Loss:
  if name in _LOSSES:
    raise ValueError(f"loss {name!r} is already registered")
  _LOSSES[name] = loss
  return loss


def get_loss(name: str) -> Loss:
  if name not in _LOSSES:
    raise ValueError(f"unknown loss {name!r}: registered losses are {sorted(_LOSSES)} "
                     f"(config.train.loss)")
  return _LOSSES[name]


def token_log_probs(logits_btv: jax.Array, targets_bt: jax.Array):
  """log p(target) and log Z per position, float32."""
  logits = logits_btv.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  return target_logit - log_z, log_z


def cross_entropy_sums(logits_btv, targets_bt, weights_bt, z_loss: float = 0.0):
  """Weighted sums of next-token cross-entropy (+ optional z-loss) — the numerator of the LM loss."""
  logp, log_z = token_log_probs(logits_btv, targets_bt)
  ce_sum = -jnp.sum(weights_bt * logp)
  z_sum = jnp.sum(weights_bt * jnp.square(log_z))
  correct = jnp.sum(weights_bt * (jnp.argmax(logits_btv, axis=-1) == targets_bt))
  return ce_sum + z_loss * z_sum, {"ce_sum": ce_sum, "z_sum": z_sum, "correct_sum": correct}


def _lm_numerator(params, batch, ctx: LossContext):
  mask = intervals_from_segment_ids(batch["segment_ids"])
  out = ctx.apply_fn({"params": params}, batch["inputs"], batch["positions"], mask)
  return cross_entropy_sums(out.logits, batch["targets"], batch["weights"],
                            ctx.config.get("z_loss", 0.0))


def _weight_sum(batch):
  return jnp.sum(batch["weights"])


# Next-token cross-entropy with per-token weights (loss masks): mid-training and flat SFT.
LM = register("lm", Loss(numerator=_lm_numerator, denominator=_weight_sum))
