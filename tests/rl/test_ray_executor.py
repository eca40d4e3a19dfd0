"""The Ray executor (kat_jax.rl.executor, config.rl.executor='ray'): environments in Ray actors
step exactly as in-process ones (same statuses, observations, grades and rewards for scripted
actions; the same trajectories for a tiny model's rollout on a fixed seed), and a worker killed
mid-episode becomes the episode's env_error status — the rollout returns, the dead worker is
replaced. One local Ray cluster for the module (starting Ray costs seconds)."""
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ray  # noqa: E402  (the [ray] extra; CI installs it with README's install line)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data"))
from byte_tokenizer import ByteTokenizer  # noqa: E402

from configs.base import get_base_config  # noqa: E402
from kat_jax.data import procedural  # noqa: E402
from kat_jax.model import ModelConfig, Transformer, get_preset  # noqa: E402
from kat_jax.model import intervals_from_segment_ids  # noqa: E402
from kat_jax.rl import executor, rewards  # noqa: E402
from kat_jax.rl import rollout as rollout_lib  # noqa: E402
from kat_jax.rl.envs import base  # noqa: E402
from kat_jax.sample import Sampler  # noqa: E402
from kat_jax.sandbox import SandboxPool  # noqa: E402

TOK = ByteTokenizer()


def _config():
  c = get_base_config("tiny")
  c.rl.env_name = "code"
  c.rl.env.update(dict(tool_timeout_s=2.0, max_observation_chars=800))
  c.rl.executor = "ray"
  c.rl.ray.update(dict(num_cpus=2, env_workers=2, sandbox_workers=1))
  return c


@pytest.fixture(scope="module")
def factories():
  config = _config()
  with SandboxPool(num_workers=1) as pool:
    local = executor.InProcessEnvs(config.rl.env_name, config.rl.env, pool)
    remote = executor.make(config)
    try:
      yield local, remote
    finally:
      remote.close()
      ray.shutdown()


@pytest.fixture(scope="module")
def tasks():
  return procedural.generate_tasks(seed=0, num_tasks=4, split="train", levels=(0,))


def _call(name, code):
  return ("<tool_call>\n" + json.dumps({"name": name, "arguments": {"code": code}})
          + "\n</tool_call>")


def _summary(result):
  grade = result.info.get("grade")
  return (result.status, result.done, [(m.role, m.content) for m in result.observation.messages],
          None if grade is None else (grade.passed, grade.compiled, grade.tests_passed,
                                      grade.tests_total), rewards.score(grade,
                                                                        rewards.default_reward_config()))


def test_ray_environments_step_like_in_process_ones(factories, tasks):
  local, remote = factories
  scripts = [[_call("run_tests", tasks[0].solution), _call("submit", tasks[0].solution)],
             [_call("submit", "def nope(:\n")],
             ["I am not sure.", _call("run_tests", "def f(x):\n    return 0\n")],
             [_call("submit", tasks[3].solution)]]
  envs_local, envs_remote = local.make(len(tasks)), remote.make(len(tasks))
  assert {e.slot for e in envs_remote} == {0, 1}      # both workers serve rows
  seen = set()
  for task, script, a, b in zip(tasks, scripts, envs_local, envs_remote):
    assert a.reset(task) == b.reset(task) and a.tools == b.tools
    for action in script:
      ra, rb = _summary(a.step(action)), _summary(b.step(action))
      assert ra == rb
      seen.add(ra[0])
  assert {base.SUBMITTED, base.NO_ACTION, base.OK} <= seen
  for e in envs_local + envs_remote:
    e.close()


def _numpy_init(abstract, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape) * a.shape[0] ** -0.5 if a.ndim > 1
                            else np.ones(a.shape), a.dtype), abstract)


@pytest.fixture(scope="module")
def sampler():
  c = get_preset("tiny")
  c.update(dict(vocab_size=384, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                head_dim=16, mlp_dim=64))
  model = Transformer(ModelConfig.from_config(c))
  t = jnp.zeros((1, 8), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), t, t, intervals_from_segment_ids(jnp.ones((1, 8), jnp.int32)))["params"]))
  return Sampler(model, _numpy_init(abstract), max_len=2560, prefill_bucket=256, output_bucket=8,
                 extend_bucket=64)


def _rollout_cfg():
  cfg = rollout_lib.default_rollout_config()
  cfg.update(dict(max_turns=2, max_new_tokens=8, temperature=1.0, max_observation_tokens=256,
                  env_threads=1))
  return cfg


def test_ray_rollout_equals_in_process_rollout(factories, tasks, sampler):
  local, remote = factories
  out = {}
  for name, factory in (("local", local), ("ray", remote)):
    envs = factory.make(len(tasks))
    out[name] = rollout_lib.rollout(sampler, envs, tasks, jax.random.key(3), _rollout_cfg(), TOK)
  for a, b in zip(out["local"], out["ray"]):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logp_policy, b.logp_policy)
    assert (a.status, a.num_turns, a.reward_terms) == (b.status, b.num_turns, b.reward_terms)
    assert a.info["statuses"] == b.info["statuses"] and a.status != base.ENV_ERROR
    assert a.num_turns >= 1 and a.info["statuses"]      # the environments were really stepped


class KillWorkerOnStep(base.Environment):
  """Kills its Ray worker when the episode's first step comes, then forwards the step."""

  def __init__(self, env):
    self.env, self.tools = env, env.tools

  def reset(self, task):
    return self.env.reset(task)

  def step(self, action):
    ray.kill(self.env.actor)
    return self.env.step(action)


def test_killed_worker_mid_episode_is_an_episode_status(factories, tasks, sampler):
  _, remote = factories
  envs = remote.make(len(tasks))                      # rows 0, 2 on one worker; 1, 3 on the other
  victim = envs[0].slot
  envs[0] = KillWorkerOnStep(envs[0])
  trajs = rollout_lib.rollout(sampler, envs, tasks, jax.random.key(3), _rollout_cfg(), TOK)
  for i, t in enumerate(trajs):
    on_victim = (envs[i].env if i == 0 else envs[i]).slot == victim
    if on_victim:
      assert t.status == base.ENV_ERROR and "died" in t.info["env_error"], t.info
      assert t.num_turns == 1                           # reset went through; the step did not
    else:
      assert t.status != base.ENV_ERROR, t.info
  # The next environments get a fresh worker in the dead one's place.
  fresh = remote.make(2)
  for env, task in zip(fresh, tasks):
    env.reset(task)
    assert env.step("nothing to do").status == base.NO_ACTION
  assert len(set(remote.pids())) == 2
