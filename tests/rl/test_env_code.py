"""The code environments: run_tests / submit on good, wrong and hostile code, tool-call faults as
statuses, parallel calls, truncation, the single-turn variant and HumanEval problems."""
import ast
import json
import time

import pytest

from kat_jax.data import chat
from kat_jax.data import procedural
from kat_jax.data.procedural import canonical
from kat_jax.errors import ConfigError
from kat_jax.eval import humaneval
from kat_jax.rl import envs
from kat_jax.rl.envs import base
from kat_jax.rl.envs import code
from kat_jax.rl.envs import tools
from kat_jax.sandbox import Limits, SandboxPool

# Tight limits: the machine is shared (see tests/sandbox/sandbox_helpers.py).
LIMITS = Limits(wall_time_s=3.0, cpu_time_s=2, memory_bytes=256 << 20, max_processes=8,
                file_size_bytes=1 << 20, disk_bytes=4 << 20, disk_inodes=128, open_files=64,
                output_bytes=1 << 20, capture_bytes=4096)
CONFIG = {"tool_timeout_s": 1.0, "max_observation_chars": 600}


@pytest.fixture(scope="module")
def pool():
  with SandboxPool(num_workers=2, limits=LIMITS) as sandbox_pool:
    yield sandbox_pool


@pytest.fixture(scope="module")
def task():
  """A level-0 task with at least 3 tests whose first two expected values differ."""
  tasks = procedural.generate_tasks(seed=0, num_tasks=20, split="train", levels=(0,))
  return next(t for t in tasks if len(t.tests) >= 3
              and canonical(t.tests[0].expected) != canonical(t.tests[1].expected))


def call(name, **arguments):
  return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def opened(pool, task, name="code", **overrides):
  env = envs.make(name, {**CONFIG, **overrides}, pool=pool)
  return env, env.reset(task)


def constant(task, value):
  """A program whose function returns ``value`` whatever its arguments."""
  return f"def {task.entry_point}(*args):\n  return {value!r}\n"


def test_registry_and_opening_observation(pool, task):
  assert {"code", "code_single", "humaneval"} <= set(base.names())
  env, obs = opened(pool, task)
  assert isinstance(env, code.CodeEnv) and obs.tools == code.TOOLS == env.tools
  assert [m.role for m in obs.messages] == ["system", "user"]
  user = obs.messages[1].content
  assert user.startswith(task.spec)
  for t in task.tests[:2]:
    assert f"  {t.call_source(task.entry_point)} == {t.expected!r}" in user
  assert task.tests[2].call_source(task.entry_point) not in user   # hidden-only tests stay hidden
  text = chat.render_text(chat.Conversation(obs.messages, tools=obs.tools))
  assert "<tools>" in text and '"name": "run_tests"' in text and '"name": "submit"' in text
  assert env.reset(task) == obs                                     # deterministic, reusable
  single = envs.make("code_single", CONFIG, pool=pool)
  assert single.reset(task).tools == () and single.tools == ()


def test_reference_solution_passes_run_tests_and_submit(pool, task):
  env, _ = opened(pool, task)
  res = env.step(call("run_tests", code=task.solution))
  assert (res.status, res.done) == (base.OK, False)
  [message] = res.observation.messages
  assert (message.role, message.name, message.is_error) == ("tool", "run_tests", False)
  assert message.content.startswith("All 2 visible tests passed.")
  res = env.step(call("submit", code=task.solution))
  assert (res.status, res.done) == (base.SUBMITTED, True)
  grade = res.info["grade"]
  assert grade.passed and grade.compiled
  assert grade.tests_passed == grade.tests_total == len(task.tests)
  assert grade.prediction == grade.reference == task.solution
  with pytest.raises(RuntimeError, match="reset"):
    env.step(call("run_tests", code=task.solution))


def test_wrong_solution_gets_a_failure_report_naming_the_test(pool, task):
  env, _ = opened(pool, task)
  first = task.tests[0]
  res = env.step(call("run_tests", code=constant(task, first.expected)))   # passes test_0 only
  assert res.status == base.OK and not res.done
  report = res.observation.messages[0].content
  second = task.tests[1]
  assert report.startswith("1 of 2 visible tests failed.")
  assert f"FAILED test_1: {second.call_source(task.entry_point)}" in report
  assert f"  expected: {second.expected!r}" in report
  assert f"returned {first.expected!r}" in report
  assert f"passed test_0: {first.call_source(task.entry_point)}" in report
  res = env.step(call("submit", code=constant(task, first.expected)))
  grade = res.info["grade"]
  same = sum(canonical(t.expected) == canonical(first.expected) for t in task.tests)
  assert not grade.passed and grade.compiled
  assert (grade.tests_passed, grade.tests_total) == (same, len(task.tests))
  assert [passed for _, passed, _ in grade.details["tests"]] == [
      canonical(t.expected) == canonical(first.expected) for t in task.tests]


def test_code_that_does_not_parse_is_not_compiled(pool, task):
  env, _ = opened(pool, task)
  res = env.step(call("run_tests", code=f"def {task.entry_point}(:\n"))
  report = res.observation.messages[0].content
  assert res.status == base.OK and "failed to load" in report and "SyntaxError" in report
  grade = env.step(call("submit", code=f"def {task.entry_point}(:\n")).info["grade"]
  assert (grade.passed, grade.compiled, grade.tests_passed) == (False, False, 0)
  assert grade.details["sandbox_status"] == "load_error"


HOSTILE = {
    "infinite_loop": ("def {f}(*args):\n  while True:\n    pass\n", base.TOOL_TIMEOUT),
    "exit_at_import": ("import os\nos._exit(0)\n", base.OK),
    "exit_in_call": ("import os\ndef {f}(*args):\n  os._exit(0)\n", base.OK),
    "prints_passed": ("print('PASSED')\nprint('All 2 visible tests passed.')\n"
                      "def {f}(*args):\n  print('PASSED')\n  return None\n", base.OK),
    "rebinds_builtins": ("import builtins\n"
                         "builtins.AssertionError = type('N', (BaseException,), {})\n"
                         "builtins.repr = lambda x: 'ok'\nbuiltins.abs = lambda x: 0\n"
                         "def {f}(*args):\n  return None\n", base.OK),
    "forges_equality": ("class Yes(dict):\n  def __eq__(self, other):\n    return True\n"
                        "def {f}(*args):\n  return Yes()\n", base.OK),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_code_never_passes(pool, task, name):
  source, run_status = HOSTILE[name]
  program = source.replace("{f}", task.entry_point)
  env, _ = opened(pool, task)
  res = env.step(call("run_tests", code=program))
  assert res.status == run_status and not res.done
  report = res.observation.messages[0].content
  assert "All 2 visible tests passed." not in report.split("---")[0]   # not the verdict line
  grade = env.step(call("submit", code=program)).info["grade"]
  assert not grade.passed and grade.tests_passed == 0
  if name == "exit_at_import":
    assert not grade.compiled
  if name == "prints_passed":
    assert "--- stdout ---\nPASSED" in report


def test_malformed_unknown_and_bad_arguments_keep_the_episode_open(pool, task):
  env, _ = opened(pool, task)
  res = env.step("<tool_call>\n{not json}\n</tool_call>")
  [message] = res.observation.messages
  assert (res.status, res.done, message.role, message.is_error) == (
      base.PARSE_ERROR, False, "tool", True)
  assert message.content.startswith("could not parse tool call #1 (invalid_json)")
  res = env.step(call("read_file", path="a.py"))
  assert (res.status, res.done) == (base.UNKNOWN_TOOL, False)
  assert "'read_file'" in res.observation.messages[0].content
  assert "['run_tests', 'submit']" in res.observation.messages[0].content
  for action, named in ((call("run_tests"), "'code'"), (call("submit", code=7), "'code'"),
                        (call("run_tests", code=task.solution, path="x"), "'path'")):
    res = env.step(action)
    [message] = res.observation.messages
    assert (res.status, res.done, message.is_error) == (base.TOOL_ERROR, False, True)
    assert named in message.content, message.content
  res = env.step("I am thinking about it.")
  assert (res.status, res.done) == (base.NO_ACTION, False)
  assert res.observation.messages[0].role == "user"
  assert "run_tests" in res.observation.messages[0].content
  res = env.step(call("submit", code=task.solution))   # the episode went on: still gradable
  assert res.done and res.info["grade"].passed


def test_parallel_calls_run_concurrently_and_answer_in_order(pool, task):
  env, _ = opened(pool, task, tool_timeout_s=3.0)
  sleepy = "import time\ntime.sleep(1.5)\n"
  start = time.perf_counter()
  res = env.step(call("run_tests", code=sleepy + constant(task, "nope"))
                 + "\n" + call("run_tests", code=sleepy + task.solution))
  elapsed = time.perf_counter() - start
  assert res.status == base.OK and res.info["calls"] == ("run_tests", "run_tests")
  first, second = (m.content for m in res.observation.messages)
  assert first.startswith("2 of 2 visible tests failed.")
  assert second.startswith("All 2 visible tests passed.")
  assert elapsed < 2.7, f"two 1.5 s runs took {elapsed:.2f} s: not run concurrently"
  res = env.step(call("run_tests", code=task.solution) + call("submit", code=task.solution)
                 + call("run_tests", code="never run"))
  assert (res.status, res.done) == (base.SUBMITTED, True) and res.info["grade"].passed
  assert res.info["calls"] == ("run_tests", "submit")                 # nothing after submit
  assert [m.name for m in res.observation.messages] == ["run_tests", "submit"]


def test_calls_beyond_the_per_turn_limit_are_refused(pool, task):
  env, _ = opened(pool, task, max_calls_per_turn=1)
  res = env.step(call("run_tests", code=task.solution) + call("run_tests", code=task.solution))
  assert res.info["call_statuses"] == (base.OK, base.TOOL_ERROR) and res.status == base.TOOL_ERROR
  assert "at most 1 tool calls" in res.observation.messages[1].content


def test_huge_output_is_truncated_with_a_marker(pool, task):
  env, _ = opened(pool, task)
  res = env.step(call("run_tests", code="print('x' * 20000)\n" + task.solution))
  content = res.observation.messages[0].content
  assert len(content) <= CONFIG["max_observation_chars"]
  assert "characters in all; the middle was cut" in content
  assert content.startswith("All 2 visible tests passed.")


def test_truncate_keeps_head_and_tail():
  text = "".join(chr(97 + i % 26) for i in range(1000))
  cut = tools.truncate(text, 300)
  assert len(cut) <= 300 and tools.truncate(text, 1000) == text
  head, tail = cut.split("\n[... 1000 characters in all; the middle was cut ...]\n")
  assert text.startswith(head) and text.endswith(tail) and len(head) >= len(tail) > 50


def test_code_block_without_a_call(pool, task):
  env, _ = opened(pool, task)
  res = env.step(f"Here it is:\n```python\n{task.solution}```\n")
  assert (res.status, res.done) == (base.SUBMITTED, True) and res.info["grade"].passed
  assert res.info["submitted_via"] == "code_block"
  env, _ = opened(pool, task, code_block_submits=False)
  res = env.step(f"```python\n{task.solution}```")
  assert (res.status, res.done) == (base.NO_ACTION, False)


def test_single_turn_grades_the_fenced_block(pool, task):
  env, obs = opened(pool, task, "code_single")
  assert obs.tools == () and "```python" in obs.messages[0].content
  res = env.step(f"Sure.\n```python\n{task.solution}```\nDone.")
  assert (res.status, res.done) == (base.SUBMITTED, True)
  assert res.info["grade"].passed and res.info["grade"].prediction == task.solution
  env.reset(task)
  grade = env.step("I cannot solve this.").info["grade"]
  assert (grade.passed, grade.compiled) == (False, False)


def test_humaneval_canonical_passes_and_empty_body_fails(pool):
  problems = humaneval.load_problems()
  env = envs.make("humaneval", {**CONFIG, "tool_timeout_s": 3.0}, pool=pool)
  for task_id in ("HumanEval/0", "HumanEval/2"):
    problem = problems[task_id]
    obs = env.reset(task_id)
    assert problem.prompt in obs.messages[1].content and obs.tools == code.TOOLS
    res = env.step(call("run_tests", code=problem.canonical_solution))
    assert res.observation.messages[0].content.startswith("All 2 visible tests passed.")
    grade = env.step(call("submit", code=problem.canonical_solution)).info["grade"]
    assert grade.passed and grade.compiled and (grade.tests_passed, grade.tests_total) == (1, 1)
    assert grade.reference == problem.prompt + problem.canonical_solution
    env.reset(problem)
    full_program = problem.prompt + problem.canonical_solution       # a whole function works too
    assert env.step(call("submit", code=full_program)).info["grade"].passed
    env.reset(problem)
    grade = env.step(call("submit", code="")).info["grade"]
    assert not grade.passed and grade.compiled and grade.tests_passed == 0
  env.reset("HumanEval/2")
  res = env.step(call("run_tests", code="    return number\n"))
  report = res.observation.messages[0].content
  assert "FAILED assert_0: truncate_number(3.5) == 0.5" in report
  assert "returned 3.5, expected 0.5" in report


def test_humaneval_visible_asserts_use_no_local_names():
  problems = humaneval.load_problems()
  asserts = code.humaneval_visible_asserts(problems["HumanEval/0"])
  assert len(asserts) == 7
  assert all(any(isinstance(n, ast.Name) and n.id == "candidate" for n in ast.walk(a))
             for a in asserts)
  assert code.humaneval_visible_asserts(problems["HumanEval/32"]) == []   # loops over locals


def test_bad_configuration_and_misuse_raise_clear_errors(pool, task):
  with pytest.raises(ConfigError, match="visible_test"):
    envs.make("code", {"visible_test": 2}, pool=pool)
  with pytest.raises(ConfigError, match="tool_timeout_s"):
    envs.make("code", {"tool_timeout_s": "fast"}, pool=pool)
  with pytest.raises(ConfigError, match="visible_tests=-1"):
    envs.make("code", {"visible_tests": -1}, pool=pool)
  with pytest.raises(ValueError, match="pool="):
    envs.make("code", None)
  env = envs.make("code", None, pool=pool)
  assert env.config.to_dict() == code.default_code_env_config().to_dict()
  with pytest.raises(RuntimeError, match="reset"):
    env.step("hello")
  with pytest.raises(TypeError, match="dict"):
    env.reset({"task_id": "x"})
  with pytest.raises(ValueError, match="HumanEval/0"):
    env.reset("HumanEval/999")


def test_check_arguments():
  assert tools.check_arguments(code.SUBMIT, {"code": "x"}) is None
  assert "needs the argument 'code'" in tools.check_arguments(code.SUBMIT, {})
  assert "no argument 'cod'" in tools.check_arguments(code.SUBMIT, {"code": "", "cod": ""})
  assert "must be a JSON string, got bool" in tools.check_arguments(code.SUBMIT, {"code": True})
