"""The paper's ablations on the tiny chain: named sets of arms, each arm a chain of
configs/pipeline_tiny.py stages started from a finished base chain, reported side by side.

  python -m experiments.main --config=configs/pipeline_tiny.py --workdir=BASE     # the base
  python -m experiments.ablate --ablation=NAME --base=BASE --workdir=DIR [--arms=a,b] \
      [--out=docs/ablations] [--set=chain.rl.rl.iterations=2 ...]

Every arm runs ``chain.run_chain`` in ``DIR/<arm>`` with the same ``chain.eval`` as the base, so
each arm's last stage is evaluated exactly like the base's stages (the same held-out tasks,
greedy). An arm's first stage starts from the base's checkpoint it names
(``BASE/<i>_<stage>@<final step>``), or from scratch with the base's tokenizer. Arms are chains,
so an interrupted ablation resumes where it stopped (finished arms are skipped). The ablation's
table and chart go to ``OUT/<name>.md`` / ``OUT/<name>.png`` (with the command that made them)
and its records to ``DIR/<name>.json``.

| ablation | arms | question |
|---|---|---|
| ``stages`` | full (the base itself), no_midtrain (sft→rft→rl from scratch), no_sft (rft→rl from mid-training), no_rft (rl from SFT) | does each stage add? |
| ``rl_algorithms`` | ppo, grpo, dapo, drgrpo (configs/rl_presets.py), RL from the base's SFT | which RL objective |
| ``tree_vs_flat`` | tree (a group is one trajectory tree), flat (one tree per trajectory), same seeds | the same curves for less wall time? |
| ``prune_budget`` | budget fraction 1.0 (off), 0.75, 0.5, 0.25 by entropy; 0.5 random; 0.5 longest path | pass and time vs budget |
| ``behaviour`` | none run: the base's SFT and RL rows | turns per episode and tool-call shares after RL |

RFT vs RL sample efficiency is ``experiments/ablate_rft.py`` (its own per-iteration evaluation);
the self-debugging three-mode table is docs/SELF_DEBUG.md's.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Callable, NamedTuple, Optional

from absl import app
from absl import flags

FLAGS = flags.FLAGS

BASE_STAGES = ("midtrain", "sft", "rft", "rl")
# The columns of an arm's row: the chain report's columns of its last stage.
ROW_COLUMNS = ("single-turn code pass", "code pass", "code tool-call turns",
               "code turns opening a call", "code turns", "repo resolved", "HumanEval pass@1",
               "RL reward", "train s", "eval s")


class Arm(NamedTuple):
  """One arm: the stages it runs, where its first stage starts, and its config changes."""
  name: str
  stages: tuple[str, ...]
  # The base stage whose final checkpoint the first stage starts from; None: from scratch (with
  # the base's tokenizer); "" : the arm is the base itself (nothing runs).
  start: Optional[str]
  edit: Callable = lambda config: None


def _set_rl(**fields) -> Callable:
  def edit(config):
    for path, value in fields.items():
      node = config.chain.rl
      *parents, leaf = path.split("__")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return edit


def _preset(name: str) -> Callable:
  def edit(config):
    from configs.rl_presets import apply_preset
    apply_preset(config.chain.rl, name)
  return edit


def _prune(fraction: float, score: str = "entropy") -> Callable:
  if fraction >= 1.0:
    return _set_rl(rl__prune__enabled=False)
  return _set_rl(rl__prune__enabled=True, rl__prune__budget_fraction=fraction,
                 rl__prune__score=score)


ABLATIONS: dict[str, tuple[Arm, ...]] = {
    "stages": (Arm("full", BASE_STAGES, ""),
               Arm("no_midtrain", ("sft", "rft", "rl"), None),
               Arm("no_sft", ("rft", "rl"), "midtrain"),
               Arm("no_rft", ("rl",), "sft")),
    "rl_algorithms": tuple(Arm(p, ("rl",), "sft", _preset(p))
                           for p in ("ppo", "grpo", "dapo", "drgrpo")),
    "tree_vs_flat": (Arm("tree", ("rl",), "sft", _set_rl(rl__tree_mode=True)),
                     Arm("flat", ("rl",), "sft", _set_rl(rl__tree_mode=False))),
    "prune_budget": (Arm("budget_1.0", ("rl",), "sft", _prune(1.0)),
                     Arm("entropy_0.75", ("rl",), "sft", _prune(0.75)),
                     Arm("entropy_0.5", ("rl",), "sft", _prune(0.5)),
                     Arm("entropy_0.25", ("rl",), "sft", _prune(0.25)),
                     Arm("random_0.5", ("rl",), "sft", _prune(0.5, "random")),
                     Arm("longest_path_0.5", ("rl",), "sft", _prune(0.5, "longest_path"))),
    "behaviour": (),
}


def define_flags() -> None:
  """The command line (defined only when run as a script)."""
  flags.DEFINE_enum("ablation", None, list(ABLATIONS), "Which ablation.")
  flags.DEFINE_string("base", None, "A finished configs/pipeline_tiny.py chain's workdir.")
  flags.DEFINE_string("workdir", None, "Where the arms run (one chain per arm).")
  flags.DEFINE_list("arms", [], "Arms to run (default: all of the ablation's).")
  flags.DEFINE_string("out", "docs/ablations", "Where the table and the chart go.")
  flags.DEFINE_multi_string("set", [], "PATH=VALUE config overrides for every arm, e.g. "
                            "chain.rl.rl.iterations=2 (values parsed as Python literals).")
  flags.mark_flags_as_required(["ablation", "base", "workdir"])


def base_stages(base: str) -> dict[str, dict]:
  """stage name -> the base chain's done record (its workdir and final step)."""
  from kat_jax.errors import ConfigError
  from kat_jax.train import chain
  path = os.path.join(base, chain.REPORT_JSON)
  if not os.path.exists(path):
    raise ConfigError(f"--base={base!r} has no {chain.REPORT_JSON}: run configs/pipeline_tiny.py "
                      f"there first (python -m experiments.main --config=configs/pipeline_tiny.py "
                      f"--workdir={base})")
  with open(path) as f:
    report = json.load(f)
  missing = [s for s in BASE_STAGES if f"{BASE_STAGES.index(s) + 1}_{s}" not in report["finished"]]
  if missing:
    raise ConfigError(f"--base={base!r}: stages {missing} have not finished; run the chain there "
                      "again to finish them")
  return {row["name"]: row for row in report["stages"]}


def _override(config, assignment: str) -> None:
  import ast
  from kat_jax.errors import ConfigError
  path, sep, text = assignment.partition("=")
  if not sep:
    raise ConfigError(f"--set={assignment!r}: write PATH=VALUE, e.g. chain.rl.rl.iterations=2")
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    if p not in node:
      raise ConfigError(f"--set={assignment!r}: config has no field {path!r}")
    node = node[p]
  if leaf not in node:
    raise ConfigError(f"--set={assignment!r}: config has no field {path!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  node[leaf] = value


def arm_config(arm: Arm, stages: dict[str, dict], overrides=()):
  """configs/pipeline_tiny.py running ``arm.stages``, its first stage from the base."""
  from configs import pipeline_tiny
  from kat_jax import workdir as workdir_lib
  config = pipeline_tiny.get_config()
  for assignment in overrides:
    _override(config, assignment)
  config.chain.stages = ",".join(arm.stages)
  first = config.chain[arm.stages[0]]
  if arm.start is None:
    first.data.tokenizer_path = workdir_lib.tokenizer_dir(stages["midtrain"]["workdir"])
  else:
    row = stages[arm.start]
    first.init_from = f"{row['workdir']}@{row['final_step']}"
  arm.edit(config)
  return config


def arm_row(arm: Arm, report: dict) -> dict:
  """The arm's figures: its last stage's report columns (plus where it started)."""
  last = report["finished"][-1]
  row = {"arm": arm.name, "stages": "→".join(arm.stages), "last_stage": last}
  row.update({c: report["columns"][last].get(c) for c in ROW_COLUMNS})
  row["chain train s"] = sum(r["train_s"] for r in report["stages"])
  history = report["stages"][-1].get("history") or []
  row["history"] = [{k: h[k] for k in ("loss", "reward", "pass_rate") if k in h} for h in history]
  return row


def run_ablation(name: str, base: str, workdir: str, arms=(), overrides=()) -> list[dict]:
  """Runs the arms of ``name`` (skipping finished ones) and returns one row per arm."""
  from kat_jax.errors import ConfigError
  from kat_jax.train import chain
  stages = base_stages(base)
  if name == "behaviour":
    return [behaviour_row(stages[s]) for s in ("sft", "rl")]
  chosen = ABLATIONS[name]
  unknown = sorted(set(arms) - {a.name for a in chosen})
  if unknown:
    raise ConfigError(f"--arms names {unknown}: ablation {name!r} has arms "
                      f"{[a.name for a in chosen]}")
  rows = []
  for arm in chosen:
    if arms and arm.name not in arms:
      continue
    if arm.start == "":
      with open(os.path.join(base, chain.REPORT_JSON)) as f:
        report = json.load(f)
    else:
      arm_dir = os.path.join(workdir, arm.name)
      chain.run_chain(arm_config(arm, stages, overrides), arm_dir)
      with open(os.path.join(arm_dir, chain.REPORT_JSON)) as f:
        report = json.load(f)
    rows.append(arm_row(arm, report))
  return rows


def behaviour_row(row: dict) -> dict:
  code = row["eval"].get("code", {})
  repo = row["eval"].get("repo", {})
  return {"arm": f"after {row['name']}", "code turns": code.get("mean_turns"),
          "code tool-call turns": code.get("tool_call_share"),
          "code turns opening a call": code.get("attempted_share"),
          "code schema-valid share": code.get("schema_valid_share"),
          "code pass": code.get("pass_rate"), "repo turns": repo.get("mean_turns"),
          "repo tool-call turns": repo.get("tool_call_share"),
          "repo resolved": repo.get("resolve_rate")}


def _cell(value) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
  return str(value)


def table(rows: list[dict]) -> str:
  """A markdown table of ``rows`` (every key but the per-iteration history)."""
  keys = [k for k in rows[0] if k != "history"]
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
  return "\n".join(lines)


def write_report(name: str, rows: list[dict], out: str, command: str) -> dict[str, str]:
  """``OUT/<name>.md`` (command, table, per-iteration curves) and ``OUT/<name>.png``."""
  os.makedirs(out, exist_ok=True)
  paths = {"md": os.path.join(out, f"{name}.md"), "png": os.path.join(out, f"{name}.png")}
  text = [f"# Ablation `{name}` (tiny chain)", "", "```", command, "```", "", table(rows), ""]
  curves = [r for r in rows if r.get("history")]
  if curves:
    text += ["Per iteration of each arm's last stage (loss, reward):", ""]
    for r in curves:
      points = ", ".join(f"({_cell(h.get('loss'))}, {_cell(h.get('reward'))})"
                         for h in r["history"])
      text.append(f"- {r['arm']}: {points}")
    text.append("")
  with open(paths["md"], "w") as f:
    f.write("\n".join(text))
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 3.5))
  ax_bar, ax_curve = fig.subplots(1, 2)
  metric = "code turns" if name == "behaviour" else "single-turn code pass"
  ax_bar.bar([r["arm"] for r in rows], [r.get(metric) or 0.0 for r in rows])
  ax_bar.set_ylabel(metric)
  ax_bar.tick_params(axis="x", labelrotation=45, labelsize=7)
  for r in curves:
    ax_curve.plot([h.get("reward", float("nan")) for h in r["history"]], "o-", label=r["arm"])
  ax_curve.set_xlabel("iteration")
  ax_curve.set_ylabel("train reward")
  if curves:
    ax_curve.legend(fontsize=7)
  fig.suptitle(f"ablation: {name}")
  fig.tight_layout()
  fig.savefig(paths["png"], dpi=110)
  return paths


def main(argv):
  del argv
  os.makedirs(FLAGS.workdir, exist_ok=True)
  rows = run_ablation(FLAGS.ablation, FLAGS.base, FLAGS.workdir, FLAGS.arms, FLAGS.set)
  with open(os.path.join(FLAGS.workdir, f"{FLAGS.ablation}.json"), "w") as f:
    json.dump(rows, f, indent=1)
  command = "python -m experiments.ablate " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  paths = write_report(FLAGS.ablation, rows, FLAGS.out, command)
  print(table(rows))
  print(json.dumps(paths))


if __name__ == "__main__":
  define_flags()
  app.run(main)
