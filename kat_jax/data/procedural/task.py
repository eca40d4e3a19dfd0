"""A procedural task as data (spec, reference solution, unit tests), and a runner for *trusted* code.

Tests are data — ``TestCase(args, expected)`` with JSON values — so a sandbox harness can run a
candidate, serialize its results and compare them outside the candidate's process; ``assert_source``
renders the same tests as assert statements. Results are compared as canonical JSON
(``json.dumps(sort_keys=True)``), so ``True`` differs from ``1`` and tuples equal lists.

``run_tests`` executes code in *this* process, bounded by a count of executed lines (deterministic,
unlike a wall-clock timeout). It exists to build data from code we generated ourselves (reference
solutions and their mutants); model-written code goes through ``kat_jax.sandbox``.
"""
from __future__ import annotations

import builtins
import copy
import dataclasses
import json
import sys
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class TestCase:
  __test__ = False  # not a pytest test class
  args: tuple
  expected: Any

  def call_source(self, entry_point: str) -> str:
    return f"{entry_point}({', '.join(repr(a) for a in self.args)})"


def short_repr(value: Any, limit: int = 200) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def canonical(value: Any) -> Optional[str]:
  """Canonical JSON text of a result, or None if it is not JSON-serializable."""
  try:
    return json.dumps(value, sort_keys=True, allow_nan=False)
  except (TypeError, ValueError):
    return None


@dataclasses.dataclass(frozen=True)
class Task:
  """One function-writing task.

  ``params`` are the template's semantic parameters (constants, letters): held-out tasks share no
  (template, params) pair with training tasks. ``solution`` is the reference source (canonical
  ``ast.unparse`` formatting, trailing newline).
  """
  task_id: str
  template: str
  family: str
  level: int
  params: tuple
  entry_point: str
  arg_names: tuple
  spec: str
  solution: str
  tests: tuple

  def assert_source(self) -> str:
    """The tests as assert statements (one per line)."""
    return "".join(f"assert {t.call_source(self.entry_point)} == {t.expected!r}\n" for t in self.tests)

  def program(self, code: str) -> str:
    """``code`` followed by the assert statements: exits non-zero iff a test fails."""
    return code.rstrip("\n") + "\n\n\n" + self.assert_source()

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["params"] = list(self.params)
    d["arg_names"] = list(self.arg_names)
    d["tests"] = [{"args": list(t.args), "expected": t.expected} for t in self.tests]
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "Task":
    fields = dict(d)
    fields["params"] = tuple(d["params"])
    fields["arg_names"] = tuple(d["arg_names"])
    fields["tests"] = tuple(TestCase(tuple(t["args"]), t["expected"]) for t in d["tests"])
    return cls(**fields)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), ensure_ascii=False)

  @classmethod
  def from_json(cls, text: str) -> "Task":
    return cls.from_dict(json.loads(text))


@dataclasses.dataclass(frozen=True)
class TestReport:
  """``passed[i]`` for each test; ``failures`` the messages of failing tests, in order; ``error``
  a problem before any test could run (syntax error, missing function)."""
  __test__ = False  # not a pytest test class
  passed: tuple
  failures: tuple = ()
  error: Optional[str] = None

  @property
  def all_passed(self) -> bool:
    return self.error is None and all(self.passed)

  @property
  def pass_rate(self) -> float:
    return sum(self.passed) / len(self.passed) if self.passed else 0.0

  def feedback(self, max_failures: int = 3) -> str:
    """Test-runner style text for self-debugging prompts."""
    if self.error is not None:
      return self.error
    failed = len(self.passed) - sum(self.passed)
    lines = [f"{failed} of {len(self.passed)} tests failed."]
    lines += list(self.failures[:max_failures])
    if failed > max_failures:
      lines.append(f"... and {failed - max_failures} more")
    return "\n".join(lines)


class StepLimitExceeded(Exception):
  pass


def _call_with_step_limit(fn, args, max_steps: int):
  """Calls fn(*args), raising StepLimitExceeded after ``max_steps`` traced lines."""
  steps = 0

  def tracer(frame, event, arg):
    nonlocal steps
    if event == "line":
      steps += 1
      if steps > max_steps:
        raise StepLimitExceeded(f"more than {max_steps} executed lines")
    return tracer

  previous = sys.gettrace()
  sys.settrace(tracer)
  try:
    return fn(*args)
  finally:
    sys.settrace(previous)


def evaluate_call(code: str, entry_point: str, args: tuple, *, max_steps: int = 20_000
                  ) -> tuple[bool, Any]:
  """Runs trusted ``code`` and calls ``entry_point(*args)``: (True, result) or (False, "Type: msg")."""
  namespace: dict = {"__builtins__": builtins, "__name__": "solution"}
  try:
    exec(compile(code, "<solution>", "exec"), namespace)
    return True, _call_with_step_limit(namespace[entry_point], copy.deepcopy(args), max_steps)
  except Exception as e:  # noqa: BLE001
    return False, f"{type(e).__name__}: {e}"


def run_tests(code: str, task: Task, *, max_steps: int = 20_000) -> TestReport:
  """Runs trusted ``code`` against the task's tests in this process (see the module docstring)."""
  n = len(task.tests)
  try:
    compiled = compile(code, "<solution>", "exec")
  except SyntaxError as e:
    return TestReport((False,) * n, error=f"SyntaxError: {e.msg} (line {e.lineno})")
  namespace: dict = {"__builtins__": builtins, "__name__": "solution"}
  try:
    _call_with_step_limit(lambda: exec(compiled, namespace), (), max_steps)
  except Exception as e:  # noqa: BLE001 - any error of the module body is a failed run
    return TestReport((False,) * n, error=f"{type(e).__name__}: {e}")
  fn = namespace.get(task.entry_point)
  if not callable(fn):
    return TestReport((False,) * n, error=f"NameError: function {task.entry_point!r} is not defined")
  passed, failures = [], []
  for test in task.tests:
    call = test.call_source(task.entry_point)
    try:
      result = _call_with_step_limit(fn, copy.deepcopy(test.args), max_steps)
    except StepLimitExceeded as e:
      passed.append(False)
      failures.append(f"{call} did not finish ({e})")
      continue
    except Exception as e:  # noqa: BLE001
      passed.append(False)
      failures.append(f"{call} raised {type(e).__name__}: {e}")
      continue
    ok = canonical(result) is not None and canonical(result) == canonical(test.expected)
    passed.append(ok)
    if not ok:
      failures.append(f"assert {call} == {test.expected!r}\nAssertionError: got {short_repr(result)}")
  return TestReport(tuple(passed), tuple(failures))
