"""A run killed with SIGKILL and restarted on the same workdir ends bitwise equal to an
uninterrupted run (model, optimizer state and data position all restored)."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import synthetic_tiny
from kat_jax.train import loop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kill_helpers import kill_after_checkpoint  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, EVERY, KILL_AFTER = 12, 4, 8
OVERRIDES = [f"--config.train.steps={STEPS}", f"--config.train.checkpoint_every={EVERY}",
             "--config.train.eval_every=0", "--config.train.progress_bar=False",
             "--config.train.seq_len=64", "--config.train.log_every=1",
             "--config.train.warmup_steps=2"]


def _launch(workdir):
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.main", "--config=configs/synthetic_tiny.py",
       f"--workdir={workdir}", *OVERRIDES],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _config():
  c = synthetic_tiny.get_config()
  c.train.steps, c.train.checkpoint_every, c.train.seq_len = STEPS, EVERY, 64
  c.train.warmup_steps = 2
  return c


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_equal(tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  p = _launch(straight)
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  # The console: one line per logged step and a summary; no library INFO chatter by default.
  assert sum(line.startswith("step ") and " train: " in line for line in out.splitlines()) == STEPS
  assert f"finished: step {STEPS} (started at 0)" in out and "checkpoints: " in out
  assert "orbax" not in err.lower() and " INFO " not in err, err[-2000:]

  kill_after_checkpoint(_launch(killed), killed, KILL_AFTER, STEPS)

  p = _launch(killed)
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  assert f"restored step {KILL_AFTER}" in out

  a, _, _, step_a = loop.load_state(_config(), straight)
  b, _, _, step_b = loop.load_state(_config(), killed)
  assert step_a == step_b == STEPS
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(x, y)
