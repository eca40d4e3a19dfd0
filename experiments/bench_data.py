"""Loader throughput: packed tokens/s of kat_jax's LM iterator, beside grain's own packer.

  python -m experiments.bench_data [--batch_size=8 --seq_len=1024 --num_batches=200 --data_dir=DIR]

Prints one JSON object per case on stdout. Cases (all on the configured code corpus, default the
Python standard library, with the same tokenizer, same batch shape, after one warm-up batch):

* ``kat_fim_off``           make_lm_iterator, FIM off, documents tokenized ahead on worker threads
* ``kat_fim_off_no_prefetch``  the same on the calling thread only
* ``kat_fim_on``            FIM on: rate 0.5, structured (AST node) for all FIM documents, SPM 0.5
* ``kat_mixture``           code 0.6 + commits of this repository 0.4 (when run inside a git checkout)
* ``grain_concat_then_split`` baseline: grain MapDataset shuffle/repeat/map(tokenize) →
  ``to_iter_dataset`` with 2 read threads → ``grain.experimental.ConcatThenSplitIterDataset`` →
  ``batch``: grain's own packer (inputs / segment ids / positions only, no targets or weights).

``measure_loader_tokens_per_s(data_config, ...)`` is the reusable part (the trainer's benchmark
compares it with the train step's consumption).
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from typing import Optional

from absl import app, flags
import grain
import numpy as np

from kat_jax.data import config as config_lib
from kat_jax.data import pipeline
from kat_jax.data import tokenizer as tokenizer_lib

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 200, "Timed batches per case.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS cache ('' = the default cache).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Tokenizer cache ('' = a temporary directory).")
_CASES = flags.DEFINE_list("cases", ["kat_fim_off", "kat_fim_off_no_prefetch", "kat_fim_on",
                                     "kat_mixture", "grain_concat_then_split"], "Cases to run.")


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


def _git_toplevel() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ""


def main(argv):
  del argv
  base = config_lib.default_data_config()
  base.data_dir = _DATA_DIR.value
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="bench_data_")
  tokenizer = pipeline.get_or_train_tokenizer(base, workdir)
  shape = dict(batch_size=_BATCH_SIZE.value, seq_len=_SEQ_LEN.value,
               num_batches=_NUM_BATCHES.value)
  common = dict(shape, corpus=pipeline.code_corpus_builder(base).builder_config.root,
                vocab_size=tokenizer.vocab_size, cpu_count=os.cpu_count())
  for case in _CASES.value:
    config = base.copy_and_resolve_references()
    if case == "kat_fim_off":
      result = measure_loader_tokens_per_s(config, tokenizer=tokenizer, **shape)
    elif case == "kat_fim_off_no_prefetch":
      config.num_threads = 0
      result = measure_loader_tokens_per_s(config, tokenizer=tokenizer, **shape)
    elif case == "kat_fim_on":
      config.fim.rate, config.fim.structured_rate, config.fim.spm_rate = 0.5, 1.0, 0.5
      result = measure_loader_tokens_per_s(config, tokenizer=tokenizer, **shape)
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
    else:
      raise ValueError(f"unknown case {case!r}; known: {_CASES.default}")
    print(json.dumps({"case": case, **common, **result}), flush=True)


if __name__ == "__main__":
  app.run(main)
