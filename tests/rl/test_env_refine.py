"""The ``refine`` environment and reward: an episode starts from a failing program and the
sandbox's real report of it, every answer is graded, a failing one gets its new report and another
round; the ``refine`` reward equals the hand-computed combination and gives an empty or
unparsable refinement 0 CodeBLEU and 0 pass rate; the RL stage's rollout drives the environment
over two rounds; configs/rl_tiny_refine.py validates."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from kat_jax.data import procedural, self_debug
from kat_jax.errors import ConfigError
from kat_jax.rl import codebleu, envs, rewards, rollout
from kat_jax.rl.envs import base, refine
from kat_jax.sandbox import Limits, SandboxPool
from tests.data.byte_tokenizer import ByteTokenizer

LIMITS = Limits(wall_time_s=5.0, cpu_time_s=3, memory_bytes=256 << 20, max_processes=8,
                file_size_bytes=1 << 20, disk_bytes=4 << 20, disk_inodes=128, open_files=64,
                output_bytes=1 << 20, capture_bytes=4096)
CONFIG = {"tool_timeout_s": 2.0, "max_rounds": 3}


@pytest.fixture(scope="module")
def pool():
  with SandboxPool(num_workers=2, limits=LIMITS) as sandbox_pool:
    yield sandbox_pool


@pytest.fixture(scope="module")
def task():
  tasks = procedural.generate_tasks(seed=0, num_tasks=20, split="train", levels=(0,))
  return next(t for t in tasks if len(t.tests) >= 4
              and len(procedural.buggy_variants(t, max_variants=3)) == 3)


def fenced(code, explanation=""):
  return (explanation + "\n\n" if explanation else "") + "```python\n" + code + "```"


def reward_config(**weights):
  cfg = rewards.default_reward_config()
  cfg.name = "refine"
  cfg.refine = refine.default_refine_reward_config()
  cfg.refine.update(weights)
  return cfg


def test_episode_starts_from_a_mutant_and_its_real_report(pool, task):
  assert "refine" in envs.names()
  env = envs.make("refine", CONFIG, pool=pool)
  obs = env.reset(task)
  assert isinstance(env, refine.RefineEnv) and obs.tools == ()
  assert [m.role for m in obs.messages] == ["system", "user"]
  spec, code, error, explanation, mode = self_debug.parse_debug_prompt(obs.messages[1].content)
  variants = procedural.buggy_variants(task, max_variants=3)
  assert spec == task.spec and code in [v.code for v in variants] and mode == "explain_refine"
  ct = self_debug.code_task(task, env.config)
  (verdict,) = self_debug.judge(pool, [(ct, code)])
  assert error == verdict.error and not verdict.passed and "FAILED test_" in error
  # Every row of a group starts from the same program.
  again = envs.make("refine", CONFIG, pool=pool).reset(task)
  assert again.messages == obs.messages
  # A stub when asked (or when a task has no failing mutant).
  stub = envs.make("refine", {**CONFIG, "buggy_source": "stub"}, pool=pool)
  assert "return None" in self_debug.parse_debug_prompt(
      stub.reset(task).messages[1].content)[1]


def test_rounds_until_a_pass_or_the_limit(pool, task):
  env = envs.make("refine", CONFIG, pool=pool)
  obs = env.reset(task)
  _, buggy, error, _, _ = self_debug.parse_debug_prompt(obs.messages[1].content)
  res = env.step(fenced(buggy, "I think it is fine."))
  assert (res.done, res.status, res.info["round"], res.info["passed"]) == (False, base.OK, 1,
                                                                           False)
  (message,) = res.observation.messages
  assert message.role == "user" and message.content == self_debug.followup_message(
      error, "explain_refine")
  res = env.step("def broken(:")
  assert not res.done and "SyntaxError" in res.observation.messages[0].content
  res = env.step(fenced(task.solution, "Line 2 is wrong."))
  assert res.done and res.status == base.SUBMITTED
  grade = res.info["grade"]
  assert grade.passed and grade.details["round"] == 3 and grade.prediction == task.solution
  assert grade.reference == task.solution and grade.details["source"] == "mutant"
  assert grade.details["explanation"] == "Line 2 is wrong."
  with pytest.raises(RuntimeError, match="without an open episode"):
    env.step("x")
  one = envs.make("refine", {**CONFIG, "max_rounds": 1}, pool=pool)
  one.reset(task)
  res = one.step(fenced(buggy))
  assert res.done and not res.info["grade"].passed and res.info["grade"].details["round"] == 1


def model_record(task):
  return self_debug.SelfDebugRecord(
      record_id="r", task_id=task.task_id, source="model", prompt=task.spec,
      task=task.to_json(), reference=task.solution, buggy_code="def f(*a):\n    return 0\n",
      error="1 of 4 tests failed: a given report.", buggy_tests_passed=0,
      explanation="Line 2 returns 0 instead of the answer.", refinement=task.solution,
      refinement_text="", passed=True, tests_passed=4, tests_total=4, status="completed",
      refinement_error="", lineage={})


def test_records_path_gives_the_models_own_failing_program(pool, task, tmp_path):
  record = model_record(task)
  path = self_debug.write_records([record], str(tmp_path / "records.jsonl"))
  env = envs.make("refine", {**CONFIG, "records_path": path}, pool=pool)
  _, code, error, _, _ = self_debug.parse_debug_prompt(env.reset(task).messages[1].content)
  assert (code, error, env.task.source) == (record.buggy_code, record.error, "model")
  other = procedural.generate_tasks(seed=1, num_tasks=1, split="train", levels=(0,))[0]
  env.reset(other)                       # not in the records: a mutant
  assert env.task.source in ("mutant", "stub") and other.task_id != task.task_id


def test_given_task_error_and_reference_explanation(pool, task):
  record = model_record(task)
  given = refine.refine_task_of(record)
  assert given.task_id == task.task_id and given.reference_explanation == record.explanation
  env = envs.make("refine", {**CONFIG, "with_system_prompt": False}, pool=pool)
  (user,) = env.reset(given).messages
  assert user.content == self_debug.debug_prompt(task.spec, record.buggy_code, record.error,
                                                 "explain_refine")
  res = env.step(fenced(task.solution, "Line 2 returns 0 instead of the sum."))
  details = res.info["grade"].details
  # 7 common words of 8 and 8: F1 = 7/8.
  assert details["explanation_score"] == pytest.approx(7 / 8) and details["explanation_scored"]
  assert refine.explanation_score("a b c", "a b d") == pytest.approx(2 / 3)
  assert refine.explanation_score("", "a") == 0.0


def test_reward_is_the_hand_computed_combination(pool, task):
  env = envs.make("refine", {**CONFIG, "max_rounds": 1}, pool=pool)
  env.reset(task)
  partial = next(v.code for v in procedural.buggy_variants(task, max_variants=None)
                 if 0 < procedural.run_tests(v.code, task).pass_rate < 1)
  grade = env.step(fenced(partial, "Line 3 is off by one.")).info["grade"]
  assert 0 < grade.pass_fraction < 1
  cfg = reward_config(w_test=0.6, w_codebleu=0.3, w_explanation=0.1)
  terms = rewards.score(grade, cfg)
  cb = codebleu.codebleu(partial, task.solution)
  expl = refine.explanation_score("Line 3 is off by one.",
                                  env.task.reference_explanation)
  assert terms["test"] == grade.tests_passed / grade.tests_total
  assert terms["codebleu"] == pytest.approx(cb) and 0 < cb < 1
  assert terms["explanation"] == pytest.approx(expl) and expl > 0
  assert terms["reward"] == pytest.approx(0.6 * terms["test"] + 0.3 * cb + 0.1 * expl)
  assert rewards.score(None, cfg) == {"reward": 0.0, "test": 0.0, "codebleu": 0.0,
                                      "explanation": 0.0}


@pytest.mark.parametrize("answer", ["", "   \n", "```python\ndef f(:\n    return\n```",
                                    "no code here, just words"])
def test_empty_or_unparsable_refinement_scores_zero(pool, task, answer):
  env = envs.make("refine", {**CONFIG, "max_rounds": 1}, pool=pool)
  env.reset(task)
  grade = env.step(answer).info["grade"]
  terms = rewards.score(grade, reward_config(w_test=0.5, w_codebleu=0.5))
  assert (terms["test"], terms["codebleu"], terms["reward"]) == (0.0, 0.0, 0.0)
  assert grade.tests_passed == 0


def test_config_errors(pool, task):
  with pytest.raises(ConfigError, match="config.rl.env.mode='debug'"):
    envs.make("refine", {"mode": "debug"}, pool=pool)
  with pytest.raises(ConfigError, match="max_rounds=0"):
    envs.make("refine", {"max_rounds": 0}, pool=pool)
  with pytest.raises(ValueError, match="needs a sandbox"):
    envs.make("refine", None)
  cfg = rewards.default_reward_config()
  cfg.name = "refine"
  with pytest.raises(ConfigError, match="reward.refine is missing"):
    rewards.validate_config(cfg)
  with pytest.raises(ConfigError, match="w_test=-1"):
    rewards.validate_config(reward_config(w_test=-1.0))
  with pytest.raises(TypeError, match="RefineTask or a procedural Task"):
    envs.make("refine", CONFIG, pool=pool).reset("HumanEval/0")


def test_rollout_drives_two_rounds_and_the_config_validates(pool, task):
  from configs import rl_tiny_refine
  from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
  from kat_jax.rl import loop
  from kat_jax.sample import Sampler
  c = rl_tiny_refine.get_config()
  loop.validate(c)
  rewards.validate_config(c.rl.rollout.reward)
  assert isinstance(envs.make(c.rl.env_name, c.rl.env, pool=pool), refine.RefineEnv)
  for preset in ("dapo", "drgrpo"):
    rl_tiny_refine.get_config(preset)
  tok = ByteTokenizer()
  m = get_preset("tiny")
  m.update(vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
           head_dim=16, mlp_dim=64)
  model = Transformer(ModelConfig.from_config(m))
  t = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), t, t, intervals_from_segment_ids(
      jnp.ones((1, 4), jnp.int32)))["params"])
  sampler = Sampler(model, params, max_len=2048, prefill_bucket=256, output_bucket=16)
  cfg = rollout.default_rollout_config()
  cfg.update(dict(max_turns=2, max_new_tokens=8, max_observation_tokens=0, env_threads=2))
  cfg.reward = reward_config()
  env_cfg = {**CONFIG, "max_rounds": 2, "with_system_prompt": False}
  env_list = [envs.make("refine", env_cfg, pool=pool) for _ in range(2)]
  trajs = rollout.rollout(sampler, env_list, [task, task], jax.random.key(0), cfg, tok)
  for traj in trajs:
    assert traj.status == base.SUBMITTED and traj.num_turns == 2
    assert traj.grade.details["round"] == 2 and not traj.grade.passed
    assert set(traj.reward_terms) == {"reward", "test", "codebleu", "explanation"}
    assert traj.reward == pytest.approx(0.8 * traj.grade.pass_fraction
                                        + 0.2 * traj.reward_terms["codebleu"])
    assert dataclasses.asdict(traj.grade)["details"]["source"] == "mutant"
