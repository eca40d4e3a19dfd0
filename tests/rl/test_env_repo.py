"""The repo environment: the workspace's file tools on good, wrong and hostile input, SWE-bench
grading (gold / empty / test-tampering / printing patches), run_tests and search in the sandbox,
tool-call faults as statuses, parallel calls, and a whole episode driven by text actions."""
import re

import pytest

from kat_jax.data.procedural.repos import RepoTask, apply_patch, make_repo_task, run_repo_tests
from kat_jax.data.toolcall import ToolCall
from kat_jax.errors import ConfigError
from kat_jax.rl import envs
from kat_jax.rl.envs import base
from kat_jax.rl.envs import repo
from kat_jax.rl.envs import workspace
from kat_jax.rl.envs.workspace import ToolError, Workspace, WorkspaceLimits
from kat_jax.sandbox import Limits, SandboxPool

# Tight limits: the machine is shared (see tests/sandbox/sandbox_helpers.py).
LIMITS = Limits(wall_time_s=3.0, cpu_time_s=2, memory_bytes=256 << 20, max_processes=8,
                file_size_bytes=1 << 20, disk_bytes=4 << 20, disk_inodes=128, open_files=64,
                output_bytes=1 << 20, capture_bytes=16 << 10)
CONFIG = {"memory_mb": 256, "run_tests_timeout_s": 10.0, "grade_timeout_s": 10.0}
HOSTILE_PATHS = ["../etc/passwd", "/etc/passwd", "pkg/../../x.py", "a/./../../b", "a\x00b.py",
                 "a\\..\\b.py", "x" * 300, "\n", "", 7, None]


@pytest.fixture(scope="module")
def pool():
  with SandboxPool(num_workers=2, limits=LIMITS) as sandbox_pool:
    yield sandbox_pool


@pytest.fixture(scope="module")
def task() -> RepoTask:
  return make_repo_task(0)


def fixed_files(task):
  return apply_patch(task.files, task.gold_patch)


def act(*calls, text="Let me work on it.\n"):
  """An assistant turn: text, then each (name, arguments) as a <tool_call> block."""
  return text + "".join(f"<tool_call>\n{ToolCall(name, args).to_json_text()}\n</tool_call>\n"
                        for name, args in calls)


def opened(pool, task, **overrides):
  env = envs.make("repo", {**CONFIG, **overrides}, pool=pool)
  return env, env.reset(task)


def bug_edit(task):
  """(old_str, new_str) of the gold patch's one-line fix."""
  removed = [l[1:] for l in task.gold_patch.splitlines() if l.startswith("-") and
             not l.startswith("---")]
  added = [l[1:] for l in task.gold_patch.splitlines() if l.startswith("+") and
           not l.startswith("+++")]
  return "\n".join(removed), "\n".join(added)


# ------------------------------------------------------------------------------ the workspace


def test_read_file_numbers_lines_and_ranges(task):
  ws = Workspace(task.files)
  text = ws.read_file(task.bug_file)
  header, *body = text.split("\n")
  lines = task.files[task.bug_file].splitlines()
  assert header == f"{task.bug_file} (lines 1-{len(lines)} of {len(lines)}):"
  assert [re.match(r"^ *(\d+)\t(.*)$", b).groups() for b in body] == [
      (str(i + 1), line) for i, line in enumerate(lines)]
  part = ws.read_file(task.bug_file, start_line=2, end_line=3).split("\n")
  assert part[1:] == [f"     2\t{lines[1]}", f"     3\t{lines[2]}"]
  assert ws.read_file(task.bug_file, start_line=len(lines), end_line=10**6).endswith(lines[-1])
  for start, end, message in ((0, None, "outside"), (len(lines) + 1, None, "outside"),
                              (3, 2, "before start_line")):
    with pytest.raises(ToolError, match=message):
      ws.read_file(task.bug_file, start, end)
  short = Workspace(task.files, WorkspaceLimits(max_read_lines=2)).read_file(task.bug_file)
  assert short.count("\n") == 3 and "start_line=3 for more" in short
  with pytest.raises(ToolError, match="did you mean 'utilpack/listops.py'"):
    ws.read_file("utilpack/listop.py")
  with pytest.raises(ToolError, match="is a directory"):
    ws.read_file("tests")
  assert Workspace({"e.py": ""}).read_file("./e.py") == "e.py is empty."


@pytest.mark.parametrize("path", HOSTILE_PATHS, ids=repr)
def test_hostile_paths_are_refused_by_every_tool(task, path):
  ws = Workspace(task.files)
  before = dict(ws.files)
  tools = {"read_file": lambda: ws.read_file(path),
           "create_file": lambda: ws.create_file(path, "x = 1\n"),
           "str_replace": lambda: ws.str_replace(path, "a", "b"),
           "search": lambda: ws.search_plan("x", path),
           "list_files": lambda: ws.list_files(path)}
  for name, tool in tools.items():
    if path in ("", None) and name in ("search", "list_files"):
      continue   # for these two, '' or no path means the whole repository
    with pytest.raises(ToolError) as error:
      tool()
    assert str(error.value) and "Traceback" not in str(error.value), name
  assert ws.files == before


def test_path_errors_say_what_is_wrong(task):
  ws = Workspace(task.files)
  for path, message in (("../etc/passwd", "leaves the repository"), ("/etc/passwd", "absolute"),
                        ("a\x00b.py", "control character"), ("a\\b.py", "backslash"),
                        ("x" * 300, "longer than the limit of 256"), (7, "must be a string")):
    with pytest.raises(ToolError, match=message):
      ws.create_file(path, "")
  assert ws.create_file("./new//dir/mod.py", "x = 1\n") == "Created new/dir/mod.py (1 line)."
  assert "new/dir/mod.py" in ws.files


def test_str_replace_needs_exactly_one_occurrence(task):
  ws = Workspace(task.files)
  old, new = bug_edit(task)
  with pytest.raises(ToolError, match="does not occur in"):
    ws.str_replace(task.bug_file, "no such text", "x")
  with pytest.raises(ToolError, match="match except for whitespace"):
    ws.str_replace(task.bug_file, "      " + old.strip(), new)   # indented wrongly
  count = task.files[task.bug_file].count("xs")
  with pytest.raises(ToolError, match=f"occurs {count} times"):
    ws.str_replace(task.bug_file, "xs", "ys")
  with pytest.raises(ToolError, match="occurs 2 times"):   # overlapping occurrences count
    Workspace({"a.txt": "aaa\n"}).str_replace("a.txt", "aa", "b")
  for bad_old, message in (("", "old_str is empty"), (old, "identical")):
    with pytest.raises(ToolError, match=message):
      ws.str_replace(task.bug_file, bad_old, old if bad_old else "x")
  assert ws.files == task.files
  report = ws.str_replace(task.bug_file, old, new)
  assert ws.files == fixed_files(task)
  assert report.startswith(f"Edited {task.bug_file}: replaced 1 line at line ") and new in report


def test_create_file_limits_and_conflicts(task):
  ws = Workspace(task.files, WorkspaceLimits(max_files=len(task.files) + 1, max_file_chars=100))
  assert ws.create_file("tests/test_new.py", "def test_a():\n  pass\n") == (
      "Created tests/test_new.py (2 lines).")
  assert ws.create_file("tests/test_new.py", "x = 1\n") == (
      "Overwrote tests/test_new.py (1 line; it had 2 lines).")
  for path, content, message in (("extra.py", "", "already holds"),
                                 ("tests/test_new.py", "x" * 101, "limit is 100"),
                                 ("tests", "", "is a directory"),
                                 ("README.md/x.py", "", "is a file"),
                                 ("tests/test_new.py", "s = '\ud800'", "not valid UTF-8")):
    with pytest.raises(ToolError, match=message):
      ws.create_file(path, content)


def test_list_files(task):
  ws = Workspace(task.files)
  everything = ws.list_files().split("\n")
  assert everything[0] == f"{len(task.files)} files in the repository:"
  assert [line.split("  (")[0] for line in everything[1:]] == sorted(task.files)
  package = task.bug_file.split("/")[0]
  listed = ws.list_files(package + "/").split("\n")[1:]
  assert [line.split("  (")[0] for line in listed] == sorted(
      p for p in task.files if p.startswith(package + "/"))
  assert ws.list_files(task.bug_file).split("\n")[1].startswith(task.bug_file)
  with pytest.raises(ToolError, match="no file or directory 'nowhere'"):
    ws.list_files("nowhere")


def test_visible_tests_are_the_pass_to_pass_tests(task):
  for t in (task, make_repo_task(5, num_modules=3)):
    assert sorted(workspace.visible_tests(t.files)) == sorted(t.pass_to_pass)
  source = ("import unittest\n\nclass TestA(unittest.TestCase):\n  def test_x(self):\n"
            "    pass\n  def helper(self):\n    pass\n\ndef test_y():\n  pass\n\n"
            "def not_a_test():\n  pass\n  def test_nested():\n    pass\n")
  assert workspace.collect_tests("t/test_m.py", source) == ["t/test_m.py::TestA::test_x",
                                                           "t/test_m.py::test_y"]


# --------------------------------------------------------------------------------- grading


def test_gold_patch_resolves_and_the_grade_is_complete(pool, task):
  files = fixed_files(task)
  grade = repo.grade_files(task, files, pool, LIMITS)
  total = len(task.fail_to_pass) + len(task.pass_to_pass)
  assert grade.passed and grade.compiled and grade.tests_passed == grade.tests_total == total
  assert grade.reference == task.gold_patch
  assert apply_patch(task.files, grade.prediction) == files
  assert grade.details["fail_to_pass"] == {t: True for t in task.fail_to_pass}
  assert grade.details["pass_to_pass"] == {t: True for t in task.pass_to_pass}
  assert grade.details["errors"] == {} and grade.details["sandbox_status"] == "completed"


@pytest.mark.parametrize("seed", [1, 2])
def test_grades_agree_with_the_trusted_runner_on_generated_code(pool, seed):
  """On our own (trusted) code, per-test verdicts equal repos.run_repo_tests on the repository
  with the test patch applied: the buggy repository fails exactly FAIL_TO_PASS."""
  t = make_repo_task(seed, num_modules=2)
  ids = t.fail_to_pass + t.pass_to_pass
  for files in (t.files, fixed_files(t)):
    grade = repo.grade_files(t, files, pool, LIMITS)
    want = run_repo_tests(apply_patch(files, t.test_patch), ids)
    assert {**grade.details["fail_to_pass"], **grade.details["pass_to_pass"]} == want
  buggy = repo.grade_files(t, t.files, pool, LIMITS)
  assert not buggy.passed and buggy.compiled and buggy.prediction == ""
  assert not any(buggy.details["fail_to_pass"].values())
  assert all(buggy.details["pass_to_pass"].values())


def test_tampering_with_tests_or_printing_does_not_resolve(pool, task):
  failing_path, _, failing_name = task.fail_to_pass[0].partition("::")
  with_hidden = apply_patch(task.files, task.test_patch)
  printing = dict(task.files)
  printing[task.bug_file] += "\nprint('PASSED')\nprint('===== 21 passed =====')\n"
  all_pass = "".join(f"\n\ndef {t.partition('::')[2]}():\n    pass\n"
                     for t in task.fail_to_pass + task.pass_to_pass)
  cases = {
      "empty patch": dict(task.files),
      "adds the failing test, then deletes it": {
          **with_hidden, failing_path: re.sub(rf"\n\n\ndef {failing_name}\(\):\n.*\n", "\n",
                                              with_hidden[failing_path])},
      "edits the failing test to pass": {
          **with_hidden, failing_path: with_hidden[failing_path].replace(
              f"def {failing_name}():\n", f"def {failing_name}():\n    return\n")},
      "deletes the test files": {p: t for p, t in task.files.items() if not p.startswith("tests/")},
      "replaces every test by pass": {**task.files, failing_path: all_pass},
      "prints PASSED": printing,
  }
  for name, files in cases.items():
    grade = repo.grade_files(task, files, pool, LIMITS)
    assert not grade.passed, name
    assert grade.details["fail_to_pass"] == {t: False for t in task.fail_to_pass}, name
    assert all(grade.details["pass_to_pass"].values()), name
  # Test edits never count, also for a correct fix: it still resolves.
  fixed = fixed_files(task)
  tampered = {**fixed, failing_path: "raise SystemExit(0)\n", "tests/conftest.py": "1/0\n"}
  assert repo.grade_files(task, tampered, pool, LIMITS).passed


def test_broken_module_is_not_compiled(pool, task):
  files = {**fixed_files(task), task.bug_file: fixed_files(task)[task.bug_file] + "\ndef (:\n"}
  grade = repo.grade_files(task, files, pool, LIMITS)
  assert not grade.passed and not grade.compiled
  module = task.bug_file[:-3].replace("/", ".")
  assert grade.details["module_errors"][module].startswith("SyntaxError")


# ------------------------------------------------------------------------- the environment


def test_registry_reset_and_config(pool, task):
  assert "repo" in base.names()
  env, obs = opened(pool, task)
  assert isinstance(env, repo.RepoEnv) and obs.tools == repo.TOOLS == env.tools
  assert [t.name for t in obs.tools] == ["list_files", "read_file", "search", "str_replace",
                                         "create_file", "run_tests", "submit"]
  assert [m.role for m in obs.messages] == ["system", "user"]
  assert task.issue.strip() in obs.messages[1].content
  assert all(path in obs.messages[1].content for path in task.files)
  assert env.reset(task.to_dict()).messages == obs.messages   # a task given as its dict
  with pytest.raises(ConfigError, match="no_such_knob"):
    envs.make("repo", {"no_such_knob": 1}, pool=pool)
  with pytest.raises(ConfigError, match="max_calls_per_turn=0"):
    envs.make("repo", {"max_calls_per_turn": 0}, pool=pool)
  with pytest.raises(ValueError, match="needs a sandbox"):
    envs.make("repo", None)
  with pytest.raises(TypeError, match="RepoTask"):
    env.reset("not a task")
  defaults = repo.default_repo_env_config()
  assert set(defaults) >= {"max_calls_per_turn", "run_tests_timeout_s", "grade_timeout_s"}


def test_episode_driven_by_text_actions_resolves(pool, task):
  env, _ = opened(pool, task)
  old, new = bug_edit(task)
  listing = env.step(act(("list_files", {})))
  assert listing.status == base.OK and not listing.done
  read = env.step(act(("read_file", {"path": task.bug_file})))
  assert old in read.observation.messages[0].content
  before = env.step(act(("run_tests", {})))
  report = before.observation.messages[0].content
  assert before.status == base.OK and report.startswith(
      f"Ran {len(task.pass_to_pass)} tests: {len(task.pass_to_pass)} passed, 0 failed.")
  # The agent writes a test reproducing the issue; run_tests picks it up.
  failing = apply_patch(task.files, task.test_patch)
  path = task.fail_to_pass[0].partition("::")[0]
  issue_test = failing[path][len(task.files[path]):]
  created = env.step(act(("create_file", {"path": "tests/test_issue.py", "content":
                                          task.files[path].split("\n")[0] + "\n" + issue_test})))
  assert created.status == base.OK
  red = env.step(act(("run_tests", {"test_ids": ["tests/test_issue.py"]})))
  red_text = red.observation.messages[0].content
  assert red_text.startswith("Ran 1 test: 0 passed, 1 failed.")
  assert "FAILED tests/test_issue.py::" in red_text
  assert "AssertionError: assert" in red_text   # the values the assertion compared
  edit = env.step(act(("str_replace", {"path": task.bug_file, "old_str": old, "new_str": new}),
                      ("run_tests", {})))
  assert edit.status == base.OK
  assert edit.observation.messages[1].content.startswith(
      f"Ran {len(task.pass_to_pass) + 1} tests: {len(task.pass_to_pass) + 1} passed, 0 failed.")
  done = env.step(act(("submit", {})))
  assert done.done and done.status == base.SUBMITTED
  grade = done.info["grade"]
  assert grade.passed and grade.compiled and grade.tests_passed == grade.tests_total
  assert apply_patch(task.files, grade.prediction) == {**fixed_files(task), "tests/test_issue.py":
                                                       env.workspace.files["tests/test_issue.py"]}
  assert done.observation.messages[0].content.startswith(
      f"Submitted: {grade.tests_total} of {grade.tests_total} hidden tests passed")
  with pytest.raises(RuntimeError, match="reset"):
    env.step(act(("list_files", {})))


def test_parallel_calls_apply_in_order_and_runs_see_their_snapshot(pool, task):
  env, _ = opened(pool, task)
  old, new = bug_edit(task)
  with_hidden = apply_patch(task.files, task.test_patch)
  path = task.fail_to_pass[0].partition("::")[0]
  res = env.step(act(("create_file", {"path": path, "content": with_hidden[path]}),
                     ("run_tests", {"test_ids": list(task.fail_to_pass)}),
                     ("str_replace", {"path": task.bug_file, "old_str": old, "new_str": new}),
                     ("run_tests", {"test_ids": list(task.fail_to_pass)}),
                     ("str_replace", {"path": task.bug_file, "old_str": new, "new_str": old}),
                     ("read_file", {"path": task.bug_file})))
  texts = [m.content for m in res.observation.messages]
  assert tuple(m.name for m in res.observation.messages) == res.info["calls"] == (
      "create_file", "run_tests", "str_replace", "run_tests", "str_replace", "read_file")
  assert texts[1].startswith("Ran 1 test: 0 passed, 1 failed.")
  assert texts[3].startswith("Ran 1 test: 1 passed, 0 failed.")
  assert old in texts[5] and env.workspace.files[task.bug_file] == task.files[task.bug_file]
  assert res.status == base.OK and not res.done


def test_faults_are_statuses(pool, task):
  env, _ = opened(pool, task, max_calls_per_turn=2)
  cases = [
      ("<tool_call>\n{not json}\n</tool_call>", base.PARSE_ERROR),
      ("<tool_call>\n{\"name\": \"read_file\"", base.PARSE_ERROR),
      (act(("rm_rf", {"path": "/"})), base.UNKNOWN_TOOL),
      ("I think the bug is in filter_gt.", base.NO_ACTION),
      (act(("read_file", {})), base.TOOL_ERROR),
      (act(("read_file", {"path": task.bug_file, "start_line": "1"})), base.TOOL_ERROR),
      (act(("read_file", {"path": task.bug_file, "mode": "r"})), base.TOOL_ERROR),
      (act(("read_file", {"path": "../../etc/passwd"})), base.TOOL_ERROR),
      (act(("str_replace", {"path": task.bug_file, "old_str": "zzz", "new_str": "y"})),
       base.TOOL_ERROR),
      (act(("search", {"pattern": "([a-z"})), base.TOOL_ERROR),
      (act(("run_tests", {"test_ids": ["tests/test_x.py::a::b::c"]})), base.TOOL_ERROR),
      (act(("run_tests", {"test_ids": ["../x.py"]})), base.TOOL_ERROR),
  ]
  for action, status in cases:
    res = env.step(action)
    assert res.status == status and not res.done, (action, res)
    message = res.observation.messages[0]
    assert message.content and (message.is_error or status == base.NO_ACTION), (action, message)
  assert env.workspace.files == task.files
  res = env.step(act(("list_files", {}), ("read_file", {"path": "README.md"}),
                     ("submit", {})))
  assert res.status == base.TOOL_ERROR and not res.done   # the third call was over the limit
  assert "at most 2 tool calls" in res.observation.messages[2].content


def test_search_matches_like_re_and_is_capped(pool, task):
  env, _ = opened(pool, task, max_search_results=3)
  pattern = r"def test_\w+_[0-2]\("
  res = env.step(act(("search", {"pattern": pattern, "path": "tests"}),
                     ("search", {"pattern": r"return \[", "path": task.bug_file}),
                     ("search", {"pattern": "no such text anywhere"})))
  capped, scoped, empty = [m.content for m in res.observation.messages]
  want = [f"{p}:{i}: {line}" for p in sorted(task.files) if p.startswith("tests/")
          for i, line in enumerate(task.files[p].splitlines(), 1)
          if re.search(pattern, line)]
  assert capped.split("\n")[0] == (f"{len(want)} matching lines in tests/ for {pattern!r} "
                                   "(first 3 shown):")
  assert capped.split("\n")[1:] == want[:3]
  assert scoped.split("\n")[1:] == [
      f"{task.bug_file}:{i}: {line}" for i, line in
      enumerate(task.files[task.bug_file].splitlines(), 1) if "return [" in line]
  assert empty == "No line of the repository matches 'no such text anywhere'."
  assert res.status == base.OK


def test_catastrophic_regex_times_out_in_the_sandbox(pool, task):
  env, _ = opened(pool, task, search_timeout_s=1.0)
  env.step(act(("create_file", {"path": "data.txt", "content": "a" * 40 + "!\n"})))
  res = env.step(act(("search", {"pattern": "^(a+)+$", "path": "data.txt"})))
  assert res.status == base.TOOL_TIMEOUT and not res.done
  assert "backtracks" in res.observation.messages[0].content


def test_run_tests_timeout_crash_and_output_are_reported(pool, task):
  env, _ = opened(pool, task, run_tests_timeout_s=1.5, max_observation_chars=400)
  env.step(act(("create_file", {"path": "tests/test_loop.py", "content":
                                "def test_spin():\n  while True:\n    pass\n"})))
  res = env.step(act(("run_tests", {"test_ids": ["tests/test_loop.py"]})))
  assert res.status == base.TOOL_TIMEOUT and "time limit" in res.observation.messages[0].content
  env.step(act(("create_file", {"path": "tests/test_loop.py", "content":
                                "import os\n\ndef test_exit():\n  os._exit(0)\n"})))
  res = env.step(act(("run_tests", {"test_ids": ["tests/test_loop.py"]})))
  assert res.status == base.OK and "died (exit 0)" in res.observation.messages[0].content
  env.step(act(("create_file", {"path": "tests/test_loop.py", "content":
                                "def test_noisy():\n  print('x' * 5000)\n"})))
  res = env.step(act(("run_tests", {})))
  text = res.observation.messages[0].content
  assert res.status == base.OK and len(text) <= 400
  assert "characters in all; the middle was cut" in text
  assert text.startswith(f"Ran {len(task.pass_to_pass) + 1} tests: {len(task.pass_to_pass) + 1} "
                         "passed") and text.endswith("x" * 20)


def test_submit_ends_the_turn_after_the_edits_before_it(pool, task):
  env, _ = opened(pool, task)
  old, new = bug_edit(task)
  res = env.step(act(("str_replace", {"path": task.bug_file, "old_str": old, "new_str": new}),
                     ("submit", {}),
                     ("str_replace", {"path": task.bug_file, "old_str": new, "new_str": old})))
  assert res.done and res.status == base.SUBMITTED and res.info["grade"].passed
  assert res.info["calls"] == ("str_replace", "submit")
  assert env.workspace.files == fixed_files(task)
  env2, _ = opened(pool, task)
  assert not env2.grade().passed   # grading without submitting: the unchanged repository
