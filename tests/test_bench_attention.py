"""experiments.bench_attention at tiny sizes: one record per input and a tree-vs-flat comparison
whose work counts equal independent counts from the trajectories, and whose ratios and
efficiencies are the stated quotients."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kernels.tree_attention import layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = dict(sizes="256", pors="0.5", repeats="2", heads="2", kv_heads="1", head_dim="16",
            block="32", trajectories="4", impls="blocksparse", seed="3")


@pytest.fixture(scope="module")
def records():
  cmd = [sys.executable, "-m", "experiments.bench_attention",
         *[f"--{k}={v}" for k, v in ARGS.items()]]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _paths():
  """The benchmark's trajectories, rebuilt from its seed."""
  from experiments.bench_attention import make_tree
  return make_tree(np.random.default_rng(int(ARGS["seed"])), int(ARGS["sizes"]),
                   float(ARGS["pors"]), int(ARGS["trajectories"]))


def test_records_and_work_counts_equal_independent_counts(records):
  by_case = {r["case"]: r for r in records}
  assert [r["case"] for r in records] == ["tree", "flat_same_tokens", "flat_trajectories",
                                         "tree_vs_flat_trajectories"]
  paths = _paths()
  prefixes = {tuple(p[:i + 1]) for p in paths for i in range(len(p))}   # the trie's nodes
  tree, flat = by_case["tree"], by_case["flat_trajectories"]
  assert tree["tokens"] == tree["tree_tokens"] == len(prefixes)
  assert flat["tokens"] == flat["flat_tokens"] == sum(map(len, paths))
  # A tree token sees its ancestors and itself (its depth + 1 keys); a flat row is causal.
  assert tree["visible_pairs"] == sum(len(p) for p in prefixes)
  assert flat["visible_pairs"] == sum(n * (n + 1) // 2 for n in map(len, paths))
  block = int(ARGS["block"])
  assert flat["visited_blocks"] == sum(layout.causal_visited_blocks(len(p), block, block)
                                       for p in paths)
  for record in (tree, flat, by_case["flat_same_tokens"]):
    assert record["visited_blocks"] <= record["computed_block_slots"]
    assert set(record["seconds"]) == set(record["median_seconds"]) == {"blocksparse"}
    assert 0 < record["seconds"]["blocksparse"] <= record["median_seconds"]["blocksparse"]


def test_comparison_states_speedup_against_the_work_ratio(records):
  by_case = {r["case"]: r for r in records}
  tree, flat, cmp = (by_case[k] for k in ("tree", "flat_trajectories",
                                          "tree_vs_flat_trajectories"))
  assert cmp["impl"] == "blocksparse" and cmp["rounds"] == int(ARGS["repeats"])
  for key in ("tokens", "visible_pairs", "visited_blocks", "computed_block_slots"):
    assert cmp[f"{key}_ratio"] == pytest.approx(flat[key] / tree[key], abs=1e-4)
  assert cmp["tokens_ratio"] == pytest.approx(1 / (1 - cmp["por"]), abs=1e-3)
  # The work of the block-sparse path is its computed slots; attention work shrinks by less
  # than the token count (shared prompt tokens see few keys).
  assert cmp["work"] == "computed_block_slots"
  assert cmp["work_ratio"] == cmp["computed_block_slots_ratio"]
  assert 1 < cmp["visible_pairs_ratio"] < cmp["tokens_ratio"]
  assert cmp["speedup_fastest"] == pytest.approx(
      flat["seconds"]["blocksparse"] / tree["seconds"]["blocksparse"], rel=2e-3)
  assert cmp["efficiency"] == pytest.approx(cmp["speedup"] / cmp["work_ratio"], abs=2e-3)
  assert cmp["pair_efficiency"] == pytest.approx(cmp["speedup"] / cmp["visible_pairs_ratio"],
                                                 abs=2e-3)
  assert cmp["token_efficiency"] == pytest.approx(cmp["speedup"] / cmp["tokens_ratio"], abs=2e-3)
  assert cmp["tree_median_s"] == tree["median_seconds"]["blocksparse"]
