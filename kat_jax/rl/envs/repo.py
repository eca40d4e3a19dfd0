"""The ``repo`` environment: resolve an issue in a small repository with file tools (SWE-bench).

Tasks are ``data.procedural.repos.RepoTask`` s. The episode's repository is a ``Workspace`` (in
memory, path -> text, the task's files at reset) that persists across turns; the tools are those of
SWE-agent / OpenHands::

    env = envs.make("repo", None, pool=pool)        # config: default_repo_env_config() overrides
    obs = env.reset(task)     # system + user (the issue, the file list); obs.tools: the 7 below
    res = env.step('<tool_call>\\n{"name": "read_file", "arguments": {"path": "pkg/mod.py"}}'
                   '\\n</tool_call>')
    ...
    res = env.step('<tool_call>\\n{"name": "submit", "arguments": {}}\\n</tool_call>')
    res.done, res.status, res.info["grade"]       # True, "submitted", Grade(passed=resolved, ...)

Tools: ``list_files(path?)``, ``read_file(path, start_line?, end_line?)`` (numbered lines),
``search(pattern, path?)`` (a regex, line by line, capped; matched in the sandbox),
``str_replace(path, old_str, new_str)`` (old_str must occur exactly once), ``create_file(path,
content)``, ``run_tests(test_ids?)`` and ``submit()``.

run_tests runs the *visible* tests — every ``test_*`` function / ``Test*.test_*`` method of the
workspace's test files: the repository's existing tests (its PASS_TO_PASS tests) plus whatever
tests the agent wrote — in the sandbox's directory mode, inline (the tests run beside the code:
feedback only), and reports the failures with their tracebacks and assertion values.

Grading (``grade_files``), as SWE-bench does it, on a fresh copy of the final files in the
sandbox's proxy directory mode: the test files are reset to the original repository's (every test
file of the task plus those the test patch touches), the task's ``test_patch`` is applied to them,
and every FAIL_TO_PASS and PASS_TO_PASS test runs in the judge against the model's code (so
editing or deleting a test, or printing "PASSED", does not help; a missing test is a failed one).
``Grade.passed`` = resolved (all of them pass), ``compiled`` = every non-test module imports,
``tests_passed/tests_total`` over FAIL_TO_PASS + PASS_TO_PASS, ``prediction`` = the diff from
the original repository, ``reference`` = the gold patch, ``details`` = per-test outcomes split
FAIL_TO_PASS / PASS_TO_PASS, errors, sandbox status and module import errors.

Statuses (``base``): an unparsable turn → PARSE_ERROR, a call to another tool → UNKNOWN_TOOL
(nothing of that turn runs), a missing, unknown or mistyped argument or a refused call (bad path,
no match, ...) → TOOL_ERROR with the reason, a sandbox run past its limit → TOOL_TIMEOUT, a turn
without calls → NO_ACTION with a nudge. Calls of one turn are answered in order: file edits apply
in order, each sandbox run sees the files as they were at its place in the turn, and the runs go
to the pool concurrently; a valid ``submit`` ends the turn. Long results are cut in the middle
with a visible marker (``config.max_observation_chars``).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections

from kat_jax.data import chat
from kat_jax.data import toolcall
from kat_jax.data.chat import Message
from kat_jax.data.procedural.repos import RepoTask, apply_patch, make_diff
from kat_jax.data.toolcall import ToolSpec
from kat_jax.errors import ConfigError
from kat_jax.rl.envs import base
from kat_jax.rl.envs.tools import check_arguments, resolve_config, truncate
from kat_jax.rl.envs.workspace import (ToolError, Workspace, WorkspaceLimits, check_test_id,
                                       collect_tests, is_test_file, search_job, search_report,
                                       visible_tests)
from kat_jax.sandbox import DirectoryJob, Limits, Result, SandboxPool
from kat_jax.sandbox import testrun

CONFIG_PATH = "config.rl.env"
TIMEOUT_KILLS = ("wall_time", "cpu_time")


def default_repo_env_config() -> ml_collections.ConfigDict:
  """Every knob of the ``repo`` environment (config.rl.env)."""
  c = ml_collections.ConfigDict()
  c.max_calls_per_turn = 8              # tool calls past this many in one turn are refused
  c.max_observation_chars = 6000        # longer tool results are cut in the middle, with a marker
  c.max_failures_shown = 5              # failing tests detailed in one run_tests report
  c.max_output_chars = 1500             # program stdout/stderr tail shown in a run_tests report
  c.max_tests_per_run = 200             # test ids one run_tests call may run
  c.max_files = 200                     # files the workspace may hold
  c.max_file_chars = 200_000            # characters of one file
  c.max_total_chars = 2_000_000         # characters of the whole workspace
  c.max_path_chars = 256                # characters of a path argument
  c.max_read_lines = 400                # lines one read_file call shows
  c.max_list_entries = 200              # paths one list_files call shows
  c.max_search_results = 50             # matching lines one search call shows
  c.max_pattern_chars = 500             # characters of a search pattern
  c.run_tests_timeout_s = 20.0          # wall-clock limit of one run_tests sandbox run
  c.search_timeout_s = 5.0              # wall-clock limit of one search (regex backtracking)
  c.grade_timeout_s = 30.0              # wall-clock limit of the grading run
  c.memory_mb = 512                     # address-space limit of each sandboxed process
  c.show_file_list = True               # list the repository's files in the user turn
  c.system_prompt = ""                  # '' = the built-in SYSTEM_PROMPT
  return c


def _validate(c: ml_collections.ConfigDict) -> None:
  for field, low in (("max_calls_per_turn", 1), ("max_observation_chars", 200),
                     ("max_failures_shown", 1), ("max_output_chars", 0),
                     ("max_tests_per_run", 1), ("max_files", 1), ("max_file_chars", 1),
                     ("max_total_chars", 1), ("max_path_chars", 16), ("max_read_lines", 1),
                     ("max_list_entries", 1), ("max_search_results", 1),
                     ("max_pattern_chars", 1), ("memory_mb", 64)):
    if c[field] < low:
      raise ConfigError(f"{CONFIG_PATH}.{field}={c[field]} must be >= {low}")
  for field in ("run_tests_timeout_s", "search_timeout_s", "grade_timeout_s"):
    if not c[field] > 0:
      raise ConfigError(f"{CONFIG_PATH}.{field}={c[field]} must be > 0 seconds")


def workspace_limits(c: ml_collections.ConfigDict) -> WorkspaceLimits:
  return WorkspaceLimits(
      max_files=c.max_files, max_file_chars=c.max_file_chars, max_total_chars=c.max_total_chars,
      max_path_chars=c.max_path_chars, max_read_lines=c.max_read_lines,
      max_list_entries=c.max_list_entries, max_search_results=c.max_search_results,
      max_pattern_chars=c.max_pattern_chars)


def sandbox_limits(base_limits: Limits, timeout_s: float, memory_mb: int,
                   workspace: WorkspaceLimits) -> Limits:
  """The pool's limits with this run's wall / CPU time, memory, and a tmpfs the files fit in."""
  disk = max(base_limits.disk_bytes, 4 * workspace.max_total_chars + (8 << 20))
  return dataclasses.replace(
      base_limits, wall_time_s=float(timeout_s), cpu_time_s=max(1, math.ceil(timeout_s)),
      memory_bytes=memory_mb << 20, disk_bytes=disk,
      disk_inodes=max(base_limits.disk_inodes, 4 * workspace.max_files + 64))


# -------------------------------------------------------------------------------------- tools


def _tool(name: str, description: str, properties: Optional[dict] = None,
          required: Sequence[str] = ()) -> ToolSpec:
  return ToolSpec(name, description, {"type": "object", "properties": properties or {},
                                      "required": list(required)})


_PATH = {"type": "string", "description": "a path relative to the repository root, e.g. "
                                          "'pkg/mod.py'"}
LIST_FILES = _tool("list_files", "Lists the repository's files (with their line counts) under a "
                   "directory, or the whole repository.",
                   {"path": {"type": "string", "description": "a directory or file ('' or "
                                                              "omitted: the whole repository)"}})
READ_FILE = _tool("read_file", "Shows a file with numbered lines, whole or from start_line to "
                  "end_line (inclusive, numbered from 1).",
                  {"path": _PATH, "start_line": {"type": "integer"},
                   "end_line": {"type": "integer"}}, ["path"])
SEARCH = _tool("search", "Searches the files (of a directory or one file, or the whole "
               "repository) for lines matching a Python regular expression; shows path:line: "
               "text for each match.",
               {"pattern": {"type": "string", "description": "a Python regular expression"},
                "path": {"type": "string", "description": "a directory or file to search in "
                                                          "(omitted: the whole repository)"}},
               ["pattern"])
STR_REPLACE = _tool("str_replace", "Replaces old_str by new_str in a file. old_str must occur "
                    "in the file exactly once, matching it exactly (whitespace and indentation "
                    "included); include enough surrounding lines to make it unique.",
                    {"path": _PATH, "old_str": {"type": "string"},
                     "new_str": {"type": "string"}}, ["path", "old_str", "new_str"])
CREATE_FILE = _tool("create_file", "Writes a file with the given content (creating it, or "
                    "replacing an existing file's whole content).",
                    {"path": _PATH, "content": {"type": "string"}}, ["path", "content"])
RUN_TESTS = _tool("run_tests", "Runs the repository's tests (every test_* function and Test* "
                  "class method in its test_*.py files, including test files you wrote) and "
                  "reports the failures. test_ids narrows the run to some tests "
                  "('tests/test_x.py::test_name') or test files ('tests/test_x.py').",
                  {"test_ids": {"type": "array", "items": {"type": "string"}}})
SUBMIT = _tool("submit", "Submits the repository as it is now. It is graded by hidden tests "
               "(tests that reproduce the issue, and the repository's existing tests); the "
               "episode ends.")
TOOLS = (LIST_FILES, READ_FILE, SEARCH, STR_REPLACE, CREATE_FILE, RUN_TESTS, SUBMIT)

SYSTEM_PROMPT = (
    "You are an expert software engineer working in a Python repository. Resolve the issue the "
    "user reports by editing the repository's files with the tools. Read the relevant code "
    "first (list_files, read_file, search), make focused edits (str_replace to change a file, "
    "create_file for a new file), and check them with run_tests, which runs the repository's "
    "tests and any test files you add. When the issue is resolved, call submit(): it ends the "
    "episode, and your changes are graded by hidden tests that reproduce the issue together "
    "with the repository's existing tests (changes to test files are not used for grading).")
NUDGE = ("Your reply had no tool call. Use the tools (inside <tool_call></tool_call> tags) to "
         "inspect and edit the repository, and call submit() when the issue is resolved.")


# ------------------------------------------------------------------------------------ grading


_PATCH_PATHS = re.compile(r"^(?:diff --git a/|--- a/|\+\+\+ b/)(\S+)", re.MULTILINE)


def task_test_paths(task: RepoTask) -> tuple[str, ...]:
  """The test files of the task: the repository's test files and those the test patch touches."""
  touched = set(_PATCH_PATHS.findall(task.test_patch))
  return tuple(sorted({p for p in task.files if testrun.is_test_path(p)} | touched))


def trusted_test_files(task: RepoTask) -> dict[str, str]:
  """The task's test files as graded: the original repository's, with the test patch applied."""
  patched = apply_patch(task.files, task.test_patch)
  return {path: patched[path] for path in task_test_paths(task) if path in patched}


def grading_job(task: RepoTask, files: Mapping[str, str], limits: Optional[Limits] = None,
                job_id: str = "") -> DirectoryJob:
  """The proxy-mode sandbox job that grades ``files`` (the model's final repository)."""
  trusted = trusted_test_files(task)
  program = {p: t for p, t in files.items() if p not in trusted}
  return DirectoryJob(files=program, test_files=trusted,
                      tests=tuple(task.fail_to_pass) + tuple(task.pass_to_pass), mode="proxy",
                      job_id=job_id or f"{task.repo_id}#grade", limits=limits)


def grade_of(task: RepoTask, files: Mapping[str, str], job: DirectoryJob,
             result: Result) -> base.Grade:
  """The Grade of a finished ``grading_job`` (see the module docstring)."""
  outcomes = {t.name: t for t in result.tests}
  passed = {test: test in outcomes and outcomes[test].passed for test in job.tests}
  f2p = {test: passed[test] for test in task.fail_to_pass}
  p2p = {test: passed[test] for test in task.pass_to_pass}
  errors = {test: f"{outcomes[test].error_type}: {outcomes[test].error}"
            for test in job.tests if test in outcomes and not outcomes[test].passed}
  compiled = bool(job.imports) and all(
      name in result.modules and result.modules[name] is None for name in job.imports)
  resolved = bool(job.tests) and all(passed.values())
  return base.Grade(
      passed=resolved, compiled=compiled, tests_passed=sum(passed.values()),
      tests_total=len(passed), prediction=make_diff(task.files, files),
      reference=task.gold_patch,
      details={"repo_id": task.repo_id, "fail_to_pass": f2p, "pass_to_pass": p2p,
               "errors": errors, "sandbox_status": result.status, "killed_by": result.killed_by,
               "module_errors": {n: e for n, e in result.modules.items() if e is not None},
               "harness_error": result.harness_error})


def grade_files(task: RepoTask, files: Mapping[str, str], pool: SandboxPool,
                limits: Optional[Limits] = None) -> base.Grade:
  """Grades a final repository ``files`` for ``task`` in the sandbox (SWE-bench resolution)."""
  job = grading_job(task, files, limits)
  return grade_of(task, files, job, pool.run(job))


# ---------------------------------------------------------------------------- run_tests reports


def timed_out(result: Result) -> bool:
  return result.killed_by in TIMEOUT_KILLS


def tests_report(result: Result, *, max_failures: int, max_output_chars: int,
                 time_limit_s: float) -> tuple[str, str]:
  """(status, text) of a run_tests call: counts, the failing tests with their errors, modules
  that failed to import, why the run stopped early, and the tail of the program's output."""
  if result.status == "harness_error":
    return base.TOOL_ERROR, (f"run_tests failed in the sandbox (not a fault of your code): "
                             f"{result.harness_error}")
  status = base.TOOL_TIMEOUT if timed_out(result) else base.OK
  total, passed = len(result.tests), result.num_passed
  lines = []
  if result.status == "load_error":
    lines.append(f"The repository could not be written to the sandbox: {result.load_error_type}: "
                 f"{result.load_error}")
  elif timed_out(result):
    lines.append(f"The run was stopped at its {time_limit_s:g} s time limit ({result.killed_by}); "
                 "tests that had not finished count as failed.")
  elif result.status == "output_limit":
    lines.append("The run was stopped: the tests wrote more output than the sandbox allows.")
  elif result.status == "crashed":
    lines.append(f"The test process died ({result.killed_by}); tests that had not finished "
                 "count as failed.")
  broken = {name: error for name, error in result.modules.items() if error is not None}
  if broken:
    lines.append("Modules that failed to import:")
    lines += [f"  {name}: {error}" for name, error in sorted(broken.items())]
  failed = [t for t in result.tests if not t.passed]
  lines.append(f"Ran {total} test{'s' if total != 1 else ''}: {passed} passed, {len(failed)} "
               "failed.")
  for outcome in failed[:max_failures]:
    lines.append(f"FAILED {outcome.name}")
    detail = (outcome.error or "").rstrip()
    if outcome.error_type and outcome.error_type not in detail:   # no traceback to name it
      detail = f"{outcome.error_type}: {detail}" if detail else outcome.error_type
    lines += [f"  {line}" for line in detail.splitlines()]
  if len(failed) > max_failures:
    lines.append(f"... and {len(failed) - max_failures} more failing tests: "
                 + ", ".join(t.name for t in failed[max_failures:max_failures + 20]))
  for name, text, cut in (("stdout", result.stdout, result.stdout_truncated),
                          ("stderr", result.stderr, result.stderr_truncated)):
    if text.strip() and max_output_chars:
      tail = text.rstrip()[-max_output_chars:]
      more = len(text.rstrip()) > len(tail) or cut
      lines.append(f"--- {name}{' (last part)' if more else ''} ---\n{tail}")
  return status, "\n".join(lines)


# ---------------------------------------------------------------------------- the environment


@dataclasses.dataclass
class _Call:
  """One tool call of a turn: answered at once (edits, reads) or waiting for a sandbox run."""
  call: toolcall.ToolCall
  status: str = base.OK
  text: str = ""
  future: Any = None
  finish: Optional[Callable[[Result], tuple[str, str]]] = None
  submit_job: Optional[DirectoryJob] = None
  submit_files: Optional[dict] = None


class RepoEnv(base.Environment):
  """One repository episode at a time over a shared ``SandboxPool`` (see the module docstring)."""

  tools = TOOLS

  def __init__(self, config: Any = None, *, pool: Optional[SandboxPool] = None):
    self.config = resolve_config(config, default_repo_env_config())
    _validate(self.config)
    if pool is None:
      raise ValueError("the repo environment needs a sandbox: envs.make('repo', config, "
                       "pool=SandboxPool(...))")
    self.pool = pool
    self.workspace_limits = workspace_limits(self.config)
    c = self.config
    self.run_limits = sandbox_limits(pool.limits, c.run_tests_timeout_s, c.memory_mb,
                                     self.workspace_limits)
    self.search_limits = sandbox_limits(pool.limits, c.search_timeout_s, c.memory_mb,
                                        self.workspace_limits)
    self.grade_limits = sandbox_limits(pool.limits, c.grade_timeout_s, c.memory_mb,
                                       self.workspace_limits)
    self._tools_by_name = {t.name: t for t in self.tools}
    self._handlers = {LIST_FILES.name: self._list_files, READ_FILE.name: self._read_file,
                      SEARCH.name: self._search, STR_REPLACE.name: self._str_replace,
                      CREATE_FILE.name: self._create_file, RUN_TESTS.name: self._run_tests,
                      SUBMIT.name: self._submit}
    self.task: Optional[RepoTask] = None
    self.workspace: Optional[Workspace] = None
    self.done = True
    self.turns = 0
    self.runs = 0

  # -- episode ----------------------------------------------------------------------------

  def reset(self, task: Any) -> base.Observation:
    if isinstance(task, Mapping):
      task = RepoTask.from_dict(dict(task))
    if not isinstance(task, RepoTask):
      raise TypeError(f"the repo environment runs RepoTask tasks (or their to_dict()), got "
                      f"{type(task).__name__}")
    self.task = task
    self.workspace = Workspace(task.files, self.workspace_limits)
    self.done = False
    self.turns = 0
    self.runs = 0
    user = f"Repository `{task.repo_id}`. Issue:\n\n{task.issue.rstrip()}"
    if self.config.show_file_list:
      user += "\n\n" + self.workspace.list_files()
    system = self.config.system_prompt or SYSTEM_PROMPT
    return base.Observation((Message("system", system), Message("user", user)), self.tools)

  def step(self, action: str) -> base.StepResult:
    if self.task is None or self.done:
      raise RuntimeError("RepoEnv.step() without an open episode: call reset(task) first (and "
                         "again after a step returned done=True)")
    self.turns += 1
    parsed = toolcall.parse_assistant_output(action, self.tools)
    if isinstance(parsed, toolcall.ParseError):
      status = base.UNKNOWN_TOOL if parsed.kind == "unknown_tool" else base.PARSE_ERROR
      return base.StepResult(base.Observation((chat.parse_error_observation(parsed),)), False,
                             status, info={"parse_error": parsed.kind})
    if not parsed.tool_calls:
      return base.StepResult(base.Observation((Message("user", NUDGE),)), False, base.NO_ACTION)
    return self._run_calls(parsed.tool_calls)

  def grade(self) -> base.Grade:
    """The Grade of the workspace as it is now (e.g. for an episode that ran out of turns)."""
    if self.task is None:
      raise RuntimeError("RepoEnv.grade() without a task: call reset(task) first")
    files = dict(self.workspace.files)
    job = grading_job(self.task, files, self.grade_limits)
    return grade_of(self.task, files, job, self.pool.run(job))

  def close(self) -> None:
    self.task = None
    self.workspace = None
    self.done = True

  # -- one turn ---------------------------------------------------------------------------

  def _run_calls(self, calls: Sequence[toolcall.ToolCall]) -> base.StepResult:
    planned: list[_Call] = []
    for index, call in enumerate(calls):
      if index >= self.config.max_calls_per_turn:
        planned.append(_Call(call, base.TOOL_ERROR, f"not run: at most "
                             f"{self.config.max_calls_per_turn} tool calls are run per turn"))
        continue
      planned.append(self._plan(call))
      if planned[-1].submit_job is not None:
        break   # a valid submit ends the episode: later calls are not run
    grade = None
    messages = []
    for p in planned:
      if p.future is not None:
        result = p.future.result()
        if p.submit_job is not None:
          grade = grade_of(self.task, p.submit_files, p.submit_job, result)
          p.status, p.text = base.SUBMITTED, _submission_text(grade)
        else:
          p.status, p.text = p.finish(result)
      is_error = p.status not in (base.OK, base.SUBMITTED)
      messages.append(chat.tool_result(truncate(p.text, self.config.max_observation_chars),
                                       name=p.call.name, is_error=is_error))
    statuses = [p.status for p in planned]
    info: dict = {"calls": tuple(p.call.name for p in planned), "call_statuses": tuple(statuses)}
    if grade is not None:
      self.done = True
      info["grade"] = grade
      return base.StepResult(base.Observation(tuple(messages)), True, base.SUBMITTED, info=info)
    status = base.first_error(statuses) or base.OK
    return base.StepResult(base.Observation(tuple(messages)), False, status, info=info)

  def _plan(self, call: toolcall.ToolCall) -> _Call:
    spec = self._tools_by_name[call.name]
    error = check_arguments(spec, call.arguments)
    if error is not None:
      return _Call(call, base.TOOL_ERROR, error)
    try:
      return self._handlers[call.name](call)
    except ToolError as refused:
      return _Call(call, base.TOOL_ERROR, str(refused))

  def _job_id(self, kind: str) -> str:
    self.runs += 1
    return f"{self.task.repo_id}#{kind}{self.runs}"

  # -- tool handlers (each returns an answered or a pending _Call; ToolError = refused) ----

  def _list_files(self, call) -> _Call:
    return _Call(call, text=self.workspace.list_files(call.arguments.get("path")))

  def _read_file(self, call) -> _Call:
    args = call.arguments
    return _Call(call, text=self.workspace.read_file(args["path"], args.get("start_line"),
                                                     args.get("end_line")))

  def _str_replace(self, call) -> _Call:
    args = call.arguments
    return _Call(call, text=self.workspace.str_replace(args["path"], args["old_str"],
                                                       args["new_str"]))

  def _create_file(self, call) -> _Call:
    args = call.arguments
    return _Call(call, text=self.workspace.create_file(args["path"], args["content"]))

  def _search(self, call) -> _Call:
    plan = self.workspace.search_plan(call.arguments["pattern"], call.arguments.get("path"))
    job = search_job(plan, self.search_limits, self._job_id("search"))

    def finish(result: Result) -> tuple[str, str]:
      if result.status == "harness_error":
        return base.TOOL_ERROR, f"search failed in the sandbox: {result.harness_error}"
      slow, text = search_report(plan, result)
      return (base.TOOL_TIMEOUT if slow else base.OK), text

    return _Call(call, future=self.pool.submit(job), finish=finish)

  def _run_tests(self, call) -> _Call:
    files = dict(self.workspace.files)
    tests = self._selected_tests(call.arguments.get("test_ids"), files)
    if not tests:
      return _Call(call, text="No tests found: the repository has no test_* functions in "
                              "test_*.py files (create_file can add some).")
    job = DirectoryJob(files=files, tests=tuple(tests), mode="inline",
                       job_id=self._job_id("run_tests"), limits=self.run_limits)
    c = self.config

    def finish(result: Result) -> tuple[str, str]:
      return tests_report(result, max_failures=c.max_failures_shown,
                          max_output_chars=c.max_output_chars,
                          time_limit_s=c.run_tests_timeout_s)

    return _Call(call, future=self.pool.submit(job), finish=finish)

  def _selected_tests(self, test_ids, files: Mapping[str, str]) -> list[str]:
    if test_ids is None:
      tests = visible_tests(files)
    else:
      if not test_ids:
        raise ToolError("test_ids is empty: omit it to run every test, or name some tests")
      tests = []
      for test_id in test_ids:
        if not isinstance(test_id, str):
          raise ToolError(f"test_ids must hold strings, got {test_id!r}")
        path = self.workspace.path(test_id.partition("::")[0])
        if "::" not in test_id:
          if path not in files:
            raise ToolError(f"no test file {path!r} in the repository")
          if not is_test_file(path):
            raise ToolError(f"{path!r} is not a test file (test_*.py or *_test.py)")
          found = collect_tests(path, files[path])
          if not found:
            raise ToolError(f"{path!r} has no test_* functions or Test* classes")
          tests += found
        else:
          tests.append(check_test_id(path + "::" + test_id.partition("::")[2]))
      tests = list(dict.fromkeys(tests))
    if len(tests) > self.config.max_tests_per_run:
      raise ToolError(f"{len(tests)} tests selected; one run_tests call runs at most "
                      f"{self.config.max_tests_per_run}: pass test_ids to run fewer")
    return tests

  def _submit(self, call) -> _Call:
    files = dict(self.workspace.files)
    job = grading_job(self.task, files, self.grade_limits, self._job_id("grade"))
    return _Call(call, future=self.pool.submit(job), submit_job=job, submit_files=files)


def _submission_text(grade: base.Grade) -> str:
  verdict = "the issue is resolved" if grade.passed else "the issue is not resolved"
  return (f"Submitted: {grade.tests_passed} of {grade.tests_total} hidden tests passed; "
          f"{verdict}.")


@base.register("repo")
def make_repo_env(config: Any = None, *, pool: Optional[SandboxPool] = None,
                  **unused) -> RepoEnv:
  """The SWE-style repository environment (see the module docstring)."""
  return RepoEnv(config, pool=pool)
