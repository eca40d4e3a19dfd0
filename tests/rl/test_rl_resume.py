"""The RL stage killed with SIGKILL after a checkpoint and restarted on the same workdir ends
bitwise equal to an uninterrupted run: params, optimizer, and the loop's own state (iteration,
curriculum, reward normalizer) — rollouts after the restart are the ones the straight run drew."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "train"))
from kill_helpers import kill_after_checkpoint  # noqa: E402

ITERATIONS, KILL_AFTER = 3, 1   # the resumed run still does two iterations
REPO = os.path.dirname(os.path.dirname(HERE))


def _launch(workdir):
  return subprocess.Popen([sys.executable, os.path.join(HERE, "rl_driver.py"), workdir,
                           str(ITERATIONS)], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  return out


@pytest.mark.slow
def test_killed_rl_run_resumes_bitwise(tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  _finish(_launch(straight))
  kill_after_checkpoint(_launch(killed), killed, KILL_AFTER, ITERATIONS)
  _finish(_launch(killed))
  a = json.load(open(os.path.join(straight, "final.json")))
  b = json.load(open(os.path.join(killed, "final.json")))
  assert a["start_iteration"] == 0 and a["iteration"] == b["iteration"] == ITERATIONS
  assert KILL_AFTER <= b["start_iteration"] < ITERATIONS     # it resumed, not restarted
  assert b["rewards"] == a["rewards"][b["start_iteration"]:]
  assert a["loop_state"] == b["loop_state"] and a["loop_state"]["normalizer"]["count"] > 0
  pa, pb = np.load(os.path.join(straight, "final.npz")), np.load(os.path.join(killed,
                                                                               "final.npz"))
  assert len(pa.files) == len(pb.files) > 0
  for key in pa.files:
    np.testing.assert_array_equal(pa[key], pb[key])
