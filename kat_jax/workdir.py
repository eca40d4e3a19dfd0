"""The layout of a run's working directory, named in one place.

    WORKDIR/
      checkpoints/<step>/     Orbax checkpoints (train state + the driving loop's JSON state)
      tokenizer/              the tokenizer the run trained or imported (tokenizer.model, ...)
      tb/                     TensorBoard event files
      eval/step_<N>.json      evaluation reports (experiments.eval)
      model_config.json       config.model of a params-only checkpoint (experiments.convert)
      hf_config.json          the source config.json of an imported Hugging Face checkpoint
      lock.json               held by the one trainer writing this workdir (``WorkdirLock``)

Every module that reads or writes one of these goes through the functions here.

``WorkdirLock(workdir).acquire()`` claims the workdir for one trainer (process 0 of a multi-host
job: the lock is per workdir, not per process). A second trainer is refused at once with
``WorkdirLockedError`` naming the holder (pid, host, start time, last heartbeat). A lock is stale —
taken over with a warning — when its holder was on this host and that process is gone (or its pid
now belongs to another process), or when its heartbeat (the file's mtime, touched every
``heartbeat_s`` by a daemon thread) is older than ``stale_after_s``. The file is created by
``link(2)`` of a fully written temporary file (atomic: two trainers cannot both create it), and a
takeover runs under an ``flock`` so two trainers cannot both take over the same stale lock.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

from absl import logging

from kat_jax.errors import WorkdirLockedError

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"
TENSORBOARD = "tb"
EVAL = "eval"
MODEL_CONFIG_FILENAME = "model_config.json"
HF_CONFIG_FILENAME = "hf_config.json"
TOKENIZER_MODEL_FILENAME = "tokenizer.model"
LOCK_FILENAME = "lock.json"
HEARTBEAT_S = 10.0       # the holder touches its lock file this often
STALE_AFTER_S = 120.0    # a lock whose heartbeat is older than this is stale (holder on any host)


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS)


def tokenizer_dir(workdir: str) -> str:
  return os.path.join(workdir, TOKENIZER)


def tensorboard_dir(workdir: str) -> str:
  return os.path.join(workdir, TENSORBOARD)


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, EVAL)


def model_config_path(workdir: str) -> str:
  return os.path.join(workdir, MODEL_CONFIG_FILENAME)


def hf_config_path(workdir: str) -> str:
  return os.path.join(workdir, HF_CONFIG_FILENAME)


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_FILENAME)


def has_saved_tokenizer(workdir: str) -> bool:
  return os.path.exists(os.path.join(tokenizer_dir(workdir), TOKENIZER_MODEL_FILENAME))


def find_tokenizer_dir(workdir: str, config) -> str:
  """``WORKDIR/tokenizer`` if it holds a tokenizer, else ``config.data.tokenizer_path``, else the one
  tokenizer cached under ``WORKDIR/tokenizer/<fingerprint>`` by mid-training."""
  root = tokenizer_dir(workdir)
  if has_saved_tokenizer(workdir):
    return root
  path = config.data.tokenizer_path if "data" in config and "tokenizer_path" in config.data else ""
  if path:
    return path
  cached = sorted(d for d in (os.listdir(root) if os.path.isdir(root) else ())
                  if os.path.exists(os.path.join(root, d, TOKENIZER_MODEL_FILENAME)))
  if len(cached) == 1:
    return os.path.join(root, cached[0])
  raise FileNotFoundError(
      f"no tokenizer for {workdir!r}: expected {root}/{TOKENIZER_MODEL_FILENAME} (saved by "
      f"training), config.data.tokenizer_path, or exactly one cached tokenizer under {root}/ (found "
      f"{len(cached)}); the synthetic stage trains none — save one there first")


# ----------------------------------------------------------------------------------- lock

def _process_start_ticks(pid: int) -> Optional[int]:
  """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _pid_alive(pid: int, start_ticks: Optional[int]) -> bool:
  """Whether ``pid`` runs on this host and is the same process (its start time matches)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  now = _process_start_ticks(pid)
  return start_ticks is None or now is None or now == start_ticks


class WorkdirLock:
  """The exclusive claim of one trainer on ``workdir`` (see the module docstring)."""

  def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S):
    self.path = lock_path(os.path.abspath(workdir))
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self._token: Optional[str] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  @property
  def held(self) -> bool:
    return self._token is not None

  def holder(self) -> Optional[dict]:
    """The lock file's record plus ``heartbeat_age_s``; None if there is no lock file. A file
    that cannot be parsed (a crash mid-write is impossible, but a hand edit is not) reads as a
    record without pid."""
    try:
      with open(self.path) as f:
        text = f.read()
      age = time.time() - os.stat(self.path).st_mtime
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
      if not isinstance(record, dict):
        raise ValueError(record)
    except ValueError:
      record = {"unparsable": text[:200]}
    record["heartbeat_age_s"] = age
    return record

  def _stale_reason(self, record: dict) -> Optional[str]:
    """Why ``record``'s holder no longer holds the workdir, or None if it is live."""
    if record["heartbeat_age_s"] > self.stale_after_s:
      return f"no heartbeat for {record['heartbeat_age_s']:.0f} s (> {self.stale_after_s:.0f} s)"
    if "unparsable" in record:
      return None
    if record.get("host") == socket.gethostname() and not _pid_alive(
        int(record.get("pid", -1)), record.get("pid_start_ticks")):
      return f"process {record.get('pid')} on this host is gone"
    return None

  @staticmethod
  def describe(record: dict) -> str:
    if "unparsable" in record:
      return f"an unparsable lock file (heartbeat {record['heartbeat_age_s']:.0f} s ago)"
    return (f"pid {record.get('pid')} on host {record.get('host')}, started "
            f"{record.get('start_time')}, last heartbeat {record['heartbeat_age_s']:.0f} s ago")

  def _create(self, record: dict) -> bool:
    """Creates the lock file holding ``record`` atomically; False if it already exists."""
    tmp = f"{self.path}.{record['token']}.tmp"
    with open(tmp, "w") as f:
      json.dump(record, f)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    finally:
      os.unlink(tmp)

  def acquire(self) -> None:
    """Claims the workdir or raises ``WorkdirLockedError`` naming the live holder."""
    if self.held:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "pid_start_ticks": _process_start_ticks(os.getpid()), "token": uuid.uuid4().hex}
    if not self._create(record):
      with open(self.path + ".guard", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
          if not self._create(record):
            current = self.holder()
            reason = self._stale_reason(current) if current is not None else "it vanished"
            if reason is None:
              raise WorkdirLockedError(
                  f"workdir {os.path.dirname(self.path)} is in use by another trainer: "
                  f"{self.describe(current)} (lock file {self.path}). Wait for it to finish or "
                  f"stop it, or use another --workdir; a dead holder's lock is taken over "
                  f"automatically (on another host after {self.stale_after_s:.0f} s without "
                  f"heartbeat)")
            if current is not None:
              logging.warning("taking over the stale lock of workdir %s (%s): %s",
                              os.path.dirname(self.path), self.describe(current), reason)
              os.unlink(self.path)
            if not self._create(record):
              raise WorkdirLockedError(f"workdir {os.path.dirname(self.path)}: another trainer "
                                       f"took the lock first ({self.path})")
        finally:
          fcntl.flock(guard, fcntl.LOCK_UN)
    self._token = record["token"]
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        os.utime(self.path)
      except OSError:
        pass   # the workdir went away; the owner finds out on its next write

  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if it is still ours."""
    if not self.held:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    record = self.holder()
    if record is not None and record.get("token") == self._token:
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass
    self._token = None
