"""Evol-Instruct with a real model: evolves a seed instruction set, runs the evolved solutions in
the sandbox against generated or given tests, keeps those that pass, writes them as instruction
records, aiXcoder-style code files and a TFDS corpus (kat_jax.data.evol_instruct)::

  python -m experiments.evolve_instructions --config=configs/midtrain_tiny.py \
      --workdir=/tmp/kat_midtrain [--generator=checkpoint | --generator=hf:/ckpt/Qwen-Coder] \
      [--seeds=procedural --num_seeds=64 | --seeds=seeds.jsonl] [--rounds=3 --tests=both] \
      [--out_dir=DIR --data_dir=DIR --temperature=0.7 --max_new_tokens=384]

The generator (``kat_jax.data.generator``) is the checkpoint in ``--workdir`` (with ``--config``,
through the KV-cache sampler) or an imported Hugging Face model (``--generator=hf:<dir>``); it
writes the rewrites, the solutions and, for ``--tests=generated|both``, assert statements for each
evolved instruction. ``--tests=given`` runs the seed's own tests (``--seeds=procedural``: the
procedural training tasks, spec as the instruction and their unit tests as asserts; a JSONL file:
``{"id", "instruction", "solution"?, "tests"?: [assert, ...]}`` per line) on every descendant.

Writes ``DIR/evolved.jsonl`` (every accepted evolution), ``DIR/verified.jsonl`` (the ones whose
solution passed: instruction record + tests, tests_source, lineage from the seed),
``DIR/code_files/<id>.py`` (``evol_instruct.to_code_file``: the instruction as the docstring) and
``DIR/report.json`` (per-operation proposed / accepted / verified counts, rejection reasons,
generator calls, structured-FIM examples the code files yield), and prepares the JSONL corpus of
``verified.jsonl`` in ``--data_dir`` — the ``instructions`` stream reads it with
``data.instructions.render='code_file'`` (FIM'd code files). Prints the report as one JSON line.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

import numpy as np
from absl import app, flags, logging

from kat_jax.data import evol_instruct

DEFAULT_OUT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "kat_jax", "evol")
FLAGS = flags.FLAGS


def procedural_seeds(seed: int, num_seeds: int, levels: Sequence[int] = (0,)) -> list[dict]:
  """Procedural training tasks as seeds: spec, reference solution, tests as asserts."""
  from kat_jax.data import procedural
  tasks = procedural.generate_tasks(seed=seed, num_tasks=num_seeds, split="train",
                                    levels=tuple(levels))
  return [{"id": t.task_id, "instruction": t.spec, "solution": t.solution,
           "tests": t.assert_source().splitlines()} for t in tasks]


def read_seeds(path: str) -> list[dict]:
  """Seeds from JSONL: ``{"id"?, "instruction", "solution"?, "tests"?}`` per line."""
  seeds = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      obj = json.loads(line)
      if not isinstance(obj.get("instruction"), str):
        raise ValueError(f"{path}:{n}: a seed needs an 'instruction' string")
      obj.setdefault("id", f"seed-{len(seeds)}")
      seeds.append(obj)
  return seeds


def _write_jsonl(rows: Sequence[dict], path: str) -> str:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
  return path


def run(seeds: Sequence[dict], generate, pool, *, out_dir: str, rounds: int = 3,
        tests: str = "generated", data_dir: str = "", seed: int = 0,
        eval_fraction: float = 0.05, fim_examples_per_file: int = 2,
        config: Optional[evol_instruct.EvolConfig] = None) -> dict:
  """Evolves, verifies and writes everything of the module docstring; returns the report."""
  from kat_jax.data import corpora
  from kat_jax.data.corpora import jsonl
  start = time.time()
  os.makedirs(os.path.join(out_dir, "code_files"), exist_ok=True)
  config = config or evol_instruct.EvolConfig(rounds=rounds)
  records, stats = evol_instruct.evolve(seeds, generate, np.random.default_rng(seed), config)
  evol_instruct.write_jsonl(records, os.path.join(out_dir, "evolved.jsonl"))
  verified, report = evol_instruct.verify(records, generate, pool, tests=tests, seeds=seeds)
  verified_path = _write_jsonl([v.to_dict() for v in verified],
                               os.path.join(out_dir, "verified.jsonl"))
  rng = np.random.default_rng(seed)
  fim = 0
  for v in verified:
    path = f"evol/{v.record.id}.py"
    text = evol_instruct.to_code_file(v.record.instruction, v.record.solution, path=path)
    with open(os.path.join(out_dir, "code_files", f"{v.record.id}.py"), "w") as f:
      f.write(text)
    fim += len(evol_instruct.code_file_fim_examples(text, rng,
                                                    num_examples=fim_examples_per_file))
  corpus = {}
  if verified:
    builder = corpora.prepare(jsonl.JsonlConversations,
                              jsonl.jsonl_config([verified_path], name_prefix="evol",
                                                 eval_fraction=eval_fraction), data_dir)
    corpus = {split: len(builder.as_data_source(split=split)) for split in builder.info.splits}
  per_operation = {op: {"proposed": stats.proposed_per_operation[op],
                        "accepted": stats.accepted_per_operation[op],
                        "verified": report["per_operation"].get(op, {}).get("verified", 0)}
                   for op in evol_instruct.EVOL_METHODS if stats.proposed_per_operation[op]}
  summary = {"seeds": len(seeds), "rounds": config.rounds, "tests": tests,
             "evolved": len(records), "verified": len(verified),
             "accepted_per_round": stats.accepted_per_round,
             "evolution_rejected": dict(stats.rejected), "verify_rejected": report["rejected"],
             "per_operation": per_operation,
             "generator": generate.stats() if hasattr(generate, "stats") else None,
             "fim_examples": fim, "corpus": corpus, "verified_path": verified_path,
             "seconds": round(time.time() - start, 1)}
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(summary, f, indent=2)
  logging.info("evol: %s", {k: summary[k] for k in ("evolved", "verified", "per_operation")})
  return summary


def define_flags() -> None:
  """The command line, defined only when run as a script (see experiments/make_agentic_data.py)."""
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Run config of --workdir's checkpoint.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Training workdir of the checkpoint generator.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("generator", "checkpoint", "checkpoint (--config/--workdir) or hf:<dir>.")
  flags.DEFINE_string("seeds", "procedural", "procedural, or a seeds JSONL file.")
  flags.DEFINE_integer("num_seeds", 64, "Procedural seeds (--seeds=procedural).")
  flags.DEFINE_integer("rounds", 3, "Evolution rounds.")
  flags.DEFINE_enum("tests", "generated", list(evol_instruct.TEST_SOURCES),
                    "Tests the evolved solutions must pass.")
  flags.DEFINE_string("out_dir", DEFAULT_OUT_DIR, "Where the outputs go.")
  flags.DEFINE_string("data_dir", "", "TFDS cache of the corpus ('' = default).")
  flags.DEFINE_float("temperature", 0.7, "Sampling temperature of the generator.")
  flags.DEFINE_integer("max_new_tokens", 384, "Tokens per response at most.")
  flags.DEFINE_integer("max_len", 2048, "KV-cache slots of the sampler.")
  flags.DEFINE_integer("batch_size", 16, "Sampled rows per decode batch.")
  flags.DEFINE_integer("workers", 2, "Sandbox pool workers.")
  flags.DEFINE_integer("seed", 0, "Seed of the seeds, the operation draws and the sampling.")


def main(argv):
  del argv
  from kat_jax.data import generator as generator_lib
  from kat_jax.sandbox import SandboxPool
  options = dict(max_len=FLAGS.max_len, temperature=FLAGS.temperature,
                 max_new_tokens=FLAGS.max_new_tokens, batch_size=FLAGS.batch_size,
                 seed=FLAGS.seed)
  if FLAGS.generator.startswith("hf:") and FLAGS.generator[3:]:
    gen = generator_lib.from_hf(FLAGS.generator[3:], **options)
  elif FLAGS.generator == "checkpoint":
    if FLAGS.config is None or not FLAGS.workdir:
      raise app.UsageError("--generator=checkpoint needs --config and --workdir")
    gen = generator_lib.from_checkpoint(FLAGS.config, FLAGS.workdir, step=FLAGS.step, **options)
  else:
    raise app.UsageError(f"--generator={FLAGS.generator!r}: use checkpoint or hf:<dir>")
  seeds = (procedural_seeds(FLAGS.seed, FLAGS.num_seeds) if FLAGS.seeds == "procedural"
           else read_seeds(FLAGS.seeds))
  with SandboxPool(num_workers=FLAGS.workers) as pool:
    summary = run(seeds, gen, pool, out_dir=FLAGS.out_dir, rounds=FLAGS.rounds,
                  tests=FLAGS.tests, data_dir=FLAGS.data_dir, seed=FLAGS.seed)
  print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main)
