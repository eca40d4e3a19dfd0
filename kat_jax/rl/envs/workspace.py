"""The in-memory repository of a SWE-style episode and its file tools (as in SWE-agent / OpenHands).

A ``Workspace`` is the repository as the agent has left it so far: path -> text, starting from the
task's files, kept across the episode's turns. Its tools check their arguments and return the text
the model sees, or raise ``ToolError`` whose message is that text::

    ws = Workspace(task.files, WorkspaceLimits())
    ws.list_files("pkg")                                    # paths with line counts
    ws.read_file("pkg/mod.py", start_line=1, end_line=20)   # numbered lines
    ws.str_replace("pkg/mod.py", "v > 1", "v > 2")          # old_str must occur exactly once
    ws.create_file("tests/test_issue.py", "...")
    plan = ws.search_plan(r"def \\w+", "pkg")               # the regex is compiled here ...
    result = pool.run(search_job(plan, limits))             # ... and matched in the sandbox
    timed_out, text = search_report(plan, result)
    ws.diff(task.files)                                     # unified diff (repos.make_diff)

Paths are repository-relative and checked by ``sandbox.directory.normalize_path`` (no ``..``, no
absolute paths, no NUL or control characters, bounded length); the workspace holds regular files
only, so there is no symlink to follow, and refuses a file that would also be a directory or the
reverse. Regular expressions come from the model, and Python's ``re`` can backtrack for
exponential time, so matching runs in the sandbox under its time limit (``search_job``); only the
pattern's compilation runs here.

Visible tests (``visible_tests``): the ``test_*`` functions and ``Test*`` classes' ``test_*``
methods of the workspace's test files (``test_*.py`` / ``*_test.py``), found by scanning lines,
never by importing or executing model-written code here.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
from typing import Mapping, Optional, Sequence

from kat_jax.data.procedural.repos import make_diff
from kat_jax.sandbox import Job, Limits, Result
from kat_jax.sandbox import directory
from kat_jax.sandbox import testrun


class ToolError(ValueError):
  """A tool call the workspace refuses; the message says why and how to call it instead."""


@dataclasses.dataclass(frozen=True)
class WorkspaceLimits:
  max_files: int = 200                # files the workspace may hold
  max_file_chars: int = 200_000       # characters of one file
  max_total_chars: int = 2_000_000    # characters of all files together
  max_path_chars: int = 256           # characters of one path
  max_read_lines: int = 400           # lines one read_file call shows
  max_list_entries: int = 200         # paths one list_files call shows
  max_search_results: int = 50        # matching lines one search call shows
  max_line_chars: int = 300           # characters of a matching line in a search report
  max_pattern_chars: int = 500        # characters of a search pattern

  def __post_init__(self):
    for field in dataclasses.fields(self):
      if getattr(self, field.name) < 1:
        raise ValueError(f"WorkspaceLimits.{field.name} must be >= 1, got "
                         f"{getattr(self, field.name)!r}")


@dataclasses.dataclass(frozen=True)
class SearchPlan:
  """A checked search: the pattern and the files to match it against."""
  pattern: str
  scope: str                          # what was searched ("the repository", "pkg/", "pkg/mod.py")
  files: Mapping[str, str]
  max_results: int
  max_line_chars: int


def _lines_word(n: int) -> str:
  return f"{n} line" if n == 1 else f"{n} lines"


def _line_count(text: str) -> int:
  return len(text.splitlines())


def _numbered(lines: Sequence[str], first: int) -> str:
  return "\n".join(f"{first + i:>6}\t{line}" for i, line in enumerate(lines))


class Workspace:
  """The repository being edited (see the module docstring); ``files`` is path -> text."""

  def __init__(self, files: Mapping[str, str], limits: Optional[WorkspaceLimits] = None):
    self.limits = limits or WorkspaceLimits()
    self.files: dict[str, str] = {}
    for path, text in files.items():
      normal = directory.normalize_path(path)
      directory.check_text(normal, text)
      self.files[normal] = text

  # -- paths ------------------------------------------------------------------------------

  def path(self, path) -> str:
    """The normalized form of a path argument, or ToolError saying what is wrong with it."""
    try:
      return directory.normalize_path(path, max_chars=self.limits.max_path_chars)
    except ValueError as error:
      raise ToolError(str(error)) from None

  def is_dir(self, path: str) -> bool:
    prefix = path + "/"
    return any(p.startswith(prefix) for p in self.files)

  def _existing_file(self, path) -> str:
    path = self.path(path)
    if path in self.files:
      return path
    if self.is_dir(path):
      raise ToolError(f"{path!r} is a directory, not a file: list_files({path!r}) shows its files")
    close = difflib.get_close_matches(path, list(self.files), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else (
        "; list_files() shows the repository's files")
    raise ToolError(f"no file {path!r} in the repository{hint}")

  def _scope(self, path) -> tuple[str, dict]:
    """(description, files) under a file or directory argument ('' or None: everything)."""
    if path is None or path in ("", ".", "./"):
      return "the repository", dict(self.files)
    path = self.path(path)
    if path in self.files:
      return path, {path: self.files[path]}
    prefix = path + "/"
    under = {p: t for p, t in self.files.items() if p.startswith(prefix)}
    if not under:
      tops = sorted({p.split("/")[0] + ("/" if "/" in p else "") for p in self.files})
      raise ToolError(f"no file or directory {path!r} in the repository; its top-level entries "
                      f"are {', '.join(tops)}")
    return prefix, under

  # -- tools ------------------------------------------------------------------------------

  def list_files(self, path: Optional[str] = None) -> str:
    scope, files = self._scope(path)
    paths = sorted(files)
    shown = paths[:self.limits.max_list_entries]
    lines = [f"{p}  ({_lines_word(_line_count(files[p]))})" for p in shown]
    if len(paths) > len(shown):
      lines.append(f"... and {len(paths) - len(shown)} more files (list a subdirectory)")
    if not paths:
      return "The repository has no files."
    return f"{len(paths)} files in {scope}:\n" + "\n".join(lines)

  def read_file(self, path, start_line: Optional[int] = None,
                end_line: Optional[int] = None) -> str:
    path = self._existing_file(path)
    lines = self.files[path].splitlines()
    total = len(lines)
    if total == 0:
      return f"{path} is empty."
    start = 1 if start_line is None else start_line
    if start < 1 or start > total:
      raise ToolError(f"start_line={start} is outside {path}, which has {_lines_word(total)} "
                      f"(lines are numbered from 1)")
    end = total if end_line is None else end_line
    if end < start:
      raise ToolError(f"end_line={end} is before start_line={start}")
    end = min(end, total)
    cut = end - start + 1 > self.limits.max_read_lines
    if cut:
      end = start + self.limits.max_read_lines - 1
    text = f"{path} (lines {start}-{end} of {total}):\n" + _numbered(lines[start - 1:end], start)
    if cut or (end_line is None and end < total):
      text += (f"\n[showing at most {self.limits.max_read_lines} lines: call read_file with "
               f"start_line={end + 1} for more]")
    return text

  def str_replace(self, path, old_str: str, new_str: str) -> str:
    path = self._existing_file(path)
    text = self.files[path]
    if old_str == "":
      raise ToolError("old_str is empty: give the exact text to replace (create_file writes a "
                      "whole file)")
    if old_str == new_str:
      raise ToolError("new_str is identical to old_str: nothing would change")
    self._check_content(path, new_str)
    starts = _occurrences(text, old_str)
    if not starts:
      raise ToolError(f"old_str does not occur in {path}: it must match the file exactly, "
                      f"whitespace and indentation included{_near_miss(text, old_str)} "
                      f"(read_file shows the current text)")
    if len(starts) > 1:
      at = ", ".join(str(text.count("\n", 0, s) + 1) for s in starts[:10])
      raise ToolError(f"old_str occurs {len(starts)} times in {path} (starting at lines {at}); "
                      "it must occur exactly once: include more of the surrounding lines")
    start = starts[0]
    updated = text[:start] + new_str + text[start + len(old_str):]
    self._check_size(path, updated)
    self.files[path] = updated
    first = text.count("\n", 0, start) + 1
    new_lines = updated.splitlines()
    shown_end = min(len(new_lines), first + new_str.count("\n") + 3)
    shown_start = max(1, first - 3)
    return (f"Edited {path}: replaced {_lines_word(max(1, _line_count(old_str)))} at line "
            f"{first} with {_lines_word(_line_count(new_str))}. The file now reads "
            f"(lines {shown_start}-{shown_end}):\n"
            + _numbered(new_lines[shown_start - 1:shown_end], shown_start))

  def create_file(self, path, content: str) -> str:
    path = self.path(path)
    self._check_content(path, content)
    if self.is_dir(path):
      raise ToolError(f"{path!r} is a directory of the repository: choose a file path")
    parent = path.rsplit("/", 1)[0] if "/" in path else None
    while parent is not None:
      if parent in self.files:
        raise ToolError(f"{parent!r} is a file, so {path!r} cannot be created under it")
      parent = parent.rsplit("/", 1)[0] if "/" in parent else None
    if path not in self.files and len(self.files) >= self.limits.max_files:
      raise ToolError(f"the workspace already holds {len(self.files)} files, the limit")
    self._check_size(path, content)
    previous = self.files.get(path)
    self.files[path] = content
    if previous is None:
      return f"Created {path} ({_lines_word(_line_count(content))})."
    return (f"Overwrote {path} ({_lines_word(_line_count(content))}; it had "
            f"{_lines_word(_line_count(previous))}).")

  def search_plan(self, pattern: str, path: Optional[str] = None) -> SearchPlan:
    """Checks a search call (the pattern compiles; the path exists); matching is ``search_job``."""
    if not pattern:
      raise ToolError("pattern is empty: give a regular expression, e.g. 'def filter_\\w+'")
    if len(pattern) > self.limits.max_pattern_chars:
      raise ToolError(f"pattern of {len(pattern)} characters is longer than the limit of "
                      f"{self.limits.max_pattern_chars}")
    try:
      re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as error:
      raise ToolError(f"invalid regular expression {pattern!r}: {error} (escape special "
                      "characters such as ( [ . * with a backslash to match them literally)"
                      ) from None
    scope, files = self._scope(path)
    return SearchPlan(pattern, scope, files, self.limits.max_search_results,
                      self.limits.max_line_chars)

  # -- whole workspace --------------------------------------------------------------------

  def diff(self, original: Mapping[str, str]) -> str:
    """The unified diff from ``original`` to the workspace (what a submission predicts)."""
    return make_diff(original, self.files)

  def _check_content(self, path: str, content: str) -> None:
    try:
      directory.check_text(path, content)
    except ValueError as error:
      raise ToolError(str(error)) from None

  def _check_size(self, path: str, content: str) -> None:
    if len(content) > self.limits.max_file_chars:
      raise ToolError(f"{path} would have {len(content)} characters; the limit is "
                      f"{self.limits.max_file_chars}")
    total = sum(len(t) for p, t in self.files.items() if p != path) + len(content)
    if total > self.limits.max_total_chars:
      raise ToolError(f"the repository would hold {total} characters; the limit is "
                      f"{self.limits.max_total_chars}")


def _occurrences(text: str, needle: str) -> list[int]:
  """Start offsets of every occurrence of ``needle``, overlapping ones included."""
  starts, at = [], text.find(needle)
  while at >= 0:
    starts.append(at)
    at = text.find(needle, at + 1)
  return starts


def _near_miss(text: str, old_str: str) -> str:
  """A hint when ``old_str`` matches once its lines are stripped of surrounding whitespace."""
  want = [line.strip() for line in old_str.strip("\n").splitlines()]
  lines = text.splitlines()
  if not want or not any(want):
    return ""
  for i in range(len(lines) - len(want) + 1):
    if [line.strip() for line in lines[i:i + len(want)]] == want:
      return f"; lines {i + 1}-{i + len(want)} match except for whitespace"
  return ""


# -------------------------------------------------------------------------- search in the sandbox

_GREP_MARKER = "@@KAT_GREP@@"
_GREP_PROGRAM = """\
import json, re
query = json.loads({query!r})
pattern = re.compile(query["pattern"])
hits, total = [], 0
for path in sorted(query["files"]):
  for number, line in enumerate(query["files"][path].splitlines(), 1):
    if pattern.search(line):
      total += 1
      if len(hits) < query["max_results"]:
        hits.append([path, number, line[:query["max_line_chars"]], len(line)])
print({marker!r} + json.dumps({{"hits": hits, "total": total}}))
"""


def search_job(plan: SearchPlan, limits: Limits, job_id: str = "search") -> Job:
  """The sandbox job that matches ``plan.pattern`` line by line (results on its stdout)."""
  query = json.dumps({"pattern": plan.pattern, "files": dict(plan.files),
                      "max_results": plan.max_results, "max_line_chars": plan.max_line_chars})
  capture = max(limits.capture_bytes, 8 * plan.max_results * (plan.max_line_chars + 200))
  return Job(program=_GREP_PROGRAM.format(query=query, marker=_GREP_MARKER), tests=(),
             job_id=job_id, limits=dataclasses.replace(limits, capture_bytes=capture,
                                                       output_bytes=max(limits.output_bytes,
                                                                        2 * capture)))


def search_report(plan: SearchPlan, result: Result) -> tuple[bool, str]:
  """(timed out, text) of a finished ``search_job``: matching lines as ``path:line: text``."""
  marker = [line for line in result.stdout.splitlines() if line.startswith(_GREP_MARKER)]
  if not marker:
    if result.killed_by in ("wall_time", "cpu_time"):
      return True, (f"search for {plan.pattern!r} ran past its time limit: the pattern backtracks "
                    "too much; simplify it (avoid nested quantifiers such as (a+)+)")
    return False, (f"search for {plan.pattern!r} failed in the sandbox ({result.status}"
                   f"{': ' + result.load_error if result.load_error else ''})")
  try:
    found = json.loads(marker[-1][len(_GREP_MARKER):])
    hits, total = found["hits"], found["total"]
  except (ValueError, KeyError, TypeError):
    return False, f"search for {plan.pattern!r} failed: its report was cut (too many results)"
  if not total:
    return False, f"No line of {plan.scope} matches {plan.pattern!r}."
  lines = [f"{total} matching line{'s' if total != 1 else ''} in {plan.scope} for "
           f"{plan.pattern!r}" + (f" (first {len(hits)} shown)" if total > len(hits) else "") + ":"]
  for path, number, text, length in hits:
    cut = f" [... {length - len(text)} more characters]" if length > len(text) else ""
    lines.append(f"{path}:{number}: {text}{cut}")
  return False, "\n".join(lines)


# ------------------------------------------------------------------------------- visible tests

_TEST_FUNCTION = re.compile(r"^def\s+(test\w*)\s*\(")
_TEST_CLASS = re.compile(r"^class\s+(Test\w*)\s*[(:]")
_TEST_METHOD = re.compile(r"^\s+def\s+(test\w*)\s*\(")


def is_test_file(path: str) -> bool:
  """A file whose tests run_tests collects (pytest's default ``test_*.py`` / ``*_test.py``)."""
  name = path.rsplit("/", 1)[-1]
  return name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py"))


def collect_tests(path: str, text: str) -> list[str]:
  """Test ids of one test file, in file order, by scanning its lines (nothing is executed)."""
  ids, current_class = [], None
  for line in text.splitlines():
    if line and not line[0].isspace() and not line.startswith("#"):
      current_class = None
      match = _TEST_FUNCTION.match(line)
      if match:
        ids.append(f"{path}::{match.group(1)}")
        continue
      match = _TEST_CLASS.match(line)
      if match:
        current_class = match.group(1)
      continue
    if current_class is not None:
      match = _TEST_METHOD.match(line)
      if match:
        ids.append(f"{path}::{current_class}::{match.group(1)}")
  return list(dict.fromkeys(ids))


def visible_tests(files: Mapping[str, str]) -> list[str]:
  """Every test id of every test file in ``files`` (sorted by file, file order within)."""
  return [test for path in sorted(files) if is_test_file(path)
          for test in collect_tests(path, files[path])]


def check_test_id(test_id) -> str:
  """A test id as given to run_tests, or ToolError naming the accepted forms."""
  try:
    testrun.parse_test_id(test_id)
  except testrun.TestIdError as error:
    raise ToolError(str(error)) from None
  return test_id
