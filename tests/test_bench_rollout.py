"""experiments.bench_rollout at tiny sizes: its JSON has the fields and the ratios of its timings;
its re-prefill baseline prefills the whole history every turn and, greedy, samples the very tokens
(and log-probs) of the KV-reusing loop; its tool clock measures the union of tool-call intervals."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import bench_rollout
from kat_jax.model import ModelConfig, Transformer, get_preset
from kat_jax.rl import rollout
from kat_jax.sample import Sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_rollout_reports_its_fields_and_ratios():
  cmd = [sys.executable, "-m", "experiments.bench_rollout", "--presets=tiny", "--turns=2",
         "--episodes=2", "--new_tokens=8", "--tool_tokens=16", "--rounds=1",
         "--sandbox_workers=1"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
  [r] = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert (r["case"], r["preset"], r["turns"], r["episodes"]) == ("tiny/turns=2", "tiny", 2, 2)
  assert r["tokens_equal"] is True and r["statuses"] == ["max_turns"] and r["sandbox"] is True
  assert 2 <= r["sampled_tokens"] <= 2 * 2 * 8
  assert r["speedup"] == pytest.approx(r["reprefill_s"] / r["reuse_s"])
  assert r["reuse_tokens_per_s"] == pytest.approx(r["sampled_tokens"] / r["reuse_s"])
  assert r["reprefill_tokens_per_s"] == pytest.approx(r["sampled_tokens"] / r["reprefill_s"])
  assert 0 < r["tool_time_fraction"] < 1               # real sandbox runs, inside the rollout
  assert r["reuse_s_rounds"] == [r["reuse_s"]] and r["reprefill_s_rounds"] == [r["reprefill_s"]]
  assert r["context_tokens"] > r["sampled_tokens"] + 2 * r["prompt_tokens"]


class CountingPrefills:
  def __init__(self, sampler):
    self.sampler, self.max_len, self.prefilled = sampler, sampler.max_len, []

  def start_episode(self, prompts, rng):
    self.prefilled.append([len(p) for p in prompts])
    return self.sampler.start_episode(prompts, rng)

  def generate_turn(self, episode, config, tokenizer=None):
    return self.sampler.generate_turn(episode, config, tokenizer)


def test_reprefill_prefills_the_history_each_turn_and_samples_the_same_greedy_tokens():
  tok = bench_rollout.ByteTokenizer()
  model = Transformer(ModelConfig.from_config(get_preset("tiny")))
  sampler = Sampler(model, bench_rollout._numpy_params(model), max_len=384, prefill_bucket=64,
                    output_bucket=64, extend_bucket=64)
  cfg = rollout.default_rollout_config()
  cfg.update(max_turns=3, max_new_tokens=12, temperature=0.0, env_threads=1)
  env_class = bench_rollout.make_env_class()
  clock = bench_rollout.ToolClock()
  tasks = ["t0", "t1", "t2"]
  reuse = rollout.rollout(sampler, [env_class(20, None, clock) for _ in tasks], tasks,
                          jax.random.key(0), cfg, tok)
  counting = CountingPrefills(sampler)
  again = rollout.rollout(bench_rollout.Reprefill(counting),
                          [env_class(20, None, clock) for _ in tasks], tasks, jax.random.key(0),
                          cfg, tok)
  for a, b in zip(reuse, again):
    assert a.status == b.status == "max_turns" and a.num_turns == 3
    for name in ("tokens", "sampled", "event_tag", "turn"):
      np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.logp_policy, b.logp_policy, atol=1e-4)
  # One prefill per turn, each of every row's whole context so far.
  assert len(counting.prefilled) == 3
  for turn, lengths in enumerate(counting.prefilled):
    assert lengths == [int((t.turn < turn).sum()) for t in reuse]


def test_tool_clock_measures_the_union_of_intervals():
  clock = bench_rollout.ToolClock()
  for start, end in ((0.0, 1.0), (0.5, 2.0), (3.0, 4.0), (3.2, 3.5), (10.0, 10.25)):
    clock.add(start, end)
  assert clock.busy_s() == pytest.approx(2.0 + 1.0 + 0.25)
