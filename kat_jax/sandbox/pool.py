"""Host side of the sandbox: a worker pool that runs Jobs through a zygote and returns Results.

    with SandboxPool(num_workers=2) as pool:
      results = pool.map(jobs)          # list[Result], same order; never raises for a bad job
      print(pool.stats())               # jobs, wall seconds, jobs/s, statuses

Each job: the host draws a fresh sandbox uid, asks the zygote (``zygote.py``) to fork a judge with
five fresh pipes, streams the job to it, and multiplexes the judge's events, its diagnostics and
the program's stdout/stderr until the judge exits — keeping ``capture_bytes`` of each stream and
killing the job once the program has written ``output_bytes``. If the judge overruns
``wall_time_s`` plus a grace period, or the job is killed for its output, the host kills the judge
(through a pidfd) and every process still running under the job's uid. Whatever happens, the
caller gets a ``Result``; faults of the program, of the trusted test code and of the sandbox
itself are statuses, not exceptions. A dead zygote is restarted transparently.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Iterable, Optional

from kat_jax.sandbox import confine
from kat_jax.sandbox import directory
from kat_jax.sandbox.job import Isolation, Job, Limits, Result, TestOutcome, encode_tests

log = logging.getLogger(__name__)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); from kat_jax.sandbox import zygote; "
         "zygote.main(int(sys.argv[2]))")
_GRACE_S = 3.0          # host backstop beyond the judge's own wall-time limit
_DIAG_BYTES = 64 << 10
_EVENT_BYTES = 64 << 20
_UID_BASE = 1_900_000_000   # per-job uids are drawn from [base, base + span): never a real user
_UID_SPAN = 1 << 26
_PID = struct.Struct(">q")  # the zygote's reply: pid or -errno


def default_readonly_paths() -> tuple[str, ...]:
  """System directories plus the Python installation the sandboxed interpreter runs from."""
  prefix = os.path.realpath(sys.base_prefix)
  paths = list(confine.SYSTEM_PATHS)
  if not any(prefix == p or prefix.startswith(p + os.sep) for p in paths):
    paths.append(prefix)
  return tuple(paths)


class ForkFailed(OSError):
  """The zygote is alive but fork() failed (e.g. EAGAIN: the machine is out of processes)."""


class _Zygote:
  """The fork server process and its control socket."""

  def __init__(self):
    host_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
      self._process = subprocess.Popen(
          [sys.executable, "-I", "-S", "-c", _BOOT, _REPO_ROOT, str(child_end.fileno())],
          pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/",
          start_new_session=True)
    finally:
      child_end.close()
    self._socket = host_end
    self._lock = threading.Lock()

  def spawn(self, fds: list[int]) -> int:
    """Forks a judge holding ``fds``; returns its pid (raises OSError if the zygote is gone)."""
    with self._lock:
      socket.send_fds(self._socket, [b"S"], fds)
      reply = b""
      while len(reply) < 8:
        chunk = self._socket.recv(8 - len(reply))
        if not chunk:
          raise ConnectionError("the sandbox zygote exited")
        reply += chunk
    (pid,) = _PID.unpack(reply)
    if pid < 0:
      raise ForkFailed(-pid, f"the sandbox zygote could not fork: {os.strerror(-pid)}")
    return pid

  def alive(self) -> bool:
    return self._process.poll() is None

  def close(self) -> None:
    self._socket.close()
    try:
      self._process.wait(timeout=5)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()



@dataclasses.dataclass(frozen=True)
class PoolStats:
  jobs: int
  wall_seconds: float          # first submission to last completion
  jobs_per_second: float
  mean_job_seconds: float      # mean latency of one job (host view)
  statuses: dict


class SandboxPool:
  """Runs Jobs in parallel, each fully isolated; see the module docstring."""

  def __init__(self, num_workers: Optional[int] = None, limits: Optional[Limits] = None,
               isolation: Optional[Isolation] = None):
    if num_workers is not None and num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    self.num_workers = num_workers or os.cpu_count() or 1
    self.limits = limits or Limits()
    self.isolation = isolation or Isolation()
    self.readonly_paths = default_readonly_paths() + tuple(self.isolation.readonly_paths)
    self._zygote_lock = threading.Lock()
    self._zygote = _Zygote()
    self._executor = concurrent.futures.ThreadPoolExecutor(
        self.num_workers, thread_name_prefix="kat-sandbox")
    self._stats_lock = threading.Lock()
    self._jobs = 0
    self._job_seconds = 0.0
    self._first_submit = None
    self._last_done = None
    self._statuses = collections.Counter()
    self._warned_isolation = False
    self._closed = False

  # -- public API ---------------------------------------------------------------------------

  def submit(self, job: Job) -> concurrent.futures.Future:
    """Schedules ``job``; the future's result is its Result (the future never raises)."""
    if self._closed:
      raise RuntimeError("SandboxPool is closed; create a new one")
    with self._stats_lock:
      if self._first_submit is None:
        self._first_submit = time.perf_counter()
    return self._executor.submit(self._run_safely, job)

  def run(self, job: Job) -> Result:
    return self.submit(job).result()

  def map(self, jobs: Iterable[Job]) -> list[Result]:
    futures = [self.submit(job) for job in jobs]
    return [future.result() for future in futures]

  def stats(self) -> PoolStats:
    with self._stats_lock:
      wall = ((self._last_done - self._first_submit)
              if self._first_submit is not None and self._last_done is not None else 0.0)
      return PoolStats(jobs=self._jobs, wall_seconds=wall,
                       jobs_per_second=self._jobs / wall if wall > 0 else 0.0,
                       mean_job_seconds=self._job_seconds / self._jobs if self._jobs else 0.0,
                       statuses=dict(self._statuses))

  def reset_stats(self) -> None:
    with self._stats_lock:
      self._jobs, self._job_seconds = 0, 0.0
      self._first_submit = self._last_done = None
      self._statuses.clear()

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    self._executor.shutdown(wait=True)
    with self._zygote_lock:
      self._zygote.close()

  def __enter__(self) -> "SandboxPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- one job ------------------------------------------------------------------------------

  def _run_safely(self, job: Job) -> Result:
    start = time.perf_counter()
    try:
      result = self._run(job)
    except BaseException as error:  # noqa: BLE001 - a job never takes the pool down
      result = _failed_result(job, "harness_error", f"sandbox failure: {error!r}",
                              time.perf_counter() - start)
    if result.isolation.get("notes") and not self._warned_isolation:
      self._warned_isolation = True
      log.warning("sandbox isolation degraded: %s", "; ".join(result.isolation["notes"]))
    with self._stats_lock:
      self._jobs += 1
      self._job_seconds += result.wall_seconds
      self._last_done = time.perf_counter()
      self._statuses[result.status] += 1
    return result

  def _spawn(self) -> tuple[int, list[int]]:
    """Forks a judge through the zygote with five fresh pipes; returns its pid and the host ends
    (job input, events, diagnostics, stdout, stderr). A zygote found dead, or dying mid-spawn, is
    restarted once — and the retry gets new pipes: a zygote can die after forking the judge, and
    that orphaned judge holds the first pipes (it reads EOF once their host ends are closed, and
    exits), so they are never handed to a second judge."""
    for attempt in range(2):
      with self._zygote_lock:
        zygote = self._zygote
        if not zygote.alive():
          log.warning("sandbox zygote exited (code %s); restarting it", zygote._process.poll())
          zygote.close()
          zygote = self._zygote = _Zygote()
      child_ends, host_ends = _job_pipes()
      try:
        pid = zygote.spawn(child_ends)
      except BaseException as error:
        for fd in host_ends:
          os.close(fd)
        # ForkFailed: the zygote is fine, the machine refused a process (a harness_error).
        if isinstance(error, ForkFailed) or not isinstance(error, OSError) or attempt == 1:
          raise
        # The zygote died under us (EPIPE, ECONNRESET, EOF).
        with self._zygote_lock:
          if self._zygote is zygote:
            zygote.close()
            self._zygote = _Zygote()
        continue
      finally:
        for fd in child_ends:
          os.close(fd)
      return pid, host_ends
    raise AssertionError("unreachable")

  def _run(self, job: Job) -> Result:
    start = time.perf_counter()
    limits = job.limits or self.limits
    uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
    if isinstance(job, directory.DirectoryJob):
      spec, tests_message = directory.job_messages(job, limits)
    else:
      try:
        tests = encode_tests(job)
      except ValueError as error:
        return _failed_result(job, "harness_error", str(error), 0.0)
      spec = {
          "job_id": job.job_id, "program": job.program, "module_name": job.module_name,
          "mode": job.mode, "exports": list(job.exports),
          "canonicalize": job.canonicalize_results, "limits": dataclasses.asdict(limits),
      }
      tests_message = {"setup": job.setup, "tests": tests}
    spec.update(uid=uid, readonly_paths=list(self.readonly_paths),
                isolation={"namespaces": self.isolation.namespaces,
                           "drop_privileges": self.isolation.drop_privileges})
    payload = _frame(spec) + _frame(tests_message)

    pid, (job_in_w, events_r, diag_r, out_r, err_r) = self._spawn()
    try:
      pidfd = os.pidfd_open(pid)
    except OSError:
      pidfd = None  # the judge already exited (its events are still in the pipe)
    try:
      io = _JobIO(job_in_w, events_r, diag_r, out_r, err_r, payload, limits)
      host_reason = io.run(deadline=start + limits.wall_time_s + _GRACE_S,
                           kill=lambda: _kill(pidfd))
    finally:
      if pidfd is not None:
        os.close(pidfd)
    end = io.events_of("end")
    if host_reason is not None or not end:
      _kill_uid(uid)  # whatever the job left behind (normally nothing)
    return _assemble(job, io, host_reason, time.perf_counter() - start)


def _job_pipes() -> tuple[list[int], list[int]]:
  """Five pipes of one job: (the judge's ends, the host's ends), in the judge's fd order (job
  input, events, diagnostics, stdout, stderr); none is left open if the host runs out of fds."""
  pipes = []
  try:
    for _ in range(5):
      pipes.append(os.pipe())
  except OSError:
    for pair in pipes:
      for fd in pair:
        os.close(fd)
    raise
  (job_in_r, job_in_w), *outputs = pipes
  return [job_in_r] + [w for _, w in outputs], [job_in_w] + [r for r, _ in outputs]


def _frame(obj) -> bytes:
  payload = json.dumps(obj, separators=(",", ":")).encode()
  return len(payload).to_bytes(4, "big") + payload


def _kill(pidfd: Optional[int]) -> None:
  """SIGKILLs the judge through its pidfd (no pidfd: it had already exited)."""
  if pidfd is None:
    return
  try:
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
  except OSError:
    pass


def _kill_uid(uid: int, patience_s: float = 2.0) -> None:
  """SIGKILLs every process whose real or effective uid is the job's private uid, and waits
  (up to ``patience_s``) until none is left."""
  if os.geteuid() != 0:
    return
  deadline = time.perf_counter() + patience_s
  key = str(uid).encode()
  while True:
    found = False
    for entry in os.scandir("/proc"):
      if not entry.name.isdigit():
        continue
      try:
        with open(f"/proc/{entry.name}/status", "rb") as status:
          for line in status:
            if line.startswith(b"Uid:"):
              if key in line.split()[1:3]:
                found = True
                os.kill(int(entry.name), signal.SIGKILL)
              break
      except (OSError, ValueError):
        continue
    if not found or time.perf_counter() > deadline:
      return
    time.sleep(0.005)


class _JobIO:
  """Feeds the job to the judge and collects its events and the program's output."""

  def __init__(self, job_in, events, diag, out, err, payload: bytes, limits: Limits):
    self.limits = limits
    self.pending = memoryview(payload)
    self.job_in = job_in
    self.events_buffer = bytearray()
    self.events = []
    self.diag = bytearray()
    self.captured = {out: bytearray(), err: bytearray()}
    self.truncated = {out: False, err: False}
    self.out, self.err, self.events_fd, self.diag_fd = out, err, events, diag
    self.output_bytes = 0

  def run(self, deadline: float, kill) -> Optional[str]:
    """Returns None, "deadline" or "output" (why the host killed the judge)."""
    reason = None
    selector = selectors.DefaultSelector()
    for fd in (self.job_in, self.events_fd, self.diag_fd, self.out, self.err):
      os.set_blocking(fd, False)
    if self.pending:
      selector.register(self.job_in, selectors.EVENT_WRITE)
    else:
      os.close(self.job_in)
      self.job_in = None
    for fd in (self.events_fd, self.diag_fd, self.out, self.err):
      selector.register(fd, selectors.EVENT_READ)
    open_reads = {self.events_fd, self.diag_fd, self.out, self.err}
    try:
      while self.events_fd in open_reads:
        timeout = deadline - time.perf_counter()
        if timeout <= 0:
          if reason is None:
            reason = "deadline"
            kill()
            deadline = time.perf_counter() + 2.0  # the judge's pipes close as it dies
            continue
          break
        for key, _ in selector.select(timeout):
          fd = key.fd
          if fd == self.job_in:
            try:
              written = os.write(fd, self.pending[:1 << 16])
              self.pending = self.pending[written:]
            except BrokenPipeError:
              self.pending = self.pending[:0]
            if not self.pending:
              selector.unregister(fd)
              os.close(fd)
              self.job_in = None
            continue
          try:
            data = os.read(fd, 1 << 16)
          except BlockingIOError:
            continue
          if not data:
            selector.unregister(fd)
            open_reads.discard(fd)
            continue
          if fd == self.events_fd:
            self._take_events(data)
          elif fd == self.diag_fd:
            self.diag += data[:max(0, _DIAG_BYTES - len(self.diag))]
          else:
            self._take_output(fd, data)
            if reason is None and self.output_bytes > self.limits.output_bytes:
              reason = "output"
              kill()
              deadline = min(deadline, time.perf_counter() + 2.0)
      # The judge is gone; take what the program wrote before it was killed.
      for fd in (self.out, self.err):
        if fd in open_reads:
          try:
            while data := os.read(fd, 1 << 16):
              self._take_output(fd, data)
          except (BlockingIOError, OSError):
            pass
    finally:
      selector.close()
      for fd in (self.job_in, self.events_fd, self.diag_fd, self.out, self.err):
        if fd is not None:
          os.close(fd)
    return reason

  def _take_events(self, data: bytes) -> None:
    if len(self.events_buffer) + len(data) > _EVENT_BYTES:
      return
    self.events_buffer += data
    *lines, rest = self.events_buffer.split(b"\n")
    self.events_buffer = bytearray(rest)
    for line in lines:
      try:
        self.events.append(json.loads(line))
      except ValueError:
        self.diag += b"\nunparsable event: " + line[:200]

  def _take_output(self, fd: int, data: bytes) -> None:
    self.output_bytes += len(data)
    buffer = self.captured[fd]
    room = self.limits.capture_bytes - len(buffer)
    if len(data) > room:
      self.truncated[fd] = True
    if room > 0:
      buffer += data[:room]

  def events_of(self, kind: str) -> list[dict]:
    return [event for event in self.events if event.get("e") == kind]

  def text(self, fd: int) -> str:
    return self.captured[fd].decode("utf-8", errors="replace")


def _assemble(job: Job, io: _JobIO, host_reason: Optional[str], seconds: float) -> Result:
  outcomes = {}
  names = job.test_names
  for event in io.events_of("test"):
    index = event.get("index")
    if isinstance(index, int) and 0 <= index < len(names):
      outcomes[index] = TestOutcome(name=names[index], passed=event.get("passed") is True,
                                    error_type=event.get("error_type"), error=event.get("error"),
                                    seconds=float(event.get("seconds") or 0.0))
  start = (io.events_of("start") or [{}])[0]
  loaded = (io.events_of("loaded") or [{}])[0]
  end = (io.events_of("end") or [None])[0]
  harness_error = None
  if host_reason == "output":
    status, killed_by = "output_limit", "output"
    missing = "not run: the program exceeded the output limit"
  elif end is not None:
    status, killed_by = end.get("status", "harness_error"), end.get("killed_by")
    harness_error = end.get("harness_error")
    missing = "not run"
  elif host_reason == "deadline":
    status, killed_by = "timeout", "wall_time"
    missing = "not run: the judge overran the wall-time limit"
  else:
    status, killed_by = "harness_error", None
    harness_error = "the judge exited without a verdict: " + bytes(io.diag[-2000:]).decode(
        "utf-8", errors="replace")
    missing = "not run: the judge exited without a verdict"
  tests = tuple(outcomes.get(index) or TestOutcome(name=name, passed=False,
                                                   error_type="NotRun", error=missing)
                for index, name in enumerate(names))
  if host_reason == "output":
    tests = tuple(t if t.passed or t.error_type != "ProgramDied" else dataclasses.replace(
        t, error_type="NotRun", error=missing) for t in tests)
  end = end or {}
  return Result(
      job_id=job.job_id, status=status, tests=tests, killed_by=killed_by,
      load_error_type=loaded.get("error_type"), load_error=loaded.get("error"),
      harness_error=harness_error,
      stdout=io.text(io.out), stderr=io.text(io.err),
      stdout_truncated=io.truncated[io.out], stderr_truncated=io.truncated[io.err],
      output_bytes=io.output_bytes, wall_seconds=seconds,
      load_seconds=float(loaded.get("seconds") or 0.0),
      program_cpu_seconds=float(end.get("cpu_s") or 0.0),
      program_max_rss_kb=int(end.get("max_rss_kb") or 0),
      isolation=start.get("isolation") or {},
      modules=loaded.get("modules") if isinstance(loaded.get("modules"), dict) else {})


def _failed_result(job: Job, status: str, why: str, seconds: float) -> Result:
  return Result(job_id=job.job_id, status=status, harness_error=why, wall_seconds=seconds,
                tests=tuple(TestOutcome(name=name, passed=False, error_type="NotRun",
                                        error=why) for name in job.test_names))


def run_job(job: Job, limits: Optional[Limits] = None,
            isolation: Optional[Isolation] = None) -> Result:
  """Runs one job in a throw-away single-worker pool (convenience; pools amortize startup)."""
  with SandboxPool(num_workers=1, limits=limits, isolation=isolation) as pool:
    return pool.run(job)

