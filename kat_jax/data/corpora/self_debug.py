"""Self-debugging records (``kat_jax.data.self_debug``) as a TFDS corpus (array_record).

``experiments/make_self_debug_data.py`` writes the records of a synthesis run as JSONL
(``self_debug.write_records``); this builder turns those files into a dataset with one example per
refinement — prompt, buggy code, its error, the explanation, the refinement and its test outcome,
source (``model`` or ``mutant``) and lineage — so SFT (the passing ones) and RL (all of them) read
the same data. Records go to ``eval`` by a stable hash of their task id (all refinements of a task
share a split). A line that does not parse as a record is skipped and reported
(``common.builder_stats``); an edited file gets a new cache (size and mtime are fingerprinted)::

  builder = corpora.prepare(SelfDebugRecords, self_debug_config(["out/records.jsonl"]), data_dir)
  records = read_records(builder, "train")          # list[self_debug.SelfDebugRecord]
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from kat_jax.data.corpora import common
from kat_jax.data.corpora.jsonl import expand_paths

TEXT_FIELDS = ("record_id", "task_id", "source", "prompt", "task", "reference", "buggy_code",
               "error", "explanation", "refinement", "refinement_text", "status",
               "refinement_error")


@dataclasses.dataclass
class SelfDebugConfig(common.KatBuilderConfig):
  paths: tuple = ()
  file_signatures: tuple = ()   # (size, mtime) of each file


def self_debug_config(patterns: Sequence[str], *, eval_fraction: float = 0.05,
                      name_prefix: str = "self_debug") -> SelfDebugConfig:
  paths = tuple(expand_paths(patterns))
  if not paths:
    raise ValueError(f"record patterns {list(patterns)} name no files")
  signatures = tuple((os.path.getsize(p), int(os.path.getmtime(p))) for p in paths)
  fields = dict(paths=paths, file_signatures=signatures, eval_fraction=float(eval_fraction))
  return SelfDebugConfig(name=f"{name_prefix}_{common.config_fingerprint(fields)}", **fields)


def example_of(record) -> dict:
  """A ``SelfDebugRecord`` as a corpus example."""
  example = {name: getattr(record, name) for name in TEXT_FIELDS}
  example.update(passed=bool(record.passed),
                 buggy_tests_passed=np.int32(record.buggy_tests_passed),
                 tests_passed=np.int32(record.tests_passed),
                 tests_total=np.int32(record.tests_total),
                 lineage=json.dumps(record.lineage, sort_keys=True))
  return example


def record_of(example):
  """The ``SelfDebugRecord`` of a corpus example (as ``as_data_source`` returns it)."""
  from kat_jax.data.self_debug import SelfDebugRecord  # pylint: disable=g-import-not-at-top

  def text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

  fields = {name: text(example[name]) for name in TEXT_FIELDS}
  fields.update(passed=bool(example["passed"]),
                buggy_tests_passed=int(example["buggy_tests_passed"]),
                tests_passed=int(example["tests_passed"]),
                tests_total=int(example["tests_total"]),
                lineage=json.loads(text(example["lineage"])))
  return SelfDebugRecord(**fields)


def read_records(builder, split: str) -> list:
  source = builder.as_data_source(split=split)
  return [record_of(source[i]) for i in range(len(source))]


class SelfDebugRecords(tfds.core.GeneratorBasedBuilder):
  """Self-debugging records from JSONL files; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    features = {name: tfds.features.Text() for name in TEXT_FIELDS}
    features.update(passed=np.bool_, buggy_tests_passed=np.int32, tests_passed=np.int32,
                    tests_total=np.int32, lineage=tfds.features.Text())
    return self.dataset_info_from_configs(
        description="Failing programs (the model's own samples and AST mutants) with their "
                    "sandbox error, an explanation, a refinement and its test outcome.",
        features=tfds.features.FeaturesDict(features), metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    from kat_jax.data.self_debug import SelfDebugRecord  # pylint: disable=g-import-not-at-top
    config = self.builder_config
    report = common.BuildReport()
    examples = {split: [] for split in common.SPLITS}
    seen = set()
    for path in config.paths:
      with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
          where = f"{path}:{line_number}"
          if not line.strip():
            report.skip("blank_line", where, warn=False)
            continue
          try:
            record = SelfDebugRecord.from_dict(json.loads(line))
          except (ValueError, TypeError, AttributeError) as e:
            report.skip("not_a_record", where, f"{type(e).__name__}: {e}")
            continue
          if record.record_id in seen:
            report.skip("duplicate_id", where, record.record_id, warn=False)
            continue
          seen.add(record.record_id)
          split = common.split_of(f"task:{record.task_id}", config.eval_fraction)
          report.keep(split)
          examples[split].append((record.record_id, example_of(record)))
    report.write_to(self.info.metadata)
    return common.nonempty_splits({split: iter(rows) for split, rows in examples.items()},
                                  report, f"self-debugging records {list(config.paths)}")

  def _generate_examples(self):  # required by the base class; splits come from _split_generators
    raise NotImplementedError
