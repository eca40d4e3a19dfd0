"""The judge process: confines one job, forks its program process, runs the tests, reports.

Forked by the zygote for each job, with its descriptors arranged as:
  0  job input from the host: two framed messages, ``program`` (the untrusted program, limits,
     isolation) then ``tests`` (trusted setup code and tests);
  1  events to the host: JSON lines ``start``, ``loaded``, ``test`` (one per test), ``end``;
  2  diagnostics (the judge's own tracebacks);
  3, 4  the program's stdout and stderr pipes (handed to the program process, closed here).

Order matters for secrecy: the program process is forked after the first message was read and
before the second, so the tests (expected values, the test code) are never in its memory; it gets
no descriptor of fd 0, 1 or 2; it runs under another uid in another pid namespace, so it cannot
read this process's memory, descriptors or /proc entry either.

The verdict is this process's alone: a test passes only if the judge itself saw it complete —
a CallTest's result rebuilt as genuine plain data and canonically equal to the expected value; a
proxy-mode CodeTest executed here, against proxies, to its end; an inline CodeTest acknowledged
with the random nonce the judge sent for that test only. Exit statuses and printed output are
never consulted. A wall-clock alarm bounds the whole job; on expiry, or once the tests are done,
the program process (pid 1 of its namespace, so all it started) is killed.

A ``DirectoryJob`` (``"kind": "directory"`` in the first message) runs the same way, with
``directory_program`` serving in the program process and ``directory_judge`` judging here.
"""
import builtins
import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback

from kat_jax.sandbox import codec
from kat_jax.sandbox import confine
from kat_jax.sandbox import directory_program
from kat_jax.sandbox import program as program_side

_SPEC_BYTES = 256 << 20
_ERROR_CHARS = 2000
ROOT_MOUNT = "/tmp"  # where the program's private root is mounted in the judge's mount namespace


class _Deadline(BaseException):
  """The job's wall-clock limit expired (BaseException: trusted test code cannot swallow it)."""


class ProgramDied(BaseException):
  """The program process exited, was killed, or broke the protocol."""


class ProxyArgumentError(TypeError):
  """A test passed a value to the program that is not plain data."""


class CandidateError(Exception):
  """The program raised an exception that is not a built-in Exception type."""


class InlineTestFailed(Exception):
  """An inline test failed in the program process, with the error it reported."""

  def __init__(self, error_type: str, message: str):
    super().__init__(message)
    self.error_type, self.message = error_type, message


def _emit(event: dict) -> None:
  try:
    os.write(1, (json.dumps(event, separators=(",", ":")) + "\n").encode())
  except OSError:
    pass  # the host is gone; keep going so the program is still killed


def _on_alarm(signum, frame):
  raise _Deadline()


class _Program:
  """The judge's handle on the program process and its request/reply pipes."""

  def __init__(self, pid: int, request_fd: int, reply_fd: int, max_bytes: int):
    self.pid = pid
    self.request_fd = request_fd
    self.reply_fd = reply_fd
    self.max_bytes = max_bytes
    self.alive = True
    self.death = None   # why the channel broke
    self.next_id = 0

  def receive(self):
    if not self.alive:
      raise ProgramDied(self.death)
    try:
      reply = codec.read_message(self.reply_fd, self.max_bytes)
    except codec.ChannelClosed:
      self._broken("the program closed its reply channel (exited or was killed)")
    except (codec.MessageTooLarge, ValueError, RecursionError) as error:
      self._broken(f"protocol violation: {str(error)[:200]}")
    if type(reply) is not dict:
      self._broken("protocol violation: a reply that is not an object")
    if reply.get("op") == "harness_error":
      self._broken("the sandbox's code in the program process crashed: "
                   f"{str(reply.get('error'))[:_ERROR_CHARS]}")
    return reply

  def send(self, message: dict) -> None:
    if not self.alive:
      raise ProgramDied(self.death)
    try:
      codec.write_message(self.request_fd, message)
    except OSError:
      self._broken("the program closed its request channel (exited or was killed)")

  def _broken(self, why: str):
    self.alive = False
    self.death = why
    raise ProgramDied(why)

  def call(self, function: str, args: tuple, kwargs: dict):
    try:
      encoded_args, encoded_kwargs = codec.encode(tuple(args)), codec.encode(dict(kwargs))
    except codec.UnsupportedValue as error:
      raise ProxyArgumentError(f"argument of {function}() cannot be sent to the program: "
                               f"{error}") from None
    self.next_id += 1
    self.send({"op": "call", "id": self.next_id, "fn": function, "args": encoded_args,
               "kwargs": encoded_kwargs})
    reply = self.receive()
    if reply.get("op") != "result" or type(reply.get("id")) is not int or (
        reply["id"] != self.next_id):
      self._broken("protocol violation: unexpected reply to a call")
    if reply.get("ok") is True:
      try:
        return codec.decode(reply.get("value"))
      except codec.MalformedValue as error:
        raise CandidateError(f"malformed result from {function}(): {error}") from None
    raise _candidate_exception(reply.get("error_type"), reply.get("error"))

  def run_inline_test(self, setup: str, code: str, exports, canonicalize: bool):
    nonce = os.urandom(16).hex()
    self.send({"op": "test", "nonce": nonce, "setup": setup, "code": code,
               "exports": list(exports), "canonicalize": canonicalize})
    reply = self.receive()
    if reply.get("op") != "test_done" or reply.get("nonce") != nonce:
      self._broken("protocol violation: inline test acknowledgement without its nonce")
    if reply.get("ok") is True:
      return
    raise InlineTestFailed(str(reply.get("error_type"))[:200],
                           str(reply.get("error"))[:_ERROR_CHARS])


def _candidate_exception(error_type, message) -> Exception:
  """An exception to raise in trusted test code for an exception the program raised."""
  error_type = str(error_type)[:200]
  message = str(message)[:_ERROR_CHARS]
  cls = builtins.__dict__.get(error_type)
  if isinstance(cls, type) and issubclass(cls, Exception):
    try:
      return cls(message)
    except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError needs five arguments
      pass
  return CandidateError(f"{error_type}: {message}")


def _make_proxy(program: _Program, name: str):
  def proxy(*args, **kwargs):
    return program.call(name, args, kwargs)

  proxy.__name__ = proxy.__qualname__ = name
  return proxy


def _describe(error: BaseException) -> tuple[str, str]:
  if isinstance(error, InlineTestFailed):
    return error.error_type, error.message
  return type(error).__name__, str(error)[:_ERROR_CHARS]


def _preview(value, limit=200) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


class _State:
  """Everything the judge learned so far; ``_finish`` turns it into the final report."""

  def __init__(self, start: float):
    self.start = start
    self.spec = None
    self.tests = None        # the judge's view of the tests, once read
    self.emitted = set()     # indices of tests whose verdict was already reported
    self.layout = None
    self.program = None
    self.status = "completed"
    self.killed_by = None
    self.timed_out = False
    self.harness_error = None

  def emit_test(self, index, passed, error_type, error, seconds) -> None:
    self.emitted.add(index)
    _emit({"e": "test", "index": index, "name": self.tests[index]["name"], "passed": passed,
           "error_type": error_type, "error": error, "seconds": seconds})

  def fail_rest(self, error_type, error) -> None:
    for index in range(len(self.tests or ())):
      if index not in self.emitted:
        self.emit_test(index, False, error_type, error, 0.0)


def main() -> None:
  """Entry point of a judge process (descriptors arranged as in the module docstring)."""
  state = _State(time.monotonic())
  try:
    try:
      _judge(state)
    except _Deadline:
      state.timed_out = True
    except BaseException:  # noqa: BLE001 - report instead of dying silently
      traceback.print_exc()
      state.harness_error = traceback.format_exc(limit=4)[-_ERROR_CHARS:]
    finally:
      signal.setitimer(signal.ITIMER_REAL, 0)
  except _Deadline:  # the one-shot alarm fired inside the finally above, before the cancel
    state.timed_out = True
  # The alarm is one-shot and has either fired or been cancelled: nothing interrupts from here.
  _finish(state)


def _judge(state: _State) -> None:
  try:
    state.spec = codec.read_message(0, _SPEC_BYTES)
  except Exception as error:  # noqa: BLE001
    state.harness_error = f"no job specification: {error}"
    return
  spec = state.spec
  signal.signal(signal.SIGALRM, _on_alarm)
  signal.setitimer(signal.ITIMER_REAL,
                   max(1e-3, spec["limits"]["wall_time_s"] - (time.monotonic() - state.start)))
  report, state.layout = _confine_judge(spec)
  # No deadline between the fork and recording the child: _finish must always find it to kill.
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
  pid, request_w, reply_r = _start_program(spec, state.layout)
  state.program = _Program(pid, request_w, reply_r, spec["limits"]["max_value_bytes"])
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
  _emit({"e": "start", "program_pid": pid, "isolation": report})
  _run_tests(state)


def _confine_judge(spec: dict) -> tuple[dict, dict]:
  """Namespaces and private root; returns the isolation report and the program's layout."""
  isolation = spec["isolation"]
  report = {"namespaces": False, "chroot": False, "uid": None, "notes": []}
  layout = {"root": None, "mount_proc": False, "workdir": None, "uid": None, "host_tmpdir": None}
  is_root = os.geteuid() == 0
  if isolation["namespaces"]:
    refused = confine.enter_namespaces()
    if refused:
      report["notes"].append(f"namespaces refused ({refused}): the program shares the host's "
                             "network, mount table and pid space")
    else:
      report["namespaces"] = True
      layout["mount_proc"] = True
  else:
    report["notes"].append("namespaces disabled by Isolation.namespaces")
  uid = spec["uid"] if (isolation["drop_privileges"] and is_root) else None
  if isolation["drop_privileges"] and not is_root:
    report["notes"].append("not root: the program keeps the host user's privileges")
  if not isolation["drop_privileges"]:
    report["notes"].append("privilege drop disabled by Isolation.drop_privileges")
  if report["namespaces"]:
    try:
      confine.build_root(ROOT_MOUNT, spec["readonly_paths"], uid if uid is not None else 0,
                         spec["limits"]["disk_bytes"], spec["limits"]["disk_inodes"])
      layout["root"] = ROOT_MOUNT
      layout["workdir"] = "/tmp"
      report["chroot"] = True
    except OSError as error:
      report["notes"].append(f"private root refused ({error}): the program sees the host's "
                             "file system")
  if layout["root"] is None:
    workdir = tempfile.mkdtemp(prefix="kat_sandbox_")
    if uid is not None:
      os.chown(workdir, uid, uid)
      stdlib = os.path.dirname(os.__file__)
      if not _traversable_by_others(stdlib):
        report["notes"].append(f"the standard library ({stdlib}) is not readable by other users: "
                               "modules the program imports that were not preloaded will fail")
    layout["workdir"] = layout["host_tmpdir"] = workdir
  layout["uid"] = report["uid"] = uid
  return report, layout


def _traversable_by_others(path: str) -> bool:
  while True:
    try:
      if not os.stat(path).st_mode & 0o001:
        return False
    except OSError:
      return False
    parent = os.path.dirname(path)
    if parent == path:
      return True
    path = parent


def _start_program(spec: dict, layout: dict) -> tuple[int, int, int]:
  request_r, request_w = os.pipe()
  reply_r, reply_w = os.pipe()
  signal.signal(signal.SIGCHLD, signal.SIG_DFL)
  pid = os.fork()
  if pid == 0:
    status = 70
    try:
      signal.setitimer(signal.ITIMER_REAL, 0)
      signal.signal(signal.SIGALRM, signal.SIG_DFL)
      signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
      signal.signal(signal.SIGINT, signal.default_int_handler)
      os.dup2(3, 1)
      os.dup2(4, 2)
      devnull = os.open("/dev/null", os.O_RDONLY)
      os.dup2(devnull, 0)
      os.dup2(request_r, program_side.REQUEST_FD)
      os.dup2(reply_w, program_side.REPLY_FD)
      os.closerange(5, _max_fd())
      if layout["root"] is None:
        os.setpgid(0, 0)  # without a pid namespace: a group the judge can kill at the end
      confine.confine_program(root=layout["root"], mount_proc=layout["mount_proc"],
                              uid=layout["uid"], limits=spec["limits"],
                              workdir=layout["workdir"])
      os.environ.clear()
      os.environ.update(confine.scrubbed_environment(layout["workdir"]))
      # Imported before the fork: the confined program process cannot import from the repository.
      serve = directory_program.serve if spec.get("kind") == "directory" else program_side.serve
      serve(spec)
      status = 0
    except BaseException:  # noqa: BLE001
      try:
        traceback.print_exc()
      except BaseException:  # noqa: BLE001
        pass
    finally:
      os._exit(status)
  os.close(request_r)
  os.close(reply_w)
  os.close(3)
  os.close(4)
  return pid, request_w, reply_r


def _max_fd() -> int:
  soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
  return soft if soft != resource.RLIM_INFINITY else 65536


def _run_tests(state: _State) -> None:
  if state.spec.get("kind") == "directory":
    from kat_jax.sandbox import directory_judge  # noqa: PLC0415 - it imports this module
    directory_judge.run_tests(state)
    return
  spec, program = state.spec, state.program
  tests_msg = codec.read_message(0, _SPEC_BYTES)
  setup, state.tests = tests_msg["setup"], tests_msg["tests"]
  exports = spec["exports"]
  inline = spec["mode"] == "inline"
  namespace = {"__name__": "__judge__", "__builtins__": builtins}
  try:
    setup_code = compile(setup, "<setup>", "exec")
    if not inline:
      exec(setup_code, namespace)  # noqa: S102 - trusted test code
  except _Deadline:
    raise
  except BaseException as error:  # noqa: BLE001
    error_type, message = _describe(error)
    state.status = "harness_error"
    state.harness_error = f"the trusted setup code raised {error_type}: {message}"
    state.fail_rest("SetupError", state.harness_error)
    return
  if not inline:
    for name in exports:
      namespace[name] = _make_proxy(program, name)

  try:
    loaded = program.receive()
    if loaded.get("op") != "loaded":
      program._broken("protocol violation: no load report")
  except ProgramDied as died:
    state.status = "crashed"
    state.fail_rest("ProgramDied", f"before loading finished: {died}")
    return
  seconds = loaded.get("seconds")
  event = {"e": "loaded", "ok": loaded.get("ok") is True,
           "seconds": seconds if type(seconds) is float else 0.0}
  if not event["ok"]:
    event["error_type"] = str(loaded.get("error_type"))[:200]
    event["error"] = str(loaded.get("error"))[:_ERROR_CHARS]
  _emit(event)
  if not event["ok"]:
    state.status = "load_error"
    state.fail_rest("ProgramLoadError", f"{event['error_type']}: {event['error']}")
    return

  for index, test in enumerate(state.tests):
    test_start = time.monotonic()
    try:
      if test["kind"] == "call":
        _run_call_test(program, test)
      elif inline:
        program.run_inline_test(setup, test["code"], exports, spec["canonicalize"])
      else:
        exec(compile(test["code"], f"<test {test['name']}>", "exec"), namespace)  # noqa: S102
      state.emit_test(index, True, None, None, time.monotonic() - test_start)
    except _Deadline:
      state.emit_test(index, False, "Timeout", "the job's wall-time limit expired",
                      time.monotonic() - test_start)
      raise
    except ProgramDied as died:
      state.status = "crashed"
      state.emit_test(index, False, "ProgramDied", str(died), time.monotonic() - test_start)
      state.fail_rest("ProgramDied", f"not run: {died}")
      return
    except BaseException as error:  # noqa: BLE001 - includes SystemExit raised by test code
      error_type, message = _describe(error)
      state.emit_test(index, False, error_type, message, time.monotonic() - test_start)


def _run_call_test(program: _Program, test: dict) -> None:
  args = codec.decode(test["args"])
  kwargs = codec.decode(test["kwargs"])
  expected = codec.decode(test["expected"])
  actual = program.call(test["function"], args, kwargs)
  if codec.canonical(actual) != codec.canonical(expected):
    raise AssertionError(f"{test['function']}(...) returned {_preview(actual)}, expected "
                         f"{_preview(expected)}")


def _finish(state: _State) -> None:
  """Kills and reaps the program, reports untested tests, emits the ``end`` event."""
  end = {"e": "end"}
  program, layout = state.program, state.layout
  if program is not None:
    crashed = state.status == "crashed"
    exited = _wait_exit(program.pid, 0.2 if crashed else 0.0)
    if not exited or layout["root"] is None:
      try:
        if layout["root"] is None:
          os.killpg(program.pid, signal.SIGKILL)  # its group: what it started, too
        else:
          os.kill(program.pid, signal.SIGKILL)  # pid 1 of its namespace: all of it dies
      except (ProcessLookupError, PermissionError):
        pass
    _, wait_status, usage = os.wait4(program.pid, 0)
    end["cpu_s"] = usage.ru_utime + usage.ru_stime
    end["max_rss_kb"] = usage.ru_maxrss
    if crashed and not state.timed_out:
      state.killed_by = (_death_cause(wait_status, usage, state.spec["limits"]) if exited
                         else "protocol_violation")
  if layout is not None and layout.get("host_tmpdir"):
    import shutil  # noqa: PLC0415 - only on the fallback path
    shutil.rmtree(layout["host_tmpdir"], ignore_errors=True)
  if state.timed_out:
    state.status, state.killed_by = "timeout", "wall_time"
    state.fail_rest("Timeout", "not run: the job's wall-time limit expired")
  elif state.harness_error is not None:
    state.status = "harness_error"
    state.fail_rest("HarnessError", state.harness_error)
  else:
    state.fail_rest("NotRun", "not run")
  end.update(status=state.status, killed_by=state.killed_by, harness_error=state.harness_error,
             seconds=time.monotonic() - state.start)
  _emit(end)


def _wait_exit(pid: int, patience_s: float) -> bool:
  """True iff ``pid`` has exited (left unreaped), polling for up to ``patience_s`` seconds."""
  deadline = time.monotonic() + patience_s
  while True:
    if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
      return True
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.002)


def _death_cause(wait_status: int, usage, limits: dict) -> str:
  if os.WIFSIGNALED(wait_status):
    signum = os.WTERMSIG(wait_status)
    # RLIMIT_CPU is enforced on the kernel's precise runtime; rusage is sampled and can read a
    # few percent lower, hence the margin (other SIGKILLs come from the judge or the host, whose
    # kills are reported as theirs).
    if signum in (signal.SIGKILL, signal.SIGXCPU) and (
        usage.ru_utime + usage.ru_stime >= 0.85 * limits["cpu_time_s"]):
      return "cpu_time"
    return f"signal {signal.Signals(signum).name}"
  return f"exit {os.WEXITSTATUS(wait_status)}"
