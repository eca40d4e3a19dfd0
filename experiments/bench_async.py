"""The synchronous RL loop vs the trajectory manager (η = 1, 2) under environment latency that
varies per episode, in the same run.

  python -m experiments.bench_async [--rounds=2 --iterations=3 --etas=1,2 --tasks=4 --group=4 \
      --delay=lognormal --delay_ms=2000 --delay_sigma=0.75 --rollout_workers=4 --batch_groups=2]

One ``RLStage`` (tiny model, fresh init or ``--init_from``) on the multi-turn ``code``
environment; every environment step is the environment's own step, plus one **real sandbox run**
of the model's code against the task's visible tests (``--sandbox_calls``), plus a sleep of the
episode's latency: one draw per episode from ``--delay`` (``lognormal`` with median
``--delay_ms`` and log-std ``--delay_sigma``, ``exponential`` with mean ``--delay_ms``,
``uniform`` on [0, 2·``--delay_ms``], ``none``), the same sequence of draws for every case. Cases:

* ``sync``: the manager at η = 0 with one worker rolling all B groups in one lockstep batch —
  exactly the synchronous loop (tested equal to ``RLStage.iterate``): rollout, then score and
  train; trainer idle ≈ rollout time, rollout idle ≈ score + train time.
* ``manager`` η: ``kat_jax.rl.manager.AsyncRL`` with ``--rollout_workers`` episode-driver threads
  of ``--batch_groups`` groups each, partial rollout at turn boundaries (KV kept),
  ``decoupled_ppo``.

A warm-up round (one iteration of every case: compiles every shape) comes first; then
``--rounds`` rounds, each running every case for ``--iterations`` updates in turn (alternating,
so load from other processes hits all alike). Prints one JSON object per case: medians over the
rounds of ``trajectories_per_s``, ``trainer_idle_fraction``, ``rollout_idle_fraction``, the median
per-round ``speedup_vs_sync`` (trajectories/s over the same round's sync case),
``max_staleness`` and the staleness histogram of the trained tokens.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
import tempfile
import threading
import time

import numpy as np
from absl import app, flags

from kat_jax.eval.scoring import extract_code
from kat_jax.rl.envs import base

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  flags.DEFINE_integer("rounds", 2, "Timed rounds (each runs every case).")
  flags.DEFINE_integer("iterations", 4, "Updates per case per round.")
  flags.DEFINE_string("etas", "1,2", "Staleness bounds of the manager cases.")
  flags.DEFINE_integer("tasks", 4, "Groups per update (B = tasks_per_iteration).")
  flags.DEFINE_integer("group", 4, "Rollouts per task (G).")
  flags.DEFINE_integer("max_turns", 2, "Assistant turns per episode.")
  flags.DEFINE_integer("max_new_tokens", 16, "Tokens sampled per turn.")
  flags.DEFINE_enum("delay", "lognormal", ["lognormal", "exponential", "uniform", "none"],
                    "Distribution of the per-episode environment latency.")
  flags.DEFINE_float("delay_ms", 2000.0, "Median (lognormal) / mean of the latency.")
  flags.DEFINE_float("delay_sigma", 0.75, "Log-std of the lognormal latency.")
  flags.DEFINE_bool("sandbox_calls", True,
                    "Run the model's code on the visible tests at every step.")
  flags.DEFINE_integer("rollout_workers", 4, "Episode-driver threads (manager cases).")
  flags.DEFINE_integer("batch_groups", 2, "Groups per lockstep rollout batch of a manager worker.")
  flags.DEFINE_enum("kv_on_resume", "keep", ["keep", "recompute"], "Partial-rollout KV.")
  flags.DEFINE_integer("seed", 0, "Seed of the tasks, the sampling and the latencies.")
  flags.DEFINE_string("preset", "tiny", "Model preset.")
  flags.DEFINE_integer("d_model", 0, "Override the preset's d_model (0 = keep).")
  flags.DEFINE_integer("num_layers", 0, "Override the preset's num_layers (0 = keep).")
  flags.DEFINE_string("init_from", "", "Checkpoint to start from ('' = fresh init).")
  flags.DEFINE_string("tokenizer_dir", "", "Tokenizer ('' = train one, cached).")
  flags.DEFINE_string("workdir", "", "Run directory ('' = a temporary one).")


def _config(iterations: int):
  from configs.base import get_base_config
  c = get_base_config(FLAGS.preset)
  c.stage, c.seed, c.init_from = "rl", FLAGS.seed, FLAGS.init_from
  c.data.tokenizer_path = FLAGS.tokenizer_dir
  c.data.tokenizer_max_sentences = 3000
  c.rl.update(dict(env_name="code", iterations=iterations, tasks_per_iteration=FLAGS.tasks,
                   group_size=FLAGS.group, eval_every=0, sandbox_workers=2,
                   checkpoint_every=10 ** 6))
  c.rl.env.update(dict(tool_timeout_s=2.0, max_observation_chars=600))
  c.rl.rollout.update(dict(max_turns=FLAGS.max_turns, max_new_tokens=FLAGS.max_new_tokens,
                           temperature=1.0, max_observation_tokens=192,
                           env_threads=max(FLAGS.tasks * FLAGS.group, 1)))
  c.rl.manager.kv_on_resume = FLAGS.kv_on_resume
  c.train.update(dict(loss="tree", objective="decoupled_ppo", batch_size=FLAGS.tasks,
                      steps=iterations, warmup_steps=0, learning_rate=1e-4, weight_decay=0.0,
                      progress_bar=False, log_every=10 ** 6, eval_every=0,
                      checkpoint_every=10 ** 6))
  # A code-env prompt (system turn with the tools block) is ~650 tokens with the trained tokenizer.
  c.tree.update(dict(max_len=1024, max_tokens=2048, max_nodes=64, max_traj=FLAGS.group))
  if FLAGS.d_model:
    c.model.update(dict(d_model=FLAGS.d_model, mlp_dim=4 * FLAGS.d_model))
  if FLAGS.num_layers:
    c.model.num_layers = FLAGS.num_layers
  return c


def _delay_s(rng: np.random.Generator) -> float:
  ms = FLAGS.delay_ms
  if FLAGS.delay == "none" or ms <= 0:
    return 0.0
  if FLAGS.delay == "lognormal":
    return float(ms * np.exp(FLAGS.delay_sigma * rng.standard_normal())) / 1e3
  if FLAGS.delay == "exponential":
    return float(rng.exponential(ms)) / 1e3
  return float(rng.uniform(0.0, 2 * ms)) / 1e3


class LatencyDraws:
  """The latency of episode 0, 1, 2, ... of a case (thread-safe; the same sequence per case)."""

  def __init__(self, seed: int):
    self.seed, self.count, self.lock = seed, itertools.count(), threading.Lock()

  def __next__(self) -> float:
    with self.lock:
      n = next(self.count)
    return _delay_s(np.random.default_rng((self.seed, n)))


class LatencyEnv(base.Environment):
  """Wraps a ``code`` environment: each step also runs the model's code on the visible tests in
  the sandbox and then sleeps the episode's latency (drawn at reset)."""

  def __init__(self, env, draws: LatencyDraws):
    self.env, self.tools, self.draws = env, env.tools, draws
    self.delay_s = 0.0

  def reset(self, task):
    self.delay_s = next(self.draws)
    return self.env.reset(task)

  def step(self, action):
    result = self.env.step(action)
    if FLAGS.sandbox_calls and self.env.task is not None:
      job = self.env.task.visible_job(extract_code(action))
      self.env.pool.run(dataclasses.replace(job, limits=self.env.limits))
    time.sleep(self.delay_s)
    return result

  def close(self):
    self.env.close()


def _wrapper(seed: int):
  draws = LatencyDraws(seed)
  return lambda env: LatencyEnv(env, draws)


def run_case(stage, iterations: int, eta: int) -> dict:
  """``iterations`` updates through ``AsyncRL`` at ``eta``; η = 0 with one worker rolling all B
  groups in one lockstep batch is the synchronous loop (same rollouts, same updates as
  ``RLStage.iterate``: tests/rl/test_manager.py) with the same environments as the others."""
  from kat_jax.rl import manager as manager_lib
  m = stage.config.rl.manager
  m.enabled, m.eta = True, eta
  m.rollout_workers = 1 if eta == 0 else FLAGS.rollout_workers
  m.batch_groups = FLAGS.tasks if eta == 0 else FLAGS.batch_groups
  run = manager_lib.AsyncRL(stage, end_iteration=stage.iteration + iterations,
                            env_wrapper=_wrapper(FLAGS.seed))
  try:
    for _ in range(iterations):
      run.iterate(timeout=1800)
    summary = run.summary()
  finally:
    run.close()
  return summary


def main(argv):
  del argv
  from kat_jax.rl import loop as rl_loop
  etas = [int(e) for e in FLAGS.etas.split(",") if e.strip()]
  cases = [("sync", 0)] + [("manager", e) for e in etas]
  per_case = 1 + FLAGS.rounds * FLAGS.iterations
  config = _config(iterations=len(cases) * per_case)
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="kat_bench_async_")
  tokenizer = None
  if not FLAGS.tokenizer_dir:
    from kat_jax.data import pipeline
    tokenizer = pipeline.get_or_train_tokenizer(config.data, workdir)
  stage = rl_loop.RLStage(config, workdir, tokenizer=tokenizer)
  results = {c: [] for c in cases}
  try:
    for round_ in range(-1, FLAGS.rounds):             # round -1: warm-up (compiles)
      iters = 1 if round_ < 0 else FLAGS.iterations
      for case, eta in cases:
        r = run_case(stage, iters, eta)
        if round_ >= 0:
          results[(case, eta)].append(r)
  finally:
    stage.close()
  sync_tps = [r["trajectories_per_s"] for r in results[("sync", 0)]]
  for case, eta in cases:
    rs = results[(case, eta)]
    hist: dict = {}
    for r in rs:
      for s, f in r["staleness_histogram"].items():
        hist[str(s)] = hist.get(str(s), 0.0) + f / len(rs)
    print(json.dumps({
        "case": case, "eta": eta,
        "trajectories_per_s": statistics.median(r["trajectories_per_s"] for r in rs),
        "trainer_idle_fraction": statistics.median(r["trainer_idle_fraction"] for r in rs),
        "rollout_idle_fraction": statistics.median(r["rollout_idle_fraction"] for r in rs),
        "speedup_vs_sync": statistics.median(r["trajectories_per_s"] / s
                                             for r, s in zip(rs, sync_tps)),
        "max_staleness": max(r["max_staleness"] for r in rs),
        "staleness_histogram": hist,
        "swaps": sum(r["swaps"] for r in rs),
        "round_trajectories_per_s": [r["trajectories_per_s"] for r in rs],
        "rounds": FLAGS.rounds, "iterations": FLAGS.iterations, "tasks": FLAGS.tasks,
        "group": FLAGS.group, "max_turns": FLAGS.max_turns, "rollout_workers": (
            FLAGS.rollout_workers if case == "manager" else 1),
        "delay": FLAGS.delay, "delay_ms": FLAGS.delay_ms, "delay_sigma": FLAGS.delay_sigma,
        "sandbox_calls": FLAGS.sandbox_calls, "kv_on_resume": FLAGS.kv_on_resume,
    }), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
