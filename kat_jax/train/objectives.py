"""Per-pair terms of the policy loss over prediction pairs ``[B, K, L-1]`` (tree or flat batch,
docs/DESIGN.md: batch contract): the policy objectives, registered by name and chosen by
``config.train.objective``; the KL to the frozen reference (``config.train.kl_estimator``); the
(clipped) value loss. ``kat_jax.train.losses`` reduces them with one aggregation mode::

    loss_bkl, terms = objectives.get(cfg.objective)(logp_bkl, batch, cfg)
    kl_bkl = objectives.kl_to_reference(logp_bkl, batch, cfg)           # field ref_logp
    v_loss_bkl, v_terms = objectives.value_loss(values_bkl, batch, cfg)  # field return

An objective is a pure function ``(logp [B, K, L-1], batch, config.train) -> (per-pair loss,
terms)``; ``terms`` are per-pair arrays the losses report as metrics, aggregated like the loss.
Per-trajectory fields are read for the pair that predicts their token (``pair_fields``); a field an
objective needs and the batch lacks is a ``ValueError`` naming it.

Objectives (r = π_θ / π_old per pair, A the pair's advantage, clip(r) = clip(r, 1 - ε_low,
1 + ε_high) with ε_low = ``clip_eps``, ε_high = ``clip_eps_high``, -1 = ε_low):

- ``nll``: -log π_θ (SFT).
- ``ppo``: -min(r·A, clip(r)·A). Dual clip (``dual_clip`` = c > 1; 0 = off): for A < 0 the
  surrogate is max(min(r·A, clip(r)·A), c·A), so the loss -surrogate is at most c·|A| however large
  r grows (pairs at the bound get no gradient). ``old_logp`` absent: stop_gradient(log π_θ), r = 1.
- ``gspo``: one ratio per trajectory, s_i = exp(Σ_t w_t (log π_θ - log π_old)_t / Σ_t w_t) over the
  trajectory's weighted pairs (w = ``pair_weights``: loss mask × validity × pruning keep), clipped
  with its own range (``gspo_clip_eps``, ``gspo_clip_eps_high``). Every pair t of trajectory i gets
  the loss ℓ_it = -min(s_i·A_it, clip(s_i)·A_it) — no stop-gradient anywhere: s_i is a function of
  all of the trajectory's token log-probs, so ∂ℓ_it/∂log π_θ(y_iu) = -A_it·s_i·w_u / Σ_t w_t where
  unclipped. With one advantage per trajectory and ``loss_agg=seq_mean_token_mean`` the loss is the
  GSPO sequence objective -mean_i min(s_i·A_i, clip(s_i)·A_i) and its gradient exactly
  -mean_i s_i·A_i·mean_t ∇log π_θ(y_it) (the paper's, where unclipped); other aggregations weight
  trajectory i by its pair count. With advantages that vary within a trajectory every pair's term
  still reaches all of its tokens through s_i (unlike GSPO-token's sg(s_i)·π_θ/sg(π_θ) per token;
  the two agree when the advantage is constant per trajectory).
- ``decoupled_ppo`` (AReaL): behaviour log-probs ``old_logp`` (the policy that sampled), proximal
  log-probs ``prox_logp`` (the policy the update is anchored to), r = π_θ / π_prox:
  loss = -(π_prox / π_behav)·min(r·A, clip(r)·A) (dual clip as in ``ppo``), the importance weight
  held constant (stop-gradient) and capped at ``decoupled_max_weight`` (0 = no cap).

The KL term (added by ``losses.policy_pair_loss`` with weight ``kl_coef``) estimates KL(π_θ ‖ π_ref)
at the sampled token from d = log π_ref - log π_θ: ``k1`` = -d, ``k2`` = d²/2, ``k3`` = e^d - d - 1
(≥ 0). Folding a KL penalty into the reward instead is the advantage estimator's job
(``kat_jax.rl.advantages``), with ``kl_coef = 0`` here.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

Objective = Callable[[jax.Array, dict, object], tuple[jax.Array, dict]]

_OBJECTIVES: dict[str, Objective] = {}


def register(name: str, fn: Objective) -> Objective:
  """Registers ``fn(logp, batch, config.train) -> (per-pair loss, terms)`` as ``name``."""
  if name in _OBJECTIVES:
    raise ValueError(f"objective {name!r} is already registered")
  _OBJECTIVES[name] = fn
  return fn


def get(name: str) -> Objective:
  if name not in _OBJECTIVES:
    raise ValueError(f"unknown objective {name!r}: registered objectives are {names()} "
                     f"(config.train.objective)")
  return _OBJECTIVES[name]


def names() -> list[str]:
  return sorted(_OBJECTIVES)


# ---------------------------------------------------------------------------------------------------
# The per-pair view of a batch: one reader for flat batches and trees.
# ---------------------------------------------------------------------------------------------------

def pair_fields(batch: dict, name: str, default: Optional[float] = 0.0):
  """Per-trajectory field of the *predicted* token of each pair (``field/<name>[..., 1:]``);
  absent: ``default`` everywhere, or None when ``default`` is None."""
  key = f"field/{name}"
  if key not in batch:
    return None if default is None else jnp.full(batch["pred_labels"].shape, default, jnp.float32)
  return batch[key][..., 1:].astype(jnp.float32)


def required_pair_field(batch: dict, name: str, needed_by: str) -> jax.Array:
  """``pair_fields`` of a field that must be present; else a ValueError naming it."""
  value = pair_fields(batch, name, None)
  if value is None:
    raise ValueError(f"{needed_by} needs the per-token batch field 'field/{name}' [B, K, L], "
                     f"which this batch lacks (docs/DESIGN.md: batch contract)")
  return value


def pair_weights(batch: dict) -> jax.Array:
  """Loss weight of each pair: the ``weight`` field (loss mask; 1 if absent) × pair validity ×
  the pruning keep mask of the predicted token (``keep`` [B, T], if present)."""
  w = pair_fields(batch, "weight", 1.0) * batch["pred_valid"].astype(jnp.float32)
  if "keep" in batch:
    b = jnp.arange(w.shape[0])[:, None, None]
    w = w * batch["keep"][b, batch["pred_label_rows"]].astype(jnp.float32)
  return w


# ---------------------------------------------------------------------------------------------------
# Policy objectives.
# ---------------------------------------------------------------------------------------------------

def clipped_surrogate(ratio, adv, eps_low: float, eps_high: float, dual_clip: float):
  """Per-pair loss -min(r·A, clip(r, 1 - eps_low, 1 + eps_high)·A); with ``dual_clip`` = c > 1
  (0 = off), -max(min(r·A, clip(r)·A), c·A) where A < 0. Terms: ``ratio``, ``clipped_frac`` (the
  clipped branch is taken), ``dual_clip_frac`` (with dual clip: the c·A bound is taken)."""
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
  surrogate = jnp.minimum(unclipped, clipped)
  terms = {"clipped_frac": (clipped < unclipped).astype(jnp.float32), "ratio": ratio}
  if dual_clip:
    bound = dual_clip * adv
    at_bound = (adv < 0) & (surrogate < bound)
    surrogate = jnp.where(at_bound, bound, surrogate)
    terms["dual_clip_frac"] = at_bound.astype(jnp.float32)
  return -surrogate, terms


def _clip_high(low: float, high: float) -> float:
  return low if high < 0 else high


def _old_logp(logp, batch):
  old = pair_fields(batch, "old_logp", None)
  return jax.lax.stop_gradient(logp) if old is None else old


def nll(logp, batch, cfg):
  del batch, cfg
  return -logp, {}


def ppo(logp, batch, cfg):
  adv = required_pair_field(batch, "advantage", "objective 'ppo'")
  ratio = jnp.exp(logp - _old_logp(logp, batch))
  return clipped_surrogate(ratio, adv, cfg.clip_eps, _clip_high(cfg.clip_eps, cfg.clip_eps_high),
                           cfg.dual_clip)


def sequence_log_ratio(logp, old_logp, weights):
  """log s_i = Σ_t w_t (logp - old_logp)_t / Σ_t w_t per trajectory, broadcast over its pairs
  (0 for a trajectory without weighted pairs)."""
  diff = jnp.where(weights > 0, weights * (logp - old_logp), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  log_s = jnp.sum(diff, axis=-1, keepdims=True) / jnp.maximum(total, 1e-9)
  return jnp.broadcast_to(log_s, logp.shape)


def gspo(logp, batch, cfg):
  adv = required_pair_field(batch, "advantage", "objective 'gspo'")
  log_s = sequence_log_ratio(logp, _old_logp(logp, batch), pair_weights(batch))
  return clipped_surrogate(jnp.exp(log_s), adv, cfg.gspo_clip_eps,
                           _clip_high(cfg.gspo_clip_eps, cfg.gspo_clip_eps_high), cfg.dual_clip)


def decoupled_ppo(logp, batch, cfg):
  needed_by = "objective 'decoupled_ppo'"
  adv = required_pair_field(batch, "advantage", needed_by)
  behaviour = required_pair_field(batch, "old_logp", needed_by)
  proximal = required_pair_field(batch, "prox_logp", needed_by)
  weight = jax.lax.stop_gradient(jnp.exp(proximal - behaviour))
  if cfg.decoupled_max_weight:
    weight = jnp.minimum(weight, cfg.decoupled_max_weight)
  loss, terms = clipped_surrogate(jnp.exp(logp - proximal), adv, cfg.clip_eps,
                                  _clip_high(cfg.clip_eps, cfg.clip_eps_high), cfg.dual_clip)
  return weight * loss, {**terms, "behaviour_weight": weight}


NLL = register("nll", nll)
PPO = register("ppo", ppo)
GSPO = register("gspo", gspo)
DECOUPLED_PPO = register("decoupled_ppo", decoupled_ppo)


# ---------------------------------------------------------------------------------------------------
# KL to the reference and the value loss.
# ---------------------------------------------------------------------------------------------------

# Estimators of KL(π_θ ‖ π_ref) at a sampled token from d = log π_ref - log π_θ.
KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "k1": lambda d: -d,                     # log π_θ - log π_ref: unbiased, high variance, signed
    "k2": lambda d: 0.5 * jnp.square(d),    # d²/2 >= 0: biased, low variance
    "k3": lambda d: jnp.expm1(d) - d,       # e^d - d - 1 >= 0: unbiased, low variance
}


def kl_estimator(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {name!r}: use one of {sorted(KL_ESTIMATORS)} "
                     f"(config.train.kl_estimator)")
  return KL_ESTIMATORS[name]


def kl_to_reference(logp, batch, cfg) -> jax.Array:
  """Per-pair KL estimate (``config.train.kl_estimator``) to the reference log-probs
  ``field/ref_logp``."""
  ref = required_pair_field(batch, "ref_logp", "the KL term (config.train.kl_coef > 0)")
  return kl_estimator(cfg.kl_estimator)(ref - logp)


def value_loss(values, batch, cfg) -> tuple[jax.Array, dict]:
  """Per-pair value loss against ``field/return``: ½(V - R)², or with ``value_clip`` = c > 0
  ½·max((V - R)², (clip(V, V_old - c, V_old + c) - R)²) with V_old = ``field/old_values``. Terms:
  ``value_clipped_frac`` (with clipping: the clipped error is the larger)."""
  returns = required_pair_field(batch, "return", "the value loss (config.train.value_coef > 0)")
  unclipped = jnp.square(values - returns)
  if not cfg.value_clip:
    return 0.5 * unclipped, {}
  old = required_pair_field(batch, "old_values", "the clipped value loss (config.train.value_clip)")
  clipped = jnp.square(jnp.clip(values, old - cfg.value_clip, old + cfg.value_clip) - returns)
  return 0.5 * jnp.maximum(unclipped, clipped), {
      "value_clipped_frac": (clipped > unclipped).astype(jnp.float32)}
