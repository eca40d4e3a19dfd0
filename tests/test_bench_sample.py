"""experiments.bench_sample at tiny sizes: the recompute baseline runs over each step's prefix in
power-of-two buckets (step counts per bucket, the padding it reports), its tokens equal the KV
cache's, and the reported speedup and rates are the stated quotients of the per-round times."""
import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT, NEW, BATCH, ROUNDS = 8, 20, 2, 2


@pytest.fixture(scope="module")
def record():
  cmd = [sys.executable, "-m", "experiments.bench_sample", "--preset=tiny",
         f"--batch_size={BATCH}", f"--prompt_len={PROMPT}", f"--new_tokens={NEW}",
         f"--rounds={ROUNDS}", "--recompute_steps=2"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
  records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert len(records) == 1
  return records[0]


def test_recompute_runs_over_the_bucketed_prefix(record):
  # Step i predicts token PROMPT + i from a prefix of PROMPT + i tokens (8..27): buckets of the
  # next power of two, capped at the 28-token buffer: 8 -> 8, 9..16 -> 16, 17..27 -> 28.
  assert record["recompute_steps_by_bucket"] == {"8": 1, "16": 8, "28": 11}
  assert sum(record["recompute_steps_by_bucket"].values()) == NEW
  assert record["recompute_steps_timed_per_bucket"] == {"8": 1, "16": 2, "28": 2}
  lengths = range(PROMPT, PROMPT + NEW)
  buckets = [8] + [16] * 8 + [28] * 11
  assert record["recompute_mean_bucket_over_prefix"] == pytest.approx(
      statistics.fmean(b / n for b, n in zip(buckets, lengths)))
  assert set(record["recompute_step_s_by_bucket"]) == {"8", "16", "28"}
  assert all(s > 0 for s in record["recompute_step_s_by_bucket"].values())
  assert record["tokens_agree"] is True     # greedy recompute == KV cache at every timed step


def test_speedup_and_rates_are_medians_of_paired_rounds(record):
  kv, rec = record["kv_cache_total_s_by_round"], record["recompute_total_s_by_round"]
  assert len(kv) == len(rec) == len(record["speedup_by_round"]) == ROUNDS == record["rounds"]
  assert record["speedup_by_round"] == pytest.approx([r / k for r, k in zip(rec, kv)])
  assert record["speedup"] == pytest.approx(statistics.median(record["speedup_by_round"]))
  assert record["kv_cache_total_s"] == pytest.approx(statistics.median(kv))
  assert record["recompute_total_s"] == pytest.approx(statistics.median(rec))
  assert record["kv_cache_tokens_per_s"] == pytest.approx(BATCH * NEW / record["kv_cache_total_s"])
  assert record["recompute_tokens_per_s"] == pytest.approx(
      BATCH * NEW / record["recompute_total_s"])
  assert 0 < record["kv_cache_prefill_s"] < record["kv_cache_total_s"]
  assert (record["preset"], record["prompt_len"], record["new_tokens"]) == ("tiny", PROMPT, NEW)
