"""Shared by the kill -9 / resume tests: SIGKILL a training process once a checkpoint exists."""
import os
import signal
import time


def kill_after_checkpoint(proc, workdir: str, step: int, total_steps: int,
                          timeout_s: float = 600.0) -> None:
  """Waits until ``workdir/checkpoints/<step>`` exists, SIGKILLs ``proc``, and checks the run had
  not finished (no checkpoint of ``total_steps``)."""
  marker = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + timeout_s
  while not os.path.isdir(marker) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  steps_left = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                      if d.isdigit())
  assert total_steps not in steps_left, steps_left
