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


def _weight_sum(batch):
  return jnp.sum(batch["weights"])


# Next-token cross-entropy with per-token weights (loss masks): mid-training and flat SFT.
LM = register("lm", Loss(numerator=_lm_numerator, denominator=_weight_sum))


# ---------------------------------------------------------------------------------------------------
# Per-trajectory losses over prediction pairs [.., K, L-1]: one reducer for flat batches and trees.
# ---------------------------------------------------------------------------------------------------

def pair_fields(batch: dict, name: str, default: float = 0.0):
  """Per-trajectory field of the *predicted* token of each pair (``field/<name>[..., 1:]``)."""
  key = f"field/{name}"
  if key not in batch:
    return None if default is None else jnp.full(batch["pred_labels"].shape, default, jnp.float32)
  return batch[key][..., 1:].astype(jnp.float32)


def pair_weights(batch: dict) -> jax.Array:
  """Loss weight of each pair: the ``weight`` field (loss mask; 1 if absent) × pair validity ×
  the pruning keep mask of the predicted token (``keep`` [B, T], if present)."""
  w = pair_fields(batch, "weight", 1.0) * batch["pred_valid"].astype(jnp.float32)
  if "keep" in batch:
    b = jnp.arange(w.shape[0])[:, None, None]
    w = w * batch["keep"][b, batch["pred_label_rows"]].astype(jnp.float32)
  return w


def reduce_pairs(loss_bkl: jax.Array, weights_bkl: jax.Array, normalizer: str):
  """(numerator, denominator) of a weighted per-pair loss.

  ``token``: sum(w·l) / sum(w) — every trained token counts once per trajectory it belongs to
  (a shared prompt token of 4 trajectories counts 4 times, exactly as in the flat batch);
  ``sequence``: mean over trajectories of each trajectory's weighted token mean.
  """
  if normalizer == "token":
    return jnp.sum(weights_bkl * loss_bkl), jnp.sum(weights_bkl)
  if normalizer == "sequence":
    per_traj_w = jnp.sum(weights_bkl, axis=-1)
    per_traj = jnp.sum(weights_bkl * loss_bkl, axis=-1) / jnp.maximum(per_traj_w, 1e-9)
    has = (per_traj_w > 0).astype(jnp.float32)
    return jnp.sum(per_traj * has), jnp.sum(has)
  raise ValueError(f"unknown normalizer {normalizer!r}: use 'token' or 'sequence' "
                   f"(config.train.normalizer)")


def policy_pair_loss(logp, batch: dict, cfg) -> tuple[jax.Array, dict]:
  """Per-pair loss by ``cfg.objective``: ``nll`` (SFT) or ``ppo`` (clipped ratio with per-pair
  advantages; GRPO is ``ppo`` with group-relative advantages and an optional KL to a reference)."""
  objective = cfg.objective
  if objective == "nll":
    return -logp, {}
  if objective == "ppo":
    adv = pair_fields(batch, "advantage", 0.0)
    old = pair_fields(batch, "old_logp", None)
    old = jax.lax.stop_gradient(logp) if old is None else old
    ratio = jnp.exp(logp - old)
    eps_lo = cfg.clip_eps
    eps_hi = eps_lo if cfg.clip_eps_high < 0 else cfg.clip_eps_high
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_lo, 1.0 + eps_hi) * adv
    loss = -jnp.minimum(unclipped, clipped)
    terms = {"clipped_frac": (clipped < unclipped).astype(jnp.float32), "ratio": ratio}
    beta = cfg.kl_coef
    ref = pair_fields(batch, "ref_logp", None)
    if beta and ref is not None:
      d = ref - logp
      kl = jnp.exp(d) - d - 1.0          # k3 estimator, >= 0
      loss = loss + beta * kl
      terms["kl"] = kl
    return loss, terms
  raise ValueError(f"unknown objective {objective!r}: use 'nll' or 'ppo' (config.train.objective)")


def _tree_numerator(params, batch, ctx: LossContext, normalizer: str):
  from kat_jax.tree.logprobs import tree_logprobs
  cfg = ctx.config
  out = tree_logprobs(ctx.apply_fn, params, batch,
                      return_values=cfg.value_coef > 0, logits_chunk=cfg.logits_chunk)
  w = pair_weights(batch)
  loss, terms = policy_pair_loss(out["logp"], batch, cfg)
  num, _ = reduce_pairs(loss, w, normalizer)
  metrics = {"nll_sum": reduce_pairs(-out["logp"], w, normalizer)[0],
             "entropy_sum": reduce_pairs(out["entropy"], w, normalizer)[0]}
  for k, v in terms.items():
    metrics[f"{k}_sum"] = reduce_pairs(v, w, normalizer)[0]
  ent_coef = cfg.entropy_coef
  if ent_coef:
    num = num - ent_coef * metrics["entropy_sum"]
  if "values" in out:
    returns = pair_fields(batch, "return", 0.0)
    v_loss = 0.5 * jnp.square(out["values"] - returns)
    metrics["value_loss_sum"] = reduce_pairs(v_loss, w, normalizer)[0]
    num = num + cfg.value_coef * metrics["value_loss_sum"]
  return num, metrics


def make_tree_loss(normalizer: str) -> Loss:
  """Tree (or flat-as-tree) loss with a fixed normalizer; the objective comes from config.train."""
  def denominator(batch):
    return reduce_pairs(jnp.zeros(batch["pred_labels"].shape, jnp.float32), pair_weights(batch),
                        normalizer)[1]

  def numerator(params, batch, ctx):
    return _tree_numerator(params, batch, ctx, normalizer)

  return Loss(numerator=numerator, denominator=denominator)


# Trees with per-trajectory losses: token-mean and sequence-mean normalizers.
TREE = register("tree", make_tree_loss("token"))
TREE_SEQUENCE_MEAN = register("tree_sequence_mean", make_tree_loss("sequence"))
