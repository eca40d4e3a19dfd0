"""Losses as (numerator, denominator) pairs, registered by name and chosen by ``config.train.loss``.

A loss splits into ``numerator(params, batch, ctx) -> (scalar, metrics)``, differentiable, and
``denominator(batch, config.train) -> scalar`` that depends on the data (and the config) only, never
on params. The step computes the denominator of the whole global batch once, so gradient
accumulation and data parallelism give exactly the full-batch loss ``sum(numerators) / denominator``
— the same reducer serves SFT means, token means, sequence means and constant normalizers::

    loss = losses.get_loss("tree")
    num, metrics = loss.numerator(params, batch, LossContext(apply_fn, config.train))
    value = num / loss.denominator(batch, config.train)

The tree losses reduce the per-pair terms of ``kat_jax.train.objectives`` with one aggregation mode
(``AGGREGATIONS``): ``tree`` takes it from ``config.train.loss_agg``, ``tree_sequence_mean`` fixes it
to ``seq_mean_token_mean``. ``distill`` (``kat_jax.train.distill``, registered on import of this
module) mixes the LM / tree cross-entropy with a divergence to a frozen teacher.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kat_jax.model.attention import intervals_from_segment_ids
from kat_jax.train import objectives
from kat_jax.train.objectives import pair_fields, pair_weights  # the per-pair batch view


@dataclasses.dataclass(frozen=True)
class LossContext:
  """What a loss needs besides params and batch."""
  apply_fn: Callable[..., Any]          # model.apply
  config: Any                           # config.train (ConfigDict)
  rng: jax.Array | None = None
  teacher: Any = None                   # the distill loss's frozen teacher (distill.Teacher)


@dataclasses.dataclass(frozen=True)
class Loss:
  numerator: Callable[[Any, dict, LossContext], tuple[jax.Array, dict]]
  # (batch, config.train or None) -> scalar: data only. Losses whose aggregation the config
  # chooses (``tree``) read it; without a config they give their default (the token mean).
  denominator: Callable[..., jax.Array]


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
  return _ce_sums(logp, log_z, jnp.argmax(logits_btv, axis=-1), targets_bt, weights_bt, z_loss)


def _ce_sums(logp, log_z, argmax, targets_bt, weights_bt, z_loss):
  ce_sum = -jnp.sum(weights_bt * logp)
  z_sum = jnp.sum(weights_bt * jnp.square(log_z))
  correct = jnp.sum(weights_bt * (argmax == targets_bt))
  return ce_sum + z_loss * z_sum, {"ce_sum": ce_sum, "z_sum": z_sum, "correct_sum": correct}


def _lm_numerator(params, batch, ctx: LossContext):
  mask = intervals_from_segment_ids(batch["segment_ids"])
  z_loss, chunk = ctx.config.z_loss, ctx.config.logits_chunk
  if not chunk:
    out = ctx.apply_fn({"params": params}, batch["inputs"], batch["positions"], mask)
    return cross_entropy_sums(out.logits, batch["targets"], batch["weights"], z_loss)
  # The output head a few rows at a time (kat_jax.tree.logprobs.chunked_rows): no [B, T, V].
  from kat_jax.tree.logprobs import chunked_rows
  out = ctx.apply_fn({"params": params}, batch["inputs"], batch["positions"], mask,
                     return_hidden=True, compute_logits=False)

  def stats(h):
    logits = ctx.apply_fn({"params": params}, h, method="output_head")
    return jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1)

  log_z, argmax = chunked_rows(stats, out.hidden, chunk)
  target_logit = ctx.apply_fn({"params": params}, out.hidden, batch["targets"],
                              method="output_head")
  return _ce_sums(target_logit - log_z, log_z, argmax, batch["targets"], batch["weights"], z_loss)


def _weight_sum(batch, config=None):
  del config
  return jnp.sum(batch["weights"])


# Next-token cross-entropy with per-token weights (loss masks): mid-training and flat SFT.
LM = register("lm", Loss(numerator=_lm_numerator, denominator=_weight_sum))


# ---------------------------------------------------------------------------------------------------
# Per-trajectory losses over prediction pairs [.., K, L-1]: one reducer for flat batches and trees.
# ---------------------------------------------------------------------------------------------------

def _valid_trajectories(weights_bkl):
  """Trajectories with at least one weighted pair, [B, K] float (padding and fully masked or pruned
  trajectories do not count)."""
  return (jnp.sum(weights_bkl, axis=-1) > 0).astype(jnp.float32)


def _token_mean(loss_bkl, weights_bkl, agg_constant):
  del agg_constant
  return jnp.sum(weights_bkl * loss_bkl), jnp.sum(weights_bkl)


def _seq_mean_token_mean(loss_bkl, weights_bkl, agg_constant):
  del agg_constant
  per_traj_w = jnp.sum(weights_bkl, axis=-1)
  per_traj = jnp.sum(weights_bkl * loss_bkl, axis=-1) / jnp.maximum(per_traj_w, 1e-9)
  has = _valid_trajectories(weights_bkl)
  return jnp.sum(per_traj * has), jnp.sum(has)


def _seq_mean_token_sum(loss_bkl, weights_bkl, agg_constant):
  del agg_constant
  return jnp.sum(weights_bkl * loss_bkl), jnp.sum(_valid_trajectories(weights_bkl))


def _constant(loss_bkl, weights_bkl, agg_constant):
  if agg_constant is None:
    raise ValueError("aggregation 'constant' needs agg_constant (config.train.agg_constant)")
  return (jnp.sum(weights_bkl * loss_bkl),
          agg_constant * jnp.sum(_valid_trajectories(weights_bkl)))


# Aggregation modes (``config.train.loss_agg``): (loss [B, K, L-1], weights, agg_constant) ->
# (numerator, denominator), the denominator from the weights (data) only. Each trajectory counts
# its own pairs: a prompt token shared by 4 trajectories of a tree counts 4 times, as in the flat
# batch.
AGGREGATIONS = {
    "token_mean": _token_mean,                    # sum(w·l) / sum(w)
    "seq_mean_token_mean": _seq_mean_token_mean,  # mean over trajectories of each one's token mean
    "seq_mean_token_sum": _seq_mean_token_sum,    # mean over trajectories of each one's sum(w·l)
    "constant": _constant,                        # Dr. GRPO: sum(w·l) / (agg_constant · n_traj)
}
# The normalizer names ``reduce_pairs`` took before ``loss_agg`` existed.
_NORMALIZER_ALIASES = {"token": "token_mean", "sequence": "seq_mean_token_mean"}


def reduce_pairs(loss_bkl: jax.Array, weights_bkl: jax.Array, mode: str,
                 agg_constant: float | None = None):
  """(numerator, denominator) of a weighted per-pair loss by aggregation ``mode``
  (``AGGREGATIONS``; ``token`` / ``sequence`` name ``token_mean`` / ``seq_mean_token_mean``).
  A trajectory counts in the sequence and constant modes when it has a weighted pair."""
  name = _NORMALIZER_ALIASES.get(mode, mode)
  if name not in AGGREGATIONS:
    raise ValueError(f"unknown aggregation {mode!r}: use one of {sorted(AGGREGATIONS)} "
                     f"(config.train.loss_agg)")
  return AGGREGATIONS[name](loss_bkl, weights_bkl, agg_constant)


def policy_pair_loss(logp, batch: dict, cfg) -> tuple[jax.Array, dict]:
  """Per-pair loss and terms of ``cfg.objective`` (``kat_jax.train.objectives``) plus, with
  ``cfg.kl_coef > 0``, ``kl_coef`` × the KL estimate to the reference (term ``kl``). GRPO is
  ``ppo`` with group-relative advantages and an optional KL to the reference."""
  loss, terms = objectives.get(cfg.objective)(logp, batch, cfg)
  if cfg.kl_coef:
    kl = objectives.kl_to_reference(logp, batch, cfg)
    loss = loss + cfg.kl_coef * kl
    terms = {**terms, "kl": kl}
  return loss, terms


def _aggregation(fixed: str | None, config) -> tuple[str, float | None]:
  """(mode, agg_constant) of a tree loss: its fixed mode, else config.train's ``loss_agg``."""
  if fixed is not None:
    return fixed, None
  if config is None:
    return "token_mean", None
  return config.loss_agg, config.agg_constant


def _tree_numerator(params, batch, ctx: LossContext, fixed_agg: str | None):
  from kat_jax.tree.logprobs import tree_logprobs
  cfg = ctx.config
  mode, agg_constant = _aggregation(fixed_agg, cfg)
  w = pair_weights(batch)

  def reduce(per_pair):
    return reduce_pairs(per_pair, w, mode, agg_constant)[0]

  out = tree_logprobs(ctx.apply_fn, params, batch,
                      return_values=cfg.value_coef > 0, logits_chunk=cfg.logits_chunk)
  loss, terms = policy_pair_loss(out["logp"], batch, cfg)
  num = reduce(loss)
  metrics = {"nll_sum": reduce(-out["logp"]), "entropy_sum": reduce(out["entropy"])}
  metrics.update({f"{k}_sum": reduce(v) for k, v in terms.items()})
  if cfg.entropy_coef:
    num = num - cfg.entropy_coef * metrics["entropy_sum"]
  if "values" in out:
    v_loss, v_terms = objectives.value_loss(out["values"], batch, cfg)
    metrics["value_loss_sum"] = reduce(v_loss)
    metrics.update({f"{k}_sum": reduce(v) for k, v in v_terms.items()})
    num = num + cfg.value_coef * metrics["value_loss_sum"]
  return num, metrics


def make_tree_loss(fixed_agg: str | None = None) -> Loss:
  """Tree (or flat-as-tree) loss; the objective comes from config.train, the aggregation mode is
  ``fixed_agg`` or (None) ``config.train.loss_agg``. Metrics (``<term>_sum``) are aggregated like
  the loss, so the step's division by the denominator gives their mean in that mode."""
  def denominator(batch, config=None):
    mode, agg_constant = _aggregation(fixed_agg, config)
    zeros = jnp.zeros(batch["pred_labels"].shape, jnp.float32)
    return reduce_pairs(zeros, pair_weights(batch), mode, agg_constant)[1]

  def numerator(params, batch, ctx):
    return _tree_numerator(params, batch, ctx, fixed_agg)

  return Loss(numerator=numerator, denominator=denominator)


# Trees with per-trajectory losses: ``tree`` aggregates by config.train.loss_agg (default token
# mean); ``tree_sequence_mean`` is always the mean over trajectories of their token means.
TREE = register("tree", make_tree_loss())
TREE_SEQUENCE_MEAN = register("tree_sequence_mean", make_tree_loss("seq_mean_token_mean"))

# Knowledge distillation (``distill``: flat and tree batches) registers itself on import.
from kat_jax.train import distill as _distill  # noqa: E402,F401  (imports this module)
