"""The mid-training streams built from the SFT builders, as TFDS corpora (array_record), built once.

Three streams of ``config.data`` (``data.config``) are generated in place rather than read from
files, by the same code that writes the SFT data (``kat_jax.data.agentic``):

* ``tool_use``: episodes of scripted experts (``kat_jax.rl.experts``) run through the real
  environments — by default the function-task experts (``code_direct``, ``code_fix``: run_tests,
  read the sandbox's report, fix, submit) and ``math_answer`` (submit an exact answer): short
  tool-calling exchanges on one task.
* ``multi_turn``: by default the repository experts (``repo_fix``, ``repo_reproduce``,
  ``repo_explore``): five to eight turns in a workspace that persists — search, read, edit with
  ``str_replace`` / ``create_file``, run the tests, submit.
* ``instruction_following``: ``kat_jax.data.instructions`` examples, a request with checkable
  constraints (over all of its ``CATEGORIES``) and an answer that every verifier accepts.

Every tool result in an episode is what the environment's real tool returned (sandboxed test
runs, greps, file reads), and an episode is kept only when the environment graded it passed
(``agentic.teacher_trajectories``); the dropped ones are counted in ``skipped`` by expert and
reason. ``train`` holds episodes on the procedural generator's ``train`` tasks, ``eval`` on its
``heldout`` tasks (``data.procedural.heldout_fraction``, so mid-training never sees a held-out
task); instruction examples of ``eval`` come from another seed stream, and an example that
repeats one already in the corpus is dropped (``skipped/duplicate``). The config name fingerprints
the complete generation configs (every section field but ``RENDER_FIELDS``, and the defaults of
``kat_jax.data.agentic``), so a changed knob builds a new corpus and an unchanged one is reused.
Building the defaults of ``data.config`` takes about 10 s on 2 shared CPU cores::

  config = stream_corpus_config("tool_use", data_config)
  builder = corpora.prepare(AgenticConversations, config, data_config.data_dir)
  builder.as_data_source(split="train")[0]["conversation"]     # chat.Conversation JSON
"""
from __future__ import annotations

import dataclasses
import json

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from kat_jax.data.corpora import common

EPISODE_STREAMS = ("tool_use", "multi_turn")      # experts run through the environments
INSTRUCTION_STREAMS = ("instruction_following",)  # data.instructions examples
STREAMS = EPISODE_STREAMS + INSTRUCTION_STREAMS
# Our split name -> the procedural generator's split name.
GENERATOR_SPLITS = {"train": "train", "eval": "heldout"}


# Fields of a stream's section that do not change its examples (kept out of the corpus config).
RENDER_FIELDS = ("loss_on", "workers")


@dataclasses.dataclass
class AgenticConfig(common.KatBuilderConfig):
  stream: str = "tool_use"      # one of STREAMS
  section: str = "{}"           # JSON of data.<stream> without RENDER_FIELDS
  heldout_fraction: float = 0.1  # data.procedural.heldout_fraction
  workers: int = 2              # sandbox pool workers while building (not in the fingerprint)


def _generation(stream: str, section: dict, heldout_fraction: float) -> dict:
  """{split: the ``kat_jax.data.agentic`` config (a dict) that generates it} of ``stream``."""
  from kat_jax.data import agentic   # pylint: disable=g-import-not-at-top  (imports kat_jax.rl)
  out = {}
  for split, count in (("train", section["num_train"]), ("eval", section["num_eval"])):
    if stream in EPISODE_STREAMS:
      c = agentic.episodes_config(
          section["experts"], int(count), split=GENERATOR_SPLITS[split], seed=section["seed"],
          heldout_fraction=heldout_fraction, code_levels=section["code_levels"],
          math_levels=section["math_levels"], repo_level=section["repo_level"],
          max_turns=section["max_turns"], num_threads=1, field=f"data.{stream}")
    else:
      if count < 0 or section["max_constraints"] < 1:
        raise ValueError(f"data.{stream}: need num_train, num_eval >= 0 and max_constraints >= 1,"
                         f" got {section}")
      c = agentic.default_agentic_config()
      c.code_episodes = c.repo_episodes = c.math_episodes = 0
      c.seed, c.split = int(section["seed"]), GENERATOR_SPLITS[split]
      c.instructions = int(count)
      c.instruction_max_constraints = int(section["max_constraints"])
    out[split] = c.to_dict()
  return out


def stream_corpus_config(name: str, data_config: ml_collections.ConfigDict) -> AgenticConfig:
  """The corpus config of mid-training stream ``name`` (one of ``STREAMS``); its name
  fingerprints the complete generation configs, defaults of ``kat_jax.data.agentic`` included."""
  if name not in STREAMS:
    raise ValueError(f"{name!r} is not a generated stream; use one of {list(STREAMS)}")
  section = {k: v for k, v in data_config[name].to_dict().items() if k not in RENDER_FIELDS}
  heldout_fraction = float(data_config.procedural.heldout_fraction)
  generation = _generation(name, section, heldout_fraction)
  fields = dict(stream=name, section=json.dumps(section, sort_keys=True),
                heldout_fraction=heldout_fraction)
  workers = int(data_config[name].workers) if name in EPISODE_STREAMS else 1
  if workers < 1:
    raise ValueError(f"data.{name}.workers={workers} must be >= 1")
  fingerprint = common.config_fingerprint({**fields, "generation": generation})
  return AgenticConfig(name=f"{name}_{fingerprint}", workers=workers, **fields)


def generation_config(builder_config: AgenticConfig, split: str) -> ml_collections.ConfigDict:
  """The ``kat_jax.data.agentic`` config that generates ``split`` (rebuilds its episode plan)."""
  generation = _generation(builder_config.stream, json.loads(builder_config.section),
                           builder_config.heldout_fraction)
  return ml_collections.ConfigDict(generation[split])


def _episodes(config: AgenticConfig, report: common.BuildReport) -> dict[str, list]:
  from kat_jax.data import agentic   # pylint: disable=g-import-not-at-top
  from kat_jax.sandbox import SandboxPool   # pylint: disable=g-import-not-at-top
  rows = {}
  with SandboxPool(num_workers=config.workers) as pool:
    for split in common.SPLITS:
      generation = generation_config(config, split)
      generation.num_threads = config.workers
      conversations, experts_report = agentic.teacher_trajectories(generation, pool)
      for expert, entry in sorted(experts_report.items()):
        for reason, count in sorted(entry["dropped"].items()):
          for _ in range(count):
            report.skip(f"{expert}/{reason}", f"{split}:{expert}", warn=False)
      rows[split] = conversations
  return rows


def _instructions(config: AgenticConfig, report: common.BuildReport) -> dict[str, list]:
  from kat_jax.data import agentic   # pylint: disable=g-import-not-at-top
  rows, seen = {}, set()
  for split in common.SPLITS:
    rows[split] = []
    for conversation in agentic.instruction_conversations(generation_config(config, split)):
      task_id = conversation.meta["task_id"]
      if task_id in seen:
        report.skip("duplicate", f"{split}:{task_id}", "an example already in the corpus",
                    warn=False)
        continue
      seen.add(task_id)
      rows[split].append(conversation)
  return rows


def example_of(conversation) -> dict:
  """A conversation as a corpus example (the JSONL corpus's fields, plus its task and source)."""
  meta = conversation.meta or {}
  record = conversation.to_dict()
  metadata = {k: record[k] for k in ("label", "meta") if k in record}
  return {"conversation": conversation.to_json(), "task_id": str(meta.get("task_id", "")),
          "source": str(meta.get("expert", meta.get("source", ""))),
          "metadata": json.dumps(metadata, ensure_ascii=False, sort_keys=True)}


class AgenticConversations(tfds.core.GeneratorBasedBuilder):
  """Generated conversations of one mid-training stream; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Expert episodes through the real environments, or instruction following "
                    "with code-verified constraints, one chat.Conversation JSON per example.",
        features=tfds.features.FeaturesDict({
            "conversation": tfds.features.Text(), "task_id": tfds.features.Text(),
            "source": tfds.features.Text(), "metadata": tfds.features.Text(),
            "turns": np.int32,
        }),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    report = common.BuildReport()
    build = _episodes if config.stream in EPISODE_STREAMS else _instructions
    rows = build(config, report)
    examples = {}
    for split, conversations in rows.items():
      examples[split] = []
      for i, conversation in enumerate(conversations):
        report.keep(split)
        example = example_of(conversation)
        example["turns"] = sum(m.role == "assistant" for m in conversation.messages)
        examples[split].append((f"{i:06d}:{example['task_id']}", example))
    report.write_to(self.info.metadata)
    return common.nonempty_splits(examples, report, f"the {config.stream!r} stream")

  def _generate_examples(self):  # required by the base class; splits come from _split_generators
    raise NotImplementedError
