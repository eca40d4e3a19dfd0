"""A real two-process run: two local processes (jax.distributed with a localhost coordinator, gloo
CPU collectives, 4 simulated devices each) train the same config as one process with 8 devices and
end with equal params (≤1e-5); checkpoints are written and restored by both processes, including a
restart of the two-process job that resumes from the step it had saved."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multiprocess_driver as driver  # noqa: E402

from kat_jax.train import loop  # noqa: E402
from kat_jax.train.trainer import Trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes(workdir: str, max_steps: int) -> list[dict]:
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, "tests/train/multiprocess_driver.py", str(i),
                             str(port), workdir, str(max_steps)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume(tmp_path):
  workdir = str(tmp_path / "two")
  first = _run_two_processes(workdir, max_steps=3)        # stops after checkpoint 3
  assert [r["restored_step"] for r in first] == [3, 3]
  second = _run_two_processes(workdir, max_steps=driver.STEPS)   # restarts: resumes from 3
  assert [r["restored_step"] for r in second] == [driver.STEPS] * 2
  assert second[0]["checksum"] == second[1]["checksum"]   # both processes restored the same state

  single = loop.train(driver.config(), str(tmp_path / "one"))["state"]
  restored = Trainer(driver.config(), workdir)            # the two-process checkpoint, 8 devices here
  restored.close()
  assert restored.restored_step == driver.STEPS
  for a, b in zip(jax.tree.leaves(jax.device_get(single.params)),
                  jax.tree.leaves(jax.device_get(restored.params))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
