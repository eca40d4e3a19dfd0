"""Faults of the sandbox's own machinery, injected: fork failure in the zygote, the zygote dying
mid-spawn (before and after it forked the judge), the judge dying mid-test or exiting without a
verdict. Each becomes the right status with the right per-test outcomes, leaves no process
behind, and the pool keeps running honest jobs.

Injection: the pool starts its zygote from ``pool._BOOT``; this module's pool boots a zygote that
first runs ``_FAULTS`` (below), which wraps ``os.fork`` and two judge functions. Every fault is
one-shot and armed by creating a marker file named after it: the zygote (and only the zygote)
removes the marker at its next fork and injects the fault there, or — for judge faults — marks
the judge it forks as doomed. Restarted zygotes boot the same way, so an armed fault hits exactly
one spawn whichever zygote serves it.
"""
import dataclasses
import os
import signal
import time

import pytest

from kat_jax.sandbox import CallTest, Job, SandboxPool
from kat_jax.sandbox import pool as pool_lib
from sandbox_helpers import TIGHT_LIMITS, processes_of_uid

_FAULTS = r'''
import errno, os, signal
from kat_jax.sandbox import judge as _judge

_MARKERS = {markers!r}
_ZYGOTE = os.getpid()
_real_fork = os.fork
_doomed = []          # in a judge: the judge fault it was forked with

def _take(kind):
    """True once per arming, and only in the zygote itself."""
    if os.getpid() != _ZYGOTE:
        return False
    try:
        os.remove(os.path.join(_MARKERS, kind))
        return True
    except FileNotFoundError:
        return False

def _fork():
    if _take("fork_fails"):
        raise OSError(errno.EAGAIN, "injected: fork refused")
    if _take("zygote_dies_before_fork") or _take("zygote_dies_again"):
        os._exit(1)
    dies_after = _take("zygote_dies_after_fork")
    judge_fault = [k for k in ("judge_killed_mid_test", "judge_exits_without_end") if _take(k)]
    pid = _real_fork()
    if pid == 0:
        _doomed[:] = judge_fault
    elif dies_after:
        os._exit(1)   # the judge now runs, holding this job's five descriptors
    return pid

os.fork = _fork

_real_call_test = _judge._run_call_test
def _call_test(program, test):
    if "judge_killed_mid_test" in _doomed and test["name"] == "second":
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_call_test(program, test)
_judge._run_call_test = _call_test

_real_finish = _judge._finish
def _finish(state):
    if "judge_exits_without_end" in _doomed:
        os._exit(0)   # tests reported, program still alive, no "end" event
    return _real_finish(state)
_judge._finish = _finish
'''

_PROGRAM = "import time\ndef f(x):\n  return x + 1\ndef slow(x):\n  time.sleep(x)\n  return x\n"
_TWO_TESTS = (CallTest("first", "f", (1,), 2), CallTest("second", "f", (2,), 3))
_HONEST = Job(program=_PROGRAM, tests=_TWO_TESTS, job_id="honest")


@pytest.fixture(scope="module")
def markers(tmp_path_factory):
  return str(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def faulty_pool(markers):
  boot = ("import sys; sys.path.insert(0, sys.argv[1]); exec(" + repr(
      _FAULTS.format(markers=markers)) + "); from kat_jax.sandbox import zygote; "
      "zygote.main(int(sys.argv[2]))")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pool_lib, "_BOOT", boot)
    with SandboxPool(num_workers=1, limits=TIGHT_LIMITS) as pool:
      yield pool


def _arm(markers, kind):
  open(os.path.join(markers, kind), "w").close()


def _zygote_processes(markers) -> list[int]:
  """Host pids started from this module's boot: the zygote, its judges, orphans of dead ones."""
  found = []
  for entry in os.scandir("/proc"):
    if entry.name.isdigit():
      try:
        with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
          if markers.encode() in cmdline.read():
            found.append(int(entry.name))
      except OSError:
        continue
  return found


def _settle(predicate, patience_s=5.0):
  deadline = time.monotonic() + patience_s
  while not predicate() and time.monotonic() < deadline:
    time.sleep(0.02)
  return predicate()


@pytest.fixture(autouse=True)
def pool_survives(faulty_pool, markers):
  """After every fault: nothing armed is left, an honest job passes, and only the one live
  zygote of this pool remains (no orphaned judge)."""
  yield
  assert os.listdir(markers) == [], "an armed fault was never hit"
  result = faulty_pool.run(_HONEST)
  assert result.passed and result.status == "completed", result
  zygote = faulty_pool._zygote._process.pid
  assert _settle(lambda: _zygote_processes(markers) == [zygote]), _zygote_processes(markers)


def _not_run(result, names=("first", "second")):
  for name in names:
    outcome = next(t for t in result.tests if t.name == name)
    assert not outcome.passed and outcome.error_type == "NotRun", outcome


def test_fork_failure_is_a_harness_error(faulty_pool, markers):
  _arm(markers, "fork_fails")
  result = faulty_pool.run(Job(program=_PROGRAM, tests=_TWO_TESTS, job_id="fork"))
  assert result.status == "harness_error" and not result.passed
  assert "could not fork" in result.harness_error and "Resource temporarily unavailable" in (
      result.harness_error), result.harness_error
  _not_run(result)
  assert result.job_id == "fork" and result.killed_by is None


@pytest.mark.parametrize("fault", ["zygote_dies_before_fork", "zygote_dies_after_fork"])
def test_zygote_death_mid_spawn_is_retried_on_a_fresh_zygote(faulty_pool, markers, fault):
  dead = faulty_pool._zygote._process.pid
  _arm(markers, fault)
  result = faulty_pool.run(Job(program=_PROGRAM, tests=_TWO_TESTS, job_id=fault))
  # The job ran once, on the restarted zygote, with its own descriptors: both verdicts are real.
  assert result.status == "completed" and result.passed, result
  assert [t.name for t in result.tests] == ["first", "second"]
  assert faulty_pool._zygote._process.pid != dead and faulty_pool._zygote.alive()
  assert processes_of_uid(result.isolation["uid"]) == []


def test_zygote_dying_on_the_retry_too_is_a_harness_error(faulty_pool, markers):
  _arm(markers, "zygote_dies_before_fork")
  _arm(markers, "zygote_dies_again")      # the restarted zygote dies as well
  result = faulty_pool.run(Job(program=_PROGRAM, tests=_TWO_TESTS, job_id="twice"))
  assert result.status == "harness_error" and "zygote exited" in result.harness_error, result
  _not_run(result)


def test_judge_killed_mid_test_keeps_earlier_verdicts_and_cleans_up(faulty_pool, markers):
  _arm(markers, "judge_killed_mid_test")
  result = faulty_pool.run(Job(program=_PROGRAM, tests=_TWO_TESTS, job_id="killed"))
  assert result.status == "harness_error" and not result.passed
  assert result.harness_error.startswith("the judge exited without a verdict")
  first, second = result.tests
  assert first.passed and first.error_type is None           # reported before the judge died
  assert not second.passed and second.error_type == "NotRun"
  assert "without a verdict" in second.error
  # The program process (alive when its judge died) and anything under the job's uid are gone.
  assert _settle(lambda: processes_of_uid(result.isolation["uid"]) == [])


def test_judge_exiting_without_end_event_is_a_harness_error(faulty_pool, markers):
  _arm(markers, "judge_exits_without_end")
  job = Job(program=_PROGRAM, tests=_TWO_TESTS + (CallTest("third", "f", (0,), 5),),
            job_id="no_end")
  result = faulty_pool.run(job)
  assert result.status == "harness_error" and not result.passed
  assert result.harness_error.startswith("the judge exited without a verdict")
  # The judge's per-test verdicts stand (the wrong third answer stays failed), nothing is invented.
  assert [t.passed for t in result.tests] == [True, True, False]
  assert "returned 1, expected 5" in result.tests[2].error
  assert _settle(lambda: processes_of_uid(result.isolation["uid"]) == [])


def test_pool_statuses_count_the_faults(faulty_pool, markers):
  faulty_pool.reset_stats()
  _arm(markers, "fork_fails")
  faulty_pool.run(_HONEST)
  _arm(markers, "zygote_dies_before_fork")
  faulty_pool.run(_HONEST)
  _arm(markers, "judge_killed_mid_test")
  faulty_pool.run(_HONEST)
  assert faulty_pool.stats().statuses == {"harness_error": 2, "completed": 1}


def test_stopped_judge_is_killed_by_the_host_backstop(faulty_pool):
  """Not injected: the host's wall-time backstop against a judge that never answers. A judge
  stopped with SIGSTOP (so its own alarm cannot fire) is killed by the host after
  wall_time_s + grace; the job is a timeout and its processes are gone."""
  limits = dataclasses.replace(TIGHT_LIMITS, wall_time_s=1.0)
  future = faulty_pool.submit(Job(program=_PROGRAM, tests=(CallTest("slow", "slow", (30,), 30),),
                                  limits=limits, job_id="stopped"))
  # The judge is the zygote's child; stop it once the program runs (the call is sleeping).
  zygote = faulty_pool._zygote._process.pid

  def judges():
    with open(f"/proc/{zygote}/task/{zygote}/children") as children:
      return [int(pid) for pid in children.read().split()]

  assert _settle(lambda: bool(judges()))
  time.sleep(0.3)
  for pid in judges():
    os.kill(pid, signal.SIGSTOP)
  result = future.result()
  assert result.status == "timeout" and result.killed_by == "wall_time", result
  assert result.tests[0].error_type == "NotRun"
  assert result.wall_seconds < limits.wall_time_s + pool_lib._GRACE_S + 3.0
  assert _settle(lambda: processes_of_uid(result.isolation.get("uid") or -1) == [])
