"""experiments.ablate: every arm of every ablation plans as a valid chain that starts where it
says (the base's checkpoint, or from scratch with the base's tokenizer), its config differs from
the plain stage exactly by the arm's change, and the report writes the table and the chart."""
import json
import os

import pytest

from configs import pipeline_tiny
from configs.rl_presets import apply_preset
from experiments import ablate
from kat_jax import workdir as workdir_lib
from kat_jax.errors import ConfigError
from kat_jax.train import chain

STEPS = {"midtrain": 240, "sft": 100, "rft": 2, "rl": 4}


@pytest.fixture()
def base(tmp_path):
  """A base chain's report.json (what the arms read of it: names, directories, final steps)."""
  path = tmp_path / "base"
  path.mkdir()
  rows = [{"name": s, "workdir": str(path / f"{i}_{s}"), "final_step": STEPS[s],
           "eval": {"code": {"mean_turns": 2.0 - i / 4, "tool_call_share": i / 8,
                             "attempted_share": i / 4, "schema_valid_share": 1.0,
                             "pass_rate": i / 16}}}
          for i, s in enumerate(ablate.BASE_STAGES, start=1)]
  finished = [f"{i}_{s}" for i, s in enumerate(ablate.BASE_STAGES, start=1)]
  (path / chain.REPORT_JSON).write_text(json.dumps({"finished": finished, "stages": rows}))
  return str(path)


def _diff(a, b, prefix=""):
  """Paths where two nested dicts differ."""
  out = []
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key), b.get(key)
    if isinstance(x, dict) and isinstance(y, dict):
      out += _diff(x, y, f"{prefix}{key}.")
    elif x != y:
      out.append(f"{prefix}{key}")
  return out


@pytest.mark.parametrize("name", [n for n in ablate.ABLATIONS if ablate.ABLATIONS[n]])
def test_every_arm_plans_from_where_it_says(name, base, tmp_path):
  stages = ablate.base_stages(base)
  plain = pipeline_tiny.get_config().chain
  for arm in ablate.ABLATIONS[name]:
    if arm.start == "":
      continue
    plans = chain.plan(ablate.arm_config(arm, stages), str(tmp_path / arm.name), num_devices=1)
    assert [p.name for p in plans] == list(arm.stages)
    first = plans[0].config
    if arm.start is None:
      assert first.init_from == ""
      assert first.data.tokenizer_path == workdir_lib.tokenizer_dir(stages["midtrain"]["workdir"])
    else:
      assert first.init_from == f"{base}/{ablate.BASE_STAGES.index(arm.start) + 1}_{arm.start}" \
                                f"@{STEPS[arm.start]}"
    if name == "stages":
      continue
    # An RL arm: the plain RL stage changed exactly by the arm's edit.
    changed = set(_diff(first.to_dict(), plain.rl.to_dict()))
    expected = pipeline_tiny.get_config().chain.rl
    expected.init_from = first.init_from
    if name == "rl_algorithms":
      apply_preset(expected, arm.name)
    elif name == "tree_vs_flat":
      expected.rl.tree_mode = arm.name == "tree"
    else:
      fraction = float(arm.name.rsplit("_", 1)[1])
      if fraction < 1.0:
        expected.rl.prune.enabled = True
        expected.rl.prune.budget_fraction = fraction
        expected.rl.prune.score = arm.name.rsplit("_", 1)[0]
    steps_only = {"train.steps"}        # the chain derives RL steps from the iterations
    assert changed - steps_only == set(_diff(expected.to_dict(), plain.rl.to_dict())) - steps_only


def test_prune_arms_are_the_budgets_and_scores_they_name(base):
  stages = ablate.base_stages(base)
  got = {}
  for arm in ablate.ABLATIONS["prune_budget"]:
    prune = ablate.arm_config(arm, stages).chain.rl.rl.prune
    got[arm.name] = (prune.enabled, prune.budget_fraction if prune.enabled else 1.0, prune.score)
  assert got == {"budget_1.0": (False, 1.0, "entropy"), "entropy_0.75": (True, 0.75, "entropy"),
                 "entropy_0.5": (True, 0.5, "entropy"), "entropy_0.25": (True, 0.25, "entropy"),
                 "random_0.5": (True, 0.5, "random"),
                 "longest_path_0.5": (True, 0.5, "longest_path")}


def test_bad_inputs_name_the_fix(base, tmp_path):
  with pytest.raises(ConfigError, match="run configs/pipeline_tiny.py there first"):
    ablate.base_stages(str(tmp_path / "nowhere"))
  with pytest.raises(ConfigError, match=r"ablation 'tree_vs_flat' has arms \['tree', 'flat'\]"):
    ablate.run_ablation("tree_vs_flat", base, str(tmp_path / "w"), arms=["trees"])
  with pytest.raises(ConfigError, match="no field 'chain.rl.rl.iteration'"):
    ablate.arm_config(ablate.ABLATIONS["tree_vs_flat"][0], ablate.base_stages(base),
                      ["chain.rl.rl.iteration=2"])
  config = ablate.arm_config(ablate.ABLATIONS["tree_vs_flat"][0], ablate.base_stages(base),
                             ["chain.rl.rl.iterations=2"])
  assert config.chain.rl.rl.iterations == 2
  report = json.load(open(os.path.join(base, chain.REPORT_JSON)))
  report["finished"] = report["finished"][:2]
  json.dump(report, open(os.path.join(base, chain.REPORT_JSON), "w"))
  with pytest.raises(ConfigError, match=r"stages \['rft', 'rl'\] have not finished"):
    ablate.base_stages(base)


def test_report_has_every_arm_and_its_curve(tmp_path):
  rows = [{"arm": "tree", "single-turn code pass": 0.25, "train s": 12.5,
           "history": [{"loss": 0.1, "reward": 0.2}, {"loss": 0.05, "reward": 0.4}]},
          {"arm": "flat", "single-turn code pass": 0.125, "train s": 20.0,
           "history": [{"loss": 0.1, "reward": 0.2}]}]
  paths = ablate.write_report("tree_vs_flat", rows, str(tmp_path), "python -m experiments.ablate x")
  text = open(paths["md"]).read()
  assert "python -m experiments.ablate x" in text
  assert "| tree | 0.250 | 12.500 |" in text and "| flat | 0.125 | 20.000 |" in text
  assert "- tree: (0.100, 0.200), (0.050, 0.400)" in text
  assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_behaviour_reads_the_bases_sft_and_rl_rows(base, tmp_path):
  rows = ablate.run_ablation("behaviour", base, str(tmp_path / "w"))
  assert [r["arm"] for r in rows] == ["after sft", "after rl"]
  assert [r["code turns"] for r in rows] == [1.5, 1.0]
  assert [r["code tool-call turns"] for r in rows] == [0.25, 0.5]
  assert [r["repo resolved"] for r in rows] == [None, None]   # the base ran no repo suite
