"""What the sandbox runs (Job, its tests, Limits, Isolation) and what it reports (Result).

A **Job** is an untrusted ``program`` (Python source) plus **trusted** test material: ``setup`` code
(helpers, ``def check(candidate): ...``) and a tuple of tests. Two kinds of test:

* ``CallTest(name, function, args, kwargs, expected)``: the judge calls ``function`` of the program
  with plain-data arguments; the result comes back as plain data (see ``codec``) and passes iff its
  type-exact canonical form equals ``expected``'s. ``expected`` never enters the program's process.
* ``CodeTest(name, code)``: free-form trusted Python (``"check(add)"``, ``"assert add(1, 2) == 3"``)
  that passes iff it runs to completion without raising. The program's ``exports`` (function
  names) are bound in its namespace.

``mode`` says where CodeTests run:

* ``"proxy"`` (default): in the judge process, a separate interpreter that never executes program
  code; each exported name is a proxy that ships plain-data arguments to the program process and
  rebuilds the plain-data result as genuine built-in objects. Tests that need the program's own
  objects (instances, callbacks, in-place mutation of arguments) do not fit this mode.
* ``"inline"``: in the program's process, after restoring pristine interpreter state, with results
  of exported functions round-tripped through the codec (``canonicalize_results``). Weaker: see the
  security notes in ``kat_jax/sandbox/__init__.py``.

Results are data, never exceptions: ``Result.tests`` holds one ``TestOutcome`` per test, ``status``
says how the run ended and ``killed_by`` which limit (if any) ended it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from kat_jax.sandbox import codec

MODES = ("proxy", "inline")


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of one job. Aggregate memory is bounded by max_processes × memory_bytes."""
  wall_time_s: float = 5.0          # whole job (program load + all tests); the judge kills at it
  cpu_time_s: int = 5               # RLIMIT_CPU of each program process (SIGKILL at the limit)
  memory_bytes: int = 512 << 20     # RLIMIT_AS of each program process
  max_processes: int = 8            # RLIMIT_NPROC for the job's private uid (threads count too)
  file_size_bytes: int = 4 << 20    # RLIMIT_FSIZE: largest file the program may write
  disk_bytes: int = 16 << 20        # size of the job's private tmpfs (cwd, /tmp, /dev/shm)
  disk_inodes: int = 512            # files + directories on that tmpfs
  open_files: int = 64              # RLIMIT_NOFILE
  output_bytes: int = 4 << 20       # program stdout+stderr beyond this kills the job ("output")
  capture_bytes: int = 64 << 10     # bytes of each of stdout / stderr kept in the Result
  max_value_bytes: int = 16 << 20   # largest single message (a call's arguments or result)

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not value > 0:
        raise ValueError(f"Limits.{field.name} must be > 0, got {value!r}")
    if int(self.cpu_time_s) != self.cpu_time_s:
      raise ValueError(f"Limits.cpu_time_s must be a whole number of seconds, got "
                       f"{self.cpu_time_s!r} (RLIMIT_CPU has 1 s resolution)")


@dataclasses.dataclass(frozen=True)
class Isolation:
  """Which kernel isolation to request; each part degrades (logged, reported) where refused."""
  namespaces: bool = True       # fresh net/mount/pid/ipc/uts namespaces + private read-only root
  drop_privileges: bool = True  # run the program as a fresh unprivileged uid (needs root)
  readonly_paths: tuple[str, ...] = ()  # extra host directories visible (read-only) to programs


@dataclasses.dataclass(frozen=True)
class CodeTest:
  name: str
  code: str


@dataclasses.dataclass(frozen=True)
class CallTest:
  name: str
  function: str
  args: tuple = ()
  expected: Any = None
  kwargs: Optional[dict] = None


Test = Union[CodeTest, CallTest]


@dataclasses.dataclass(frozen=True)
class Job:
  program: str
  tests: tuple[Test, ...]
  setup: str = ""
  exports: tuple[str, ...] = ()
  mode: str = "proxy"
  module_name: str = "__candidate__"   # the program's __name__ ("__main__" runs main blocks)
  canonicalize_results: bool = True    # inline mode: round-trip exported functions' results
  job_id: str = ""
  limits: Optional[Limits] = None      # overrides the pool's limits for this job

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"Job.mode must be one of {MODES}, got {self.mode!r}")
    if not isinstance(self.program, str):
      raise TypeError(f"Job.program must be source text (str), got {type(self.program).__name__}")
    object.__setattr__(self, "tests", tuple(self.tests))
    object.__setattr__(self, "exports", tuple(self.exports))
    for test in self.tests:
      if not isinstance(test, (CodeTest, CallTest)):
        raise TypeError(f"Job.tests must hold CodeTest / CallTest, got {test!r}")

  @property
  def test_names(self) -> tuple[str, ...]:
    return tuple(test.name for test in self.tests)


def encode_tests(job: Job) -> list[dict]:
  """The judge's view of ``job.tests`` (CallTest values encoded with the codec)."""
  encoded = []
  for test in job.tests:
    if isinstance(test, CodeTest):
      encoded.append({"kind": "code", "name": test.name, "code": test.code})
    else:
      try:
        encoded.append({
            "kind": "call", "name": test.name, "function": test.function,
            "args": codec.encode(tuple(test.args)),
            "kwargs": codec.encode(dict(test.kwargs or {})),
            "expected": codec.encode(test.expected),
        })
      except codec.UnsupportedValue as error:
        raise ValueError(f"CallTest {test.name!r} of job {job.job_id!r}: {error}") from None
  return encoded


@dataclasses.dataclass(frozen=True)
class TestOutcome:
  name: str
  passed: bool
  error_type: Optional[str] = None
  error: Optional[str] = None
  seconds: float = 0.0


# How a run ended. "completed": every test reached a verdict with the program alive;
# "load_error": the program raised while loading (tests not run); "crashed": the program process
# died (exit, signal, CPU limit) before the tests finished; "timeout": the wall-time limit hit;
# "output_limit": the program wrote more than Limits.output_bytes; "harness_error": the trusted side
# failed (bad setup code, sandbox failure) — not the program's fault, still counted as not passed.
STATUSES = ("completed", "load_error", "crashed", "timeout", "output_limit", "harness_error")


@dataclasses.dataclass(frozen=True)
class Result:
  job_id: str
  status: str
  tests: tuple[TestOutcome, ...]
  killed_by: Optional[str] = None  # "wall_time" "cpu_time" "output" "signal SIGSEGV" "exit 0" ...
  load_error_type: Optional[str] = None
  load_error: Optional[str] = None
  harness_error: Optional[str] = None
  stdout: str = ""
  stderr: str = ""
  stdout_truncated: bool = False
  stderr_truncated: bool = False
  output_bytes: int = 0                 # total program stdout+stderr bytes seen
  wall_seconds: float = 0.0
  load_seconds: float = 0.0
  program_cpu_seconds: float = 0.0
  program_max_rss_kb: int = 0
  isolation: dict = dataclasses.field(default_factory=dict)
  # DirectoryJob: each module imported at load -> None, or the "Type: message" it raised; a
  # module missing here was never imported (the load did not finish).
  modules: dict = dataclasses.field(default_factory=dict)

  @property
  def passed(self) -> bool:
    """True iff there is at least one test and every test passed."""
    return bool(self.tests) and all(test.passed for test in self.tests)

  @property
  def num_passed(self) -> int:
    return sum(test.passed for test in self.tests)

  @property
  def timed_out(self) -> bool:
    return self.killed_by == "wall_time"
