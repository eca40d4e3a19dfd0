"""Conversations and agent trajectories from JSONL files as a TFDS corpus (SFT, RFT, teacher data).

One JSON object per line in the ``kat_jax.data.chat.Conversation`` format
(``{"messages": [...], "tools": [...], "label": {...}, "meta": {...}}``), or an instruction record
``{"instruction", "solution", ...}`` as ``evol_instruct.write_jsonl`` writes it. A line is kept if it
parses as JSON and ``conversation_from_record`` accepts it; the example stores the raw JSON string
(``conversation``) so that rendering (loss masks, FIM-free) happens in the pipeline, plus where it
came from (``source`` = ``path:line``) and a JSON of its label/meta (``metadata``).

Every rejected line is reported as ``path:line: reason`` (absl warning, and the first reports in
``builder.info.metadata["problems"]``) and counted by reason; blank lines and exact duplicates are
counted too. Lines go to ``eval`` by a stable hash of their group key: ``meta.task_id`` when present
(so all trajectories of one task share a split), else the line's content::

  builder = corpora.prepare(JsonlConversations, jsonl_config(["sft/*.jsonl"]), data_dir)
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Sequence

import tensorflow_datasets as tfds

from kat_jax.data import chat
from kat_jax.data.corpora import common


def expand_paths(patterns: Sequence[str]) -> list[str]:
  """Absolute paths of the files matching ``patterns`` (globs allowed), sorted, without repeats."""
  paths = set()
  for pattern in patterns:
    matches = glob.glob(os.path.expanduser(pattern), recursive=True)
    if not matches:
      raise ValueError(f"no JSONL file matches {pattern!r}; check data.trajectories.paths / "
                       "data.instructions.paths")
    paths.update(os.path.abspath(m) for m in matches if os.path.isfile(m))
  return sorted(paths)


@dataclasses.dataclass
class JsonlConfig(common.KatBuilderConfig):
  paths: tuple = ()
  # (size, mtime) of each file: an edited file gets a new cache.
  file_signatures: tuple = ()
  max_line_bytes: int = 50_000_000


def jsonl_config(patterns: Sequence[str], *, name_prefix: str = "jsonl",
                 max_line_bytes: int = 50_000_000, eval_fraction: float = 0.05) -> JsonlConfig:
  paths = tuple(expand_paths(patterns))
  if not paths:
    raise ValueError(f"JSONL patterns {list(patterns)} name no files")
  signatures = tuple((os.path.getsize(p), int(os.path.getmtime(p))) for p in paths)
  fields = dict(paths=paths, file_signatures=signatures, max_line_bytes=int(max_line_bytes),
                eval_fraction=float(eval_fraction))
  name = f"{name_prefix}_{common.config_fingerprint(fields)}"
  return JsonlConfig(name="".join(c if c.isalnum() or c == "_" else "_" for c in name), **fields)


def conversation_from_record(obj: dict) -> chat.Conversation:
  """A JSONL record as a Conversation: either ``chat.Conversation`` JSON (with ``messages``) or an
  instruction record ``{"instruction", "solution", ...}`` (``evol_instruct.EvolRecord``), which
  becomes a user instruction and the assistant's solution."""
  if "messages" in obj:
    return chat.Conversation.from_dict(obj)
  if isinstance(obj.get("instruction"), str) and isinstance(obj.get("solution"), str):
    if not obj["instruction"].strip() or not obj["solution"].strip():
      raise ValueError("instruction record with an empty instruction or solution")
    meta = {k: obj[k] for k in ("id", "round", "operation", "parent_id") if obj.get(k) is not None}
    return chat.Conversation((chat.Message("user", obj["instruction"]),
                              chat.Message("assistant", obj["solution"])), meta=meta)
  raise ValueError("expected 'messages' (a conversation) or 'instruction' and 'solution' strings")


def _split_key(obj: dict, line: bytes) -> str:
  meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
  task_id = meta.get("task_id", obj.get("task_id"))
  return f"task:{task_id}" if task_id is not None else "line:" + common.content_hash(line)


class JsonlConversations(tfds.core.GeneratorBasedBuilder):
  """Conversations from JSONL files; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="One conversation / trajectory per JSONL line, stored as its JSON string.",
        features=tfds.features.FeaturesDict({
            "conversation": tfds.features.Text(), "source": tfds.features.Text(),
            "metadata": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    report = common.BuildReport()
    examples = {split: [] for split in common.SPLITS}
    seen = {}
    for path in config.paths:
      with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
          where = f"{path}:{line_number}"
          line = raw.strip()
          if not line:
            report.skip("blank_line", where, warn=False)
            continue
          if len(line) > config.max_line_bytes:
            report.skip("oversized", where, f"{len(line)} bytes > max_line_bytes="
                        f"{config.max_line_bytes}")
            continue
          try:
            text = line.decode("utf-8")
          except UnicodeDecodeError as e:
            report.skip("undecodable", where, str(e))
            continue
          try:
            obj = json.loads(text)
          except json.JSONDecodeError as e:
            report.skip("invalid_json", where, str(e))
            continue
          if not isinstance(obj, dict):
            report.skip("not_a_conversation", where,
                        f"expected a JSON object with 'messages', got {type(obj).__name__}")
            continue
          try:
            conversation_from_record(obj)
          except (KeyError, TypeError, ValueError, AttributeError) as e:
            report.skip("not_a_conversation", where, f"{type(e).__name__}: {e}")
            continue
          digest = common.content_hash(line)
          if digest in seen:
            report.skip("duplicate", where, f"same line as {seen[digest]}", warn=False)
            continue
          seen[digest] = where
          split = common.split_of(_split_key(obj, line), config.eval_fraction)
          report.keep(split)
          metadata = {k: obj[k] for k in ("label", "meta") if k in obj}
          examples[split].append({"conversation": text, "source": where,
                                  "metadata": json.dumps(metadata, ensure_ascii=False)})
    report.write_to(self.info.metadata)
    return common.nonempty_splits(
        {split: ((e["source"], e) for e in rows) for split, rows in examples.items()},
        report, f"JSONL files {list(config.paths)}")

  def _generate_examples(self):  # required by the base class; splits come from _split_generators
    raise NotImplementedError
