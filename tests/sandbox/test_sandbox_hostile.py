"""Hostile programs: each is contained, reported as a structured Result, and leaves the host,
this test process and the pool intact (the pool fixture runs an honest job after every test)."""
import dataclasses
import errno
import glob
import logging
import os
import secrets
import signal
import socket
import textwrap

import pytest

from kat_jax.sandbox import CallTest, CodeTest, Isolation, Job, SandboxPool
from sandbox_helpers import TIGHT_LIMITS, pool, processes_of_uid  # noqa: F401 (fixture)

_HONEST = Job(program="def probe():\n  return 'alive'\n",
              tests=(CallTest("probe", "probe", expected="alive"),))


@pytest.fixture(autouse=True)
def pool_still_works(pool):  # noqa: F811
  yield
  result = pool.run(_HONEST)
  assert result.passed, f"the pool no longer runs honest jobs: {result}"


def _run(pool, program, *tests, **job_args):  # noqa: F811
  tests = tests or (CallTest("probe", "probe", expected="alive"),)
  result = pool.run(Job(program=textwrap.dedent(program), tests=tests, **job_args))
  assert result.isolation.get("namespaces") and result.isolation.get("chroot") and (
      result.isolation.get("uid") is not None), f"full isolation not granted: {result.isolation}"
  assert processes_of_uid(result.isolation["uid"]) == [], "processes survived the job"
  return result


def test_fork_bomb_is_stopped_by_the_process_limit_and_cleaned_up(pool):  # noqa: F811
  result = _run(pool, """
      import os, time
      error = None
      while error is None:
        try:
          if os.fork() == 0:
            while True:  # every child keeps trying too
              try:
                os.fork()
              except OSError:
                time.sleep(0.01)
        except OSError as e:
          error = e.errno
      time.sleep(0.3)
      # /proc is this job's own pid namespace: it lists exactly the job's processes.
      running = len([entry for entry in os.listdir("/proc") if entry.isdigit()])
      def probe():
        return [error, running]
      """, CallTest("probe", "probe", expected=[11, TIGHT_LIMITS.max_processes]))  # EAGAIN
  assert result.status == "completed"
  assert result.tests[0].passed, result.tests[0]


def test_unbounded_fork_bomb_times_out_and_leaves_nothing(pool):  # noqa: F811
  result = _run(pool, """
      import os
      while True:
        try:
          os.fork()
        except OSError:
          pass
      """, limits=dataclasses.replace(TIGHT_LIMITS, wall_time_s=1.5))
  assert result.status == "timeout" and result.killed_by == "wall_time"
  assert not result.passed and result.tests[0].error_type == "Timeout"
  assert result.wall_seconds < 1.5 + 3.0


def test_memory_bomb_gets_memory_error_within_the_address_space_limit(pool):  # noqa: F811
  result = _run(pool, """
      hoard = []
      while True:
        hoard.append(bytearray(16 << 20))
      """)
  assert result.status == "load_error" and result.load_error_type == "MemoryError"
  assert result.program_max_rss_kb * 1024 <= TIGHT_LIMITS.memory_bytes


def test_single_huge_allocation_is_refused(pool):  # noqa: F811
  result = _run(pool, "block = bytearray(8 << 30)\n")
  assert result.load_error_type == "MemoryError"


def test_infinite_loop_is_killed_by_the_cpu_limit(pool):  # noqa: F811
  # A generous wall clock: on a loaded machine 1 CPU second can take several wall seconds.
  limits = dataclasses.replace(TIGHT_LIMITS, cpu_time_s=1, wall_time_s=15.0)
  result = _run(pool, """
      def probe():
        while True:
          pass
      """, limits=limits)
  assert result.status == "crashed" and result.killed_by == "cpu_time", result
  assert result.program_cpu_seconds >= 0.85 * limits.cpu_time_s
  assert result.tests[0].error_type == "ProgramDied"


def test_sleeping_past_the_timeout_is_killed_by_the_wall_clock(pool):  # noqa: F811
  result = _run(pool, """
      import time
      def probe():
        time.sleep(60)
        return 'alive'
      """)
  assert result.status == "timeout" and result.killed_by == "wall_time" and result.timed_out
  assert result.tests[0].error_type == "Timeout"
  assert TIGHT_LIMITS.wall_time_s - 0.5 < result.wall_seconds < TIGHT_LIMITS.wall_time_s + 3.0


def test_disk_fill_hits_file_size_and_tmpfs_limits_and_leaves_no_trace(pool):  # noqa: F811
  marker = f"kat_fill_{secrets.token_hex(6)}"
  result = _run(pool, f"""
      import errno, os
      def probe():
        outcomes = []
        try:
          with open("{marker}_big", "wb") as f:
            f.write(b"x" * (8 << 20))
        except OSError as e:
          outcomes.append(e.errno)
        written = 0
        try:
          for i in range(100):
            with open(f"{marker}_{{i}}", "wb") as f:
              f.write(b"y" * (512 << 10))
              f.flush()
            written += 1
        except OSError as e:
          outcomes.append(e.errno)
        return [outcomes, written < 100]
      """, CallTest("probe", "probe", expected=[[27, 28], True]))  # EFBIG, ENOSPC
  assert result.tests[0].passed, result.tests[0]
  assert glob.glob(f"/tmp/**/{marker}*", recursive=True) == []


def test_100mb_of_output_is_capped_and_the_job_killed(pool):  # noqa: F811
  result = _run(pool, """
      import sys
      def probe():
        sys.stdout.write("x" * 100_000_000)
        sys.stdout.flush()
        return 'alive'
      """)
  assert result.status == "output_limit" and result.killed_by == "output"
  assert not result.passed
  assert len(result.stdout) == TIGHT_LIMITS.capture_bytes and result.stdout_truncated
  assert result.output_bytes > TIGHT_LIMITS.output_bytes


def _listening_socket():
  listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  listener.bind(("127.0.0.1", 0))
  listener.listen(8)
  listener.setblocking(False)
  return listener


_CONNECT = """
    import socket
    def probe():
      try:
        socket.create_connection(("127.0.0.1", {port}), timeout=1).close()
        return "connected"
      except OSError as e:
        return e.errno
    """


def _accepted(listener) -> bool:
  try:
    listener.accept()[0].close()
    return True
  except BlockingIOError:
    return False


def test_network_is_unreachable_even_on_loopback(pool):  # noqa: F811
  with _listening_socket() as listener:
    port = listener.getsockname()[1]
    result = _run(pool, _CONNECT.format(port=port),
                  CallTest("probe", "probe", expected=errno.ENETUNREACH))
    assert result.passed, result.tests[0]  # the loopback of a fresh namespace is down
    assert not _accepted(listener)


def test_network_check_is_sensitive_without_namespaces(caplog):
  """Control for the test above: the same program connects when namespaces are disabled. Also
  the fallback's contract: degraded isolation is logged and reported, the host temporary
  directory that replaces the private root is removed afterwards."""
  # (Without namespaces and with a private uid, /root/.pyenv's stdlib would be unreadable here.)
  isolation = Isolation(namespaces=False, drop_privileges=False)
  with _listening_socket() as listener, caplog.at_level(logging.WARNING), SandboxPool(
      num_workers=1, limits=TIGHT_LIMITS, isolation=isolation) as fallback:
    port = listener.getsockname()[1]
    program = textwrap.dedent(_CONNECT.format(port=port)) + "import os\nprint(os.getcwd())\n"
    result = fallback.run(Job(program=program,
                              tests=(CallTest("probe", "probe", expected="connected"),)))
    assert result.passed, result
    assert _accepted(listener)
  workdir = result.stdout.strip()
  assert workdir.startswith("/tmp/kat_sandbox_") and not os.path.exists(workdir)
  assert result.isolation["namespaces"] is False and result.isolation["notes"]
  assert "sandbox isolation degraded" in caplog.text  # the fallback is logged


def test_parent_environment_is_invisible(pool, monkeypatch):  # noqa: F811
  secret = secrets.token_hex(16)
  monkeypatch.setenv("KAT_SANDBOX_SECRET", secret)
  with SandboxPool(num_workers=1, limits=TIGHT_LIMITS) as fresh:  # a zygote started after setenv
    result = fresh.run(Job(program=textwrap.dedent(f"""
        import os
        def probe():
          leaks = [dict(os.environ)]
          for pid in ({os.getpid()}, {os.getppid()}, 1):
            try:
              leaks.append(open(f"/proc/{{pid}}/environ", "rb").read().decode(errors="replace"))
            except OSError as e:
              leaks.append(type(e).__name__)
          return leaks
        """), exports=("probe",), tests=(CodeTest("probe", textwrap.dedent(f"""
        leaks = probe()
        assert leaks[0] == {{"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
                            "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}}
        assert "{secret}" not in repr(leaks) and "KAT_SANDBOX_SECRET" not in repr(leaks)
        """)),)))
  # The check ran in the judge: the secret was in the test code, never in the program's process.
  assert result.passed, result.tests[0]


def test_writes_outside_the_private_tmp_fail_and_leave_nothing(pool, tmp_path):  # noqa: F811
  tmp_path.chmod(0o777)  # writable by anyone on the host: only the sandbox can stop the write
  name = f"kat_escape_{secrets.token_hex(6)}"
  # The program's own /tmp is private (a tmpfs of the job): writing there works and stays there.
  targets = [f"/tmp/{name}", str(tmp_path / name), f"/usr/{name}", f"/etc/{name}",
             os.path.join(os.path.dirname(os.path.abspath(__file__)), name)]
  try:
    result = _run(pool, f"""
        def probe():
          outcomes = []
          for path in {targets!r}:
            try:
              with open(path, "w") as f:
                f.write("escaped")
              outcomes.append("written")
            except OSError as e:
              outcomes.append(type(e).__name__)
          return outcomes
        """, CodeTest("probe", "outcomes = probe()\nassert outcomes[0] == 'written'\n"
                                 "assert 'written' not in outcomes[1:], outcomes"),
                  exports=("probe",))
    assert result.passed, result.tests[0]
  finally:
    leftovers = [path for path in targets if os.path.exists(path)]
    for path in leftovers:
      os.remove(path)
  assert leftovers == []
  # The job's own /tmp (a private tmpfs) is gone with the job.
  assert glob.glob(f"/tmp/**/{name}", recursive=True) == []


def test_killing_the_parent_and_the_test_process_does_not_reach_them(pool):  # noqa: F811
  zygote_pid = pool._zygote._process.pid
  result = _run(pool, f"""
      import os, signal
      def probe():
        for pid in (os.getppid(), {os.getpid()}, {zygote_pid}):
          try:
            os.kill(pid, signal.SIGKILL)
          except OSError:
            pass
        return 'alive'
      """)
  assert result.status in ("completed", "crashed")  # killing itself is its own business
  os.kill(os.getpid(), 0)
  os.kill(zygote_pid, 0)  # still running (raises ProcessLookupError otherwise)
  assert pool._zygote.alive()


def test_segfault_is_a_crash_with_its_signal(pool):  # noqa: F811
  result = _run(pool, """
      import ctypes
      def probe():
        return ctypes.string_at(0)
      """)
  assert result.status == "crashed" and result.killed_by == "signal SIGSEGV"


def test_malformed_program_is_a_load_error(pool):  # noqa: F811
  result = _run(pool, "def probe(:\n  return 1\n")
  assert result.status == "load_error" and result.load_error_type == "SyntaxError"
  assert result.tests[0].error_type == "ProgramLoadError"


def test_zygote_death_is_survived(pool):  # noqa: F811
  os.kill(pool._zygote._process.pid, signal.SIGKILL)
  pool._zygote._process.wait()
  assert pool.run(_HONEST).passed
