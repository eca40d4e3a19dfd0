"""Directory jobs: a program that is a tree of files (a package with its tests), run in the sandbox.

A ``DirectoryJob`` holds the untrusted ``files`` (path -> text; materialized in the program's
private tmpfs, which is its cwd and first ``sys.path`` entry), the test ids to run, and, in
``"proxy"`` mode, the **trusted** ``test_files`` that decide the verdict::

    job = DirectoryJob(
        files={"pkg/__init__.py": "", "pkg/mod.py": "def f(x):\\n  return x + 1\\n"},
        test_files={"tests/test_mod.py": "from pkg.mod import f\\n\\ndef test_f():\\n"
                                         "  assert f(1) == 2\\n"},
        tests=("tests/test_mod.py::test_f",))
    result = pool.run(job)        # Result: one TestOutcome per test id; .modules: import outcomes

Modes (where the test code runs):

* ``"proxy"`` (default, for grading): the test files run in the judge, an interpreter that never
  executes program code. Their imports of program modules (``from pkg.mod import f``) yield
  proxies: attribute reads and calls cross to the program process as plain data (``codec``), so
  the program influences a verdict only through the values its functions return. The test files
  never enter the program process or its file system; a path in both ``files`` and
  ``test_files`` is dropped from ``files``. Test code must be standard-library only (plain
  asserts, ``unittest``) and may pass only plain data to program functions.
* ``"inline"`` (feedback only: visible tests, the agent's own tests): the tests are among
  ``files`` and run in the program process. The program can forge these verdicts; never reward
  on them. ``test_files`` must be empty.

Test ids (``testrun``): ``tests/test_mod.py::test_fn`` or ``tests/test_mod.py::TestX::test_y``; an
id whose file, module or object is missing is a failed test. Before the tests, the program process
imports ``imports`` (default: every non-test module of ``files``); ``Result.modules`` maps each to
``None`` or the error it raised, and a failed import does not stop the tests. Security notes:
``kat_jax/sandbox/__init__.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

from kat_jax.sandbox import testrun
from kat_jax.sandbox.job import Limits

MODES = ("proxy", "inline")
MAX_PATH_CHARS = 1024
MAX_COMPONENT_BYTES = 255
MAX_DEPTH = 32


def normalize_path(path, *, max_chars: int = MAX_PATH_CHARS) -> str:
  """The canonical form of a repository-relative file path, or ValueError saying what is wrong.

  Refused: non-strings, empty paths, absolute paths, ``..`` components, NUL and other control
  characters, backslashes, components over 255 bytes, more than 32 components, paths longer than
  ``max_chars``. ``./`` components, repeated and trailing slashes are dropped."""
  if not isinstance(path, str):
    raise ValueError(f"a path must be a string, got {type(path).__name__}")
  shown = path if len(path) <= 80 else path[:80] + "..."
  if len(path) > max_chars:
    raise ValueError(f"path of {len(path)} characters is longer than the limit of {max_chars}")
  if not path.strip():
    raise ValueError("empty path: name a file relative to the repository root, e.g. 'pkg/mod.py'")
  bad = next((c for c in path if ord(c) < 0x20 or ord(c) == 0x7F), None)
  if bad is not None:
    raise ValueError(f"path {shown!r} contains the control character {bad!r}")
  if "\\" in path:
    raise ValueError(f"path {shown!r} contains a backslash: separate directories with '/'")
  if path.startswith("/"):
    raise ValueError(f"absolute path {shown!r}: paths are relative to the repository root "
                     "(write 'pkg/mod.py', not '/pkg/mod.py')")
  try:
    path.encode("utf-8")
  except UnicodeEncodeError:
    raise ValueError(f"path {shown!r} is not valid Unicode text") from None
  parts = [part for part in path.split("/") if part not in ("", ".")]
  if ".." in parts:
    raise ValueError(f"path {shown!r} leaves the repository ('..' is not allowed)")
  if not parts:
    raise ValueError(f"path {shown!r} names the repository root, not a file")
  if len(parts) > MAX_DEPTH:
    raise ValueError(f"path {shown!r} is nested {len(parts)} levels deep (limit {MAX_DEPTH})")
  for part in parts:
    if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
      raise ValueError(f"a component of path {shown!r} is longer than {MAX_COMPONENT_BYTES} bytes")
  return "/".join(parts)


def check_text(path: str, text) -> None:
  """ValueError unless ``text`` is a str that can be written as UTF-8 (no lone surrogates)."""
  if not isinstance(text, str):
    raise ValueError(f"content of {path!r} must be text (str), got {type(text).__name__}")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as error:
    raise ValueError(f"content of {path!r} is not valid UTF-8 text ({error.reason} at position "
                     f"{error.start})") from None


def default_imports(files: Mapping[str, str]) -> tuple[str, ...]:
  """The importable non-test modules of ``files`` (sorted module names)."""
  names = set()
  for path in files:
    name = testrun.module_name_of(path)
    if name is not None and not testrun.is_test_path(path):
      names.add(name)
  return tuple(sorted(names))


@dataclasses.dataclass(frozen=True)
class DirectoryJob:
  files: Mapping[str, str]                  # untrusted: path -> text, the program's tree
  tests: tuple[str, ...]                    # test ids, e.g. "tests/test_mod.py::test_fn"
  test_files: Mapping[str, str] = dataclasses.field(default_factory=dict)  # trusted (proxy mode)
  mode: str = "proxy"
  imports: Optional[tuple[str, ...]] = None  # modules imported at load (None: default_imports)
  job_id: str = ""
  limits: Optional[Limits] = None            # overrides the pool's limits for this job

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"DirectoryJob.mode must be one of {MODES}, got {self.mode!r}")
    if self.mode == "inline" and self.test_files:
      raise ValueError("DirectoryJob.test_files are trusted tests: they run only in mode='proxy' "
                       "(inline tests are among the program's files)")
    files = _checked_files("files", self.files)
    test_files = _checked_files("test_files", self.test_files)
    files = {path: text for path, text in files.items() if path not in test_files}
    object.__setattr__(self, "files", files)
    object.__setattr__(self, "test_files", test_files)
    if isinstance(self.tests, str):
      raise TypeError("DirectoryJob.tests must be a sequence of test ids, got a single string")
    object.__setattr__(self, "tests", tuple(self.tests))
    for test in self.tests:
      if not isinstance(test, str):
        raise TypeError(f"DirectoryJob.tests must hold test id strings, got {test!r}")
    if self.imports is None:
      object.__setattr__(self, "imports", default_imports(files))
    else:
      object.__setattr__(self, "imports", tuple(self.imports))
      for name in self.imports:
        if not isinstance(name, str) or not all(p.isidentifier() for p in name.split(".")):
          raise ValueError(f"DirectoryJob.imports must hold dotted module names, got {name!r}")

  @property
  def test_names(self) -> tuple[str, ...]:
    return self.tests


def _checked_files(field: str, files: Mapping[str, str]) -> dict[str, str]:
  if not isinstance(files, Mapping):
    raise TypeError(f"DirectoryJob.{field} must map paths to text, got {type(files).__name__}")
  checked = {}
  for path, text in files.items():
    try:
      normal = normalize_path(path)
      check_text(normal, text)
    except ValueError as error:
      raise ValueError(f"DirectoryJob.{field}: {error}") from None
    if normal in checked:
      raise ValueError(f"DirectoryJob.{field}: {path!r} and another path both name {normal!r}")
    checked[normal] = text
  names = set(checked)
  for path in checked:  # a file cannot also be a directory of another file
    parent = path.rsplit("/", 1)[0] if "/" in path else None
    while parent is not None:
      if parent in names:
        raise ValueError(f"DirectoryJob.{field}: {parent!r} is a file and also the directory of "
                         f"{path!r}")
      parent = parent.rsplit("/", 1)[0] if "/" in parent else None
  return checked


def job_messages(job: DirectoryJob, limits: Limits) -> tuple[dict, dict]:
  """The judge's two messages for ``job``: the program part (read before the program process is
  forked: the program's files) and the test part (read after: trusted test files, test ids)."""
  program = {"kind": "directory", "job_id": job.job_id, "mode": job.mode, "files": job.files,
             "imports": list(job.imports), "limits": dataclasses.asdict(limits)}
  tests = {"test_files": job.test_files, "tests": list(job.tests)}
  return program, tests
