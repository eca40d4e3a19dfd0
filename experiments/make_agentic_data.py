"""Writes the SFT data of configs/sft_tiny.py: teacher trajectories of scripted experts run through
the real environments (kat_jax.data.agentic) and instruction following with checkable
constraints (kat_jax.data.instructions), as JSONL, then builds their TFDS corpora.

  python -m experiments.make_agentic_data [--out_dir=DIR --workers=2 --split=train
                                           --config.code_episodes=240 --config.repo_episodes=60]

Writes ``DIR/trajectories_<split>.jsonl``, ``DIR/instructions_<split>.jsonl`` and
``DIR/report_<split>.json`` (episodes run, kept and dropped by expert and reason; examples by
instruction category; seconds), prepares the array_record corpora the ``trajectories`` /
``instructions`` streams read (in ``--data_dir``, '' = the default TFDS cache) and prints the
report as one JSON object. Every file is written whole or not at all.
"""
from __future__ import annotations

import collections
import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

from kat_jax.data import agentic
from kat_jax.sandbox import SandboxPool

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  config_flags.DEFINE_config_dict("config", agentic.default_agentic_config(),
                                  "Teacher-trajectory generation (agentic.py).")
  flags.DEFINE_string("out_dir", agentic.DEFAULT_OUT_DIR, "Where the JSONL files go.")
  flags.DEFINE_string("split", "", "Procedural split of the tasks ('' = config.split).")
  flags.DEFINE_integer("workers", 2, "Sandbox pool workers.")
  flags.DEFINE_string("data_dir", "", "TFDS cache of the corpora ('' = default).")


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.split:
    config.split = FLAGS.split
  start = time.time()
  with SandboxPool(num_workers=FLAGS.workers) as pool:
    conversations, report = agentic.teacher_trajectories(config, pool)
  episodes_s = time.time() - start
  trajectories = agentic.write_jsonl(conversations, os.path.join(
      FLAGS.out_dir, agentic.TRAJECTORIES_FILE.format(split=config.split)))
  instructions = agentic.instruction_conversations(config)
  instructions_path = agentic.write_jsonl(instructions, os.path.join(
      FLAGS.out_dir, agentic.INSTRUCTIONS_FILE.format(split=config.split)))
  categories = collections.Counter(c["category"] for conv in instructions
                                   for c in conv.meta["constraints"])
  built = {}
  for name, path in (("trajectories", trajectories), ("instructions", instructions_path)):
    builder = agentic.dataset_builder([path], FLAGS.data_dir, name_prefix=name)
    built[name] = {split: len(builder.as_data_source(split=split))
                   for split in builder.info.splits}
  summary = {"split": config.split, "trajectories": trajectories, "kept": len(conversations),
             "experts": report, "episodes_s": round(episodes_s, 1),
             "instructions": instructions_path, "instruction_examples": len(instructions),
             "instruction_categories": dict(sorted(categories.items())), "corpora": built,
             "seconds": round(time.time() - start, 1)}
  with open(os.path.join(FLAGS.out_dir, f"report_{config.split}.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main)
