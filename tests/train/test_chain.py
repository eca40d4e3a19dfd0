"""The chain runner: stage 2 starts from stage 1's final params bitwise; a chain killed with SIGKILL
during stage 2 and restarted skips stage 1 (its files untouched, no training) and resumes stage 2
from its checkpoint, ending bitwise where an uninterrupted chain ends; configs/pipeline_tiny.py
with tiny step counts runs end to end and writes the report files, one row per stage; bad chain
configs are ConfigErrors naming the ``config.chain.<name>.…`` field."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from kat_jax import config as config_lib
from kat_jax.errors import ConfigError
from kat_jax.train import chain, loop
from kat_jax.train.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kill_helpers import kill_after_checkpoint  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIRST_STEPS, SECOND_STEPS, KILL_AFTER = 6, 40, 4

# Two synthetic stages on a very small model, no evaluation suite (the synthetic stage trains no
# tokenizer): the cheapest real stages, run through experiments.main like any chain.
CHAIN_FILE = f'''
from configs import synthetic_tiny
from kat_jax.train import chain


def _stage(steps, learning_rate):
  c = synthetic_tiny.get_config()
  c.train.update(dict(steps=steps, checkpoint_every=2, eval_every=0, seq_len=32, log_every=1,
                      warmup_steps=1, progress_bar=False, learning_rate=learning_rate))
  c.model.update(dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                      mlp_dim=64, vocab_size=64))
  return c


def get_config():
  c = chain.chain_config({{"first": _stage({FIRST_STEPS}, 3e-3),
                          "second": _stage({SECOND_STEPS}, 1e-3)}})
  for suite in ("code", "code_single", "repo", "humaneval"):
    c.chain.eval[suite] = False
  return c
'''


def _chain_file(tmp_path) -> str:
  path = tmp_path / "chain_synthetic.py"
  path.write_text(CHAIN_FILE)
  return str(path)


def _launch(config_file: str, workdir: str, *flags: str, env=None):
  return subprocess.Popen([sys.executable, "-m", "experiments.main", f"--config={config_file}",
                           f"--workdir={workdir}", *flags], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc, timeout=900) -> str:
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, (out[-2000:], err[-4000:])
  return out


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_equal(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The chain run in process, uninterrupted, with every Trainer's starting params recorded."""
  tmp = tmp_path_factory.mktemp("straight")
  config = config_lib._load_config_file(_chain_file(tmp))
  workdir = str(tmp / "run")
  starts = {}
  original = Trainer._initial_state

  def spy(self):
    state = original(self)
    starts[os.path.basename(self.workdir)] = _leaves(state.params)   # host copies
    return state

  Trainer._initial_state = spy
  try:
    result = chain.run_chain(config, workdir)
  finally:
    Trainer._initial_state = original
  return config, workdir, result, starts


def test_second_stage_starts_from_first_stages_final_params_bitwise(straight):
  config, workdir, result, starts = straight
  plans = chain.plan(config, workdir)
  first, second = plans
  assert [p.label for p in plans] == ["1_first", "2_second"]
  assert second.config.init_from == f"{first.workdir}@{FIRST_STEPS}"
  final_first, _, _, step = loop.load_state(first.config, first.workdir)
  assert step == FIRST_STEPS
  assert set(starts) == {"1_first", "2_second"}
  _assert_equal(starts["2_second"], final_first.params)
  # Not a fresh start: stage 1 trained away from the seed's init that it started from.
  assert any(not np.array_equal(x, y) for x, y in zip(starts["1_first"], starts["2_second"]))
  # Each stage is recorded as done, in its own directory; the report has one row per stage.
  for plan, steps in ((first, FIRST_STEPS), (second, SECOND_STEPS)):
    done = json.load(open(os.path.join(plan.workdir, chain.DONE_FILENAME)))
    assert done["final_step"] == steps and done["start_step"] == 0 and done["eval"] == {}
    assert done["train_s"] > 0 and np.isfinite(done["metrics"]["train_loss"])
  report = json.load(open(os.path.join(workdir, chain.REPORT_JSON)))
  assert report["finished"] == ["1_first", "2_second"] == report["chain"]
  assert [r["final_step"] for r in report["stages"]] == [FIRST_STEPS, SECOND_STEPS]
  table = open(os.path.join(workdir, chain.REPORT_MD)).read()
  assert sum(line.startswith("| 1_first |") or line.startswith("| 2_second |")
             for line in table.splitlines()) == 2
  assert open(os.path.join(workdir, chain.REPORT_PNG), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert result["step"] == SECOND_STEPS and result["report"] == os.path.join(workdir,
                                                                              chain.REPORT_JSON)


@pytest.mark.slow
def test_killed_chain_skips_finished_stage_and_resumes_the_next(straight, tmp_path):
  config_file = _chain_file(tmp_path)
  workdir = str(tmp_path / "killed")
  first, second = (os.path.join(workdir, d) for d in ("1_first", "2_second"))
  kill_after_checkpoint(_launch(config_file, workdir), second, KILL_AFTER, SECOND_STEPS)
  assert not os.path.exists(os.path.join(second, chain.DONE_FILENAME))
  done_file = os.path.join(first, chain.DONE_FILENAME)
  done_bytes, done_mtime = open(done_file, "rb").read(), os.stat(done_file).st_mtime_ns
  first_checkpoints = sorted(os.listdir(os.path.join(first, "checkpoints")))

  out = _finish(_launch(config_file, workdir))
  assert f"chain: 1_first done (step {FIRST_STEPS}), skipped" in out
  restored = [line for line in out.splitlines() if line.startswith("restored step")]
  assert len(restored) == 1 and "2_second" in restored[0], restored
  # Stage 1 untouched: same done file, no new checkpoint.
  assert open(done_file, "rb").read() == done_bytes
  assert os.stat(done_file).st_mtime_ns == done_mtime
  assert sorted(os.listdir(os.path.join(first, "checkpoints"))) == first_checkpoints
  # Stage 2 resumed from its own checkpoint (not from scratch) and finished.
  done = json.load(open(os.path.join(second, chain.DONE_FILENAME)))
  assert KILL_AFTER <= done["start_step"] < SECOND_STEPS and done["final_step"] == SECOND_STEPS
  # ... ending bitwise where the uninterrupted chain ends.
  config, straight_dir, _, _ = straight
  plans = chain.plan(config, straight_dir)
  a, _, _, _ = loop.load_state(plans[1].config, plans[1].workdir)
  b, _, _, step = loop.load_state(plans[1].config, second)
  assert step == SECOND_STEPS
  _assert_equal(a.params, b.params)
  _assert_equal(a.opt_state, b.opt_state)
  # A third run has nothing left to do.
  out = _finish(_launch(config_file, workdir))
  assert "2_second done" in out and "restored" not in out


def test_chain_configs_are_checked_before_anything_trains(tmp_path):
  base = config_lib._load_config_file(_chain_file(tmp_path))
  workdir = str(tmp_path / "w")

  def refused(match, **fields):
    c = config_lib._load_config_file(_chain_file(tmp_path))
    for path, value in fields.items():
      node = c
      *head, last = path.split("__")
      for part in head:
        node = node[part]
      node[last] = value
    with pytest.raises(ConfigError, match=match):
      chain.run_chain(c, workdir)

  refused(r"config.chain has no section 'third'", chain__stages="first,third")
  refused(r"names a stage twice", chain__stages="first,first")
  refused(r"config.chain.stages is empty", chain__stages="")
  refused(r"chain stage 'second': config.chain.second.init_from='/x'",
          chain__second__init_from="/x")
  refused(r"chain stage 'second': config.chain.second.train.batch_size=0 must be positive",
          chain__second__train__batch_size=0)
  refused(r"config.chain.second.model.d_model=64 but the previous stage's "
          r"config.chain.first.model has 32", chain__second__model__d_model=64)
  refused(r"config.chain.eval.max_turns=0 must be >= 1", chain__eval__max_turns=0)
  refused(r"chain stage 'first': config.chain.first.stage='nope' is not a known stage",
          chain__first__stage="nope")
  assert not os.path.exists(workdir)   # refused before any directory was made
  assert chain.stage_names(base) == ["first", "second"]


def test_rl_stage_steps_follow_its_iterations(tmp_path):
  from configs import pipeline_tiny
  c = pipeline_tiny.get_config()
  c.chain.rl.rl.iterations = 3
  c.chain.rl.train.steps = 999            # not a value the RL loop accepts: set by the chain
  plans = {p.name: p for p in chain.plan(c, str(tmp_path), num_devices=1)}   # one CPU
  assert plans["rl"].final_step == 3 * c.chain.rl.rl.tasks_per_iteration // 8
  assert plans["rft"].final_step == c.chain.rft.rl.iterations
  assert [p.label for p in plans.values()] == ["1_midtrain", "2_sft", "3_rft", "4_rl"]
  # Each stage starts from the one before it at its final step, with its tokenizer; the SFT
  # data the chain generates lives in the workdir.
  assert plans["sft"].config.init_from == f"{plans['midtrain'].workdir}@240"
  assert plans["rl"].config.init_from == f"{plans['rft'].workdir}@{plans['rft'].final_step}"
  assert plans["rft"].config.data.tokenizer_path == os.path.join(plans["sft"].workdir,
                                                                 "tokenizer")
  assert plans["sft"].config.data.trajectories.paths == str(
      tmp_path / "data" / "agentic" / "trajectories_train.jsonl")


def _single_device_env() -> dict:
  """The environment of a CPU run: one device (the tests' XLA flag simulating 8 removed)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  return env


PIPELINE_FLAGS = (
    "--config.chain.midtrain.train.steps=8", "--config.chain.midtrain.train.eval_every=8",
    "--config.chain.midtrain.train.checkpoint_every=4", "--config.chain.midtrain.train.warmup_steps=2",
    "--config.chain.midtrain.train.progress_bar=False",
    "--config.chain.sft.train.steps=4", "--config.chain.sft.train.eval_every=0",
    "--config.chain.sft.train.checkpoint_every=2", "--config.chain.sft.train.warmup_steps=1",
    "--config.chain.sft.train.progress_bar=False",
    "--config.chain.sft_data.code_episodes=8", "--config.chain.sft_data.repo_episodes=3",
    "--config.chain.sft_data.math_episodes=3", "--config.chain.sft_data.instructions=20",
    "--config.chain.rft.rl.iterations=1", "--config.chain.rft.rl.rollout.max_new_tokens=48",
    "--config.chain.rft.train.progress_bar=False",
    "--config.chain.rl.rl.iterations=1", "--config.chain.rl.rl.group_size=4",
    "--config.chain.rl.rl.checkpoint_every=1", "--config.chain.rl.train.checkpoint_every=1",
    "--config.chain.rl.train.warmup_steps=0", "--config.chain.rl.rl.rollout.max_new_tokens=48",
    "--config.chain.rl.train.progress_bar=False",
    "--config.chain.eval.code_tasks=2", "--config.chain.eval.repo_tasks=1",
    "--config.chain.eval.code_single_tasks=2", "--config.chain.eval.code_single_max_new_tokens=32",
    "--config.chain.eval.humaneval_tasks=2", "--config.chain.eval.max_turns=2",
    "--config.chain.eval.max_new_tokens=32", "--config.chain.eval.humaneval_max_new_tokens=32")


def test_a_stage_subset_plans_the_full_chains_first_stages():
  # --config.chain.stages=midtrain,sft, then the whole chain on the same workdir: the subset's
  # stages are the full chain's first ones (same directories and configs), so the second run
  # skips them (skipping a finished stage: test_killed_chain_skips_finished_stage...).
  config = config_lib._load_config_file("configs/pipeline_tiny.py")
  full = chain.plan(config, "/w", num_devices=1)
  config.chain.stages = "midtrain,sft"
  subset = chain.plan(config, "/w", num_devices=1)
  assert [p.name for p in full] == ["midtrain", "sft", "rft", "rl"]
  assert [p.name for p in subset] == ["midtrain", "sft"]
  for a, b in zip(subset, full):
    assert (a.index, a.workdir, a.final_step) == (b.index, b.workdir, b.final_step)
    assert a.config.to_dict() == b.config.to_dict()


@pytest.mark.slow
def test_pipeline_tiny_runs_end_to_end_and_reports_every_stage(tmp_path):
  workdir = str(tmp_path / "pipeline")
  out = _finish(_launch("configs/pipeline_tiny.py", workdir, *PIPELINE_FLAGS,
                        env=_single_device_env()), timeout=1800)
  assert "chain: 4_rl finished" in out
  labels = ["1_midtrain", "2_sft", "3_rft", "4_rl"]
  report = json.load(open(os.path.join(workdir, chain.REPORT_JSON)))
  assert report["finished"] == labels == report["chain"]
  assert [r["stage"] for r in report["stages"]] == ["midtrain", "sft", "rft", "rl"]
  assert [r["final_step"] for r in report["stages"]] == [8, 4, 1, 1]
  for row, prev in zip(report["stages"][1:], report["stages"]):
    assert row["init_from"] == f"{prev['workdir']}@{prev['final_step']}"
  for row in report["stages"]:
    ev = row["eval"]
    assert set(ev) == {"code", "code_single", "repo", "humaneval", "seconds"}
    assert ev["code"]["episodes"] == 2 and ev["repo"]["episodes"] == 1
    assert ev["code_single"]["episodes"] == 2
    assert ev["humaneval"]["tasks"] == 2
    for value in (ev["code"]["pass_rate"], ev["code"]["tool_call_share"],
                  ev["code_single"]["pass_rate"],
                  ev["repo"]["resolve_rate"], ev["humaneval"]["pass_at_1"]):
      assert 0.0 <= value <= 1.0
    assert 1 <= ev["code"]["mean_turns"] <= 2
  # The SFT data was generated into the workdir by the chain.
  sft = report["stages"][1]
  assert sft["data"]["trajectories"]["examples"] > 0 and sft["data"]["instructions"][
      "examples"] == 20
  assert os.path.exists(os.path.join(workdir, "data", "agentic", "trajectories_train.jsonl"))
  table = open(os.path.join(workdir, chain.REPORT_MD)).read()
  rows = [line for line in table.splitlines() if line.startswith("| ") and "_" in line[:6]]
  assert [line.split(" | ")[0][2:] for line in rows] == labels
  assert open(os.path.join(workdir, chain.REPORT_PNG), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
