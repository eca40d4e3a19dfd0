"""Run-level faults: a second trainer on a workdir is refused at once naming the holder (a stale
lock is taken over with a warning); a full disk stops the run at the failed save with one line and
a restart in place resumes; a kill -9 in the middle of a save leaves nothing that restore picks up,
and the restarted run ends bitwise equal to an uninterrupted one."""
import contextlib
import errno
import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kat_jax import workdir as workdir_lib
from kat_jax.errors import CheckpointWriteError, WorkdirLockedError
from kat_jax.train.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_faults_checkpoint import assert_bitwise, tiny_config, train_steps  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------ lock

def _write_lock(workdir, **record):
  os.makedirs(workdir, exist_ok=True)
  record = {"pid": 1, "host": socket.gethostname(), "start_time": "2020-01-01T00:00:00+00:00",
            "pid_start_ticks": None, "token": "someone-else", **record}
  with open(workdir_lib.lock_path(workdir), "w") as f:
    json.dump(record, f)


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_a_second_lock_is_refused_naming_the_holder_and_released_locks_are_free(tmp_path):
  first, second = workdir_lib.WorkdirLock(str(tmp_path)), workdir_lib.WorkdirLock(str(tmp_path))
  first.acquire()
  record = first.holder()
  assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
  with pytest.raises(WorkdirLockedError) as info:
    second.acquire()
  message = str(info.value)
  assert (f"pid {os.getpid()} on host {socket.gethostname()}, started {record['start_time']}"
          in message)
  assert workdir_lib.lock_path(str(tmp_path)) in message
  first.release()
  assert not os.path.exists(workdir_lib.lock_path(str(tmp_path)))
  second.acquire()
  second.release()


@pytest.mark.parametrize("record, why", [
    (dict(pid="dead"), "is gone"),                                   # dead pid on this host
    (dict(pid=os.getpid(), pid_start_ticks=1), "is gone"),           # pid reused by another process
    (dict(host="another-host", pid=4242, age_s=500), "no heartbeat for"),   # other host, old beat
])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog, record, why):
  record = dict(record)
  age = record.pop("age_s", 0)
  if record.get("pid") == "dead":
    record["pid"] = _dead_pid()
  _write_lock(str(tmp_path), **record)
  if age:
    old = time.time() - age
    os.utime(workdir_lib.lock_path(str(tmp_path)), (old, old))
  lock = workdir_lib.WorkdirLock(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  assert lock.holder()["pid"] == os.getpid()
  warning = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
  assert len(warning) == 1 and why in warning[0] and f"pid {record['pid']}" in warning[0]
  lock.release()


def test_a_live_lock_on_another_host_is_refused_and_the_heartbeat_keeps_it_live(tmp_path):
  _write_lock(str(tmp_path), host="another-host", pid=4242)
  with pytest.raises(WorkdirLockedError, match="pid 4242 on host another-host"):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  os.remove(workdir_lib.lock_path(str(tmp_path)))
  holder = workdir_lib.WorkdirLock(str(tmp_path), heartbeat_s=0.05)
  holder.acquire()
  old = time.time() - 1000
  os.utime(workdir_lib.lock_path(str(tmp_path)), (old, old))
  time.sleep(0.3)
  assert holder.holder()["heartbeat_age_s"] < 5      # touched again by the heartbeat thread
  holder.release()


def test_two_trainers_on_one_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  first = Trainer(tiny_config(), workdir)
  start = time.perf_counter()
  with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()} on host"):
    Trainer(tiny_config(), workdir)
  assert time.perf_counter() - start < 5.0           # at once, not after a barrier timeout
  reader = Trainer(tiny_config(), workdir, lock=False)   # read-only beside the live run
  with pytest.raises(RuntimeError, match="read-only"):
    reader.save(force=True)
  reader.close()
  # The CLI: refused at once, the last line names the holder; no library noise.
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=configs/synthetic_tiny.py",
       f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: WorkdirLockedError: workdir {workdir} is in use by another "
                         f"trainer: pid {os.getpid()} on host {socket.gethostname()}"), last
  assert "absl:" not in proc.stderr and "Traceback" in proc.stderr
  first.close()
  second = Trainer(tiny_config(), workdir)            # free once the first one closed
  second.close()


# ------------------------------------------------------------------------------ disk full

@contextlib.contextmanager
def small_disk(path, size="2m"):
  """A ``size`` tmpfs at ``path`` (as root), else None: the caller then injects ENOSPC."""
  os.makedirs(path, exist_ok=True)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                           capture_output=True).returncode == 0
  try:
    yield mounted
  finally:
    if mounted:
      subprocess.run(["umount", "-l", path], check=True)


def _inject_enospc(monkeypatch, after_saves=1):
  """Every save after the first ``after_saves`` starts a partial directory, then fails ENOSPC."""
  real, calls = ocp.CheckpointManager.save, []

  def save(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) <= after_saves:
      return real(self, step, *args, **kwargs)
    os.makedirs(os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp"))
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_stops_the_run_at_the_failed_save_and_a_restart_resumes(
    tmp_path, monkeypatch, async_save):
  disk = str(tmp_path / "disk")
  with small_disk(disk) as mounted:
    if not mounted:
      _inject_enospc(monkeypatch)
    workdir = os.path.join(disk, "run")
    config = tiny_config(steps=10, async_checkpoint=async_save)
    trainer = Trainer(config, workdir)
    with pytest.raises(CheckpointWriteError) as info:
      train_steps(trainer, config, workdir, 10)
    stopped_at = trainer.step_count
    trainer.close()
    message = str(info.value)
    failed = int(message.split("checkpoint save of step ")[1].split()[0])
    good = int(message.split("the last good checkpoint is step ")[1].split()[0])
    assert 1 <= good < failed < 10
    assert (f"to {workdir}/checkpoints/{failed} failed: [Errno 28] No space left on device"
            in message)
    assert f"({workdir}/checkpoints/{good})" in message and "restart in place" in message
    # Stopped at once: the failed save's step, or (async) the one running while it was written.
    assert stopped_at <= failed + (1 if async_save else 0)
    assert not glob.glob(f"{workdir}/checkpoints/*orbax-checkpoint-tmp*")
    assert max(int(d) for d in os.listdir(f"{workdir}/checkpoints") if d.isdigit()) == good
    monkeypatch.undo()
    restarted = Trainer(config, workdir)
    restarted.close()
    assert restarted.restored_step == good


def test_the_cli_ends_a_disk_full_run_with_one_line(tmp_path):
  # The run gets its own mount namespace (unshare: no root needed where user namespaces are
  # allowed) with a 2 MB tmpfs as the workdir's disk.
  disk = str(tmp_path / "disk")
  os.makedirs(disk)
  workdir = os.path.join(disk, "run")
  model = dict(vocab_size=256, d_model=32, num_layers=1, num_heads=8, num_kv_heads=4,
               head_dim=8, mlp_dim=64)
  command = [sys.executable, "-m", "experiments.main", "--config=configs/synthetic_tiny.py",
             f"--workdir={workdir}", "--config.train.steps=10", "--config.train.checkpoint_every=1",
             "--config.train.keep_checkpoints=10", "--config.train.eval_every=0",
             "--config.train.seq_len=16", "--config.train.progress_bar=False",
             "--config.train.log_every=1", "--config.train.warmup_steps=1",
             *[f"--config.model.{k}={v}" for k, v in model.items()]]
  proc = subprocess.run(
      ["unshare", "--mount", "--map-root-user", "sh", "-c",
       f'mount -t tmpfs -o size=2m tmpfs "{disk}" && exec "$0" "$@"', *command],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: CheckpointWriteError: checkpoint save of step "), last
  assert "No space left on device" in last and "the last good checkpoint is step " in last
  failed = int(last.split("checkpoint save of step ")[1].split()[0])
  trained = [int(line.split()[1]) for line in proc.stdout.splitlines()
             if line.startswith("step ") and " train: " in line]
  assert max(trained) <= failed + 1, trained          # no training on past the failed save
  # The traceback above it, and no Orbax / TensorStore log records (not ~1,900 lines of them).
  assert "absl:" not in proc.stderr and "[process=" not in proc.stderr, proc.stderr[-3000:]
  assert "Event loop is closed" not in proc.stderr
  assert len(proc.stderr.splitlines()) < 300


# ------------------------------------------------------------------------- kill during save

KILL_STEPS = 10
DRIVER_FLAGS = [f"--config.train.steps={KILL_STEPS}", "--config.train.checkpoint_every=1",
                "--config.train.eval_every=0", "--config.train.progress_bar=False",
                "--config.train.seq_len=64", "--config.train.log_every=1",
                "--config.train.warmup_steps=2", "--config.train.keep_checkpoints=20"]


def _driver(workdir):
  return subprocess.Popen([sys.executable, "tests/train/trainer_driver.py", workdir, *DRIVER_FLAGS],
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _driver_config():
  from configs import synthetic_tiny
  c = synthetic_tiny.get_config()
  c.train.update(dict(steps=KILL_STEPS, checkpoint_every=1, eval_every=0, progress_bar=False,
                      seq_len=64, log_every=1, warmup_steps=2, keep_checkpoints=20))
  return c


def kill_during_save(proc, workdir, min_step=3, timeout_s=600.0):
  """SIGKILLs ``proc`` the moment a save of a step >= ``min_step`` is in flight (its
  ``<step>.orbax-checkpoint-tmp`` directory exists); returns that step, or None if every save
  finished between two polls."""
  ckpt = os.path.join(workdir, "checkpoints")
  deadline = time.time() + timeout_s
  while proc.poll() is None and time.time() < deadline:
    try:
      names = os.listdir(ckpt)
    except FileNotFoundError:
      names = []
    partial = [int(n.split(".")[0]) for n in names if ".orbax-checkpoint-tmp" in n]
    if partial and max(partial) >= min_step:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
      return max(partial)
    time.sleep(0.001)
  raise AssertionError("the run finished before a save could be interrupted")


@pytest.mark.slow
def test_a_kill_during_a_save_is_never_restored_and_the_run_resumes_exactly(tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  p = _driver(straight)
  _, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]

  proc = _driver(killed)
  in_flight = kill_during_save(proc, killed)
  assert proc.returncode == -signal.SIGKILL
  complete = sorted(int(d) for d in os.listdir(f"{killed}/checkpoints") if d.isdigit())
  assert in_flight not in complete and max(complete) < in_flight
  # What a restart would restore: the newest complete step, never the interrupted one.
  probe = Trainer(_driver_config(), killed, lock=False)
  reference = Trainer(_driver_config(), straight, restore_step=max(complete), lock=False)
  probe.close(), reference.close()
  assert probe.restored_step == max(complete)
  assert_bitwise(probe.state, reference.state)
  # The restart cleans the partial save up and ends bitwise equal to the uninterrupted run.
  p = _driver(killed)
  _, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  assert not glob.glob(f"{killed}/checkpoints/*orbax-checkpoint-tmp*")
  a = Trainer(_driver_config(), straight, lock=False)
  b = Trainer(_driver_config(), killed, lock=False)
  a.close(), b.close()
  assert a.restored_step == b.restored_step == KILL_STEPS
  assert_bitwise(a.state, b.state)
  loop_a, loop_b = a.extra_state["loop"], b.extra_state["loop"]
  assert loop_a["curriculum"] == loop_b["curriculum"]
  np.testing.assert_array_equal(loop_a["returns"], loop_b["returns"])
  np.testing.assert_array_equal(jax.random.key_data(loop_a["rng"]),
                                jax.random.key_data(loop_b["rng"]))
