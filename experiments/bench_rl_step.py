"""One RL iteration on real rollouts: its time split, tree vs flat training on the same rollouts,
and what entropy-budget pruning with host compaction saves.

  python -m experiments.bench_rl_step --preset=tiny --preset=small [--rounds=5]
      [--init_from=MIDTRAIN_WORKDIR  (tiny only: real samples instead of a random model's)]

Per preset: an ``RLStage`` (configs/rl_tiny.py with the ``--algo`` preset, ``code_single``
environment, the preset's model) rolls out ``tasks × group`` episodes (one warm-up collect, then
one timed: ``sample_s`` is the time inside the sampler, ``env_s`` the rest of the rollout —
environments, sandbox grading, rendering). On those same groups, four training batches:
tree / flat (``rl.tree_mode``) × unpruned / pruned (``rl.prune`` at ``--keep_fraction`` of each
tree's tokens, compacted on the host). Each round times ``prepare`` (scoring: old / reference
log-probs; advantages) and ``update`` (the train step) of every batch, alternating the order over
rounds; figures are medians. The params move between rounds (the timing does not depend on them).

The work bound of tree over flat training is the token ratio ``n_flat / n_tree`` of the real
tokens (``1 / (1 - POR)``); ``efficiency`` = speedup / work bound. ``pruned_cost_ratio`` = pruned
train time / unpruned train time of the same mode; the goal is ``<= keep_fraction + 0.1``.

One JSON object per (preset, mode) with ``case``, ``preset``, ``mode``, ``por``, ``work_bound``,
``tree_over_flat_speedup``, ``efficiency``, ``keep_fraction``, ``pruned_cost_ratio``,
``pruned_score_ratio``, ``sample_s``, ``env_s``, ``score_s``, ``train_s`` (and sizes).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Callable, Optional

from absl import app
from absl import flags

def define_flags() -> None:
  """The command line (defined only when run as a script: other benchmarks imported in the same
  process, e.g. by the tests, define flags of the same names)."""
  flags.DEFINE_multi_string("preset", ["tiny"], "Model presets.")
  flags.DEFINE_string("algo", "grpo", "RL preset (configs/rl_presets.py).")
  flags.DEFINE_integer("tasks", 0, "Tasks (groups) per iteration; 0 = the preset's.")
  flags.DEFINE_integer("group_size", 0, "Rollouts per task; 0 = the preset's.")
  flags.DEFINE_integer("max_new_tokens", 0, "Tokens per answer; 0 = the preset's.")
  flags.DEFINE_integer("rounds", 5, "Timed rounds of every training batch.")
  flags.DEFINE_float("keep_fraction", 0.5, "Pruning budget: fraction of tree tokens kept.")
  flags.DEFINE_string("init_from", "", "Checkpoint to sample from (tiny preset).")
  flags.DEFINE_string("workdir", "", "Scratch directory ('' = a temporary one).")


# Rollout sizes per preset: the small model's train step is ~30x the tiny one's on a CPU.
SIZES = {"tiny": dict(tasks=8, group=8, new=64), "small": dict(tasks=2, group=4, new=32)}


def stage_config(preset: str, algo: str, *, tasks: int, group: int, new: int, rounds: int,
                 tree_mode: bool, init_from: str = "", configure: Optional[Callable] = None):
  """configs/rl_tiny.py:<algo> at these sizes on ``preset``'s model; ``configure(config)`` last
  (tests shrink the model and the tree limits with it)."""
  from configs import rl_tiny
  from kat_jax.model import get_preset
  c = rl_tiny.get_config(algo)
  if preset != "tiny":
    c.model.update({k: v for k, v in get_preset(preset).items() if k != "value_head"})
  c.init_from = init_from
  c.data.vocab_size = c.model.vocab_size
  iterations = 4 * rounds + 4                  # updates the bench makes (the LR schedule's span)
  c.rl.update(dict(tasks_per_iteration=tasks, group_size=group, tree_mode=tree_mode,
                   iterations=iterations, eval_every=0, ppo_epochs=1))
  c.rl.rollout.max_new_tokens = new
  c.train.update(dict(batch_size=tasks, steps=iterations, progress_bar=False, log_every=10 ** 6,
                      checkpoint_every=10 ** 6))
  c.tree.max_traj = max(group, 1)
  if algo == "dapo":
    c.rl.filter.overlong_penalty_tokens = max(new // 4, 1)
  if algo == "drgrpo":
    c.train.agg_constant = float(new)
  if configure is not None:
    configure(c)
  c.data.vocab_size = c.model.vocab_size
  return c


class _SamplerClock:
  """Adds the wall time of the sampler's episode calls to ``seconds``."""

  def __init__(self, sampler):
    self.seconds = 0.0
    for name in ("start_episode", "generate_turn", "extend", "fork"):
      method = getattr(sampler, name)
      setattr(sampler, name, self._timed(method))

  def _timed(self, method):
    def call(*args, **kwargs):
      t0 = time.perf_counter()
      try:
        return method(*args, **kwargs)
      finally:
        self.seconds += time.perf_counter() - t0
    return call


def run_case(preset: str, *, algo: str = "grpo", tasks: int, group: int, new: int, rounds: int,
             keep_fraction: float, workdir: str, pool, tokenizer=None, init_from: str = "",
             configure: Optional[Callable] = None) -> list[dict]:
  """The measurement of one preset; returns the (tree, flat) JSON objects."""
  import jax
  from kat_jax.data import pipeline
  from kat_jax.rl import loop

  def stage(tree_mode):
    c = stage_config(preset, algo, tasks=tasks, group=group, new=new, rounds=rounds,
                     tree_mode=tree_mode, init_from=init_from, configure=configure)
    return loop.RLStage(c, os.path.join(workdir, f"{preset}_{'tree' if tree_mode else 'flat'}"),
                        pool=pool, tokenizer=tokenizer)

  if tokenizer is None and not init_from:
    c = stage_config(preset, algo, tasks=tasks, group=group, new=new, rounds=rounds,
                     tree_mode=True, configure=configure)
    tokenizer = pipeline.get_or_train_tokenizer(c.data, os.path.join(workdir, "tokenizer"))
  stages = {"tree": stage(True), "flat": stage(False)}
  tree = stages["tree"]
  clock = _SamplerClock(tree.sampler)
  tree.collect()                                # warm-up: compiles the sampler
  clock.seconds = 0.0
  t0 = time.perf_counter()
  groups, _ = tree.collect()
  rollout_s = time.perf_counter() - t0
  sample_s = clock.seconds
  rewards = tree.rewards_of(groups)

  def batch_of(mode, pruned):
    s = stages[mode]
    s.config.rl.prune.update(dict(enabled=pruned, budget_fraction=keep_fraction))
    batch, info = s.build_batch(groups, rewards)
    return s, batch, info

  sides = [(mode, pruned) for mode in ("tree", "flat") for pruned in (False, True)]
  prepared, infos, times = {}, {}, {side: {"score": [], "train": []} for side in sides}
  for side in sides:                            # warm-up: compiles score and train steps
    s, batch, info = batch_of(*side)
    prepared[side] = s.prepare(batch, info)
    infos[side] = info
    s.update(prepared[side])
  for r in range(rounds):
    for side in (sides if r % 2 == 0 else sides[::-1]):
      s, batch, info = batch_of(*side)
      t0 = time.perf_counter()
      ready = s.prepare(batch, info)
      jax.block_until_ready(ready["field/old_logp"])
      t1 = time.perf_counter()
      s.update(ready)                           # update() fetches the step's metrics: synced
      times[side]["score"].append(t1 - t0)
      times[side]["train"].append(time.perf_counter() - t1)
  med = {side: {k: statistics.median(v) for k, v in t.items()} for side, t in times.items()}
  trees = infos[("tree", False)]["trees"]
  n_tree = sum(t.n_tree for t in trees)
  n_flat = sum(t.n_flat for t in trees)
  work_bound = n_flat / n_tree
  speedup = med[("flat", False)]["train"] / med[("tree", False)]["train"]
  out = []
  for mode in ("tree", "flat"):
    full, pruned = med[(mode, False)], med[(mode, True)]
    prune_info = infos[(mode, True)]["prune"]
    out.append({
        "case": "rl_step", "preset": preset, "mode": mode, "algo": algo, "tasks": tasks,
        "group_size": group, "max_new_tokens": new, "rounds": rounds,
        "por": round(1.0 - n_tree / n_flat, 4), "work_bound": round(work_bound, 3),
        "tree_over_flat_speedup": round(speedup, 3),
        "efficiency": round(speedup / work_bound, 3),
        "keep_fraction": round(prune_info["kept_fraction"], 4),
        "keep_fraction_target": keep_fraction,
        "pruned_cost_ratio": round(pruned["train"] / full["train"], 3),
        "pruned_score_ratio": round(pruned["score"] / full["score"], 3),
        "batch_tokens": int(prepared[(mode, False)]["tokens"].size),
        "pruned_batch_tokens": int(prepared[(mode, True)]["tokens"].size),
        "rollout_s": round(rollout_s, 3), "sample_s": round(sample_s, 3),
        "env_s": round(rollout_s - sample_s, 3), "score_s": round(full["score"], 3),
        "train_s": round(full["train"], 4), "pruned_train_s": round(pruned["train"], 4),
        "pass_rate": float(sum(t.grade is not None and t.grade.passed
                               for g, _ in groups for t in g)) / (tasks * group),
    })
  for s in stages.values():
    s.trainer.close()
  return out


def main(argv):
  del argv
  from kat_jax.sandbox import SandboxPool
  f = flags.FLAGS
  workdir = f.workdir or tempfile.mkdtemp(prefix="kat_bench_rl_step_")
  with SandboxPool(num_workers=2) as pool:
    for preset in f.preset:
      size = SIZES.get(preset, SIZES["small"])
      for row in run_case(preset, algo=f.algo, tasks=f.tasks or size["tasks"],
                          group=f.group_size or size["group"], new=f.max_new_tokens or size["new"],
                          rounds=f.rounds, keep_fraction=f.keep_fraction, workdir=workdir,
                          pool=pool, init_from=f.init_from if preset == "tiny" else ""):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
