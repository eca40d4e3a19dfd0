"""experiments.bench_tree on the tiny preset: the reported case has the POR of its shape, its
speedup and efficiencies are the stated ratios of its timings, its work bound equals an independent
FLOP count, and the winners it names are among the variants it swept."""
import json
import os
import subprocess
import sys

import pytest

from kat_jax.model import ModelConfig, get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_tree_reports_consistent_figures():
  cmd = [sys.executable, "-m", "experiments.bench_tree", "--preset=tiny", "--cases=0.5",
         "--flat_rows=1,4", "--token_chunks=0,128", "--repeats=2", "--sweep_rounds=1"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=True)
  records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert len(records) == 1
  r = records[0]
  # SHAPES["0.5"]: a 256-token prompt, then 4 branches of 128 tokens.
  assert (r["n_tree"], r["n_flat"], r["num_trajectories"]) == (256 + 4 * 128, 4 * 384, 4)
  assert r["por"] == pytest.approx(0.5) and r["bound"] == pytest.approx(2.0)
  assert r["speedup"] == pytest.approx(r["flat_s"] / r["tree_s"])
  assert r["efficiency"] == pytest.approx(r["speedup"] / r["bound"])
  assert r["work_efficiency"] == pytest.approx(r["speedup"] / r["work_bound"])
  cfg = ModelConfig.from_config(get_preset("tiny"))
  per_token = 6 * cfg.num_params()
  per_pair = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim
  flat = 4 * (384 * per_token + 384 * 385 // 2 * per_pair)
  tree = 768 * per_token + (256 * 257 // 2 + 4 * (128 * 256 + 128 * 129 // 2)) * per_pair
  assert r["work_bound"] == pytest.approx(flat / tree, rel=1e-12)
  assert 1.0 < r["work_bound"] < r["bound"]
  best = f'{r["flat_best_rows"]}/{r["flat_best_token_chunk"]}'
  assert best in r["sweep_flat_s_by_rows_and_chunk"]
  assert set(r["sweep_flat_s_by_rows_and_chunk"]) == {"1/0", "1/128", "4/0", "4/128"}
  assert set(r["sweep_tree_s_by_chunk"]) == {"0", "128"}
  assert r["tree_best_token_chunk"] in (0, 128)
  assert 0 < r["tree_visited_block_fraction"] < r["flat_visited_block_fraction"] <= 1
