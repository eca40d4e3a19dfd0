"""Advantage estimators of agentic RL: pure jnp functions, registered by name, chosen by config.

The RL loop hands a batch of N trajectories padded to L tokens; the trajectories of one task form a
group (``group_ids``). An estimator is ``fn(inputs, cfg) -> (advantages [N, L], returns [N, L])``,
both float32 and 0 outside the action tokens (``mask``) and on padding rows (``valid`` False)::

    cfg = advantages.default_advantage_config()             # config.rl.advantage
    advantages.validate_config(cfg)                         # at start-up: ConfigError if bad
    inputs = advantages.AdvantageInputs(rewards=r, group_ids=g, mask=m, values=v, kl=kl,
                                        valid=ok, entropy=h)  # entropy: only for entropy scaling
    adv, ret = advantages.compute(cfg.name, inputs, cfg)    # jitted inside; also fine under jit

``compute`` freezes ``cfg`` (``ml_collections.FrozenConfigDict``, hashable) and runs one
``jax.jit`` with the name and the frozen config static, so the RL loop calls it with a plain
ConfigDict from Python or from inside its own jitted step; equal configs reuse one compilation.
A registered function reads plain Python scalars from ``cfg`` at trace time, so it may also be
jitted directly with ``cfg`` closed over (``jax.jit(functools.partial(grpo, cfg=cfg))``).

``returns`` are value targets and only ``gae`` has them (``R_t = A_t + V_t``); every other
estimator returns ``returns = advantages`` (the same array), which a critic-free loop ignores.

Registered: ``gae``, ``grpo``, ``drgrpo``, ``rloo``, ``reinforce_pp``; more with
``register(name, fn)``. ``cfg.entropy_scaling.enabled`` wraps the chosen estimator in
``entropy_scaled`` (per-group advantage scale from policy entropy and pass rate).

The per-token reward (``gae``, ``reinforce_pp``) puts a trajectory's reward on its LAST action
token, minus ``cfg.kl_in_reward * kl_t`` on every action token. The MDP steps are the action
tokens only: prompt and tool-observation tokens are skipped, so the next step of action token t
is the next action token of its row, and after the last one the episode ends (V = 0).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from kat_jax.errors import ConfigError

CONFIG_PATH = "config.rl.advantage"   # where the advantage section lives, for error messages


@flax.struct.dataclass
class AdvantageInputs:
  """One batch of N trajectories padded to L tokens (a jax pytree)."""
  rewards: jax.Array      # [N] float: each trajectory's scalar outcome reward
  group_ids: jax.Array    # [N] int: trajectories of the same task share an id (any ints)
  mask: jax.Array         # [N, L] bool: action tokens (sampled by the policy), the RL steps
  values: jax.Array       # [N, L] float: critic value at each token (only gae reads it)
  kl: jax.Array           # [N, L] float: log pi - log pi_ref at action tokens (zeros if unused)
  valid: jax.Array        # [N] bool: real trajectory; False = padding (advantage 0, no group part)
  entropy: Optional[jax.Array] = None   # [N, L] float: policy entropy per token (entropy scaling)


AdvantageFn = Callable[[AdvantageInputs, Any], tuple[jax.Array, jax.Array]]

_ESTIMATORS: dict[str, AdvantageFn] = {}


def register(name: str, fn: AdvantageFn) -> AdvantageFn:
  """Adds ``fn(inputs, cfg) -> (advantages [N, L], returns [N, L])`` under ``name``."""
  if name in _ESTIMATORS:
    raise ValueError(f"advantage estimator {name!r} is already registered")
  _ESTIMATORS[name] = fn
  return fn


def names() -> list[str]:
  return sorted(_ESTIMATORS)


def get(name: str) -> AdvantageFn:
  if name not in _ESTIMATORS:
    raise ValueError(f"unknown advantage estimator {name!r}: registered estimators are "
                     f"{names()} ({CONFIG_PATH}.name)")
  return _ESTIMATORS[name]


def default_advantage_config() -> ml_collections.ConfigDict:
  """The advantage section of an RL config (config.rl.advantage)."""
  c = ml_collections.ConfigDict()
  c.name = "grpo"           # the estimator, one of advantages.names()
  c.gamma = 1.0             # discount per action step (gae, reinforce_pp), in [0, 1]
  c.lam = 0.95              # GAE lambda (gae), in [0, 1]
  c.kl_in_reward = 0.0      # r_t -= kl_in_reward * kl_t at action tokens (gae, reinforce_pp), >= 0
  c.std_normalize = True    # grpo: divide by the group's reward std (False: drgrpo's centering)
  c.std_ddof = 1            # grpo: group std with n - std_ddof in the denominator (1 or 0)
  c.eps = 1e-6              # grpo: / (std + eps); reinforce_pp: whitening / (std + eps); >= 0
  c.entropy_scaling = ml_collections.ConfigDict(dict(
      enabled=False,        # wrap the estimator in entropy_scaled (needs inputs.entropy)
      alpha=0.5,            # weight of the group's relative entropy (H_group - H_batch) / H_batch
      beta=0.5,             # weight of the group's outcome uncertainty 4 p (1 - p), centered
      lo=0.5,               # the scale is clipped to [lo, hi]; 0 < lo <= 1
      hi=2.0,               # upper clip of the scale; hi >= 1
  ))
  return c


def validate_config(cfg) -> None:
  """Checks the advantage section at start-up; raises ConfigError naming the field and the fix."""
  for field in ("name", "gamma", "lam", "kl_in_reward", "std_normalize", "std_ddof", "eps",
                "entropy_scaling"):
    if field not in cfg:
      raise ConfigError(f"{CONFIG_PATH}.{field} is missing: start from "
                        f"advantages.default_advantage_config()")
  if cfg.name not in _ESTIMATORS:
    raise ConfigError(f"{CONFIG_PATH}.name={cfg.name!r} is not a registered estimator: set it "
                      f"to one of {names()}")
  _number(cfg, "gamma", 0.0, 1.0)
  _number(cfg, "lam", 0.0, 1.0)
  _number(cfg, "kl_in_reward", 0.0, math.inf)
  _number(cfg, "eps", 0.0, math.inf)
  _flag(cfg, "std_normalize")
  if cfg.std_ddof not in (0, 1) or isinstance(cfg.std_ddof, bool):
    raise ConfigError(f"{CONFIG_PATH}.std_ddof={cfg.std_ddof!r} must be 0 (population std) or 1 "
                      f"(sample std)")
  es = cfg.entropy_scaling
  for field in ("enabled", "alpha", "beta", "lo", "hi"):
    if field not in es:
      raise ConfigError(f"{CONFIG_PATH}.entropy_scaling.{field} is missing: start from "
                        f"advantages.default_advantage_config()")
  _flag(es, "enabled", "entropy_scaling.")
  _number(es, "alpha", 0.0, math.inf, "entropy_scaling.")
  _number(es, "beta", 0.0, math.inf, "entropy_scaling.")
  _number(es, "hi", 1.0, math.inf, "entropy_scaling.")
  lo = _number(es, "lo", 0.0, 1.0, "entropy_scaling.")
  if lo <= 0:
    raise ConfigError(f"{CONFIG_PATH}.entropy_scaling.lo={lo!r} must be > 0: a scale of 0 or "
                      f"less would erase or flip advantages")


def _number(section, field: str, lo: float, hi: float, prefix: str = "") -> float:
  value = section[field]
  try:
    x = float(value) if not isinstance(value, bool) else math.nan
  except (TypeError, ValueError):
    x = math.nan
  if not (math.isfinite(x) and lo <= x <= hi):
    raise ConfigError(f"{CONFIG_PATH}.{prefix}{field}={value!r} must be a finite number in "
                      f"[{lo}, {hi}]")
  return x


def _flag(section, field: str, prefix: str = "") -> None:
  if not isinstance(section[field], bool):
    raise ConfigError(f"{CONFIG_PATH}.{prefix}{field}={section[field]!r} must be True or False")


def validate_inputs(inputs: AdvantageInputs) -> None:
  """Checks shapes and dtypes (static, so also at trace time); ValueError naming the field."""
  if inputs.rewards.ndim != 1:
    raise ValueError(f"inputs.rewards has shape {inputs.rewards.shape}: pass one reward per "
                     f"trajectory, shape [N]")
  n = inputs.rewards.shape[0]
  if inputs.mask.ndim != 2 or inputs.mask.shape[0] != n:
    raise ValueError(f"inputs.mask has shape {inputs.mask.shape}: pass [N, L] with N={n}, the "
                     f"number of rewards")
  shapes = {"rewards": (n,), "group_ids": (n,), "valid": (n,), "mask": inputs.mask.shape,
            "values": inputs.mask.shape, "kl": inputs.mask.shape}
  if inputs.entropy is not None:
    shapes["entropy"] = inputs.mask.shape
  for field, shape in shapes.items():
    x = getattr(inputs, field)
    if tuple(x.shape) != tuple(shape):
      raise ValueError(f"inputs.{field} has shape {tuple(x.shape)}, expected {tuple(shape)} "
                       f"(N trajectories, L tokens, as inputs.mask)")
  for field in ("mask", "valid"):
    if getattr(inputs, field).dtype != jnp.bool_:
      raise ValueError(f"inputs.{field} has dtype {getattr(inputs, field).dtype}: pass a bool "
                       f"array (e.g. weights > 0)")
  if not jnp.issubdtype(inputs.group_ids.dtype, jnp.integer):
    raise ValueError(f"inputs.group_ids has dtype {inputs.group_ids.dtype}: pass integers")
  for field in ("rewards", "values", "kl", "entropy"):
    x = getattr(inputs, field)
    if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"inputs.{field} has dtype {x.dtype}: pass a float array")


def compute(name: str, inputs: AdvantageInputs, cfg=None) -> tuple[jax.Array, jax.Array]:
  """``(advantages [N, L], returns [N, L])`` of the estimator ``name``, wrapped in
  ``entropy_scaled`` when ``cfg.entropy_scaling.enabled``; both float32 and 0 outside
  ``mask`` and on padding rows. ``returns`` are gae's value targets; every other estimator
  returns its advantages there (with entropy scaling: the unscaled ones). ``cfg`` defaults to
  ``default_advantage_config()``; an unknown ``name`` raises ValueError listing the registered
  ones."""
  cfg = default_advantage_config() if cfg is None else cfg
  get(name)
  validate_config(cfg)
  validate_inputs(inputs)
  return _compute_jit(name, ml_collections.FrozenConfigDict(cfg), inputs)


def _compute(name: str, cfg, inputs: AdvantageInputs):
  fn = get(name)
  if cfg.entropy_scaling.enabled:
    fn = entropy_scaled(fn)
  return fn(inputs, cfg)


_compute_jit = jax.jit(_compute, static_argnums=(0, 1))


# --------------------------------------------------------------------------------------------------
# Shared pieces.
# --------------------------------------------------------------------------------------------------

def action_mask(inputs: AdvantageInputs) -> jax.Array:
  """[N, L] bool: action tokens of real (valid) trajectories, where advantages live."""
  return inputs.mask & inputs.valid[:, None]


def broadcast_to_tokens(per_trajectory: jax.Array, inputs: AdvantageInputs) -> jax.Array:
  """[N] -> [N, L]: each trajectory's value on its action tokens, 0 elsewhere and on padding."""
  return jnp.where(action_mask(inputs), per_trajectory[:, None].astype(jnp.float32), 0.0)


def token_rewards(inputs: AdvantageInputs, kl_coef: float = 0.0) -> jax.Array:
  """[N, L] float32 per-token reward: the trajectory's reward at its last action token, minus
  ``kl_coef * kl`` at every action token; 0 elsewhere and on padding rows."""
  m = action_mask(inputs)
  position = jnp.arange(m.shape[1])
  last = jnp.max(jnp.where(m, position, -1), axis=1)            # -1: no action token
  r = jnp.where(m & (position == last[:, None]), inputs.rewards[:, None].astype(jnp.float32), 0.0)
  if kl_coef:   # a static 0 adds nothing, not even 0 * NaN from unused kl entries
    r = r - jnp.where(m, kl_coef * inputs.kl.astype(jnp.float32), 0.0)
  return r


def _reverse_action_scan(r, v, m, gamma: float, lam: float) -> jax.Array:
  """GAE over the action tokens of each row: ``A_t = delta_t + gamma lam A_t'`` with
  ``delta_t = r_t + gamma V_t' - V_t``, t' the next action token of the row (V = A = 0 after
  the last). A reverse ``lax.scan`` over positions that carries the last action step's value and
  advantage through non-action tokens (exactly the scan over the compacted steps). [N, L] in and
  out; 0 outside ``m``."""
  def step(carry, x):
    next_v, next_a = carry
    r_t, v_t, m_t = x
    delta = r_t + gamma * next_v - v_t
    a_t = delta + (gamma * lam) * next_a
    carry = (jnp.where(m_t, v_t, next_v), jnp.where(m_t, a_t, next_a))
    return carry, jnp.where(m_t, a_t, 0.0)
  zeros = jnp.zeros(r.shape[:1], jnp.float32)
  _, a = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
  return a.T


def _groups(inputs: AdvantageInputs) -> tuple[jax.Array, int]:
  """Dense group index in [0, N) per row (``group_ids`` may be any ints) and N."""
  n = inputs.rewards.shape[0]
  _, dense = jnp.unique(inputs.group_ids, return_inverse=True, size=n)
  return dense.reshape(n), n


def _group_sum(x: jax.Array, dense: jax.Array, n: int) -> jax.Array:
  """[N] -> [N]: the sum of ``x`` over each row's group."""
  return jax.ops.segment_sum(x, dense, num_segments=n)[dense]


def _group_centered(inputs: AdvantageInputs):
  """Rewards shifted by their group's minimum (so equal rewards give exact zeros), and per row:
  the shifted reward c_i, the group's sum of c and its number of valid members (0 on padding)."""
  dense, n = _groups(inputs)
  valid = inputs.valid
  r = inputs.rewards.astype(jnp.float32)
  ref = jax.ops.segment_min(jnp.where(valid, r, jnp.inf), dense, num_segments=n)[dense]
  c = jnp.where(valid, r - jnp.where(valid, ref, 0.0), 0.0)
  count = _group_sum(valid.astype(jnp.float32), dense, n)
  return c, _group_sum(c, dense, n), count, dense, n


def _safe_div(num, den):
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


# --------------------------------------------------------------------------------------------------
# Estimators.
# --------------------------------------------------------------------------------------------------

def gae(inputs: AdvantageInputs, cfg) -> tuple[jax.Array, jax.Array]:
  """Generalized advantage estimation over the action tokens (PPO with a critic).

  ``delta_t = r_t + gamma V_{t'} - V_t`` and ``A_t = sum_l (gamma lam)^l delta_{t+l}`` over the
  action steps t, t' = the next action token (V = 0 after the last: terminal), ``r_t`` the
  per-token reward (``token_rewards``: outcome at the last action token, ``cfg.kl_in_reward``
  times kl folded in); returns ``R_t = A_t + V_t``, the value targets."""
  m = action_mask(inputs)
  r = token_rewards(inputs, float(cfg.kl_in_reward))
  v = inputs.values.astype(jnp.float32)
  adv = _reverse_action_scan(r, v, m, float(cfg.gamma), float(cfg.lam))
  return adv, jnp.where(m, adv + v, 0.0)


def grpo(inputs: AdvantageInputs, cfg) -> tuple[jax.Array, jax.Array]:
  """``A_i = (R_i - mean_g R) / (std_g R + cfg.eps)`` on every action token of trajectory i, over
  the valid members of its group g; ``cfg.std_normalize`` False drops the division (drgrpo).
  ``std_g`` has ``n - cfg.std_ddof`` in its denominator; a group of one member gets 0, and so
  does a group whose rewards are all equal (exactly). ``returns = advantages``."""
  c, total, count, dense, n = _group_centered(inputs)
  centered = jnp.where(inputs.valid, c - _safe_div(total, count), 0.0)
  if cfg.std_normalize:
    var = _safe_div(_group_sum(jnp.square(centered), dense, n),
                    jnp.maximum(count - int(cfg.std_ddof), 1.0))
    centered = _safe_div(centered, jnp.sqrt(var) + float(cfg.eps))
  adv = broadcast_to_tokens(centered, inputs)
  return adv, adv


def drgrpo(inputs: AdvantageInputs, cfg) -> tuple[jax.Array, jax.Array]:
  """Dr. GRPO: ``A_i = R_i - mean_g R`` (no std division) on every action token of trajectory i.
  ``returns = advantages``."""
  del cfg
  c, total, count, _, _ = _group_centered(inputs)
  adv = broadcast_to_tokens(jnp.where(inputs.valid, c - _safe_div(total, count), 0.0), inputs)
  return adv, adv


def rloo(inputs: AdvantageInputs, cfg) -> tuple[jax.Array, jax.Array]:
  """REINFORCE leave-one-out: ``A_i = R_i - mean_{j != i in g} R_j`` on every action token of
  trajectory i; 0 for a group of one member. ``returns = advantages``."""
  del cfg
  c, total, count, _, _ = _group_centered(inputs)
  others = _safe_div(total - c, count - 1.0)
  adv = broadcast_to_tokens(jnp.where(inputs.valid & (count > 1), c - others, 0.0), inputs)
  return adv, adv


def reinforce_pp(inputs: AdvantageInputs, cfg) -> tuple[jax.Array, jax.Array]:
  """REINFORCE++: the discounted return of the per-token reward, ``G_t = sum_l gamma^l r_{t+l}``
  over the action steps (``token_rewards``: outcome at the last action token, KL folded in),
  whitened over every action token of every valid trajectory in the batch:
  ``A_t = (G_t - mean) / (std + cfg.eps)`` (population std). ``returns = advantages``."""
  m = action_mask(inputs)
  r = token_rewards(inputs, float(cfg.kl_in_reward))
  g = _reverse_action_scan(r, jnp.zeros_like(r), m, float(cfg.gamma), 1.0)
  count = jnp.sum(m).astype(jnp.float32)
  mean = _safe_div(jnp.sum(jnp.where(m, g, 0.0)), count)
  std = jnp.sqrt(_safe_div(jnp.sum(jnp.where(m, jnp.square(g - mean), 0.0)), count))
  adv = jnp.where(m, _safe_div(g - mean, std + float(cfg.eps)), 0.0)
  return adv, adv


register("gae", gae)
register("grpo", grpo)
register("drgrpo", drgrpo)
register("rloo", rloo)
register("reinforce_pp", reinforce_pp)


# --------------------------------------------------------------------------------------------------
# Entropy scaling (an optional wrapper around any estimator).
# --------------------------------------------------------------------------------------------------

def entropy_scale(inputs: AdvantageInputs, cfg) -> jax.Array:
  """[N] float32: the advantage scale of each trajectory's group (1 on padding rows).

  Our design (the KAT-Dev-72B-Exp report reshapes advantages by exploration but publishes no
  formula). Per group g:

      s_g = clip(1 + alpha * (H_g - H_b) / H_b + beta * (u_g - u_b), lo, hi)

  - ``H_i`` is the mean entropy over trajectory i's action tokens, ``H_g`` its mean over the
    group's valid members, ``H_b`` its mean over the batch's valid trajectories (rows with no
    action token take no part); the term is 0 when ``H_b`` is 0. Groups where the policy is
    unsure (still exploring) weigh more, groups it has collapsed on weigh less, which works
    against entropy collapse.
  - ``u_g = 4 p_g (1 - p_g)`` with ``p_g`` the group's mean reward clipped to [0, 1] (the pass rate
    for 0/1 rewards; every registered reward lies in [0, 1]), ``u_b`` its mean over the batch's
    valid trajectories: 1 at a 50 % pass rate, 0 when all pass or all fail. Tasks at the edge of
    the policy's ability, where outcomes are most informative, weigh more.
  - Both terms are centered on the batch, so the mean scale stays near 1 (the step size does not
    drift); ``clip`` to [lo, hi] with lo > 0 bounds the reweighting and never flips a sign.
  """
  if inputs.entropy is None:
    raise ValueError(f"{CONFIG_PATH}.entropy_scaling.enabled needs inputs.entropy ([N, L] "
                     f"per-token policy entropy): pass it, or disable entropy scaling")
  es = cfg.entropy_scaling
  dense, n = _groups(inputs)
  m = action_mask(inputs)
  tokens = jnp.sum(m, axis=1).astype(jnp.float32)
  h = _safe_div(jnp.sum(jnp.where(m, inputs.entropy.astype(jnp.float32), 0.0), axis=1), tokens)
  member = inputs.valid & (tokens > 0)
  h = jnp.where(member, h, 0.0)
  h_group = _safe_div(_group_sum(h, dense, n),
                      _group_sum(member.astype(jnp.float32), dense, n))
  h_batch = _safe_div(jnp.sum(h), jnp.sum(member).astype(jnp.float32))
  rel_entropy = _safe_div(h_group - h_batch, h_batch)

  valid = inputs.valid
  r = jnp.where(valid, inputs.rewards.astype(jnp.float32), 0.0)
  p = jnp.clip(_safe_div(_group_sum(r, dense, n),
                         _group_sum(valid.astype(jnp.float32), dense, n)), 0.0, 1.0)
  u = 4.0 * p * (1.0 - p)
  u_batch = _safe_div(jnp.sum(jnp.where(valid, u, 0.0)), jnp.sum(valid).astype(jnp.float32))
  scale = 1.0 + float(es.alpha) * rel_entropy + float(es.beta) * (u - u_batch)
  return jnp.where(valid, jnp.clip(scale, float(es.lo), float(es.hi)), 1.0)


def entropy_scaled(fn: AdvantageFn) -> AdvantageFn:
  """The estimator ``fn`` with its advantages multiplied by ``entropy_scale`` (per trajectory);
  its returns are passed through unscaled (gae's value targets do not depend on the scale)."""
  def scaled(inputs: AdvantageInputs, cfg):
    adv, ret = fn(inputs, cfg)
    return adv * entropy_scale(inputs, cfg)[:, None], ret
  scaled.__name__ = f"entropy_scaled_{getattr(fn, '__name__', 'estimator')}"
  return scaled
