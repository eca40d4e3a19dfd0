"""Rewards of agentic RL: plain functions of a ``Grade``, registered by name, chosen by config.

A reward is ``fn(grade, cfg) -> dict[str, float]``: ``"reward"`` is the total and every term it is
made of has its own key, so each is logged separately. ``grade`` is the ``Grade`` of the final
submission (``kat_jax.rl.envs.base``) or None when the episode never submitted, which scores 0 on
every term; ``cfg`` is the reward config section (``default_reward_config()``, config.rl.reward)::

    cfg = rewards.default_reward_config()
    rewards.validate_config(cfg)                                # at start-up: ConfigError if bad
    terms = rewards.score(grade, cfg, task_id=task.task_id)     # {"reward", "compile", "test", ...}
    rewards.validate_rewards(list_of_terms, task_ids)           # ValueError naming the task if NaN
    normalizer = rewards.RewardNormalizer.from_config(cfg.normalize)
    normalized = normalizer(np.array([t["reward"] for t in batch]))   # update stats, normalize
    normalizer.state_dict()                                     # JSON-able, for checkpoints

Registered: ``kat_composite`` (compile + tests + complexity), ``pass_rate``, ``swe_resolved``,
``math_exact`` and ``codebleu``; more with ``register(name, fn)``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections
import numpy as np

from kat_jax.errors import ConfigError
from kat_jax.rl import codebleu as codebleu_lib
from kat_jax.rl import complexity as complexity_lib
from kat_jax.rl.envs.base import Grade

CONFIG_PATH = "config.rl.reward"   # where the reward section lives, for error messages

RewardFn = Callable[[Optional[Grade], Any], dict]

_REWARDS: dict[str, RewardFn] = {}


def register(name: str, fn: RewardFn) -> RewardFn:
  """Adds ``fn(grade, cfg) -> {"reward": total, term: value, ...}`` under ``name``."""
  if name in _REWARDS:
    raise ValueError(f"reward {name!r} is already registered")
  _REWARDS[name] = fn
  return fn


def names() -> list[str]:
  return sorted(_REWARDS)


def get(name: str) -> RewardFn:
  if name not in _REWARDS:
    raise ValueError(f"unknown reward {name!r}: registered rewards are {names()} "
                     f"({CONFIG_PATH}.name)")
  return _REWARDS[name]


def default_reward_config() -> ml_collections.ConfigDict:
  """The reward section of an RL config (config.rl.reward)."""
  c = ml_collections.ConfigDict()
  c.name = "kat_composite"   # the reward function, one of rewards.names()
  c.kat_composite = ml_collections.ConfigDict(dict(
      w_compile=0.4,      # weight of R_compile: 1 iff the program parsed and loaded in the sandbox
      w_test=0.5,         # weight of R_test: the fraction of hidden tests passed
      w_complexity=0.1,   # weight of R_complexity: complexity vs the reference, iff all tests pass
  ))
  c.complexity = ml_collections.ConfigDict(dict(
      power=1.0,          # R_complexity = min(1, C_ref / C_pred) ** power; > 1 penalizes harder
  ))
  c.codebleu = ml_collections.ConfigDict(dict(
      lang="python",             # language of prediction and reference (codebleu.LANGUAGES)
      w_ngram=0.25,              # weight of token n-gram BLEU
      w_weighted_ngram=0.25,     # weight of keyword-weighted n-gram BLEU
      w_syntax=0.25,             # weight of AST subtree match
      w_dataflow=0.25,           # weight of data-flow match (0 stays 0, unlike the package's total)
      max_tree_work=1_000_000,   # a prediction whose codebleu.tree_work exceeds this scores 0
  ))
  c.normalize = ml_collections.ConfigDict(dict(
      mode="none",        # running reward normalization: one of NORMALIZE_MODES
      ema_decay=0.99,     # mode 'ema': weight of the old statistics at each batch, in [0, 1)
      eps=1e-8,           # normalized = (r - mean) / sqrt(var + eps)
      clip=10.0,          # normalized rewards are clipped to [-clip, clip]; 0 = no clipping
  ))
  return c


def validate_config(cfg) -> None:
  """Checks the reward section at start-up: the name, the chosen reward's weights and the
  normalization; raises ConfigError naming the field."""
  if "name" not in cfg:
    raise ConfigError(f"{CONFIG_PATH}.name is missing: set it to one of {names()}")
  try:
    get(cfg.name)(None, cfg)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None
  RewardNormalizer.from_config(_section(cfg, "normalize"))


def score(grade: Optional[Grade], cfg=None, *, task_id: Any = None) -> dict:
  """The terms of the reward ``cfg.name`` for ``grade`` (defaults: ``default_reward_config()``),
  checked finite; a non-finite term raises ValueError naming ``task_id``."""
  cfg = default_reward_config() if cfg is None else cfg
  terms = get(cfg.name)(grade, cfg)
  if "reward" not in terms:
    raise ValueError(f"reward {cfg.name!r} returned the terms {sorted(terms)} without 'reward', "
                     f"the total: a reward function must return it")
  validate_rewards([terms], [task_id])
  return {k: float(v) for k, v in terms.items()}


def validate_rewards(rewards: Sequence, task_ids: Sequence) -> None:
  """Raises ValueError naming the task when a reward is NaN, infinite or not a number.

  ``rewards[i]`` is a number or a dict of terms (every term is checked) for ``task_ids[i]``."""
  if len(rewards) != len(task_ids):
    raise ValueError(f"{len(rewards)} rewards for {len(task_ids)} task ids: give one task id per "
                     f"reward")
  for reward, task_id in zip(rewards, task_ids):
    items = reward.items() if isinstance(reward, Mapping) else (("reward", reward),)
    for term, value in items:
      try:
        number = float(value)
        shown = repr(number)
      except (TypeError, ValueError):
        number, shown = math.nan, repr(value)
      if not math.isfinite(number):
        raise ValueError(f"reward term {term!r} of task {task_id!r} is {shown}, not a finite "
                         f"number: check the task's grade and the weights in {CONFIG_PATH}")


# --------------------------------------------------------------------------------------------------
# Rewards.
# --------------------------------------------------------------------------------------------------

def _section(cfg, name: str):
  if name not in cfg:
    raise ConfigError(f"{CONFIG_PATH}.{name} is missing: start from "
                      f"rewards.default_reward_config()")
  return cfg[name]


def _weight(section, path: str, field: str) -> float:
  if field not in section:
    raise ConfigError(f"{CONFIG_PATH}.{path}.{field} is missing: start from "
                      f"rewards.default_reward_config()")
  value = section[field]
  try:
    w = float(value)
  except (TypeError, ValueError):
    w = math.nan
  if not (math.isfinite(w) and w >= 0):
    raise ConfigError(f"{CONFIG_PATH}.{path}.{field}={value!r} must be a finite number >= 0")
  return w


def kat_composite(grade: Optional[Grade], cfg) -> dict:
  """``w_compile * R_compile + w_test * R_test + w_complexity * R_complexity`` (KAT-Coder's
  code reward; weights in ``cfg.kat_composite``, 0.4 / 0.5 / 0.1 by default).

  - ``compile`` = 1 iff the program compiled (``grade.compiled``).
  - ``test`` = the fraction of hidden tests passed (``grade.pass_fraction``).
  - ``complexity`` = ``min(1, C_ref / C_pred) ** cfg.complexity.power`` with C the cyclomatic
    complexity (``complexity.cyclomatic_complexity``: 1 + radon's decision points) of the
    prediction and of the reference solution: 1 when the prediction is no more complex than the
    reference, C_ref / C_pred (power 1) when it is more complex, 0 when it does not parse. It is
    given only when the submission passes (``grade.passed``: all hidden tests), so shortening
    code never pays unless the code is correct.
  """
  section = _section(cfg, "kat_composite")
  w = {t: _weight(section, "kat_composite", f"w_{t}") for t in ("compile", "test", "complexity")}
  power = _weight(_section(cfg, "complexity"), "complexity", "power")
  terms = {"compile": 0.0, "test": 0.0, "complexity": 0.0}
  if grade is not None:
    terms["compile"] = float(grade.compiled)
    terms["test"] = float(grade.pass_fraction)
    if grade.passed:
      terms["complexity"] = complexity_lib.complexity_score(grade.prediction, grade.reference,
                                                            power)
  return {"reward": math.fsum(w[t] * terms[t] for t in terms), **terms}


def pass_rate(grade: Optional[Grade], cfg) -> dict:
  """The fraction of hidden tests passed."""
  del cfg
  test = 0.0 if grade is None else float(grade.pass_fraction)
  return {"reward": test, "test": test}


def swe_resolved(grade: Optional[Grade], cfg) -> dict:
  """1 iff the issue is resolved (repo environment: FAIL_TO_PASS and PASS_TO_PASS all pass)."""
  del cfg
  resolved = float(grade is not None and grade.passed)
  return {"reward": resolved, "resolved": resolved}


def math_exact(grade: Optional[Grade], cfg) -> dict:
  """1 iff the answer is equivalent to the reference (math environment's ``grade.passed``)."""
  del cfg
  exact = float(grade is not None and grade.passed)
  return {"reward": exact, "exact": exact}


def codebleu(grade: Optional[Grade], cfg) -> dict:
  """CodeBLEU of the prediction against the reference (``kat_jax.rl.codebleu``): the weighted
  sum of n-gram BLEU, keyword-weighted BLEU, AST subtree match and data-flow match (weights in
  ``cfg.codebleu``); an empty, unparsable or pathologically deep prediction scores 0 on every
  term."""
  section = _section(cfg, "codebleu")
  weights = tuple(_weight(section, "codebleu", f"w_{n}") for n in codebleu_lib.NAMES)
  lang = section.lang
  if lang not in codebleu_lib.LANGUAGES:
    raise ConfigError(f"{CONFIG_PATH}.codebleu.lang={lang!r} is not supported: use one of "
                      f"{list(codebleu_lib.LANGUAGES)}")
  max_work = section.max_tree_work
  if not (isinstance(max_work, int) and max_work > 0):
    raise ConfigError(f"{CONFIG_PATH}.codebleu.max_tree_work={max_work!r} must be an int > 0")
  c = (codebleu_lib.ZERO if grade is None
       else codebleu_lib.components(grade.prediction, grade.reference, lang, max_work))
  return {"reward": codebleu_lib.combine(c, weights), **dataclasses.asdict(c)}


for _name, _fn in (("kat_composite", kat_composite), ("pass_rate", pass_rate),
                   ("swe_resolved", swe_resolved), ("math_exact", math_exact),
                   ("codebleu", codebleu)):
  register(_name, _fn)


# --------------------------------------------------------------------------------------------------
# Running normalization.
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunningStats:
  """Mean and (population) variance of the rewards seen, and how many were seen."""
  count: int = 0
  mean: float = 0.0
  var: float = 0.0


def welford_update(stats: RunningStats, batch: np.ndarray, decay: float) -> RunningStats:
  """Exact mean / variance of every reward so far: Chan et al.'s parallel form of Welford's
  update, merging the batch's moments with the running ones."""
  del decay
  n_b = batch.size
  if n_b == 0:
    return stats
  mean_b, m2_b = float(batch.mean()), float(np.square(batch - batch.mean()).sum())
  n = stats.count + n_b
  delta = mean_b - stats.mean
  mean = stats.mean + delta * n_b / n
  m2 = stats.var * stats.count + m2_b + delta * delta * stats.count * n_b / n
  return RunningStats(n, mean, m2 / n)


def ema_update(stats: RunningStats, batch: np.ndarray, decay: float) -> RunningStats:
  """Exponential moving statistics: the new state is the mixture of the old distribution (weight
  ``decay``) and the batch's (weight ``1 - decay``), mean and variance of the mixture exactly. The
  first batch initializes the statistics (no bias towards 0)."""
  if batch.size == 0:
    return stats
  mean_b, var_b = float(batch.mean()), float(batch.var())
  if stats.count == 0:
    return RunningStats(batch.size, mean_b, var_b)
  mean = decay * stats.mean + (1 - decay) * mean_b
  var = (decay * (stats.var + (stats.mean - mean) ** 2)
         + (1 - decay) * (var_b + (mean_b - mean) ** 2))
  return RunningStats(stats.count + batch.size, mean, var)


def _keep(stats: RunningStats, batch: np.ndarray, decay: float) -> RunningStats:
  del batch, decay
  return stats


@dataclasses.dataclass(frozen=True)
class _Mode:
  update: Callable[[RunningStats, np.ndarray, float], RunningStats]
  standardize: bool        # False: rewards pass through unchanged


_MODES = {"none": _Mode(_keep, False), "welford": _Mode(welford_update, True),
          "ema": _Mode(ema_update, True)}
NORMALIZE_MODES = tuple(_MODES)


class RewardNormalizer:
  """Running reward normalization, ``(r - mean) / sqrt(var + eps)`` clipped to ``[-clip, clip]``,
  with statistics over all rewards seen ('welford') or exponentially weighted ('ema'); 'none'
  leaves rewards unchanged. ``state_dict()`` is JSON-able for checkpoints."""

  def __init__(self, mode: str = "none", ema_decay: float = 0.99, eps: float = 1e-8,
               clip: float = 10.0):
    if mode not in _MODES:
      raise ConfigError(f"{CONFIG_PATH}.normalize.mode={mode!r} is unknown: use one of "
                        f"{list(NORMALIZE_MODES)}")
    if not 0.0 <= ema_decay < 1.0:
      raise ConfigError(f"{CONFIG_PATH}.normalize.ema_decay={ema_decay!r} must be in [0, 1)")
    if not (math.isfinite(eps) and eps > 0):
      raise ConfigError(f"{CONFIG_PATH}.normalize.eps={eps!r} must be a finite number > 0")
    if not (math.isfinite(clip) and clip >= 0):
      raise ConfigError(f"{CONFIG_PATH}.normalize.clip={clip!r} must be >= 0 (0 = no clipping)")
    self.mode, self.ema_decay, self.eps, self.clip = mode, float(ema_decay), float(eps), float(clip)
    self.stats = RunningStats()

  @classmethod
  def from_config(cls, cfg) -> "RewardNormalizer":
    """From the ``normalize`` section of ``default_reward_config()``."""
    return cls(mode=cfg.mode, ema_decay=cfg.ema_decay, eps=cfg.eps, clip=cfg.clip)

  @property
  def mean(self) -> float:
    return self.stats.mean

  @property
  def std(self) -> float:
    return math.sqrt(self.stats.var)

  def update(self, rewards) -> None:
    """Adds a batch of rewards to the running statistics (a ValueError names a non-finite one)."""
    batch = _as_batch(rewards)
    self.stats = _MODES[self.mode].update(self.stats, batch, self.ema_decay)

  def normalize(self, rewards) -> np.ndarray:
    """Normalizes with the current statistics (float64, the shape of ``rewards``)."""
    batch = _as_batch(rewards)
    if not _MODES[self.mode].standardize:
      return batch
    if self.stats.count == 0:
      raise ValueError("RewardNormalizer.normalize before any update: call the normalizer (update "
                       "then normalize) or update() first")
    out = (batch - self.stats.mean) / math.sqrt(self.stats.var + self.eps)
    return np.clip(out, -self.clip, self.clip) if self.clip else out

  def __call__(self, rewards) -> np.ndarray:
    """Updates the statistics with the batch, then normalizes it."""
    self.update(rewards)
    return self.normalize(rewards)

  def state_dict(self) -> dict:
    return {"mode": self.mode, **dataclasses.asdict(self.stats)}

  def load_state_dict(self, state: Mapping) -> None:
    expected = {"mode", *(f.name for f in dataclasses.fields(RunningStats))}
    if set(state) != expected:
      raise ValueError(f"reward normalizer state has keys {sorted(state)}; expected "
                       f"{sorted(expected)} (from RewardNormalizer.state_dict())")
    if state["mode"] != self.mode:
      raise ValueError(f"reward normalizer state was saved in mode {state['mode']!r} but this "
                       f"normalizer is {self.mode!r} ({CONFIG_PATH}.normalize.mode): use the "
                       f"checkpoint's mode or start the statistics afresh")
    count, mean, var = state["count"], float(state["mean"]), float(state["var"])
    if not (isinstance(count, int) and count >= 0 and math.isfinite(mean)
            and math.isfinite(var) and var >= 0):
      raise ValueError(f"reward normalizer state {dict(state)} is invalid: count must be an int "
                       f">= 0, mean finite and var finite and >= 0")
    self.stats = RunningStats(count, mean, var)


def _as_batch(rewards) -> np.ndarray:
  batch = np.asarray(rewards, dtype=np.float64)
  bad = np.flatnonzero(~np.isfinite(batch))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"reward {float(batch.reshape(-1)[i])!r} at index {i} is not finite: find "
                     f"its task with rewards.validate_rewards(rewards, task_ids)")
  return batch


def _refine(grade, cfg) -> dict:
  """The refinement reward of the ``refine`` environment (w_test · pass rate + w_codebleu ·
  CodeBLEU + w_explanation · explanation score): ``kat_jax.rl.envs.refine.refine_reward``,
  imported on first use (the environment module imports much more than the rewards)."""
  from kat_jax.rl.envs import refine
  return refine.refine_reward(grade, cfg)


register("refine", _refine)
