"""The RL stage survives the environment fault fuzz inside a real run: ``RLStage.iterate`` on a
tiny random model and the real multi-turn ``code`` environment, with faults injected at random —
resets and steps that raise, steps that return garbage, the model's action replaced by malformed
tool calls, unknown tools, crashing programs, infinite loops, huge outputs, bad and good
submissions — and NaN rewards for failed submissions. Every iteration completes with finite
params, every fault ends up as a status (never a crash), and the sandbox pool still grades a
correct program afterwards."""
import collections
import itertools
import json
import os
import random
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data"))
from byte_tokenizer import ByteTokenizer  # noqa: E402

from configs.base import get_base_config  # noqa: E402
from kat_jax.rl import envs, rewards  # noqa: E402
from kat_jax.rl import loop as rl_loop  # noqa: E402
from kat_jax.rl.envs import base  # noqa: E402
from kat_jax.sandbox import SandboxPool  # noqa: E402

TOKENIZER = ByteTokenizer()
ITERATIONS, TASKS, GROUP = 4, 8, 4
_SEEDS = itertools.count()
INJECTED = collections.Counter()


def call(name, **arguments):
  return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def fault_actions(task):
  """What replaces the model's turn: kind -> text (sandbox-heavy kinds are rarer, see weights)."""
  f = task.entry_point
  return {
      "invalid_json": "<tool_call>\n{not json}\n</tool_call>",
      "unclosed_tag": '<tool_call>\n{"name": "run_tests", "arguments": {}}',
      "unknown_tool": call("read_file", path="/etc/passwd"),
      "missing_argument": call("run_tests"),
      "wrong_type": call("submit", code=7),
      "crash": call("run_tests", code="raise SystemError('boom')\n"),
      "infinite_loop": call("run_tests", code=f"def {f}(*a):\n  while True:\n    pass\n"),
      "huge_output": call("run_tests", code="print('x' * 10**7)\n" + task.solution),
      "bad_submit": call("submit", code=f"def {f}(:\n"),
      "good_submit": call("submit", code=task.solution),
  }


WEIGHTS = {"invalid_json": 3, "unclosed_tag": 3, "unknown_tool": 3, "missing_argument": 3,
           "wrong_type": 3, "crash": 1, "infinite_loop": 1, "huge_output": 1, "bad_submit": 2,
           "good_submit": 2}


class FaultyCode(base.Environment):
  """The code environment with faults injected at random (seeded per instance)."""

  def __init__(self, env, seed):
    self.env, self.tools, self.rng, self.task = env, env.tools, random.Random(seed), None

  def reset(self, task):
    self.task = task
    if self.rng.random() < 0.03:
      INJECTED["reset_raises"] += 1
      raise ConnectionError("no workspace left")
    return self.env.reset(task)

  def step(self, action):
    draw = self.rng.random()
    if draw < 0.05:
      INJECTED["step_raises"] += 1
      raise RuntimeError("env bug")
    if draw < 0.08:
      INJECTED["step_returns_garbage"] += 1
      return {"status": "ok"}
    if draw < 0.7:
      kinds = list(WEIGHTS)
      kind = self.rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
      INJECTED[kind] += 1
      action = fault_actions(self.task)[kind]
    return self.env.step(action)        # else: the model's own (random) turn


@envs.register("fuzz_code")
def _fuzz_code(config, pool=None):
  return FaultyCode(envs.make("code", config, pool=pool), seed=next(_SEEDS))


def _nan_unless_passed(grade, cfg):
  terms = rewards.kat_composite(grade, cfg)
  if grade is not None and not grade.passed:
    terms["reward"] = float("nan")
  return terms


if "rl_fuzz_nan_unless_passed" not in rewards.names():
  rewards.register("rl_fuzz_nan_unless_passed", _nan_unless_passed)


def _config():
  c = get_base_config("tiny")
  c.stage = "rl"
  c.model.update(dict(vocab_size=TOKENIZER.vocab_size, d_model=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64))
  c.rl.update(dict(env_name="fuzz_code", iterations=ITERATIONS, tasks_per_iteration=TASKS,
                   group_size=GROUP, eval_every=0, sandbox_workers=1))
  # No system turn: shorter byte-level prompts (~1,200 bytes with the tools block).
  c.rl.env.update(dict(tool_timeout_s=0.5, max_observation_chars=300, with_system_prompt=False,
                       show_visible_tests=False))
  # Tree rollouts on: forks replay the faulty environments (a mismatch refuses the fork).
  c.rl.rollout.update(dict(max_turns=3, max_new_tokens=8, max_observation_tokens=120,
                           env_threads=2, fork_turns=1, fork_width=2))
  c.rl.rollout.reward.name = "rl_fuzz_nan_unless_passed"
  c.rl.filter.mask_limit_statuses = True
  c.train.update(dict(loss="tree", objective="ppo", batch_size=8, steps=ITERATIONS,
                      warmup_steps=0, learning_rate=1e-2, weight_decay=0.0, progress_bar=False,
                      log_every=1, eval_every=0))
  c.tree.update(dict(max_len=2048, max_tokens=3072, max_nodes=32, max_traj=GROUP))
  return c


@pytest.mark.slow
def test_rl_iterations_survive_the_fault_fuzz(tmp_path):
  INJECTED.clear()
  statuses, reward_errors, env_errors, episodes, forks = collections.Counter(), 0, 0, 0, 0
  with SandboxPool(num_workers=1) as pool:
    stage = rl_loop.RLStage(_config(), str(tmp_path / "run"), pool=pool, tokenizer=TOKENIZER)
    original = stage.rollouts
    seen = []

    def recording(*args, **kwargs):
      groups = original(*args, **kwargs)
      seen.extend(t for g in groups for t in g)
      return groups

    stage.rollouts = recording
    for _ in range(ITERATIONS):
      metrics = stage.iterate()
      assert np.isfinite(metrics["reward"]) and np.isfinite(metrics["reward_used"])
      forks += metrics["rollout/forked_trajectories"] + metrics["rollout/fork_replay_errors"]
      assert metrics.get("train/loss") is None or np.isfinite(metrics["train/loss"])
    for leaf in jax.tree.leaves(jax.device_get(stage.trainer.params)):
      assert np.isfinite(np.asarray(leaf)).all()
    assert stage.trainer.step_count == ITERATIONS and stage.iteration == ITERATIONS
    for t in seen:
      episodes += 1
      statuses[t.status] += 1
      assert t.status in base.STATUSES
      assert np.isfinite(t.reward)
      env_errors += "env_error" in t.info
      if "reward_error" in t.info:
        reward_errors += 1
        assert t.reward == 0.0 and "nan" in t.info["reward_error"]
    stage.close()
    # The pool still grades a correct program.
    task = rl_loop.draw_tasks(stage.config, 0, 99, 0, 1)[0]
    env = envs.make("code", stage.config.rl.env, pool=pool)
    env.reset(task)
    result = env.step(call("submit", code=task.solution))
    assert result.status == base.SUBMITTED and result.info["grade"].passed
  assert episodes == ITERATIONS * TASKS * GROUP and forks > 0
  assert env_errors == statuses[base.ENV_ERROR] > 0
  assert reward_errors > 0 and statuses[base.SUBMITTED] > 0 and statuses[base.MAX_TURNS] > 0
  assert {"reset_raises", "step_raises", "step_returns_garbage", "infinite_loop", "crash",
          "huge_output", "good_submit"} <= set(INJECTED), INJECTED
  print(f"RL fault fuzz: {episodes} episodes, statuses {dict(statuses)}, injected "
        f"{dict(INJECTED)}")
