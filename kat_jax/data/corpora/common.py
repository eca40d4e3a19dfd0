"""Pieces shared by the kat_jax corpus builders: split assignment, content hashes, bad-input records.

Every builder assigns an example to ``train`` or ``eval`` by hashing a stable key (a file path, a commit
sha, a ``file:line``), so the split is deterministic, independent of ordering and of the rest of the
corpus, and the two splits are disjoint by construction.

Bad input is never dropped silently and never crashes a build: builders count every skipped item by
reason in ``builder.info.metadata["skipped"]`` and keep the first few human-readable reports
(``"path/to/file.jsonl:17: invalid JSON: ..."``) in ``builder.info.metadata["problems"]``; the same
reports go to the absl log as warnings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from absl import logging
import tensorflow_datasets as tfds

SPLITS = ("train", "eval")
MAX_PROBLEM_REPORTS = 200


def stable_fraction(key: str) -> float:
  """A number in [0, 1) that depends only on ``key`` (first 8 bytes of its SHA-256)."""
  digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str, eval_fraction: float) -> str:
  """``"eval"`` for about ``eval_fraction`` of all keys, ``"train"`` otherwise; deterministic."""
  return "eval" if stable_fraction(key) < eval_fraction else "train"


def content_hash(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def config_fingerprint(fields: dict) -> str:
  """Short hash of a builder's parameters; part of its TFDS config name so each setting caches apart."""
  blob = json.dumps(fields, sort_keys=True, default=str).encode("utf-8")
  return hashlib.sha256(blob).hexdigest()[:12]


class BuildReport:
  """Counts of kept and skipped items and the first problem reports, stored as builder metadata."""

  def __init__(self):
    self.kept = {split: 0 for split in SPLITS}
    self.skipped: dict[str, int] = {}
    self.problems: list[str] = []

  def skip(self, reason: str, where: str, detail: str = "", *, warn: bool = True) -> None:
    """Records one skipped item; ``where`` is ``path`` or ``path:line``; ``warn`` logs it as a warning."""
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    message = f"{where}: {reason}" + (f": {detail}" if detail else "")
    if len(self.problems) < MAX_PROBLEM_REPORTS:
      self.problems.append(message)
    if warn:
      logging.warning("kat_jax corpus: skipped %s", message)
    else:
      logging.info("kat_jax corpus: skipped %s", message)

  def keep(self, split: str) -> None:
    self.kept[split] += 1

  def write_to(self, metadata: tfds.core.MetadataDict) -> None:
    metadata["kept"] = dict(self.kept)
    metadata["skipped"] = dict(sorted(self.skipped.items()))
    metadata["problems"] = list(self.problems)


def nonempty_splits(generators: dict, report: BuildReport, what: str) -> dict:
  """The split generators of the splits that have examples (TFDS cannot write an empty split).

  A corpus with no usable example at all is an error that says what was skipped and why.
  """
  kept = {split: gen for split, gen in generators.items() if report.kept[split] > 0}
  if not kept:
    raise ValueError(f"{what} has no usable examples (skipped: {report.skipped or 'none'}; first "
                     f"problems: {report.problems[:3]})")
  return kept


def has_split(builder: tfds.core.DatasetBuilder, split: str) -> bool:
  """Whether a prepared builder has a (non-empty) ``split``."""
  return split in builder.info.splits


def builder_stats(builder: tfds.core.DatasetBuilder) -> dict:
  """``{"kept": {...}, "skipped": {reason: n}, "problems": [...]}`` of a prepared builder."""
  metadata = builder.info.metadata or {}
  return {"kept": dict(metadata.get("kept", {})), "skipped": dict(metadata.get("skipped", {})),
          "problems": list(metadata.get("problems", []))}


@dataclasses.dataclass
class KatBuilderConfig(tfds.core.BuilderConfig):
  """Base of the corpus configs: ``eval_fraction`` of examples (by stable key hash) go to ``eval``."""
  eval_fraction: float = 0.05
