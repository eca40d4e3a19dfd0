"""The agentic RL stage: rollouts with the current params → rewards → old / reference log-probs and
values from ``Trainer.score`` → advantages → trajectory trees → ``ppo_epochs`` passes of the shared
train step, all through the ``Trainer``::

    python -m experiments.main --config=configs/rl_tiny.py --workdir=/tmp/kat_rl \
        --config.init_from=/tmp/kat_sft

One iteration: ``config.rl.tasks_per_iteration`` procedural tasks of the curriculum's current level
(deterministic from the seed and the iteration), each rolled out ``config.rl.group_size`` times in
``config.rl.env_name`` (``kat_jax.rl.rollout``: token-in / token-out, the policy's own T = 1
log-probs recorded). A group is one trajectory tree (``config.rl.tree_mode``; else one tree per
trajectory — the flat baseline with identical loss). The sampler is built once and gets the new
params after every update (``sampler.params = trainer.params``: same shapes, no recompilation).
Old log-probs are ``Trainer.score`` of the batch at the params that sampled it, so the first
update's ratio is exactly 1; the reference log-probs come from ``Trainer.reference_params``.

Checkpoints (every ``config.rl.checkpoint_every`` iterations and at the end) carry the loop's own
state — iteration, curriculum level and pass-rate estimate, reward normalizer — so a killed run
resumes where it stopped, bitwise. Metrics per iteration: reward and each reward term, pass rate,
advantage / ratio / clip fraction / KL / entropy / value-loss statistics, POR, episode turns and
statuses, and the time split (rollout incl. environments, env time summed over rows, score, train).
"""
from __future__ import annotations

import collections
import copy
import time
import zlib
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from kat_jax import workdir as workdir_lib
from kat_jax.data import tokenizer as tokenizer_lib
from kat_jax.data.config import split_list
from kat_jax.data.procedural import generate_tasks
from kat_jax.errors import ConfigError
from kat_jax.rl import advantages as advantages_lib
from kat_jax.rl import envs as envs_lib
from kat_jax.rl import rewards as rewards_lib
from kat_jax.rl import rollout as rollout_lib
from kat_jax.rl.envs import base as env_base
from kat_jax.train import metrics as metrics_lib
from kat_jax.train.trainer import Trainer
from kat_jax.tree import batch as tree_batch
from kat_jax.tree import build
from kat_jax.tree import compact as tree_compact
from kat_jax.tree import layout as tree_layout
from kat_jax.tree.logprobs import batch_to_arrays


def steps_per_iteration(config) -> int:
  return config.rl.ppo_epochs * (config.rl.tasks_per_iteration // config.train.batch_size)


def validate(config) -> None:
  rl = config.rl
  if rl.tasks_per_iteration % config.train.batch_size:
    raise ConfigError(f"config.rl.tasks_per_iteration={rl.tasks_per_iteration} must be a multiple "
                      f"of config.train.batch_size={config.train.batch_size} (groups per update)")
  want = rl.iterations * steps_per_iteration(config)
  if config.train.steps != want:
    raise ConfigError(
        f"config.train.steps={config.train.steps} but the RL stage takes {want} optimizer steps "
        f"(rl.iterations={rl.iterations} × rl.ppo_epochs={rl.ppo_epochs} × tasks_per_iteration / "
        f"batch_size={rl.tasks_per_iteration // config.train.batch_size}): set "
        f"--config.train.steps={want}")
  if config.train.loss not in ("tree", "tree_sequence_mean"):
    raise ConfigError(f"config.train.loss={config.train.loss!r}: the RL stage trains tree batches; "
                      "use 'tree' or 'tree_sequence_mean'")
  if rl.group_size > config.tree.max_traj and rl.tree_mode:
    raise ConfigError(f"config.rl.group_size={rl.group_size} exceeds config.tree.max_traj="
                      f"{config.tree.max_traj}: raise max_traj to the group size")
  if rl.prune.enabled and config.train.prune.enabled:
    raise ConfigError("config.rl.prune.enabled and config.train.prune.enabled are both set: the RL "
                      "stage prunes on the host and compacts the trees (rl.prune: score and train "
                      "pay only for kept tokens); config.train.prune masks the loss inside the step "
                      "(the full tree is still computed). Set one of them")
  rollout_lib.validate_config(rl.rollout, config.tree.max_len)
  rollout_lib.validate_groups(rl.rollout, rl.group_size)


def load_tokenizer(config, workdir: str):
  """The run's tokenizer: the one saved in ``workdir``, else the ``init_from`` workdir's (copied
  into ``workdir``), else ``config.data.tokenizer_path``."""
  if workdir_lib.has_saved_tokenizer(workdir):
    return tokenizer_lib.load_tokenizer(workdir_lib.tokenizer_dir(workdir))
  source = config.init_from.rpartition("@")[0] if "@" in config.init_from else config.init_from
  tokenizer = tokenizer_lib.load_tokenizer(
      workdir_lib.find_tokenizer_dir(source, config) if source else config.data.tokenizer_path)
  if jax.process_index() == 0:
    tokenizer.save(workdir_lib.tokenizer_dir(workdir))
  return tokenizer


class _TimedEnv(env_base.Environment):
  """Adds the wall time of every reset / step to a shared counter (env time, summed over rows)."""

  def __init__(self, env: env_base.Environment, clock: list):
    self.env, self.clock, self.tools = env, clock, env.tools

  def reset(self, task):
    t0 = time.perf_counter()
    try:
      return self.env.reset(task)
    finally:
      self.clock[0] += time.perf_counter() - t0

  def step(self, action):
    t0 = time.perf_counter()
    try:
      return self.env.step(action)
    finally:
      self.clock[0] += time.perf_counter() - t0

  def close(self):
    self.env.close()

  def __getattr__(self, name):   # optional hooks of the wrapped env (clone, ...)
    if name == "clone" and hasattr(self.env, "clone"):
      return lambda: _TimedEnv(self.env.clone(), self.clock)
    raise AttributeError(name)


def _task_seed(seed: int, *parts) -> int:
  return zlib.crc32(repr((seed,) + parts).encode()) & 0x7FFFFFFF


def draw_tasks(config, level: int, iteration: int, round_: int, num: int, split: str = "train"):
  families = split_list(config.rl.task_families) or None
  return generate_tasks(_task_seed(config.seed, split, iteration, round_), num, split=split,
                        levels=(level,), families=families)


TOKEN_BUCKETS = 16  # tree-token sizes a batch is padded to: multiples of max_tokens / this


def token_bucket(n: int, limit: int) -> int:
  """The padded tree-token size of a batch whose largest row holds ``n`` tokens: the next
  multiple of ``limit / TOKEN_BUCKETS`` (at most ``limit``), so score and train steps compile
  for at most ``TOKEN_BUCKETS`` shapes and a batch of small trees does not pay for ``limit``."""
  unit = max(-(-limit // TOKEN_BUCKETS), 1)
  return min(-(-n // unit) * unit, limit)


def _overlong_penalty(traj, cfg) -> float:
  window = cfg.filter.overlong_penalty_tokens
  if window <= 0:
    return 0.0
  budget = cfg.rollout.max_new_tokens * cfg.rollout.max_turns
  excess = int(traj.sampled.sum()) - (budget - window)
  return -cfg.filter.overlong_penalty * min(max(excess, 0) / window, 1.0)


class RLStage:
  """The RL loop's state and its pieces (kept apart so tests can drive one iteration)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, pool=None, tokenizer=None):
    validate(config)
    self.config, self.workdir = config, workdir
    self.trainer = Trainer(config, workdir)
    self.tokenizer = tokenizer or load_tokenizer(config, workdir)
    from kat_jax.sample import Sampler
    from kat_jax.sandbox import SandboxPool
    self.sampler = Sampler(self.trainer.model, self.trainer.params, max_len=config.tree.max_len)
    self.pool = pool or SandboxPool(num_workers=config.rl.sandbox_workers)
    self._own_pool = pool is None
    self.levels = [int(v) for v in split_list(config.rl.task_levels)]
    extra = self.trainer.extra_state or {}
    self.iteration = int(extra.get("iteration", 0))
    self.level_index = int(extra.get("level_index", 0))
    self.pass_rate_ema = float(extra.get("pass_rate_ema", 0.0))
    self.normalizer = rewards_lib.RewardNormalizer.from_config(config.rl.rollout.reward.normalize)
    if "normalizer" in extra:
      self.normalizer.load_state_dict(extra["normalizer"])
    self.env_clock = [0.0]
    # Trajectories per group at most (the tree batch's max_traj); RFT's branches raise it.
    self.max_group = config.rl.group_size

  # --------------------------------------------------------------------------------- pieces

  def extra_state(self) -> dict:
    return {"iteration": self.iteration, "level_index": self.level_index,
            "pass_rate_ema": self.pass_rate_ema, "normalizer": self.normalizer.state_dict()}

  def make_env(self) -> env_base.Environment:
    """A fresh environment of the stage (its reset / step time counted as env time)."""
    rl = self.config.rl
    return _TimedEnv(envs_lib.make(rl.env_name, rl.env, pool=self.pool), self.env_clock)

  def rollouts(self, tasks, rng, rollout_cfg=None, group_size: Optional[int] = None,
               monitor=None):
    """``group_size`` rollouts of every task with the current params: list of groups (with
    ``rollout.fork_turns`` > 0, tree rollouts: continuations forked from shared turns; with a
    ``monitor``, watched rollouts and their spliced branches)."""
    g = self.config.rl.group_size if group_size is None else group_size
    self.sampler.params = self.trainer.params
    groups = rollout_lib.rollout_groups(self.sampler, self.make_env, tasks, g, rng,
                                        rollout_cfg or self.config.rl.rollout, self.tokenizer,
                                        policy_version=self.iteration, monitor=monitor)
    self.last_rollout_stats = rollout_lib.rollout_stats(groups)
    return groups

  def draw_tasks(self, level: int, round_: int, num: int) -> list:
    """The iteration's training tasks (deterministic from the seed, iteration and round); a stage
    that trains on other tasks (e.g. records of the model's own failures) overrides this."""
    return draw_tasks(self.config, level, self.iteration, round_, num)

  def training_rollouts(self, tasks, rng):
    """The groups an iteration trains on (RFT overrides this: watched, rescored rollouts)."""
    return self.rollouts(tasks, rng)

  def collect(self) -> tuple[list, dict]:
    """The iteration's groups: one rollout round, or with DAPO dynamic sampling more rounds until
    ``tasks_per_iteration`` groups have unequal rewards (short: padded with dropped groups, which
    get no loss). Returns (groups with their kept flag, stats)."""
    cfg = self.config.rl
    level = self.levels[self.level_index]
    want, kept, dropped, rounds = cfg.tasks_per_iteration, [], [], 0
    rng = jax.random.fold_in(jax.random.key(self.config.seed + 2), self.iteration)
    while len(kept) < want and rounds < (cfg.filter.max_sampling_rounds
                                         if cfg.filter.dynamic_sampling else 1):
      tasks = self.draw_tasks(level, rounds, want)
      for group in self.training_rollouts(tasks, jax.random.fold_in(rng, rounds)):
        rewards = [t.reward for t in group]
        if cfg.filter.dynamic_sampling and max(rewards) == min(rewards):
          dropped.append(group)
        else:
          kept.append(group)
      rounds += 1
    groups = [(g, True) for g in kept[:want]]
    groups += [(g, False) for g in dropped[:want - len(groups)]]
    return groups, {"sampling_rounds": rounds, "dropped_groups": len(dropped),
                    "padded_groups": sum(not k for _, k in groups)}

  def rewards_of(self, groups) -> np.ndarray:
    """[num groups, max group size] float64 rewards: reward terms + overlong penalty, normalized
    by config (over the trajectories only; a shorter group's missing entries are 0)."""
    real = np.array([t.reward + _overlong_penalty(t, self.config.rl) for g, _ in groups for t in g],
                    np.float64)
    if self.config.rl.rollout.reward.normalize.mode != "none":
      real = np.asarray(self.normalizer(real), np.float64)
    r = np.zeros((len(groups), max(len(g) for g, _ in groups)), np.float64)
    start = 0
    for gi, (group, _) in enumerate(groups):
      r[gi, :len(group)] = real[start:start + len(group)]
      start += len(group)
    return r

  def build_batch(self, groups, rewards: np.ndarray) -> tuple[dict, dict]:
    """The tree batch of the groups (tree or flat mode) with fields ``weight`` (sampled tokens;
    0 for dropped groups and, by config, for trajectories that ended on a limit) and the
    behaviour log-probs; plus per-row bookkeeping (reward, group id)."""
    cfg, tree_cfg = self.config.rl, self.config.tree
    trees, row_rewards, row_groups, row_traj = [], [], [], []
    for gi, (group, keep_group) in enumerate(groups):
      # An episode whose reset failed (env_error) has no tokens; it stands in the tree as a
      # one-token trajectory on the group's root with no weight: no pair, no loss, no place in
      # the group's statistics, and every trajectory keeps its index.
      root = next((t.tokens[:1] for t in group if len(t)), np.zeros((1,), np.int32))
      def arrays(t):
        if len(t):
          return t.tokens, t.event_tag.astype(np.int32), t.logp_policy, t.entropy, t.sampled
        zero = np.zeros((1,), np.float32)
        return root, np.zeros((1,), np.int32), zero, zero, np.zeros((1,), np.bool_)
      per = [arrays(t) for t in group]
      weights = []
      for t, (_, _, _, _, sampled) in zip(group, per):
        w = sampled.astype(np.float32)
        if not keep_group or (cfg.filter.mask_limit_statuses and
                              t.status in env_base.LIMIT_STATUSES):
          w = np.zeros_like(w)
        weights.append(w)
      parts = [list(range(len(group)))] if cfg.tree_mode else [[k] for k in range(len(group))]
      for ks in parts:
        trees.append(build.build_tree(
            [per[k][0] for k in ks], tags=[per[k][1] for k in ks],
            fields={"weight": [weights[k] for k in ks],
                    "behaviour_logp": [per[k][2] for k in ks],
                    "entropy": [per[k][3] for k in ks]}))
        row_rewards.append([rewards[gi, k] for k in ks])
        row_groups.append(gi)
        row_traj.append([group[k] for k in ks])
    k_max = self.max_group if cfg.tree_mode else 1
    limit = tree_cfg.max_tokens if cfg.tree_mode else tree_cfg.max_len
    batch = batch_to_arrays(tree_batch.batch_trees(
        trees, max_tokens=token_bucket(max(t.n_tree for t in trees), limit),
        max_nodes=tree_cfg.max_nodes, max_traj=k_max, max_len=tree_cfg.max_len))
    reward_bk = np.zeros(batch["traj_valid"].shape, np.float32)
    for b, rs in enumerate(row_rewards):
      reward_bk[b, :len(rs)] = rs
    info = {"rewards": reward_bk, "groups": np.asarray(row_groups, np.int32),
            "por": float(np.mean([1.0 - t.n_tree / t.n_flat for t in trees])) if cfg.tree_mode
            else 0.0, "trees": trees,
            # Trajectories that count in their group's statistics (fixed before any pruning).
            "valid": np.asarray(batch["traj_valid"]) & (batch["field/weight"] > 0).any(-1)}
    return batch, info

  def compact(self, batch: dict, info: dict) -> dict:
    """With ``config.rl.prune.enabled``: the batch's trees pruned by the entropy budget (the
    rollout's own entropies, ``field/entropy``) and compacted on the host — pruned subtrees removed,
    every trajectory at its index — padded to a bucket of ``tree.max_tokens / 8`` tokens, so the
    score and train steps compile for a few shapes and cost in proportion to what is kept. The
    loss over the compacted trees equals the masked loss over the full ones (tested). Adds
    ``prune/*`` statistics to ``info``."""
    cfg = self.config.rl.prune
    if not cfg.enabled:
      return batch
    keep, stats = tree_compact.batch_keep_masks(batch, cfg)
    _, k, _ = batch["field/weight"].shape
    full = int(batch["tokens"].shape[1])
    limit = self.config.tree.max_tokens if self.config.rl.tree_mode else self.config.tree.max_len
    # A compacted row holds at most its kept tokens plus one per trajectory whose root was
    # pruned (it keeps its first token), and never more than its input.
    b_idx = np.arange(keep.shape[0])[:, None]
    root_cut = (~keep[b_idx, batch["row_map"][:, :, 0]] & batch["traj_valid"]).sum(-1)
    bound = min(int((keep.sum(-1) + root_cut).max()), full)
    out = tree_compact.compact_batch(batch, keep, max_tokens=token_bucket(bound, limit),
                                     max_nodes=batch["node_start"].shape[1], max_traj=k,
                                     max_len=batch["field/weight"].shape[2])
    valid = float(np.asarray(batch["token_valid"]).sum())
    info["prune"] = {"kept_fraction": float(np.mean(stats["kept_fraction"])),   # as the step's
                     "tokens_before": valid, "tokens_after": float(out["token_valid"].sum()),
                     "padded_tokens": float(out["tokens"].size),
                     "mandatory_exceeds_budget": float(np.mean(stats["mandatory_exceeds_budget"]))}
    return out

  def _with_layout(self, batch: dict) -> dict:
    """The batch with the block layout its attention implementation reads (if any)."""
    return tree_layout.with_attention_blocks(batch, self.config.model.attention_impl)

  def add_scores(self, batch: dict, info: dict) -> dict:
    """Scores the batch at the current params: ``old_logp`` (``prox_logp`` beside the behaviour
    log-probs for ``decoupled_ppo``), the critic's ``old_values`` and, with a reference,
    ``ref_logp`` — per token [B, K, L], a pair's value at the token it predicts."""
    scored = self._with_layout(batch)
    scores = self.trainer.score(scored)
    b, k, length = batch["field/weight"].shape
    def tok(pairs):   # [B, K, L-1] -> [B, K, L]
      out = np.zeros((b, k, length), np.float32)
      out[..., 1:] = pairs
      return out
    old = tok(scores["logp"])
    fields = {"field/old_logp": old}
    if "values" in scores:
      fields["field/old_values"] = tok(scores["values"])   # the critic (and value clipping)
    if self.config.train.objective == "decoupled_ppo":
      # AReaL's decoupled PPO: behaviour = the sampler's log-probs, proximal = these params.
      fields["field/prox_logp"] = old
      fields["field/old_logp"] = batch["field/behaviour_logp"]
    if self.trainer.reference_params is not None:
      fields["field/ref_logp"] = tok(
          self.trainer.score(scored, params=self.trainer.reference_params)["logp"])
    info["scores"] = scores
    return {**batch, **fields}

  def _advantages_read_scores(self) -> bool:
    """Whether the estimator reads the critic's values or the per-token KL (so it must run after
    scoring); the group estimators read only rewards, the sampled mask and entropies."""
    adv = self.config.rl.advantage
    return adv.name == "gae" or adv.kl_in_reward > 0

  def add_advantage_fields(self, batch: dict, info: dict) -> dict:
    """Adds ``advantage`` and ``return`` [B, K, L] from the rewards (and, when present, the
    scored values and KL). Trajectories count in their group by ``info["valid"]`` — fixed before
    any pruning, so a pruned trajectory keeps its place in its group's statistics."""
    b, k, length = batch["field/weight"].shape
    zeros = np.zeros((b, k, length), np.float32)
    values = batch.get("field/old_values", zeros)
    kl = zeros
    if "field/ref_logp" in batch:
      scored = batch.get("field/prox_logp", batch["field/old_logp"])
      kl = (scored - batch["field/ref_logp"]) * batch["field/weight"]
    mask = batch["field/weight"] > 0
    inputs = advantages_lib.AdvantageInputs(
        rewards=info["rewards"].reshape(-1),
        group_ids=np.repeat(info["groups"], k).astype(np.int32), mask=mask.reshape(b * k, -1),
        values=values.reshape(b * k, -1), kl=kl.reshape(b * k, -1),
        valid=info["valid"].reshape(-1), entropy=batch["field/entropy"].reshape(b * k, -1))
    adv, ret = advantages_lib.compute(self.config.rl.advantage.name, inputs,
                                      self.config.rl.advantage)
    return {**batch, "field/advantage": np.asarray(adv, np.float32).reshape(b, k, length),
            "field/return": np.asarray(ret, np.float32).reshape(b, k, length)}

  def add_advantages(self, batch: dict, info: dict) -> dict:
    """Scores the batch and adds every per-token field the losses read."""
    return self.add_advantage_fields(self.add_scores(batch, info), info)

  def prepare(self, batch: dict, info: dict) -> dict:
    """The training batch of ``build_batch``'s output: scores and advantages, with
    ``config.rl.prune`` also pruning and compacting — advantages of the full trajectories first
    (group statistics, returns and whitening see every sampled token), then, for estimators that
    do not read scores, compaction before scoring so the score pass also pays only for kept
    tokens; ``gae`` / KL-in-reward score the full batch first and compact after."""
    if not self.config.rl.prune.enabled:
      return self.add_advantages(batch, info)
    if self._advantages_read_scores():
      return self.compact(self.add_advantages(batch, info), info)
    small = self.compact(self.add_advantage_fields(batch, info), info)
    return self.add_scores(small, info)

  def minibatches(self, batch: dict):
    """Row slices of ``train.batch_size`` groups (in flat mode: those groups' trajectories)."""
    rows = batch["tokens"].shape[0]
    per = self.config.train.batch_size * (1 if self.config.rl.tree_mode
                                          else self.config.rl.group_size)
    for start in range(0, rows, per):
      yield self._with_layout({key: v[start:start + per] for key, v in batch.items()
                               if key != "attention_blocks"})

  def update(self, batch: dict) -> list[dict]:
    out = []
    for _ in range(self.config.rl.ppo_epochs):
      for mb in self.minibatches(batch):
        out.append(jax.device_get(self.trainer.step(mb)))
    return out

  def evaluate(self) -> dict:
    """Greedy pass@1 on held-out procedural tasks of the current level (one rollout each)."""
    cfg = copy.deepcopy(self.config.rl.rollout)
    cfg.temperature, cfg.fork_turns = 0.0, 0     # one greedy rollout per task
    level = self.levels[self.level_index]
    tasks = draw_tasks(self.config, level, 0, 0, self.config.rl.eval_tasks, split="heldout")
    groups = self.rollouts(tasks, jax.random.key(0), cfg, group_size=1)
    passed = [float(g[0].grade is not None and g[0].grade.passed) for g in groups]
    return {"pass_at_1": float(np.mean(passed)), "reward": float(np.mean(
        [g[0].reward for g in groups])), "level": level, "tasks": len(tasks)}

  # --------------------------------------------------------------------------------- iteration

  def learn(self, groups) -> dict:
    """Everything after the rollouts, for the synchronous loop and the trajectory manager alike:
    rewards → batch (trees, pruning) → scores and advantages → ``ppo_epochs`` of updates → the
    curriculum; ``iteration`` advances. Returns the metrics (with ``score_s``, ``train_s``)."""
    rewards = self.rewards_of(groups)
    t1 = time.perf_counter()
    batch, info = self.build_batch(groups, rewards)
    batch = self.prepare(batch, info)
    score_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    step_metrics = self.update(batch)
    train_s = time.perf_counter() - t2
    metrics = self._metrics(groups, rewards, batch, info, step_metrics)
    metrics.update(score_s=score_s, train_s=train_s)
    self._advance_curriculum(metrics["pass_rate"])
    self.iteration += 1
    return metrics

  def iterate(self) -> dict:
    """One RL iteration (rollouts, then ``learn``); returns its metrics."""
    t0 = time.perf_counter()
    self.env_clock[0] = 0.0
    groups, sample_stats = self.collect()
    rollout_s = time.perf_counter() - t0
    metrics = self.learn(groups)
    metrics.update(sample_stats, rollout_s=rollout_s, env_s=self.env_clock[0])
    return metrics

  def _advance_curriculum(self, pass_rate: float) -> None:
    cur = self.config.rl.curriculum
    self.pass_rate_ema = cur.ema * self.pass_rate_ema + (1 - cur.ema) * pass_rate
    if not cur.enabled:
      return
    if self.pass_rate_ema > cur.up and self.level_index + 1 < len(self.levels):
      self.level_index, self.pass_rate_ema = self.level_index + 1, 0.0
    elif self.pass_rate_ema < cur.down and self.level_index > 0:
      self.level_index, self.pass_rate_ema = self.level_index - 1, 0.0

  def _metrics(self, groups, rewards, batch, info, step_metrics) -> dict:
    trajs = [t for g, _ in groups for t in g]
    m: dict[str, Any] = {
        "reward": float(np.mean([t.reward for t in trajs])),
        "reward_used": float(np.mean(rewards)),
        "pass_rate": float(np.mean([t.grade is not None and t.grade.passed for t in trajs])),
        "turns": float(np.mean([t.num_turns for t in trajs])),
        "sampled_tokens": float(np.mean([t.sampled.sum() for t in trajs])),
        "rollout_tokens": float(sum(t.sampled.sum() for t in trajs)),   # the iteration's budget
        "por": info["por"], "level": self.levels[self.level_index],
    }
    m.update({f"prune/{k}": v for k, v in info.get("prune", {}).items()})
    m.update({k if "/" in k else f"rollout/{k}": float(v)   # realized POR, forks; rft/...
              for k, v in getattr(self, "last_rollout_stats", {}).items()
              if isinstance(v, (int, float))})
    for key in trajs[0].reward_terms:
      m[f"reward/{key}"] = float(np.mean([t.reward_terms[key] for t in trajs]))
    for status, n in collections.Counter(t.status for t in trajs).items():
      m[f"status/{status}"] = n / len(trajs)
    w = batch["field/weight"] > 0
    adv = batch["field/advantage"][w]
    m.update({"advantage/mean": float(adv.mean()) if adv.size else 0.0,
              "advantage/std": float(adv.std()) if adv.size else 0.0,
              "advantage/abs_max": float(np.abs(adv).max()) if adv.size else 0.0})
    # The sampler's T=1 log-probs vs the trainer's score of the same tokens (same params).
    gap = np.abs(batch["field/behaviour_logp"] - batch["field/old_logp"])[w]
    m["logp_gap/max"] = float(gap.max()) if gap.size else 0.0
    for key in ("loss", "ratio", "clipped_frac", "kl", "entropy", "value_loss", "grad_norm"):
      vals = [float(s[key]) for s in step_metrics if key in s]
      if vals:
        m[f"train/{key}"] = float(np.mean(vals))
    return m

  def close(self) -> None:
    try:
      self.trainer.close()
    finally:
      if self._own_pool:
        self.pool.close()


def train(config: ml_collections.ConfigDict, workdir: str,
          max_iterations: Optional[int] = None, tokenizer=None,
          stage_cls: type = RLStage) -> dict[str, Any]:
  """Runs the RL stage in ``workdir`` (resuming from its checkpoint); returns the final metrics.
  ``tokenizer`` overrides ``load_tokenizer`` (tests); ``stage_cls`` is the stage class (the RFT
  stage runs this same loop with ``rft_loop.RFTStage``). When ``config.rl.manager`` asks for it,
  the iterations come from the trajectory manager (``manager.AsyncRL``: rollout decoupled from
  training) instead of ``stage.iterate``, and its run-level figures are added as ``manager_*``;
  in-flight rollouts are not checkpointed (a resumed run admits its groups again)."""
  from kat_jax.rl import manager as manager_lib
  start_time = time.perf_counter()
  stage = stage_cls(config, workdir, tokenizer=tokenizer)
  cfg = config.rl
  total = cfg.iterations if max_iterations is None else min(cfg.iterations, max_iterations)
  result: dict[str, Any] = {"start_iteration": stage.iteration, "start_step": stage.iteration}
  history = []
  driver = None
  try:
    if cfg.eval_every and stage.iteration == 0:
      ev = stage.evaluate()
      stage.trainer.writer.write(0, ev, prefix="eval")
      result["eval_start_pass_at_1"] = ev["pass_at_1"]
    if manager_lib.enabled(config):
      driver = manager_lib.AsyncRL(stage, end_iteration=total)
    while stage.iteration < total:
      metrics = driver.iterate() if driver is not None else stage.iterate()
      it = stage.iteration
      history.append(metrics)
      stage.trainer.writer.write(it, {k: v for k, v in metrics.items()
                                      if isinstance(v, (int, float))}, prefix="rl")
      if cfg.eval_every and (it % cfg.eval_every == 0 or it == total):
        ev = stage.evaluate()
        stage.trainer.writer.write(it, ev, prefix="eval")
        result.update({f"eval_{k}": v for k, v in ev.items()})
      if it % cfg.checkpoint_every == 0 or it == total:
        stage.trainer.save(stage.extra_state(), force=True)
    if driver is not None:
      summary = driver.summary()
      stage.trainer.writer.write(stage.iteration, {k: v for k, v in summary.items()
                                                   if isinstance(v, (int, float))},
                                 prefix="manager")
      result.update({f"manager_{k}": v for k, v in summary.items()})
    result.update(step=stage.trainer.step_count, iteration=stage.iteration)
    if history:
      result.update({f"train_{k}": v for k, v in history[-1].items()
                     if isinstance(v, (int, float))})
  finally:
    try:
      if driver is not None:
        driver.close()
    finally:
      stage.close()
  result.update(state=stage.trainer.state, history=history, loop_state=stage.extra_state(),
                wall_time_s=time.perf_counter() - start_time,
                checkpoint_dir=stage.trainer.checkpointer.directory,
                tensorboard_dir=workdir_lib.tensorboard_dir(workdir))
  how = f" (trajectory manager, eta={cfg.manager.eta})" if driver is not None else ""
  metrics_lib.console(f"{config.stage.upper()}{how}: {len(history)} iterations, reward "
                      f"{history[-1]['reward'] if history else float('nan'):.3f}")
  return result
