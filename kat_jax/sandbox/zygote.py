"""The zygote: a pristine, pre-imported interpreter that forks one judge per job.

Started once per pool by the host as ``python -I -S -c <boot> <control fd>`` (isolated mode: no
site-packages, no environment variables, no user site), so judges and programs start from the
standard library only. It never reads job contents — each request carries only five descriptors
(``socket.send_fds``): job input, events, diagnostics, program stdout, program stderr — so a
forked judge holds nothing of any other job. Forking a warm interpreter costs about a millisecond,
against ~20 ms for starting Python and importing json/ctypes per job.

Protocol on the control socket: host sends one byte ``b"S"`` with the five descriptors; the zygote
replies with a signed 8-byte pid (or ``-errno`` if fork failed). EOF on the socket ends the zygote.
The zygote is a child subreaper and ignores SIGCHLD, so judges and any orphaned program process
are reaped automatically; the host watches a judge through its events pipe and a pidfd.
"""
import fcntl
import gc
import os
import signal
import socket
import struct
import sys
import traceback

from kat_jax.sandbox import confine
from kat_jax.sandbox import directory_judge  # noqa: F401 - preloaded for directory jobs
from kat_jax.sandbox import judge

# Standard modules that generated code commonly imports: loading them once here makes them free
# for every job (copy-on-write) and part of the pristine state inline mode restores.
PRELOAD = ("abc", "array", "bisect", "cmath", "collections", "copy", "dataclasses", "datetime",
           "decimal", "enum", "fractions", "functools", "hashlib", "heapq", "io", "itertools",
           "json", "math", "numbers", "operator", "random", "re", "statistics", "string",
           "struct", "textwrap", "time", "typing", "unicodedata")
REPLY = struct.Struct(">q")
JOB_FDS = 5


def main(control_fd: int) -> None:
  for name in PRELOAD:
    __import__(name)
  # Children must not run a garbage collection over the inherited heap: it would touch (and so
  # copy) every page shared with the zygote. Frozen objects are never traversed again.
  gc.collect()
  gc.freeze()
  control = socket.socket(fileno=control_fd)
  # Orphans (a program process whose judge was killed) are re-parented here rather than to the
  # machine's init, and reaped at once like the judges: SIGCHLD is ignored.
  confine.set_child_subreaper()
  signal.signal(signal.SIGCHLD, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)   # the host's Ctrl-C is the host's business
  while True:
    try:
      message, fds, _, _ = socket.recv_fds(control, 1, JOB_FDS)
    except OSError:
      return
    if not message:
      return
    if len(fds) != JOB_FDS:
      for fd in fds:
        os.close(fd)
      control.sendall(REPLY.pack(-22))
      continue
    try:
      pid = os.fork()
    except OSError as error:
      pid = -(error.errno or 1)
    if pid == 0:
      _become_judge(control, fds)
    for fd in fds:
      os.close(fd)
    control.sendall(REPLY.pack(pid))


def _become_judge(control: socket.socket, fds: list) -> None:
  status = 0
  try:
    control.close()
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Move the five descriptors to 0..4: first above any target, then into place.
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
    for target, fd in enumerate(moved):
      os.dup2(fd, target)
    os.closerange(JOB_FDS, judge._max_fd())
    judge.main()
  except BaseException:  # noqa: BLE001
    status = 70
    try:
      traceback.print_exc()
    except BaseException:  # noqa: BLE001
      pass
  finally:
    try:
      sys.stdout.flush()
    except BaseException:  # noqa: BLE001
      pass
    os._exit(status)
