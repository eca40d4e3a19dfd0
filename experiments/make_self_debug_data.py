"""Writes the self-debugging data (LeDex) of a checkpoint: its own failing samples on procedural
training tasks (and AST mutants, labelled as such) with their sandbox errors, explanations,
refinements and test outcomes (kat_jax.data.self_debug), as JSONL and TFDS corpora::

  python -m experiments.make_self_debug_data --config=configs/midtrain_tiny.py \
      --workdir=/tmp/kat_midtrain [--self_debug.num_tasks=256 --self_debug.samples_per_task=8 \
       --self_debug.explainer=scripted:oracle|same|hf:<dir> --self_debug.refiner=same|hf:<dir> \
       --out_dir=DIR --data_dir=DIR]
  python -m experiments.make_self_debug_data --self_debug.sources=mutant \
      --self_debug.refiner=scripted:reference        # no checkpoint: mutants and scripted models

The programmer is the checkpoint in ``--workdir`` (restored with ``--config``) behind the KV-cache
sampler (``data.generator.from_checkpoint``); ``--self_debug.explainer`` / ``refiner`` say who
explains and who refines (``same`` = that checkpoint). Writes ``DIR/records.jsonl`` (every
refinement, passing or not: the RL data), ``DIR/sft_explain_refine.jsonl`` and
``DIR/sft_refine_only.jsonl`` (the passing ones as conversations: configs/sft_tiny_debug.py reads
them) and ``DIR/report.json`` (counts per stage and source — sampled, failing, kept, explained,
refined, passing — generator calls, corpus sizes, seconds); prepares the ``SelfDebugRecords``
corpus of the records and the JSONL corpora of the SFT files in ``--data_dir`` ('' = the default
TFDS cache) and prints the report as one JSON line. Every file is written whole or not at all.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

from kat_jax.data import self_debug

FLAGS = flags.FLAGS


def tasks_of(config):
  """The procedural tasks ``config`` (``self_debug.default_self_debug_config()``) names."""
  from kat_jax.data import procedural
  from kat_jax.data.config import split_list
  return procedural.generate_tasks(
      seed=config.seed, num_tasks=config.num_tasks, split=config.split,
      levels=tuple(int(v) for v in split_list(config.levels)),
      families=split_list(config.families) or None, heldout_fraction=config.heldout_fraction)


def run(tasks, programmer, pool, config, *, out_dir: str, data_dir: str = "") -> dict:
  """Synthesizes, writes and indexes everything of the module docstring; returns the report."""
  from kat_jax.data import corpora
  from kat_jax.data.corpora import jsonl
  from kat_jax.data.corpora import self_debug as self_debug_corpus
  start = time.time()
  result = self_debug.synthesize(tasks, programmer, pool, config)
  os.makedirs(out_dir, exist_ok=True)
  records = self_debug.write_records(result.records, os.path.join(out_dir,
                                                                   self_debug.RECORDS_FILE))
  paths = {"records": records}
  for fmt in self_debug.SFT_FORMATS:
    paths[fmt] = self_debug.write_sft_jsonl(
        result.records, fmt, os.path.join(out_dir, self_debug.SFT_FILE.format(format=fmt)))
  built = {}
  if result.records:
    builder = corpora.prepare(self_debug_corpus.SelfDebugRecords,
                              self_debug_corpus.self_debug_config([records]), data_dir)
    built["records"] = {s: len(builder.as_data_source(split=s)) for s in builder.info.splits}
  if any(r.passed for r in result.records):
    for fmt in self_debug.SFT_FORMATS:
      builder = corpora.prepare(jsonl.JsonlConversations,
                                jsonl.jsonl_config([paths[fmt]], name_prefix="trajectories"),
                                data_dir)
      built[fmt] = {s: len(builder.as_data_source(split=s)) for s in builder.info.splits}
  report = {"counts": result.counts, "paths": paths, "corpora": built,
            "config": config.to_dict(), "seconds": round(time.time() - start, 1)}
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  logging.info("self-debug data: %s", {k: result.counts[k] for k in (
      "sampled", "failing", "kept", "explained", "refined", "passing")})
  return report


def define_flags() -> None:
  """The command line, defined only when run as a script (see experiments/make_agentic_data.py)."""
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Run config of --workdir's checkpoint.",
                                  lock_config=True)
  config_flags.DEFINE_config_dict("self_debug", self_debug.default_self_debug_config(),
                                  "The synthesis (kat_jax/data/self_debug.py).")
  flags.DEFINE_string("workdir", "", "Training workdir of the programmer ('' = no model: "
                      "--self_debug.sources=mutant).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("out_dir", self_debug.DEFAULT_OUT_DIR, "Where the JSONL files go.")
  flags.DEFINE_string("data_dir", "", "TFDS cache of the corpora ('' = default).")


def main(argv):
  del argv
  from kat_jax.data import generator as generator_lib
  from kat_jax.sandbox import SandboxPool
  config = FLAGS.self_debug
  programmer = None
  if FLAGS.workdir:
    if FLAGS.config is None:
      raise app.UsageError("--workdir needs --config (the run config of its checkpoint)")
    programmer = generator_lib.from_checkpoint(
        FLAGS.config, FLAGS.workdir, step=FLAGS.step, max_len=config.max_len,
        temperature=config.temperature, top_p=config.top_p,
        max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, seed=config.seed)
  with SandboxPool(num_workers=config.workers) as pool:
    report = run(tasks_of(config), programmer, pool, config, out_dir=FLAGS.out_dir,
                 data_dir=FLAGS.data_dir)
  print(json.dumps(report))


if __name__ == "__main__":
  define_flags()
  app.run(main)
