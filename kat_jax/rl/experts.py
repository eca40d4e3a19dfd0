"""Scripted expert policies: teacher trajectories from real tool executions in the environments.

An expert knows the answer (the reference solution, the gold patch, the exact answer) and reaches
it through the environment's real tools, as an agent would. A script is a generator: it yields
the next assistant ``Message`` and is sent back the messages the environment answered with, so
each turn is decided from the real observations — the sandbox's failure report of a mistaken
first attempt, the search hits that locate the function an issue names. Every turn's text is
``chat.render_assistant_body(message)`` (content, then each ``ToolCall.to_json_text()`` inside
``<tool_call>`` tags), exactly what a model would emit and what ``env.step`` parses::

    with SandboxPool(num_workers=2) as pool:
      env = envs.make(EXPERTS["code_fix"].env, None, pool=pool)
      episode = run_expert(env, "code_fix", task)      # task: data.procedural.Task
      episode.conversation       # chat.Conversation (system, user, assistant/tool turns, label)
      episode.grade.passed, episode.statuses           # True, ("ok", "ok", "submitted")

Experts (``EXPERTS``, by name; each names its environment and its taxonomy label):

* ``code_direct`` (code, feature implementation): writes the reference solution, run_tests,
  submit.
* ``code_fix`` (code, bug fixing): a realistic first attempt — a mutant of the reference
  (``data.procedural.bugs``) that fails a visible test — run_tests, reads the failing test, the
  expected value and the error from the real report, names the faulty line, runs the fix
  (the reference), submits. The mistaken turn has ``train=False``: the model is not trained to
  write the bug, only to read the report and fix it.
* ``repo_fix`` (repo, bug fixing): search for the function the issue names, read_file the module
  the search found, str_replace the gold patch's change (old/new strings derived from its hunks,
  widened by context lines until old_str is unique), run_tests, submit.
* ``repo_reproduce`` (repo, test-case generation): locate and read as above, create_file a test
  reproducing the issue's call and expected value, run_tests on it (a real failure), apply the
  fix, run_tests again (all pass), submit.
* ``repo_explore`` (repo, code understanding): list_files, read the README and the module's test
  file, search the function's uses, read the function's lines, then fix, run_tests, submit.
* ``math_answer`` (math): the exact answer, as ``submit(answer)`` when the environment offers the
  tool, else as ``\\boxed{...}``.

Whether an episode succeeded is the environment's verdict (``Episode.grade``), never assumed:
``kat_jax.data.agentic`` keeps the passed ones. Expert scripts raise only on tasks they cannot
script (wrong type, no failing mutant); what the environment answers is data.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import threading
from typing import Any, Callable, Generator, Optional, Sequence

import numpy as np

from kat_jax.data import chat
from kat_jax.data import toolcall
from kat_jax.data.chat import Message
from kat_jax.data.procedural import bugs
from kat_jax.data.procedural.math_tasks import MathProblem
from kat_jax.data.procedural.repos import RepoTask
from kat_jax.data.procedural.task import Task
from kat_jax.data.taxonomy import TaskLabel
from kat_jax.data.toolcall import ToolCall
from kat_jax.rl.envs import base

# A script: given the task and the opening observation, yields assistant messages; each ``yield``
# returns the messages the environment answered the turn with.
Script = Callable[[Any, base.Observation], Generator[Message, tuple, None]]

SCENARIO = "application_development"    # procedural functions and repositories (data.procedural)
MATH_SCENARIO = "specialized_programming_domains"


@dataclasses.dataclass(frozen=True)
class Expert:
  name: str
  env: str                 # the environment it acts in (envs.make name)
  label: TaskLabel         # the taxonomy cell of its trajectories
  script: Script


@dataclasses.dataclass(frozen=True)
class Episode:
  """One expert episode: the conversation as trained on (opening messages, then each assistant
  turn and the environment's answer; the answer to the final, episode-ending turn is left out, as
  the agent loop leaves it out), the grade of the submission (None: never submitted), each
  step's status, and whether the environment ended the episode."""
  conversation: chat.Conversation
  grade: Optional[base.Grade]
  statuses: tuple[str, ...]
  done: bool
  expert: str

  @property
  def passed(self) -> bool:
    return self.done and self.grade is not None and self.grade.passed


def _assistant(content: str, *calls: ToolCall, train: Optional[bool] = None) -> Message:
  return Message("assistant", content, tuple(calls), train=train)


def _call(name: str, **arguments) -> ToolCall:
  return ToolCall(name, dict(arguments))


def _text(messages: Sequence[Message]) -> str:
  return "\n".join(m.content for m in messages)


def _seed(*parts: str) -> int:
  return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big")


def _require(task: Any, kind: type, expert: str) -> None:
  if not isinstance(task, kind):
    raise TypeError(f"expert {expert!r} scripts {kind.__name__} tasks, got "
                    f"{type(task).__name__}")


# -- code ---------------------------------------------------------------------------------------

# CPython 3.11 builds AST objects with process-global state (concurrent ast.parse calls can fail
# with "AST constructor recursion depth mismatch"): experts on several threads mutate one at a time.
_AST_LOCK = threading.Lock()
_VISIBLE_LINE = re.compile(r"^  \S.* == .+$", re.MULTILINE)
_FAILED = re.compile(r"^FAILED (\w+): (.+)$", re.MULTILINE)
_EXPECTED = re.compile(r"^  expected: (.+)$", re.MULTILINE)
_ALL_PASSED = re.compile(r"All \d+ visible tests passed\.")


def _visible_count(opening: base.Observation, task: Task) -> int:
  """How many of the task's tests the user turn lists as visible (they come first)."""
  user = opening.messages[-1].content
  shown = user.split("Visible tests", 1)[1] if "Visible tests" in user else ""
  return min(len(_VISIBLE_LINE.findall(shown)), len(task.tests))


def first_attempt(task: Task, visible: int) -> bugs.BuggyVariant:
  """The mistaken first attempt of ``code_fix``: a mutant of the reference failing at least one
  of the first ``visible`` tests (any failing mutant when none does), chosen by the task id."""
  with _AST_LOCK:
    variants = bugs.buggy_variants(task, max_variants=None)
  if not variants:
    raise ValueError(f"task {task.task_id}: the reference has no failing mutant to start from")
  shown_failing = [v for v in variants if not all(v.report.passed[:max(visible, 1)])]
  pool = shown_failing or variants
  return pool[int(np.random.default_rng(_seed(task.task_id, "attempt")).integers(len(pool)))]


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
  """The lines of ``before`` that ``after`` replaces, and their replacements (stripped)."""
  a, b = before.splitlines(), after.splitlines()
  old, new = [], []
  for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b).get_opcodes():
    if tag != "equal":
      old += [line.strip() for line in a[i1:i2]]
      new += [line.strip() for line in b[j1:j2]]
  return old, new


def _failure_summary(report: str) -> str:
  """One sentence of a code run_tests report: the first failing call, its expected value and
  the error, as the report states them (or the report's first line)."""
  lines = report.splitlines()
  failed = _FAILED.search(report)
  if failed is None:
    return lines[0] if lines else "The run gave no report."
  after = report[failed.end():].splitlines()[1:4]
  expected = next((m.group(1) for m in map(_EXPECTED.match, after) if m), None)
  error = next((line.strip() for line in after
                if line.startswith("  ") and not line.startswith("  expected:")), "")
  text = f"{lines[0]} The first failure is `{failed.group(2)}`"
  if expected is not None:
    text += f", which should give `{expected}`"
  return text + (f": {error}." if error else ".")


def code_direct(task: Task, opening: base.Observation):
  """Reference solution → run_tests → submit."""
  _require(task, Task, "code_direct")
  report = yield _assistant(f"I'll implement `{task.entry_point}` and run the visible tests "
                            "first.", _call("run_tests", code=task.solution))
  text = _text(report)
  verdict = text.splitlines()[0] if text else "The tests ran."
  yield _assistant(f"{verdict} Submitting the function.", _call("submit", code=task.solution))


def code_fix(task: Task, opening: base.Observation):
  """A mutant first attempt (not trained) → run_tests → read the real report → fix → run_tests
  → submit; a first attempt that the report says passes every visible test is submitted as it
  is (and then graded as failed: the episode is not kept)."""
  _require(task, Task, "code_fix")
  attempt = first_attempt(task, _visible_count(opening, task))
  answer = yield _assistant(
      f"Here is a first version of `{task.entry_point}`; let me run the visible tests.",
      _call("run_tests", code=attempt.code), train=False)
  report = _text(answer)
  if _ALL_PASSED.match(report):
    yield _assistant(f"{report.splitlines()[0]} Submitting.", _call("submit", code=attempt.code))
    return
  old, new = changed_lines(attempt.code, task.solution)
  fix = (f"The faulty line is `{old[0]}`; it should be `{new[0]}`." if len(old) == len(new) == 1
         else "I'll correct the function accordingly.")
  answer = yield _assistant(f"{_failure_summary(report)} {fix} Running the tests on the "
                            "corrected function.", _call("run_tests", code=task.solution))
  report = _text(answer)
  verdict = report.splitlines()[0] if report else "The tests ran."
  yield _assistant(f"{verdict} Submitting the fix.", _call("submit", code=task.solution))


# -- repositories -------------------------------------------------------------------------------

_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@")
_HIT = re.compile(r"^([^\s:]+):(\d+): ", re.MULTILINE)
_ISSUE_CALL = re.compile(r"Calling `(.+?)` (?:returns|raises) `.*?`, but it should return "
                         r"`(.+?)`\.", re.DOTALL)


def patch_hunks(patch: str) -> list[tuple[str, list[tuple[str, str]]]]:
  """(path, [(tag, line)]) of every hunk of a unified diff; tag is ' ', '-' or '+'."""
  hunks: list[tuple[str, list[tuple[str, str]]]] = []
  path = None
  for line in patch.splitlines():
    if line.startswith("+++ "):
      path = line[4:].split("\t")[0].strip()
      path = path[2:] if path.startswith("b/") else path
    elif line.startswith("--- ") or line.startswith("diff --git "):
      continue
    elif _HUNK.match(line):
      hunks.append((path, []))
    elif hunks and line[:1] in (" ", "-", "+"):
      hunks[-1][1].append((line[:1], line[1:]))
    elif hunks and line == "":
      hunks[-1][1].append((" ", ""))
  return hunks


def gold_edits(task: RepoTask) -> list[tuple[str, str, str]]:
  """The gold patch as str_replace edits (path, old_str, new_str), in patch order: each hunk's
  changed lines, widened one context line at a time on both sides until old_str occurs exactly
  once in the file (so the edit applies where the patch does)."""
  edits = []
  for path, lines in patch_hunks(task.gold_patch):
    if path not in task.files:
      raise ValueError(f"{task.repo_id}: the gold patch edits {path!r}, not in the repository")
    text = task.files[path]
    changed = [i for i, (tag, _) in enumerate(lines) if tag != " "]
    lo, hi = changed[0], changed[-1]
    while True:
      window = lines[lo:hi + 1]
      old = "\n".join(s for tag, s in window if tag != "+")
      new = "\n".join(s for tag, s in window if tag != "-")
      if old and text.count(old) == 1:
        break
      if lo == 0 and hi == len(lines) - 1:
        raise ValueError(f"{task.repo_id}: hunk of {path} is not unique in the file even with "
                         "all its context")
      lo, hi = max(lo - 1, 0), min(hi + 1, len(lines) - 1)
    edits.append((path, old, new))
  return edits


def _located(search_report: str, task: RepoTask) -> tuple[str, int]:
  """(path, line) of the first search hit, as the real report gives it; the bug file (line 1)
  if the report has none."""
  hit = _HIT.search(search_report)
  return (hit.group(1), int(hit.group(2))) if hit else (task.bug_file, 1)


def _fix_turn(task: RepoTask, lead: str) -> Message:
  edits = gold_edits(task)
  old, new = changed_lines("\n".join(e[1] for e in edits), "\n".join(e[2] for e in edits))
  what = (f"`{old[0]}` should be `{new[0]}`" if len(old) == len(new) == 1 and old
          else "the function needs a correction")
  return _assistant(f"{lead} The docstring of `{task.entry_point}` says what it must do, and "
                    f"{what}. Fixing it.",
                    *(_call("str_replace", path=p, old_str=o, new_str=n) for p, o, n in edits))


def _run_and_submit(task: RepoTask):
  answer = yield _assistant("Running the repository's tests.", _call("run_tests"))
  report = _text(answer)
  verdict = report.splitlines()[0] if report else "The tests ran."
  yield _assistant(f"{verdict} The issue is resolved; submitting.", _call("submit"))


def repo_fix(task: RepoTask, opening: base.Observation):
  """search → read_file (the module found) → str_replace (gold change) → run_tests → submit."""
  _require(task, RepoTask, "repo_fix")
  answer = yield _assistant(
      f"The issue is about `{task.entry_point}`. Let me find where it is defined.",
      _call("search", pattern=rf"def {task.entry_point}\("))
  path, line = _located(_text(answer), task)
  yield _assistant(f"`{task.entry_point}` is defined in {path} (line {line}). Reading the "
                   "module.", _call("read_file", path=path))
  yield _fix_turn(task, "I see the function.")
  yield from _run_and_submit(task)


def _reproduction(task: RepoTask, path: str) -> tuple[str, str]:
  """(test path, source) of a test of the issue's call and expected value."""
  match = _ISSUE_CALL.search(task.issue)
  if match is None:
    raise ValueError(f"{task.repo_id}: the issue names no call and expected value to test")
  call, expected = match.groups()
  module = path[:-3].replace("/", ".")
  test_path = f"tests/test_issue_{task.entry_point}.py"
  source = (f"from {module} import {task.entry_point}\n\n\n"
            f"def test_issue_{task.entry_point}():\n    assert {call} == {expected}\n")
  return test_path, source


def repo_reproduce(task: RepoTask, opening: base.Observation):
  """search → read_file → create_file (a test of the issue) → run_tests on it (fails) →
  str_replace → run_tests (all) → submit."""
  _require(task, RepoTask, "repo_reproduce")
  answer = yield _assistant(
      f"First I'll locate `{task.entry_point}`, then reproduce the issue with a test.",
      _call("search", pattern=rf"def {task.entry_point}\("))
  path, line = _located(_text(answer), task)
  yield _assistant(f"It is defined in {path} (line {line}).", _call("read_file", path=path))
  test_path, source = _reproduction(task, path)
  yield _assistant("I'll add a test with the call from the issue and the value it should "
                   "return.", _call("create_file", path=test_path, content=source))
  answer = yield _assistant("Running the new test.", _call("run_tests", test_ids=[test_path]))
  report = _text(answer)
  outcome = report.splitlines()[0] if report else "The test ran."
  yield _fix_turn(task, f"{outcome} The test reproduces the issue.")
  yield from _run_and_submit(task)


def repo_explore(task: RepoTask, opening: base.Observation):
  """list_files → read README and the module's tests → search the uses → read the function's
  lines → str_replace → run_tests → submit."""
  _require(task, RepoTask, "repo_explore")
  answer = yield _assistant("Let me get an overview of the repository.", _call("list_files"))
  listing = _text(answer)
  readme = "README.md" if "README.md" in listing else task.bug_file
  yield _assistant("Reading the README for the project's layout.", _call("read_file", path=readme))
  answer = yield _assistant(f"Now every place that mentions `{task.entry_point}`.",
                            _call("search", pattern=rf"\b{task.entry_point}\b"))
  hits = _HIT.findall(_text(answer))
  tests = next((p for p, _ in hits if p.startswith("tests/")), None)
  path, line = next(((p, int(n)) for p, n in hits if not p.startswith("tests/")),
                    (task.bug_file, 1))
  if tests is not None:
    yield _assistant(f"The tests of `{task.entry_point}` are in {tests}.",
                     _call("read_file", path=tests))
  start = max(1, line - 1)
  yield _assistant(f"The definition is at {path}:{line}. Reading it.",
                   _call("read_file", path=path, start_line=start, end_line=line + 12))
  yield _fix_turn(task, "Now I understand how it is used and tested.")
  yield from _run_and_submit(task)


# -- math ---------------------------------------------------------------------------------------

def math_answer(problem: MathProblem, opening: base.Observation):
  """The exact answer: submit(answer) when offered, else ``\\boxed{answer}``."""
  _require(problem, MathProblem, "math_answer")
  if any(tool.name == "submit" for tool in opening.tools):
    yield _assistant(f"The answer is {problem.answer}.", _call("submit", answer=problem.answer))
  else:
    yield _assistant(f"The answer is \\boxed{{{problem.answer}}}.")


EXPERTS: dict[str, Expert] = {e.name: e for e in (
    Expert("code_direct", "code", TaskLabel("feature_implementation", SCENARIO), code_direct),
    Expert("code_fix", "code", TaskLabel("bug_fixing", SCENARIO), code_fix),
    Expert("repo_fix", "repo", TaskLabel("bug_fixing", SCENARIO), repo_fix),
    Expert("repo_reproduce", "repo", TaskLabel("test_case_generation", SCENARIO), repo_reproduce),
    Expert("repo_explore", "repo", TaskLabel("code_understanding", SCENARIO), repo_explore),
    Expert("math_answer", "math", TaskLabel("feature_implementation", MATH_SCENARIO),
           math_answer),
)}


def get_expert(name: str) -> Expert:
  if name not in EXPERTS:
    raise ValueError(f"unknown expert {name!r}: use one of {sorted(EXPERTS)}")
  return EXPERTS[name]


def task_id_of(task: Any) -> str:
  for field in ("task_id", "problem_id", "repo_id"):
    value = getattr(task, field, None)
    if isinstance(value, str) and value:
      return value
  raise TypeError(f"cannot tell the id of a task of type {type(task).__name__}")


def run_expert(env: base.Environment, expert: str, task: Any, *, max_turns: int = 16) -> Episode:
  """One episode of ``expert`` on ``task`` in ``env`` (see the module docstring). Stops when the
  environment says done, the script ends, or after ``max_turns`` turns."""
  spec = get_expert(expert)
  opening = env.reset(task)
  messages = list(opening.messages)
  statuses: list[str] = []
  grade, done = None, False
  script = spec.script(task, opening)
  answer: Optional[tuple] = None
  for _ in range(max_turns):
    try:
      message = script.send(answer) if answer is not None else next(script)
    except StopIteration:
      break
    text = chat.render_assistant_body(message)
    parsed = toolcall.parse_assistant_output(text, opening.tools or None)
    if isinstance(parsed, toolcall.ParseError) or parsed.tool_calls != message.tool_calls:
      raise AssertionError(f"expert {expert!r} wrote a turn that does not parse back: {parsed}")
    result = env.step(text)
    messages.append(message)
    statuses.append(result.status)
    if result.done:
      grade, done = result.info.get("grade"), True
      break
    messages += result.observation.messages
    answer = tuple(result.observation.messages)
  script.close()
  meta = {"task_id": task_id_of(task), "source": "expert", "expert": expert, "env": spec.env,
          "statuses": list(statuses),
          "grade": None if grade is None else {"passed": bool(grade.passed),
                                               "tests_passed": int(grade.tests_passed),
                                               "tests_total": int(grade.tests_total)}}
  conversation = chat.Conversation(tuple(messages), tools=opening.tools, label=spec.label,
                                   meta=meta)
  return Episode(conversation, grade, tuple(statuses), done, expert)
