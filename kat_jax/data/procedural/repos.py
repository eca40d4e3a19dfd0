"""Small multi-file repository tasks for the SWE-style environment, and unified-diff utilities.

A ``RepoTask`` mirrors a SWE-bench instance: the repository at the buggy commit (``files``: path ->
content, with its existing tests), an issue text, the gold patch that fixes the bug, a test patch
that adds the tests reproducing the issue, and the test ids that decide success —
``fail_to_pass`` (fail before the fix, pass after) and ``pass_to_pass`` (pass before and after).
Grading as in SWE-bench: apply the model's patch, then ``test_patch``; resolved iff every
FAIL_TO_PASS and every PASS_TO_PASS test passes. Test ids are pytest node ids
(``tests/test_textops.py::test_pad_str_0``)::

    task = make_repo_task(seed=0)
    fixed = apply_patch(apply_patch(task.files, task.gold_patch), task.test_patch)
    run_repo_tests(fixed, task.fail_to_pass + task.pass_to_pass)   # {test id: True, ...}

Repositories are built from procedural tasks (level 1 or 2, so names are descriptive): a package
with one module per template family, a docstring per function (its spec), one test file per module;
one function carries a mutation from ``bugs.buggy_variants``.

``run_repo_tests`` runs the tests in a subprocess with a timeout. It is meant for code we generated
(validation, tests); it is not a sandbox — model-written patches are graded through kat_jax.sandbox.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Mapping, Optional, Sequence

import numpy as np

from kat_jax.data.procedural.bugs import buggy_variants
from kat_jax.data.procedural.generate import task_stream
from kat_jax.data.procedural.task import Task, TestCase, evaluate_call, short_repr

MODULE_OF_FAMILY = {"arithmetic": "mathops", "conditionals": "rules", "strings": "textops",
                    "lists": "listops", "dicts": "tables", "loops": "loops"}
_MODULE_TITLES = {"arithmetic": "Arithmetic helpers.", "conditionals": "Decision rules.",
                  "strings": "String helpers.", "lists": "List helpers.",
                  "dicts": "Dictionary helpers.", "loops": "Loop-based helpers."}
_PACKAGES = ("toolkit", "calckit", "helpers", "corelib", "utilpack", "smallops")


@dataclasses.dataclass(frozen=True)
class RepoTask:
  repo_id: str
  files: dict
  issue: str
  fail_to_pass: tuple
  pass_to_pass: tuple
  gold_patch: str
  test_patch: str
  bug_file: str
  entry_point: str

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["fail_to_pass"], d["pass_to_pass"] = list(self.fail_to_pass), list(self.pass_to_pass)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "RepoTask":
    fields = dict(d)
    fields["fail_to_pass"], fields["pass_to_pass"] = tuple(d["fail_to_pass"]), tuple(d["pass_to_pass"])
    fields["files"] = dict(d["files"])
    return cls(**fields)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), ensure_ascii=False)

  @classmethod
  def from_json(cls, text: str) -> "RepoTask":
    return cls.from_dict(json.loads(text))


# ------------------------------------------------------------------------------------ diffs


class PatchError(ValueError):
  """A patch that does not apply (names the file and hunk)."""


def make_diff(old_files: Mapping[str, str], new_files: Mapping[str, str], *, context: int = 3) -> str:
  """A git-style unified diff turning ``old_files`` into ``new_files`` (added, changed, deleted)."""
  out = []
  for path in sorted(set(old_files) | set(new_files)):
    old, new = old_files.get(path), new_files.get(path)
    if old == new:
      continue
    out.append(f"diff --git a/{path} b/{path}\n")
    if old is None:
      out.append("new file mode 100644\n")
    elif new is None:
      out.append("deleted file mode 100644\n")
    lines = difflib.unified_diff((old or "").splitlines(keepends=True),
                                 (new or "").splitlines(keepends=True),
                                 "/dev/null" if old is None else f"a/{path}",
                                 "/dev/null" if new is None else f"b/{path}", n=context)
    for line in lines:
      if line.startswith(("---", "+++")):
        out.append(line.rstrip("\n") + "\n")
      elif line.endswith("\n"):
        out.append(line)
      else:
        out.append(line + "\n\\ No newline at end of file\n")
  return "".join(out)


_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _strip_prefix(path: str) -> Optional[str]:
  path = path.split("\t")[0].strip()
  if path == "/dev/null":
    return None
  return path[2:] if path.startswith(("a/", "b/")) else path


def apply_patch(files: Mapping[str, str], patch: str) -> dict[str, str]:
  """Applies a unified diff (as ``make_diff`` or ``git diff`` writes it) to a copy of ``files``.

  Hunks must match exactly; a hunk whose recorded line number is off is searched for forward from
  the previous hunk. Raises ``PatchError`` naming the file and hunk otherwise.
  """
  result = dict(files)
  lines = patch.splitlines(keepends=True)
  i = 0
  while i < len(lines):
    if lines[i].startswith("diff --git "):
      # A git header; sections without ---/+++ lines create or delete an empty file.
      match = re.match(r"diff --git a/(.*) b/(.*)$", lines[i].rstrip("\r\n"))
      j = i + 1
      while j < len(lines) and not lines[j].startswith(("diff --git ", "--- ")):
        j += 1
      if match and (j == len(lines) or lines[j].startswith("diff --git ")):
        mode_lines = "".join(lines[i + 1:j])
        if "new file mode" in mode_lines:
          result[match.group(2)] = ""
        elif "deleted file mode" in mode_lines:
          if match.group(1) not in result:
            raise PatchError(f"patch deletes {match.group(1)}, which is not in the repository")
          del result[match.group(1)]
      i = j
      continue
    if not lines[i].startswith("--- "):
      i += 1
      continue
    if i + 1 >= len(lines) or not lines[i + 1].startswith("+++ "):
      raise PatchError(f"'--- ' line without a '+++ ' line after it: {lines[i].strip()!r}")
    old_path, new_path = _strip_prefix(lines[i][4:]), _strip_prefix(lines[i + 1][4:])
    path = new_path or old_path
    if path is None:
      raise PatchError("a file section has /dev/null on both sides")
    if old_path is not None and old_path not in result:
      raise PatchError(f"patch modifies {old_path}, which is not in the repository")
    content = result.get(old_path, "") if old_path else ""
    file_lines = content.splitlines(keepends=True)
    i += 2
    search_from, hunk_no = 0, 0
    while i < len(lines) and lines[i].startswith("@@"):
      hunk_no += 1
      m = _HUNK.match(lines[i])
      if not m:
        raise PatchError(f"{path}: malformed hunk header {lines[i].strip()!r}")
      old_start = int(m.group(1))
      old_count = int(m.group(2)) if m.group(2) is not None else 1
      new_count = int(m.group(4)) if m.group(4) is not None else 1
      i += 1
      old_block, new_block = [], []
      prev_tag = None
      while i < len(lines) and (len(old_block) < old_count or len(new_block) < new_count
                                or lines[i].startswith("\\")):
        line = lines[i]
        tag, text = line[:1], line[1:]
        if tag == "\\":  # "\ No newline at end of file": the previous line has no newline
          if prev_tag in (" ", "-") and old_block:
            old_block[-1] = old_block[-1].rstrip("\r\n")
          if prev_tag in (" ", "+") and new_block:
            new_block[-1] = new_block[-1].rstrip("\r\n")
        elif tag == " " or line in ("\n", "\r\n"):  # an empty context line may lose its space
          text = text if tag == " " else line
          old_block.append(text)
          new_block.append(text)
        elif tag == "-":
          old_block.append(text)
        elif tag == "+":
          new_block.append(text)
        else:
          raise PatchError(f"{path}: hunk {hunk_no} has an unexpected line {line.rstrip()!r}")
        prev_tag = tag if tag != "\\" else prev_tag
        i += 1
      at = max(old_start - 1, 0) if old_count else old_start
      if file_lines[at:at + len(old_block)] != old_block:
        at = next((k for k in range(search_from, len(file_lines) - len(old_block) + 1)
                   if file_lines[k:k + len(old_block)] == old_block), None)
        if at is None:
          raise PatchError(f"{path}: hunk {hunk_no} (at line {old_start}) does not match the file")
      file_lines[at:at + len(old_block)] = new_block
      search_from = at + len(new_block)
    if new_path is None:
      result.pop(old_path, None)
    else:
      if old_path is not None and old_path != new_path:
        result.pop(old_path, None)
      result[new_path] = "".join(file_lines)
  return result


# ------------------------------------------------------------------------------- running tests


_RUNNER = r"""
import importlib.util, json, sys
results, modules = {}, {}
for test_id in json.loads(sys.argv[1]):
    path, _, name = test_id.partition("::")
    try:
        if path not in modules:
            spec = importlib.util.spec_from_file_location(path.replace("/", "_")[:-3], path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            modules[path] = module
        getattr(modules[path], name)()
        results[test_id] = True
    except BaseException:
        results[test_id] = False
print("@@RESULTS@@" + json.dumps(results))
"""


def run_repo_tests(files: Mapping[str, str], test_ids: Sequence[str], *, timeout: float = 60.0
                   ) -> dict[str, bool]:
  """Writes the repository to a temporary directory and runs the given test functions in one
  subprocess (repository root on sys.path). A test that errors, or is missing, or a run that
  times out, counts as failed."""
  with tempfile.TemporaryDirectory(prefix="kat_repo_") as root:
    for path, content in files.items():
      full = os.path.join(root, path)
      if os.path.relpath(full, root).startswith(".."):
        raise ValueError(f"repository path {path!r} escapes the repository root")
      os.makedirs(os.path.dirname(full), exist_ok=True)
      with open(full, "w", encoding="utf-8") as f:
        f.write(content)
    env = dict(os.environ, PYTHONPATH=root, PYTHONDONTWRITEBYTECODE="1")
    try:
      proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(list(test_ids))], cwd=root,
                            env=env, capture_output=True, text=True, timeout=timeout)
      marker = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULTS@@")]
      results = json.loads(marker[-1][len("@@RESULTS@@"):]) if marker else {}
    except subprocess.TimeoutExpired:
      results = {}
  return {t: bool(results.get(t, False)) for t in test_ids}


# ----------------------------------------------------------------------------- building tasks


def _docstring(task: Task) -> str:
  """The behaviour part of the spec, as a sentence ("Returns x plus 3.")."""
  spec = task.spec
  if task.level >= 2 and ". " in spec:
    text = spec.split(". ", 1)[1]
  else:
    text = spec.split(" that ", 1)[1] if " that " in spec else spec
  text = text[0].upper() + text[1:]
  return text.replace("\\", "\\\\").replace('"""', "'''")


def _function_source(code: str, doc: str) -> str:
  lines = code.rstrip("\n").split("\n")
  return "\n".join([lines[0], f'    """{doc}"""', *lines[1:]]) + "\n"


def _module_source(title: str, functions: Sequence[str]) -> str:
  return f'"""{title}"""\n\n\n' + "\n\n".join(functions)


def _test_source(package: str, module: str, names: Sequence[str],
                 tests: Sequence[tuple[str, str, TestCase]]) -> str:
  """tests: (test function name, entry point, test case)."""
  out = [f"from {package}.{module} import {', '.join(sorted(names))}\n"]
  for test_name, entry, case in tests:
    out.append(f"\n\ndef {test_name}():\n    assert {case.call_source(entry)} == {case.expected!r}\n")
  return "".join(out)


def make_repo_task(seed: int, *, split: str = "train", level: int = 1, num_modules: int = 2,
                   functions_per_module: int = 2, heldout_fraction: float = 0.1) -> RepoTask:
  """A repository of ``num_modules`` modules × ``functions_per_module`` procedural functions, one of
  them buggy, deterministic from ``seed``; functions come from the given split of procedural tasks."""
  if level not in (1, 2):
    raise ValueError(f"repository tasks use level 1 or 2 (descriptive names), got {level}")
  if not 1 <= num_modules <= len(MODULE_OF_FAMILY):
    raise ValueError(f"num_modules={num_modules} must lie in [1, {len(MODULE_OF_FAMILY)}]")
  rng = np.random.default_rng([seed, 7])
  families = [str(f) for f in rng.choice(list(MODULE_OF_FAMILY), size=num_modules, replace=False)]
  package = str(rng.choice(_PACKAGES))
  stream = task_stream(int(rng.integers(2**31)), split=split, levels=(level,), families=families,
                       heldout_fraction=heldout_fraction)
  chosen: dict[str, list[Task]] = {f: [] for f in families}
  names: set[str] = set()
  templates_used: set[str] = set()
  for _ in range(10_000):
    if all(len(v) == functions_per_module for v in chosen.values()):
      break
    task = next(stream)
    bucket = chosen[task.family]
    if (len(bucket) < functions_per_module and task.entry_point not in names
        and task.template not in templates_used):
      bucket.append(task)
      names.add(task.entry_point)
      templates_used.add(task.template)
  else:
    raise ValueError(f"could not draw {functions_per_module} distinct functions for families {families}")
  all_tasks = [t for f in families for t in chosen[f]]
  order = rng.permutation(len(all_tasks))
  bug_task, variant = None, None
  for k in order:
    variants = buggy_variants(all_tasks[k], max_variants=None)
    if variants:
      bug_task, variant = all_tasks[k], variants[int(rng.integers(len(variants)))]
      break
  if bug_task is None:
    raise ValueError("no function of this repository has a failing mutant")

  old_files: dict[str, str] = {f"{package}/__init__.py": f'"""{package}: small helper functions."""\n'}
  fixed_sources: dict[str, str] = {}
  new_tests: dict[str, str] = {}
  fail_to_pass, pass_to_pass = [], []
  bug_file = ""
  for family in families:
    module = MODULE_OF_FAMILY[family]
    path, test_path = f"{package}/{module}.py", f"tests/test_{module}.py"
    tasks = chosen[family]
    buggy_funcs, fixed_funcs, repo_tests, hidden_tests = [], [], [], []
    for task in tasks:
      doc = _docstring(task)
      fixed_funcs.append(_function_source(task.solution, doc))
      if task is bug_task:
        buggy_funcs.append(_function_source(variant.code, doc))
        for i, (case, ok) in enumerate(zip(task.tests, variant.report.passed)):
          name = f"test_{task.entry_point}_{i}"
          (repo_tests if ok else hidden_tests).append((name, task.entry_point, case))
          (pass_to_pass if ok else fail_to_pass).append(f"{test_path}::{name}")
        bug_file = path
      else:
        buggy_funcs.append(fixed_funcs[-1])
        for i, case in enumerate(task.tests):
          name = f"test_{task.entry_point}_{i}"
          repo_tests.append((name, task.entry_point, case))
          pass_to_pass.append(f"{test_path}::{name}")
    title = _MODULE_TITLES[family]
    old_files[path] = _module_source(title, buggy_funcs)
    fixed_sources[path] = _module_source(title, fixed_funcs)
    entry_names = [t.entry_point for t in tasks]
    old_files[test_path] = _test_source(package, module, entry_names, repo_tests)
    new_tests[test_path] = _test_source(package, module, entry_names, repo_tests + hidden_tests)
  old_files["README.md"] = (f"# {package}\n\nSmall helper functions: "
                            + ", ".join(f"`{MODULE_OF_FAMILY[f]}`" for f in families)
                            + ".\n\nRun the tests with `python -m pytest tests`.\n")

  failing = next(c for c, ok in zip(bug_task.tests, variant.report.passed) if not ok)
  ok, got = evaluate_call(variant.code, bug_task.entry_point, failing.args)
  call = failing.call_source(bug_task.entry_point)
  observed = f"returns `{short_repr(got)}`" if ok else f"raises `{got}`"
  issue = (f"`{bug_task.entry_point}` gives a wrong result\n\n"
           f"Calling `{call}` {observed}, but it should return `{failing.expected!r}`.\n"
           f"According to its docstring: {_docstring(bug_task)}\n")
  gold_patch = make_diff({bug_file: old_files[bug_file]}, {bug_file: fixed_sources[bug_file]})
  test_patch = make_diff({p: old_files[p] for p in new_tests}, new_tests)
  key = json.dumps([seed, split, level, num_modules, functions_per_module])
  repo_id = f"{package}-{hash_text(key) % 10**8:08d}"
  return RepoTask(repo_id, old_files, issue, tuple(fail_to_pass), tuple(pass_to_pass), gold_patch,
                  test_patch, bug_file, bug_task.entry_point)


def hash_text(text: str) -> int:
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
