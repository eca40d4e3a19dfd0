"""Loader throughput: packed tokens/s of kat_jax's LM iterator, beside grain's own packer.

  python -m experiments.bench_data [--preset=small --batch_size=8 --seq_len=1024 --num_batches=200
      --data_dir=DIR]
  python -m experiments.bench_data --cases=loader_vs_step [--preset=small --step_batch_size=4
      --step_seq_len=256 --step_steps=2 --step_rounds=2]

Prints one JSON object per case on stdout. Cases (all on the configured code corpus, default the
Python standard library, with the same tokenizer, same batch shape, after one warm-up batch). The
tokenizer is the one the model of ``--preset`` would train with: trained on the corpus with that
preset's ``vocab_size`` (8,192 for ``small``), so tokens per document, and with them tokens/s,
are those of that model's data:

* ``kat_fim_off``           make_lm_iterator, FIM off, documents tokenized ahead on worker threads
* ``kat_fim_off_no_prefetch``  the same on the calling thread only
* ``kat_fim_on``            FIM on: rate 0.5, structured (AST node) for all FIM documents, SPM 0.5
* ``kat_mixture``           code 0.6 + commits of this repository 0.4 (when run inside a git checkout)
* ``grain_concat_then_split`` baseline: grain MapDataset shuffle/repeat/map(tokenize) →
  ``to_iter_dataset`` with 2 read threads → ``grain.experimental.ConcatThenSplitIterDataset`` →
  ``batch``: grain's own packer (inputs / segment ids / positions only, no targets or weights).
* ``loader_vs_step``        the loader with FIM on (as ``kat_fim_on``) against the train step of
  ``--preset`` (``experiments.bench_train.measure``), both at ``--step_batch_size`` ×
  ``--step_seq_len``, in this run: ``loader_tokens_per_s``, ``step_tokens_per_s``, ``ratio`` and
  ``goal_met`` (ratio ≥ ``--goal_ratio``, 10: the loader must not be what limits training). The two
  are timed one after the other; in training they share the host's cores.

``measure_loader_tokens_per_s(data_config, ...)`` and ``compare_loader_with_step(...)`` are the
reusable parts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

from absl import app, flags
import grain
import numpy as np

from kat_jax.data import config as config_lib
from kat_jax.data import pipeline
from kat_jax.data import tokenizer as tokenizer_lib
from kat_jax.model import get_preset

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
  flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
  flags.DEFINE_integer("num_batches", 200, "Timed batches per case.")
  flags.DEFINE_string("data_dir", "", "TFDS cache ('' = the default cache).")
  flags.DEFINE_string("workdir", "", "Tokenizer cache ('' = a temporary directory).")
  flags.DEFINE_string("code_root", "", "Code corpus root ('' = the Python stdlib).")
  flags.DEFINE_string("preset", "small", "Model preset: its vocab_size sizes the "
                      "tokenizer of every case; loader_vs_step times its train step.")
  flags.DEFINE_list("cases", ["kat_fim_off", "kat_fim_off_no_prefetch", "kat_fim_on",
                              "kat_mixture", "grain_concat_then_split", "loader_vs_step"],
                    "Cases to run.")
  flags.DEFINE_integer("step_batch_size", 4, "loader_vs_step: rows per batch.")
  flags.DEFINE_integer("step_seq_len", 256, "loader_vs_step: tokens per row.")
  flags.DEFINE_integer("step_steps", 2, "loader_vs_step: timed train steps per round.")
  flags.DEFINE_integer("step_rounds", 2, "loader_vs_step: rounds; the best is kept.")
  flags.DEFINE_float("goal_ratio", 10.0,
                     "loader_vs_step: loader tokens/s must be this many times the step's.")


def _time_batches(iterator, num_batches: int) -> dict:
  next(iterator)  # warm-up: opens files, starts threads
  real = total = 0
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
    segment_ids = batch.get("segment_ids", batch.get("inputs_segment_ids"))
    real += int(np.count_nonzero(segment_ids))
    total += segment_ids.size
  seconds = time.perf_counter() - start
  return {"seconds": round(seconds, 3), "tokens_per_s": round(real / seconds, 1),
          "slots_per_s": round(total / seconds, 1), "padding_fraction": round(1 - real / total, 4)}


def measure_loader_tokens_per_s(data_config, *, batch_size: int = 8, seq_len: int = 1024,
                                num_batches: int = 200, seed: int = 0,
                                tokenizer: Optional[tokenizer_lib.Tokenizer] = None,
                                workdir: str = "") -> dict:
  """Packed (non-padding) tokens per second of ``make_lm_iterator`` for ``data_config``.

  Corpus building and tokenizer training happen before the clock starts. Returns
  ``{"tokens_per_s", "slots_per_s", "padding_fraction", "seconds", "metrics"}``.
  """
  workdir = workdir or tempfile.mkdtemp(prefix="bench_data_")
  tokenizer = tokenizer or pipeline.get_or_train_tokenizer(data_config, workdir)
  iterator = pipeline.make_lm_iterator(data_config, tokenizer, split="train",
                                       batch_size=batch_size, seq_len=seq_len, seed=seed)
  try:
    result = _time_batches(iterator, num_batches)
    result["metrics"] = {k: round(v, 4) for k, v in iterator.metrics().items()
                         if "fraction" in k or k.startswith("fim/")}
  finally:
    iterator.close()
  return result


def measure_grain_baseline_tokens_per_s(data_config, tokenizer, *, batch_size: int = 8,
                                        seq_len: int = 1024, num_batches: int = 200,
                                        seed: int = 0) -> dict:
  """The same documents through grain's ConcatThenSplit packer (the strongest stock alternative)."""
  builder = pipeline.code_corpus_builder(data_config)
  headers = bool(data_config.code.language_headers)
  eos_id = tokenizer.eos_id

  def tokenize(example):
    ids = tokenizer.encode(pipeline.code_example_text(example, headers)) + [eos_id]
    return {"inputs": np.asarray(ids, np.int32)}

  dataset = (grain.MapDataset.source(builder.as_data_source(split="train"))
             .shuffle(seed=seed).repeat().map(tokenize)
             .to_iter_dataset(grain.ReadOptions(num_threads=int(data_config.num_threads),
                                                prefetch_buffer_size=int(
                                                    data_config.prefetch_documents))))
  packed = grain.experimental.ConcatThenSplitIterDataset(dataset,
                                                         length_struct={"inputs": seq_len})
  return _time_batches(iter(packed.batch(batch_size)), num_batches)


def fim_on(data_config):
  """``data_config`` with FIM as in the ``kat_fim_on`` case: rate 0.5, all structured, SPM 0.5."""
  config = data_config.copy_and_resolve_references()
  config.fim.rate, config.fim.structured_rate, config.fim.spm_rate = 0.5, 1.0, 0.5
  return config


def measure_step_tokens_per_s(preset: str, *, batch_size: int, seq_len: int, steps: int,
                              rounds: int) -> dict:
  """``experiments.bench_train.measure(preset, ...)`` in a child process (its result dict)."""
  code = ("import json, sys; from experiments import bench_train; "
          "print(json.dumps(bench_train.measure(*sys.argv[1:2], batch_size=int(sys.argv[2]), "
          "seq_len=int(sys.argv[3]), steps=int(sys.argv[4]), rounds=int(sys.argv[5]))))")
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  process = subprocess.run(
      [sys.executable, "-c", code, preset, str(batch_size), str(seq_len), str(steps), str(rounds)],
      cwd=repo_root, capture_output=True, text=True, check=False)
  if process.returncode != 0:
    raise RuntimeError(f"bench_train.measure({preset!r}, batch_size={batch_size}, "
                       f"seq_len={seq_len}) failed:\n{process.stderr[-4000:]}")
  return json.loads(process.stdout.strip().splitlines()[-1])


def compare_loader_with_step(data_config, tokenizer, *, preset: str, batch_size: int,
                             seq_len: int, num_batches: int, steps: int, rounds: int,
                             goal_ratio: float = 10.0) -> dict:
  """Loader tokens/s (``data_config`` as given) against ``preset``'s train-step tokens/s at the same
  batch shape, measured one after the other.

  The step is ``experiments.bench_train.measure`` run in a child Python process: bench_train defines
  absl flags of the same names as this module's (``--batch_size``, ``--seq_len``), so it cannot be
  imported here, and the child keeps the loader's threads and the step's JAX runtime apart.
  ``tokenizer`` must be the model's: a vocabulary of the preset's ``vocab_size``.
  """
  model_vocab = int(get_preset(preset).vocab_size)
  if tokenizer.vocab_size != model_vocab:
    raise ValueError(
        f"the loader's tokenizer has vocab_size {tokenizer.vocab_size} but preset {preset!r} has "
        f"{model_vocab}: train the tokenizer with data_config.vocab_size={model_vocab} (the "
        f"experiment configs set data.vocab_size = model.vocab_size) so that the loader feeds "
        f"the tokens this model trains on")
  loader = measure_loader_tokens_per_s(data_config, tokenizer=tokenizer, batch_size=batch_size,
                                       seq_len=seq_len, num_batches=num_batches)
  step = measure_step_tokens_per_s(preset, batch_size=batch_size, seq_len=seq_len, steps=steps,
                                   rounds=rounds)
  ratio = loader["tokens_per_s"] / step["tokens_per_s"]
  return {"preset": preset, "batch_size": batch_size, "seq_len": seq_len,
          "loader_tokens_per_s": loader["tokens_per_s"],
          "step_tokens_per_s": round(step["tokens_per_s"], 1), "ratio": round(ratio, 1),
          "goal_ratio": goal_ratio, "goal_met": bool(ratio >= goal_ratio),
          "loader": loader, "step": step}


def _git_toplevel() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ""


def main(argv):
  del argv
  base = config_lib.default_data_config()
  base.data_dir = FLAGS.data_dir
  base.code.root = FLAGS.code_root
  base.vocab_size = int(get_preset(FLAGS.preset).vocab_size)   # the model's tokenizer
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_data_")
  tokenizer = pipeline.get_or_train_tokenizer(base, workdir)
  shape = dict(batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
               num_batches=FLAGS.num_batches)
  common = dict(shape, corpus=pipeline.code_corpus_builder(base).builder_config.root,
                preset=FLAGS.preset, vocab_size=tokenizer.vocab_size,
                model_vocab_size=int(get_preset(FLAGS.preset).vocab_size),
                cpu_count=os.cpu_count())
  for case in FLAGS.cases:
    config = base.copy_and_resolve_references()
    if case == "kat_fim_off":
      result = measure_loader_tokens_per_s(config, tokenizer=tokenizer, **shape)
    elif case == "kat_fim_off_no_prefetch":
      config.num_threads = 0
      result = measure_loader_tokens_per_s(config, tokenizer=tokenizer, **shape)
    elif case == "kat_fim_on":
      result = measure_loader_tokens_per_s(fim_on(config), tokenizer=tokenizer, **shape)
    elif case == "kat_mixture":
      repo = _git_toplevel()
      if not repo:
        print(json.dumps({"case": case, "error": "not inside a git checkout"}))
        continue
      config.mixture.code, config.mixture.commits, config.commits.repo = 0.6, 0.4, repo
      result = measure_loader_tokens_per_s(config, tokenizer=tokenizer, **shape)
      result["commits_repo"] = repo
    elif case == "grain_concat_then_split":
      result = measure_grain_baseline_tokens_per_s(config, tokenizer, **shape)
    elif case == "loader_vs_step":
      result = compare_loader_with_step(
          fim_on(config), tokenizer, preset=FLAGS.preset, batch_size=FLAGS.step_batch_size,
          seq_len=FLAGS.step_seq_len, num_batches=FLAGS.num_batches, steps=FLAGS.step_steps,
          rounds=FLAGS.step_rounds, goal_ratio=FLAGS.goal_ratio)
      print(json.dumps({"case": case, **common, **result}), flush=True)
      continue
    else:
      raise ValueError(f"unknown case {case!r}; known: {FLAGS['cases'].default}")
    print(json.dumps({"case": case, **common, **result}), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
