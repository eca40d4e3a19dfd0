"""The RFT stage: the RL stage's loop, Trainer, step and tree batch, with watched rollouts guided
by teacher trajectories (``kat_jax.rl.rft``; docs/RFT.md)::

    python -m experiments.main --config=configs/rft_tiny.py --workdir=/tmp/kat_rft \
        --config.init_from=/tmp/kat_sft

An iteration draws tasks as the RL stage does, finds each task's verified teachers (cached per
task), rolls the group out under a ``rft.DeviationMonitor`` (stopped rollouts end ``deviated``;
with correction on, each gets a corrected branch that continues from the teacher's turn), scores
every trajectory by its relative reward against the teachers, and trains on one tree per group —
the rollouts and their branches together, group advantages over all of them. Only
``training_rollouts`` differs from ``loop.RLStage``: scoring, advantages, pruning, updates,
checkpoints, resume and evaluation (plain greedy rollouts, the env's own grade) are the RL
stage's.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from kat_jax import sharding as sharding_lib
from kat_jax.data.config import split_list
from kat_jax.errors import ConfigError
from kat_jax.rl import envs as envs_lib
from kat_jax.rl import loop as rl_loop
from kat_jax.rl import manager as manager_lib
from kat_jax.rl import rft as rft_lib
from kat_jax.rl import rollout as rollout_lib
from kat_jax.rl.envs import base as env_base
from kat_jax.tree import batch as tree_batch
from kat_jax.tree import build
from kat_jax.tree.logprobs import batch_to_arrays


def validate(config) -> None:
  """The RL stage's checks plus RFT's own (``ConfigError`` naming the field and the fix)."""
  rl_loop.validate(config)
  rl = config.rl
  rft_lib.validate_config(rl.rft, rl.env_name)
  if not rl.tree_mode:
    raise ConfigError("config.rl.tree_mode=False with config.stage='rft': a group and its "
                      "corrected branches are trained as one tree; set config.rl.tree_mode=True")
  if rl.rollout.fork_turns:
    raise ConfigError(f"config.rl.rollout.fork_turns={rl.rollout.fork_turns} with "
                      "config.stage='rft': RFT branches only by correction; set fork_turns=0")
  if manager_lib.enabled(config):
    raise ConfigError("config.stage='rft' runs the synchronous loop: set config.rl.manager.enabled"
                      "=False, config.rl.manager.eta=0 and config.rl.executor='inprocess'")
  want = rl.group_size + rft_lib.branches_per_group(rl.rft)
  if config.tree.max_traj < want:
    raise ConfigError(f"config.tree.max_traj={config.tree.max_traj} < group_size + "
                      f"rl.rft.correction.max_per_group = {want}: a group and its corrected "
                      f"branches are one tree; set --config.tree.max_traj={want}")


class RFTStage(rl_loop.RLStage):
  """``loop.RLStage`` with teacher-guided, watched rollouts and the relative reward."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, pool=None,
               tokenizer=None):
    validate(config)
    super().__init__(config, workdir, pool=pool, tokenizer=tokenizer)
    self.rft = config.rl.rft
    self.max_group = config.rl.group_size + rft_lib.branches_per_group(self.rft)
    probe = self._plain_env()
    self.env_tools = bool(probe.tools)
    probe.close()
    self.sources = split_list(self.rft.teachers)
    self._teachers: dict[str, tuple[list, dict]] = {}

  def _plain_env(self) -> env_base.Environment:
    rl = self.config.rl
    return envs_lib.make(rl.env_name, rl.env, pool=self.pool)

  # ------------------------------------------------------------------------------- teachers

  def teachers(self, task: Any) -> list:
    """The task's verified teachers (computed once per task id)."""
    return self._teacher_entry(task)[0]

  def _teacher_entry(self, task: Any) -> tuple[list, dict]:
    key = rollout_lib.task_id_of(task)
    if key not in self._teachers:
      self._teachers[key] = rft_lib.teachers_for(
          task, self.sources, self._plain_env, self.env_tools,
          max_turns=max(int(self.config.rl.rollout.max_turns), 16))
    return self._teachers[key]

  def _prepare_teachers(self, tasks: Sequence[Any]) -> None:
    missing = {rollout_lib.task_id_of(t): t for t in tasks
               if rollout_lib.task_id_of(t) not in self._teachers}
    threads = max(min(int(self.config.rl.rollout.env_threads), len(missing)), 1)
    with concurrent.futures.ThreadPoolExecutor(threads) as executor:
      list(executor.map(self._teacher_entry, missing.values()))

  # ------------------------------------------------------------------------------- scoring

  def teacher_tokens(self, message) -> np.ndarray:
    return rollout_lib.assistant_turn_tokens(message, self.tokenizer)

  def continuation_nll(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Mean NLL (nats per token) of each continuation after its context under the current
    params: one ``Trainer.score`` pass over trees of a context and its continuations (pairs
    with equal contexts share one tree)."""
    by_context: dict = collections.OrderedDict()
    for p, (context, cont) in enumerate(pairs):
      by_context.setdefault(np.asarray(context, np.int32).tobytes(), (context, []))[1].append(
          (p, np.asarray(cont, np.int32)))
    trees, where = [], {}
    k_max, limit = int(self.config.tree.max_traj), int(self.config.tree.max_tokens)

    def flush(context, part):
      trees.append(build.build_tree(
          [np.concatenate([context, c]) for _, c in part],
          fields={"weight": [np.concatenate([np.zeros(len(context), np.float32),
                                             np.ones(len(c), np.float32)]) for _, c in part]}))
      where.update({p: (len(trees) - 1, k) for k, (p, _) in enumerate(part)})

    for context, conts in by_context.values():   # each pair fits alone (the caller checks)
      part, size = [], len(context)
      for p, cont in conts:
        if part and (len(part) == k_max or size + len(cont) > limit):
          flush(context, part)
          part, size = [], len(context)
        part.append((p, cont))
        size += len(cont)
      flush(context, part)
    shards = sharding_lib.batch_shards(self.trainer.mesh, self.trainer.rules)
    rows = shards * (1 << max(-(-len(trees) // shards) - 1, 0).bit_length())   # pow2 buckets
    trees += [trees[-1]] * (rows - len(trees))
    batch = batch_to_arrays(tree_batch.batch_trees(
        trees, max_tokens=rl_loop.token_bucket(max(t.n_tree for t in trees), limit),
        max_nodes=self.config.tree.max_nodes, max_traj=k_max, max_len=self.config.tree.max_len))
    logp = self.trainer.score(self._with_layout(batch))["logp"]        # [B, K, L-1] pairs
    weight = batch["field/weight"][..., 1:]                             # the token each predicts
    nll = -(logp * weight).sum(-1) / np.maximum(weight.sum(-1), 1.0)
    return np.array([nll[where[p]] for p in range(len(pairs))], np.float64)

  # ------------------------------------------------------------------------------- rollouts

  def training_rollouts(self, tasks, rng):
    """Watched rollouts of every task plus their corrected branches, each trajectory's
    ``reward_terms`` replaced by its relative reward (the env's own kept in
    ``info["env_reward_terms"]``)."""
    self._prepare_teachers(tasks)
    g = self.config.rl.group_size
    monitor = rft_lib.DeviationMonitor(
        self.rft, self.teachers, group_of=lambda source: source // g,
        scorer=self._checked_nll, teacher_tokens=self.teacher_tokens,
        max_len=min(int(self.config.tree.max_len), int(self.config.tree.max_tokens)))
    groups = self.rollouts(tasks, rng, monitor=monitor)
    groups = [[self._rescored(t, task) for t in group] for group, task in zip(groups, tasks)]
    self.last_rollout_stats = {**rollout_lib.rollout_stats(groups),
                               **self._rft_stats(groups, tasks, monitor)}
    return groups

  def _checked_nll(self, pairs):
    """``continuation_nll`` of the pairs whose tree fits the batch limits (others: +inf)."""
    limit = min(int(self.config.tree.max_tokens), int(self.config.tree.max_len))
    ok = [k for k, (c, t) in enumerate(pairs) if len(c) + len(t) <= limit]
    out = np.full((len(pairs),), np.inf)
    if ok:
      out[ok] = self.continuation_nll([pairs[k] for k in ok])
    return out

  def _rescored(self, traj: rollout_lib.Trajectory, task: Any) -> rollout_lib.Trajectory:
    terms = rft_lib.relative_reward(traj.grade, traj.info.get("actions", ()), traj.status,
                                    self.teachers(task), self.rft.reward)
    return dataclasses.replace(traj, reward_terms=terms,
                               info={**traj.info, "env_reward_terms": dict(traj.reward_terms)})

  def _rft_stats(self, groups, tasks, monitor) -> dict:
    g, max_turns = self.config.rl.group_size, int(self.config.rl.rollout.max_turns)
    rollouts = [t for group in groups for t in group[:g]]
    branches = [t for group in groups for t in group[g:]]
    stopped = [t for t in rollouts if t.status == env_base.DEVIATED]
    per_task = [len(self.teachers(task)) for task in tasks]
    return {
        "rft/stopped_fraction": len(stopped) / max(len(rollouts), 1),
        # Turns a stopped rollout did not sample (an upper bound: it might have ended sooner).
        "rft/turns_saved": float(sum(max_turns - 1 - t.info["deviation"]["turn"]
                                     for t in stopped)),
        "rft/branches": float(len(branches)),
        "rft/branch_pass_rate": float(np.mean([t.grade is not None and t.grade.passed
                                               for t in branches])) if branches else 0.0,
        "rft/rollout_pass_rate": float(np.mean([t.grade is not None and t.grade.passed
                                                for t in rollouts])),
        "rft/teachers_per_task": float(np.mean(per_task)),
        "rft/tasks_without_teacher": float(sum(n == 0 for n in per_task)),
        "rft/scored_pairs": float(monitor.stats["scored_pairs"]),
    }


def train(config: ml_collections.ConfigDict, workdir: str,
          max_iterations: Optional[int] = None, tokenizer=None) -> dict[str, Any]:
  """Runs the RFT stage in ``workdir``: the RL stage's loop with ``RFTStage`` (which validates)."""
  return rl_loop.train(config, workdir, max_iterations, tokenizer=tokenizer,
                       stage_cls=RFTStage)
