"""experiments.bench_async at tiny sizes: one JSON object per case (sync, then the manager at each
η) with the fields the docs quote, idle fractions in [0, 1], each case's speedup the ratio of its
trajectories/s to the sync case's in the same round, staleness within the case's bound."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("case", "eta", "trajectories_per_s", "trainer_idle_fraction", "rollout_idle_fraction",
          "speedup_vs_sync", "max_staleness", "staleness_histogram", "round_trajectories_per_s")


def test_bench_async_reports_every_case(tmp_path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)      # one CPU device: B = 2 trees
  cmd = [sys.executable, "-m", "experiments.bench_async", "--rounds=1", "--iterations=2",
         "--etas=1", "--tasks=2", "--group=2", "--rollout_workers=2", "--batch_groups=1",
         "--max_turns=2", "--max_new_tokens=4", "--delay_ms=30", "--num_layers=1", "--d_model=32",
         f"--workdir={tmp_path}"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-4000:]
  records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [(r["case"], r["eta"]) for r in records] == [("sync", 0), ("manager", 1)]
  sync, manager = records
  for r in records:
    for field in FIELDS:
      assert field in r, field
    assert 0.0 <= r["trainer_idle_fraction"] <= 1.0
    assert 0.0 <= r["rollout_idle_fraction"] <= 1.0
    assert r["trajectories_per_s"] > 0 and len(r["round_trajectories_per_s"]) == 1
    assert 0 <= r["max_staleness"] <= r["eta"]
    assert sum(r["staleness_histogram"].values()) == pytest.approx(1.0)
  assert sync["speedup_vs_sync"] == pytest.approx(1.0)
  assert manager["speedup_vs_sync"] == pytest.approx(
      manager["round_trajectories_per_s"][0] / sync["round_trajectories_per_s"][0])
