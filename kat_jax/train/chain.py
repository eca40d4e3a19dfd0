"""Chains of stages: mid-training → SFT → RFT → RL (any registered stages, in any order) as one
run, each stage starting from the previous one's final checkpoint, with a held-out evaluation and
a report after each::

    python -m experiments.main --config=configs/pipeline_tiny.py --workdir=/tmp/kat_pipeline \
        [--config.chain.stages=midtrain,sft --config.chain.sft.train.steps=50 ...]

A chain config holds ``stage = "chain"`` and a ``chain`` section (``chain_config`` builds one):
``chain.stages`` names the stages in order (comma-separated), ``chain.<name>`` is that stage's
full experiment config (e.g. ``configs/midtrain_tiny.get_config()``; its own ``stage`` field says
which registered stage it is, so two stages of one kind get two names), ``chain.eval`` the
per-stage evaluation (``kat_jax.eval.agentic``) and ``chain.sft_data`` how the SFT data is
generated when it is missing (``kat_jax.data.agentic``). Every field is settable from the command
line (``--config.chain.rl.rl.iterations=4``); a top-level field other than these is refused by
the flag parser, which names the ``config.chain.<name>.…`` fields of the same name.

Stage i (1-based) trains in ``WORKDIR/<i>_<name>/`` (its own checkpoints, tokenizer and
TensorBoard logs) from ``init_from = WORKDIR/<i-1>_<prev>@<its final step>`` — bitwise the
previous stage's final params — with the previous stage's tokenizer (``data.tokenizer_path``,
when the stage would otherwise train its own); the first stage keeps its own ``init_from``. Each
stage keeps its own semantics: the RL and RFT stages get ``train.steps`` = their iterations ×
updates per iteration (the only value their loop accepts); a stage reading teacher trajectories
or instruction data whose file is missing gets it generated first (``chain.sft_data``; an empty
``paths`` means ``WORKDIR/data/agentic/<file>``). All stages are validated before the first one
trains, and errors name the ``config.chain.<name>.…`` field.

Restart semantics. A finished stage has ``WORKDIR/<i>_<name>/stage_done.json`` (final step, wall
times, final training metrics, the evaluation) and is skipped when the chain runs again on the
same workdir — refused if its config changed since (``stage_config.json``); an unfinished stage
resumes from its own latest checkpoint (the ``Trainer`` restores it, data position and loop state
included); a stage killed after training but before its evaluation finished
(``train_result.json`` written) is evaluated without training again. The chain holds the lock of
``WORKDIR`` itself for its whole run (``workdir.WorkdirLock``).

After every stage ``WORKDIR/report.json`` (one row per finished stage), ``WORKDIR/report.md``
(stage × metrics table, wall time per stage) and ``WORKDIR/report.png`` (the metrics along the
chain; needs matplotlib) are rewritten.
"""
from __future__ import annotations

import copy
import datetime
import glob
import json
import os
import re
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections

from kat_jax import workdir as workdir_lib
from kat_jax.data.config import split_list
from kat_jax.errors import ConfigError

DONE_FILENAME = "stage_done.json"          # a finished stage (final step, times, metrics, eval)
TRAIN_RESULT_FILENAME = "train_result.json"   # training finished, evaluation maybe not
STAGE_CONFIG_FILENAME = "stage_config.json"   # the stage's config as it ran
REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
AGENTIC_DATA_DIR = os.path.join("data", "agentic")   # generated SFT data, under WORKDIR
RESERVED = ("stages", "eval", "sft_data")   # chain fields that are not stage names
DATA_STREAMS = ("trajectories", "instructions")   # the generated JSONL streams
# Their files under WORKDIR/data/agentic (kat_jax.data.agentic's names, train split).
DATA_FILES = {"trajectories": "trajectories_train.jsonl", "instructions": "instructions_train.jsonl"}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


# ------------------------------------------------------------------------------------ config

def default_chain_section() -> ml_collections.ConfigDict:
  """``config.chain`` without stages: the stage list, the evaluation, the SFT data generation."""
  from kat_jax.data import agentic as agentic_data
  from kat_jax.eval import agentic as agentic_eval
  c = ml_collections.ConfigDict()
  c.stages = ""                    # stage names in order, comma-separated (each a chain.<name>)
  c.eval = agentic_eval.default_agentic_eval_config()   # after every stage (kat_jax.eval.agentic)
  c.sft_data = agentic_data.default_agentic_config()    # missing SFT data is generated with this
  return c


def chain_config(stage_configs: Mapping[str, ml_collections.ConfigDict],
                 order: Optional[Sequence[str]] = None) -> ml_collections.ConfigDict:
  """A chain config: ``stage = "chain"`` and the ``chain`` section holding ``stage_configs``
  (name -> full stage config) run in ``order`` (default: the mapping's order)."""
  c = ml_collections.ConfigDict()
  c.stage = "chain"
  c.chain = default_chain_section()
  order = list(order if order is not None else stage_configs)
  for name, stage_cfg in stage_configs.items():
    _check_name(name)
    c.chain[name] = copy.deepcopy(stage_cfg)
  c.chain.stages = ",".join(order)
  return c


def _check_name(name: str) -> None:
  if name in RESERVED or not _NAME.match(name):
    raise ConfigError(f"chain stage name {name!r}: use lower-case letters, digits and '_' "
                      f"(starting with a letter), not one of {list(RESERVED)}")


def _in_stage(error: Exception, name: str) -> ConfigError:
  """The error of a stage's config with its fields named as in the chain config."""
  text = re.sub(r"(?<![\w.])config\.", f"config.chain.{name}.", str(error))
  return ConfigError(f"chain stage {name!r}: {text}")


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
  """``config.chain.stages`` checked: names of ``chain.<name>`` sections, each once."""
  if "chain" not in config or "stages" not in config.chain:
    raise ConfigError("config.stage='chain' needs a config.chain section with chain.stages "
                      "(kat_jax.train.chain.chain_config builds one)")
  names = split_list(config.chain.stages)
  if not names:
    raise ConfigError("config.chain.stages is empty: name the stages to run in order, e.g. "
                      "--config.chain.stages=midtrain,sft")
  declared = [k for k in config.chain.keys() if k not in RESERVED]
  for name in names:
    _check_name(name)
    if name not in declared:
      raise ConfigError(f"config.chain.stages names {name!r}, but config.chain has no section "
                        f"{name!r}: the stages declared are {declared}")
  if len(set(names)) != len(names):
    raise ConfigError(f"config.chain.stages={config.chain.stages!r} names a stage twice: give "
                      "each run its own section (the same config under two names)")
  return names


def stage_dir(workdir: str, index: int, name: str) -> str:
  """``WORKDIR/<index>_<name>``, index 1-based."""
  return os.path.join(workdir, f"{index}_{name}")


# ------------------------------------------------------------------------------- the plan

class StagePlan:
  """One stage of the chain: its name, position, directory and the config it trains with."""

  def __init__(self, index: int, name: str, workdir: str, config: ml_collections.ConfigDict):
    self.index, self.name, self.workdir, self.config = index, name, workdir, config

  @property
  def kind(self) -> str:
    return self.config.stage

  @property
  def final_step(self) -> int:
    return int(self.config.train.steps)

  @property
  def label(self) -> str:
    return f"{self.index}_{self.name}"


def _rl_steps(config) -> int:
  from kat_jax.rl import loop as rl_loop
  return config.rl.iterations * rl_loop.steps_per_iteration(config)


def _validate_rl(config) -> None:
  from kat_jax.rl import loop as rl_loop
  rl_loop.validate(config)


def _validate_rft(config) -> None:
  from kat_jax.rl import rft_loop
  rft_loop.validate(config)


def _validate_sft(config) -> None:
  from kat_jax.train import stages
  stages._check_sft_data(config.data)   # the sft stage's own contract on config.data


# Stage kind -> the optimizer steps its loop takes (where train.steps is not free) / its checks.
_STEPS: dict[str, Callable] = {"rl": _rl_steps, "rft": _rl_steps}
_CHECKS: dict[str, Callable] = {"rl": _validate_rl, "rft": _validate_rft, "sft": _validate_sft}


def _uses_stream(config, stream: str) -> bool:
  return "data" in config and config.data.mixture[stream] > 0


def plan(config: ml_collections.ConfigDict, workdir: str,
         num_devices: Optional[int] = None) -> list[StagePlan]:
  """Every stage's directory and final config, validated against ``num_devices`` (default: the
  devices at hand; see the module docstring); nothing is written. ConfigError names the
  ``config.chain.<name>.…`` field and the fix."""
  import jax
  from kat_jax import config as config_lib
  from kat_jax.eval import agentic as agentic_eval
  from kat_jax.model import ModelConfig
  from kat_jax.model.hf import init_from as init_from_lib
  from kat_jax.train import stages
  names = stage_names(config)
  agentic_eval.validate_config(config.chain.eval)
  plans: list[StagePlan] = []
  for index, name in enumerate(names, start=1):
    section = config.chain[name]
    if not isinstance(section, ml_collections.ConfigDict) or "stage" not in section:
      raise ConfigError(f"config.chain.{name} must be a full stage config (with a 'stage' field), "
                        "e.g. configs/midtrain_tiny.get_config()")
    cfg = copy.deepcopy(section)
    try:
      if cfg.stage == "chain":
        raise ConfigError("config.stage='chain': a chain does not nest chains; list the inner "
                          "stages in config.chain.stages instead")
      stages.get_stage(cfg.stage)
      if plans:
        prev = plans[-1]
        if cfg.init_from:
          raise ConfigError(f"config.init_from={cfg.init_from!r}: a stage after the first starts "
                            f"from the previous stage's final checkpoint; set it to ''")
        cfg.init_from = f"{prev.workdir}@{prev.final_step}"
        if "data" in cfg and not cfg.data.tokenizer_path:
          # The params' token ids: a stage that would train its own tokenizer (midtrain,
          # sft_tree) reads the previous stage's instead; the others read the same one.
          cfg.data.tokenizer_path = workdir_lib.tokenizer_dir(prev.workdir)
      if cfg.stage in _STEPS:
        cfg.train.steps = int(_STEPS[cfg.stage](cfg))
      for stream in DATA_STREAMS:
        if _uses_stream(cfg, stream) and not cfg.data[stream].paths:
          cfg.data[stream].paths = os.path.join(workdir, AGENTIC_DATA_DIR, DATA_FILES[stream])
      config_lib.validate(cfg, jax.device_count() if num_devices is None else num_devices)
      if cfg.stage in _CHECKS:
        _CHECKS[cfg.stage](cfg)
      _check_data_generation(cfg, config.chain.sft_data)
    except ConfigError as e:
      raise _in_stage(e, name) from None
    if plans:
      try:
        init_from_lib.check_same_model(ModelConfig.from_config(cfg.model), plans[-1].config.model,
                                       f"the previous stage's config.chain.{plans[-1].name}.model")
      except ValueError as e:
        raise ConfigError(f"chain stage {name!r} trains the model of the stage before it: " +
                          re.sub(r"(?<![\w.])config\.model\b", f"config.chain.{name}.model",
                                 str(e).split(": ", 1)[1])) from None
    plans.append(StagePlan(index, name, stage_dir(workdir, index, name), cfg))
  return plans


def _missing_data(cfg) -> dict[str, str]:
  """stream -> the file the chain must generate for it (streams used whose one plain path is
  missing); ConfigError for a missing glob or list, which the chain cannot write."""
  missing = {}
  for stream in DATA_STREAMS:
    if not _uses_stream(cfg, stream):
      continue
    paths = split_list(cfg.data[stream].paths)
    if any(glob.glob(os.path.expanduser(p)) for p in paths):
      continue
    if len(paths) != 1 or glob.has_magic(paths[0]):
      raise ConfigError(
          f"config.data.{stream}.paths={cfg.data[stream].paths!r} matches no file and is not one "
          f"plain path the chain could generate: write the data first (python -m "
          f"experiments.make_agentic_data) or give one path (or '' for the chain's own)")
    missing[stream] = os.path.expanduser(paths[0])
  return missing


def _check_data_generation(cfg, sft_data) -> None:
  from kat_jax.data import agentic as agentic_data
  missing = _missing_data(cfg)
  if not missing:
    return
  try:
    agentic_data.episode_plan(sft_data)
  except ConfigError as e:
    raise ConfigError(str(e).replace(f"{agentic_data.CONFIG_PATH}.",
                                     "config.chain.sft_data.")) from None
  if "trajectories" in missing and not (sft_data.code_episodes + sft_data.repo_episodes
                                        + sft_data.math_episodes):
    raise ConfigError("config.data.trajectories.paths is missing and would be generated, but "
                      "config.chain.sft_data asks for no episodes: set code_episodes / "
                      "repo_episodes / math_episodes > 0")
  if "instructions" in missing and sft_data.instructions < 1:
    raise ConfigError("config.data.instructions.paths is missing and would be generated, but "
                      "config.chain.sft_data.instructions=0: set it > 0")


def generate_missing_data(cfg, sft_data) -> dict[str, Any]:
  """Writes the teacher trajectories / instruction data a stage reads and that do not exist yet
  (``kat_jax.data.agentic``, as experiments/make_agentic_data.py does); returns what it wrote."""
  from kat_jax.data import agentic as agentic_data
  from kat_jax.sandbox import SandboxPool
  from kat_jax.train import metrics as metrics_lib
  written: dict[str, Any] = {}
  for stream, path in _missing_data(cfg).items():
    start = time.perf_counter()
    if stream == "trajectories":
      with SandboxPool(num_workers=int(sft_data.num_threads)) as pool:
        conversations, report = agentic_data.teacher_trajectories(sft_data, pool)
      if not conversations:
        raise RuntimeError(f"no teacher episode passed (report: {report}): nothing to write to "
                           f"{path}")
    else:
      conversations = agentic_data.instruction_conversations(sft_data)
    agentic_data.write_jsonl(conversations, path)
    written[stream] = {"path": path, "examples": len(conversations),
                       "seconds": round(time.perf_counter() - start, 1)}
    metrics_lib.console(f"chain: wrote {len(conversations)} {stream} examples to {path} in "
                        f"{written[stream]['seconds']} s")
  return written


# -------------------------------------------------------------------------------- the run

def _read_json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value: Any) -> None:
  """Whole or not at all (a reader never sees half a file)."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _config_json(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json(sort_keys=True))


def _first_difference(a: Any, b: Any, path: str = "config") -> Optional[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      if key not in a or key not in b:
        return f"{path}.{key}"
      found = _first_difference(a[key], b[key], f"{path}.{key}")
      if found:
        return found
    return None
  return None if a == b else path


def _scalars(result: Mapping[str, Any]) -> dict:
  return {k: v for k, v in result.items()
          if isinstance(v, (bool, int, float, str)) and not k.endswith("_dir")}


def _check_unchanged(stage: StagePlan, done: dict) -> None:
  saved = _read_json(os.path.join(stage.workdir, STAGE_CONFIG_FILENAME))
  if saved is None:
    return
  diff = _first_difference(saved, _config_json(stage.config))
  if diff:
    field = diff.replace("config.", f"config.chain.{stage.name}.", 1)
    raise ConfigError(
        f"chain stage {stage.label} finished (step {done['final_step']}) with another config: "
        f"{field} differs from {stage.workdir}/{STAGE_CONFIG_FILENAME}. Use a new --workdir, "
        f"or remove {stage.workdir} to train that stage (and the ones after it) again")


def _train(stage: StagePlan, sft_data) -> dict:
  """Trains one stage (resuming its checkpoint); returns and records its final figures."""
  from kat_jax.train import metrics as metrics_lib
  from kat_jax.train import stages
  saved = _read_json(os.path.join(stage.workdir, TRAIN_RESULT_FILENAME))
  if saved is not None and saved["final_step"] == stage.final_step:
    metrics_lib.console(f"chain: {stage.label} trained already (step {stage.final_step}); "
                        "evaluating")
    return saved
  os.makedirs(stage.workdir, exist_ok=True)
  _write_json(os.path.join(stage.workdir, STAGE_CONFIG_FILENAME), _config_json(stage.config))
  data = generate_missing_data(stage.config, sft_data)
  start = time.perf_counter()
  result = stages.run(stage.config, stage.workdir)
  step = int(result["step"])
  if step != stage.final_step:
    raise RuntimeError(f"chain stage {stage.label} ended at step {step}, not at its "
                       f"config.train.steps={stage.final_step}")
  record = {"final_step": step, "start_step": int(result.get("start_step", 0)),
            "train_s": round(time.perf_counter() - start, 2), "metrics": _scalars(result),
            "data": data}
  if result.get("history"):   # the RL / RFT loops: one metrics dict per iteration (curves)
    record["history"] = [_scalars(m) for m in result["history"]]
  _write_json(os.path.join(stage.workdir, TRAIN_RESULT_FILENAME), record)
  return record


def _evaluate(stage: StagePlan, eval_cfg, evaluator) -> tuple[dict, float]:
  from kat_jax.eval import agentic as agentic_eval
  if evaluator is None:
    return {}, 0.0
  start = time.perf_counter()
  report = agentic_eval.evaluate_workdir(stage.config, stage.workdir, eval_cfg,
                                         step=stage.final_step, evaluator=evaluator)
  return report, round(time.perf_counter() - start, 2)


def run_chain(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the chain of ``config`` in ``workdir``; returns the last stage's final
  step, the chain's wall time, one row per stage and the report's paths (module docstring)."""
  from kat_jax.eval import agentic as agentic_eval
  from kat_jax.train import metrics as metrics_lib
  start = time.perf_counter()
  plans = plan(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  lock = workdir_lib.WorkdirLock(workdir)
  lock.acquire()
  evaluator = None
  rows: list[dict] = []
  try:
    if agentic_eval.enabled_suites(config.chain.eval):
      evaluator = agentic_eval.AgenticEvaluator(config.chain.eval)
    for stage in plans:
      done = _read_json(os.path.join(stage.workdir, DONE_FILENAME))
      if done is not None:
        _check_unchanged(stage, done)
        metrics_lib.console(f"chain: {stage.label} done (step {done['final_step']}), skipped")
        rows.append(done)
        continue
      metrics_lib.console(f"chain: stage {stage.index}/{len(plans)} {stage.label} "
                          f"({stage.kind}, {stage.final_step} steps) in {stage.workdir}"
                          + (f" from {stage.config.init_from}" if stage.config.init_from else ""))
      trained = _train(stage, config.chain.sft_data)
      evaluation, eval_s = _evaluate(stage, config.chain.eval, evaluator)
      done = {"index": stage.index, "name": stage.name, "stage": stage.kind,
              "workdir": stage.workdir, "init_from": stage.config.init_from, **trained,
              "eval": evaluation, "eval_s": eval_s,
              "finished_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
      _write_json(os.path.join(stage.workdir, DONE_FILENAME), done)
      rows.append(done)
      paths = write_report(workdir, rows, [p.label for p in plans])
      metrics_lib.console(f"chain: {stage.label} finished: {summary_line(done)}; report "
                          f"{paths['md']}")
    paths = write_report(workdir, rows, [p.label for p in plans])
  finally:
    try:
      if evaluator is not None:
        evaluator.close()
    finally:
      lock.release()
  last = rows[-1]
  result = {"step": last["final_step"], "start_step": last["start_step"],
            "wall_time_s": time.perf_counter() - start, "stages": rows,
            "report": paths["json"], "report_md": paths["md"],
            "checkpoint_dir": workdir_lib.checkpoints_dir(last["workdir"])}
  if "train_loss" in last["metrics"]:
    result["train_loss"] = last["metrics"]["train_loss"]
  return result


# ------------------------------------------------------------------------------ the report

# Report columns: (header, how to read it from a stage's done record; None = not applicable).
def _eval_value(suite: str, key: str) -> Callable[[dict], Any]:
  return lambda row: row["eval"][suite][key] if suite in row["eval"] else None


def _train_loss(row: dict) -> Any:
  metrics = row["metrics"]
  for key in ("train_loss", "train_train/loss"):
    if key in metrics:
      return metrics[key]
  return None


COLUMNS: tuple[tuple[str, Callable[[dict], Any]], ...] = (
    ("steps", lambda row: row["final_step"]),
    ("train loss", _train_loss),
    ("eval loss", lambda row: row["metrics"]["eval_loss"] if "eval_loss" in row["metrics"]
     else None),
    ("RL reward", lambda row: row["metrics"]["train_reward"] if "train_reward" in row["metrics"]
     else None),
    ("single-turn code pass", _eval_value("code_single", "pass_rate")),
    ("code pass", _eval_value("code", "pass_rate")),
    ("code tool-call turns", _eval_value("code", "tool_call_share")),
    ("code turns opening a call", _eval_value("code", "attempted_share")),
    ("code turns", _eval_value("code", "mean_turns")),
    ("repo resolved", _eval_value("repo", "resolve_rate")),
    ("repo tool-call turns", _eval_value("repo", "tool_call_share")),
    ("HumanEval pass@1", _eval_value("humaneval", "pass_at_1")),
    ("train s", lambda row: round(row["train_s"])),
    ("eval s", lambda row: round(row["eval_s"])),
)
# The chart's lines: shares in [0, 1] along the chain.
CHART_SERIES = ("single-turn code pass", "code pass", "code tool-call turns", "code turns opening a call", "repo resolved",
                "repo tool-call turns", "HumanEval pass@1")


def _cell(value: Any) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
  return str(value)


def summary_line(row: dict) -> str:
  return ", ".join(f"{name} {_cell(read(row))}" for name, read in COLUMNS
                   if read(row) is not None)


def report_table(rows: Sequence[dict]) -> str:
  """The markdown table: one row per finished stage, ``COLUMNS`` across."""
  header = "| stage | type | " + " | ".join(name for name, _ in COLUMNS) + " |"
  lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
  for row in rows:
    lines.append(f"| {row['index']}_{row['name']} | {row['stage']} | "
                 + " | ".join(_cell(read(row)) for _, read in COLUMNS) + " |")
  return "\n".join(lines)


def write_report(workdir: str, rows: Sequence[dict], planned: Sequence[str]) -> dict[str, str]:
  """Writes report.json, report.md and report.png (when matplotlib is installed) for the
  finished stages ``rows`` of the chain ``planned``; returns their paths."""
  paths = {"json": os.path.join(workdir, REPORT_JSON), "md": os.path.join(workdir, REPORT_MD),
           "png": os.path.join(workdir, REPORT_PNG)}
  finished = [f"{row['index']}_{row['name']}" for row in rows]
  table = report_table(rows)
  _write_json(paths["json"], {
      "chain": list(planned), "finished": finished,
      "columns": {f"{row['index']}_{row['name']}": {name: read(row) for name, read in COLUMNS}
                  for row in rows},
      "stages": list(rows), "table": table})
  wall = sum(row["train_s"] + row["eval_s"] for row in rows)
  text = (f"# Chain report\n\nStages: {' → '.join(planned)}; finished: "
          f"{', '.join(finished) or 'none'}. Wall time of the finished stages: {wall:.0f} s "
          "(each stage's last run: training + evaluation).\n\n" + table + "\n")
  if rows and any(row["eval"] for row in rows):
    text += ("\nEvaluation (held-out, greedy): `single-turn code pass` (one answer, no tools: "
             "the layout mid-training and RL train on), `code pass` (multi-turn, tools) and "
             "`repo resolved` are the shares of episodes the environment graded passed; `tool-call turns` the share of sampled "
             "turns that parse as valid tool calls (`turns opening a call`: that open a "
             "`<tool_call>` at all, valid or not); `code turns` the mean assistant turns per "
             "episode.\n")
  if _write_chart(paths["png"], rows):
    text += f"\n![stage progression]({REPORT_PNG})\n"
  tmp = paths["md"] + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, paths["md"])
  return paths


def _write_chart(path: str, rows: Sequence[dict]) -> bool:
  """The metrics of ``CHART_SERIES`` along the stages and the wall time per stage, as a PNG;
  False (and a warning) without matplotlib."""
  try:
    from matplotlib.figure import Figure   # no pyplot: a notebook's backend is left alone
  except ImportError:
    from absl import logging
    logging.warning("matplotlib is not installed: no %s (pip install matplotlib)", path)
    return False
  readers = dict(COLUMNS)
  labels = [f"{row['index']}_{row['name']}" for row in rows]
  x = list(range(len(rows)))
  fig = Figure(figsize=(11, 4))
  left, right = fig.subplots(1, 2)
  for name in CHART_SERIES:
    values = [readers[name](row) for row in rows]
    if any(v is not None for v in values):
      left.plot(x, [float("nan") if v is None else v for v in values], marker="o", label=name)
  left.set_ylim(-0.05, 1.05)
  left.set_title("held-out evaluation after each stage")
  if left.lines:
    left.legend(fontsize=8, loc="best")
  else:
    left.text(0.5, 0.5, "no evaluation suite on", ha="center", va="center",
              transform=left.transAxes)
  right.bar(x, [row["train_s"] for row in rows], label="train")
  right.bar(x, [row["eval_s"] for row in rows], bottom=[row["train_s"] for row in rows],
            label="eval")
  right.set_ylabel("seconds")
  right.set_title("wall time per stage")
  right.legend(fontsize=8)
  for axis in (left, right):
    axis.set_xticks(x)
    axis.set_xticklabels(labels, rotation=20, fontsize=8)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=90)
  os.replace(tmp, path)
  return True
