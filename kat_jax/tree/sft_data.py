"""Tree-mode SFT data: groups of trajectories that share a prompt, one serialized tree per batch
row.

A *group source* (``GroupSource``: ``row_seed -> list[chat.RenderedExample]``) gives the
trajectories of one row; ``config.tree.source`` picks it (``make_group_source``):

* ``procedural`` (``ProceduralGroups``): per procedural task (``kat_jax.data.procedural``) the
  direct solution and, per buggy variant, a self-debugging trajectory (spec → buggy attempt, not
  trained → test output → fix). All of them start with the same rendered prompt and fork at the
  first assistant token; the debug trajectories share their prefix up to the attempt.
* ``self_debug`` (``SelfDebugGroups``): the passing records of a self-debugging records JSONL
  (``kat_jax.data.self_debug``, ``config.tree.records_path``) as SFT conversations of
  ``config.tree.format`` (``sft_conversation``), grouped by their rendered user turn: the
  refinements and explanations of one failing program (same task, buggy code and error) are
  siblings of one tree, the prompt stored once. Records go to ``train`` / ``eval`` by
  ``common.split_of`` of their task id with ``config.tree.eval_fraction`` (the key of the records
  corpus, ``kat_jax.data.corpora.self_debug``, so both agree on the split).

Each trajectory is rendered with its loss mask and event tags (``kat_jax.data.chat``) and the group
is merged into a prefix tree with the mask as the per-trajectory ``weight`` field. Trees are padded
to the static sizes in ``config.tree`` so the jitted step compiles once; a trajectory that does not
fit is dropped and counted (``dropped_trajectories``), never silently, and a group none of whose
trajectories fits is replaced by a redrawn one (counted as ``skipped_groups``). With an
``attention_impl`` that skips key blocks (``blocksparse``, ``pallas``) each batch also carries its
block layout (``kat_jax.tree.layout``); the forward chunk count never shrinks from one batch to the
next, so the step recompiles only when a batch needs more chunks (with several processes it is
pinned to what any tree needs, so that all processes' rows have one shape).

Batch i depends only on (seed, split, shard, i): ``get_state``/``set_state`` is that counter.
"""
from __future__ import annotations

import collections
import os
from typing import Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np

from kat_jax.data import chat
from kat_jax.data.procedural import bugs, generate
from kat_jax.errors import ConfigError
from kat_jax.tree import batch as batch_lib
from kat_jax.tree import build
from kat_jax.tree import layout as tree_layout
from kat_jax.tree.logprobs import batch_to_arrays
from kernels.tree_attention import layout as kernel_layout

SOURCES = ("procedural", "self_debug")
SPLITS = ("train", "eval", "heldout")   # "eval" and "heldout" name the same held-out split
MAX_REDRAWS = 64                        # groups drawn for one row before giving up

# A row's trajectories from its seed (deterministic): rendered conversations sharing a prompt.
GroupSource = Callable[[int], Sequence[chat.RenderedExample]]


def default_tree_config() -> ml_collections.ConfigDict:
  """Static shapes of tree batches (one tree per row) and where their trajectories come from."""
  return ml_collections.ConfigDict(dict(
      max_tokens=512, max_nodes=64, max_traj=4, max_len=256,
      source="procedural",      # group source: procedural | self_debug (module docstring)
      levels="0",               # procedural: task difficulty levels
      max_debug_variants=3,     # procedural: debug trajectories per task
      records_path="",          # self_debug: records JSONL (experiments/make_self_debug_data.py)
      format="explain_refine",  # self_debug: SFT format, explain_refine | refine_only
      eval_fraction=0.05,       # self_debug: of task ids (by hash) in the eval split
  ))


def task_trajectories(task, tokenizer, max_debug_variants: int):
  """Rendered (tokens, loss_mask, tags) of the direct solution and of each debug trajectory."""
  convs = [generate.task_to_conversation(task)]
  for variant in bugs.buggy_variants(task, max_variants=max_debug_variants):
    convs.append(generate.debug_conversation(task, variant.code, variant.feedback))
  return [chat.render(c, tokenizer) for c in convs]


class ProceduralGroups:
  """Group source: the ``task_trajectories`` of the first task of ``task_stream(row_seed)``."""

  def __init__(self, tokenizer, *, split: str, levels: Sequence[int], max_debug_variants: int):
    self.tokenizer, self.levels = tokenizer, list(levels)
    self.split = "heldout" if split == "eval" else split   # the procedural split names
    self.max_debug_variants = max_debug_variants

  def __call__(self, row_seed: int) -> list[chat.RenderedExample]:
    task = next(generate.task_stream(row_seed, split=self.split, levels=self.levels))
    return task_trajectories(task, self.tokenizer, self.max_debug_variants)


class SelfDebugGroups:
  """Group source: the passing ``records`` of ``split`` (``train`` | ``eval``, by
  ``common.split_of(f"task:{task_id}", eval_fraction)``) as ``fmt`` SFT conversations, grouped by
  their user turn (file order within a group; groups in order of first appearance). A row is the
  group ``row_seed`` draws uniformly; each group is rendered once, on first use."""

  def __init__(self, records, tokenizer, *, fmt: str, split: str, eval_fraction: float,
               where: str = "the records"):
    from kat_jax.data import self_debug
    from kat_jax.data.corpora import common
    if fmt not in self_debug.SFT_FORMATS:
      raise ConfigError(f"config.tree.format={fmt!r}: use one of {list(self_debug.SFT_FORMATS)}")
    self.tokenizer, self.fmt = tokenizer, fmt
    self.split = "eval" if split == "heldout" else split
    passing = [r for r in records if r.passed]
    mine = [r for r in passing
            if common.split_of(f"task:{r.task_id}", eval_fraction) == self.split]
    by_prompt: dict[str, list] = {}
    for r in mine:
      conv = self_debug.sft_conversation(r, fmt)
      by_prompt.setdefault(conv.messages[0].content, []).append(conv)
    if not by_prompt:
      raise ConfigError(
          f"{where}: no passing record in split {self.split!r} ({len(records)} records, "
          f"{len(passing)} passing, config.tree.eval_fraction={eval_fraction}): use a records file "
          "with passing refinements or another config.tree.eval_fraction")
    self.prompts = list(by_prompt)                    # the user turn of each group
    self.conversations = list(by_prompt.values())     # chat.Conversation per record, per group
    self._rendered: dict[int, list[chat.RenderedExample]] = {}

  @classmethod
  def from_file(cls, path: str, tokenizer, **kwargs) -> "SelfDebugGroups":
    from kat_jax.data import self_debug
    if not path:
      raise ConfigError("config.tree.source='self_debug' reads a records JSONL: set "
                        "config.tree.records_path (python -m experiments.make_self_debug_data "
                        "writes records.jsonl)")
    if not os.path.isfile(path):
      raise ConfigError(f"config.tree.records_path={path!r} is not a file: point it at the "
                        "records.jsonl of python -m experiments.make_self_debug_data")
    return cls(self_debug.read_records(path), tokenizer, where=path, **kwargs)

  def __len__(self) -> int:
    return len(self.conversations)

  def group(self, index: int) -> list[chat.RenderedExample]:
    """The rendered trajectories of group ``index`` (loss on the assistant turn)."""
    if index not in self._rendered:
      self._rendered[index] = [chat.render(c, self.tokenizer) for c in self.conversations[index]]
    return self._rendered[index]

  def __call__(self, row_seed: int) -> list[chat.RenderedExample]:
    return self.group(int(np.random.default_rng(row_seed).integers(len(self))))


def make_group_source(tree_cfg: ml_collections.ConfigDict, tokenizer, split: str) -> GroupSource:
  """The group source ``tree_cfg.source`` names, for ``split`` (train | eval; heldout = eval)."""
  if split not in SPLITS:
    raise ValueError(f"tree SFT split {split!r}: use one of {list(SPLITS)}")
  if tree_cfg.source == "procedural":
    levels = [int(v) for v in str(tree_cfg.levels).split(",") if v.strip()]
    return ProceduralGroups(tokenizer, split=split, levels=levels,
                            max_debug_variants=tree_cfg.max_debug_variants)
  if tree_cfg.source == "self_debug":
    if not 0.0 <= tree_cfg.eval_fraction < 1.0:
      raise ConfigError(f"config.tree.eval_fraction={tree_cfg.eval_fraction} must lie in [0, 1)")
    return SelfDebugGroups.from_file(tree_cfg.records_path, tokenizer, fmt=tree_cfg.format,
                                     split=split, eval_fraction=float(tree_cfg.eval_fraction))
  raise ConfigError(f"config.tree.source={tree_cfg.source!r}: use one of {list(SOURCES)}")


class TreeSFTIterator:
  """Yields dict batches of ``batch_size`` padded trees (see ``kat_jax.tree.batch``), with the
  block layout ``attention_impl`` (``config.model.attention_impl``) reads, if any. Row trajectories
  come from ``source`` (default: ``make_group_source(tree_cfg, tokenizer, split)``)."""

  def __init__(self, tree_cfg, tokenizer, *, split: str, batch_size: int, seed: int,
               shard_index: int = 0, attention_impl: str = "xla",
               source: Optional[GroupSource] = None):
    self.cfg, self.tokenizer, self.split = tree_cfg, tokenizer, split
    self.batch_size, self.seed, self.shard_index = batch_size, seed, shard_index
    self.attention_impl = attention_impl
    self.source = source if source is not None else make_group_source(tree_cfg, tokenizer, split)
    self._chunk_capacity = 0   # largest forward chunk count so far (blocksparse layouts)
    self._index = 0
    self._counters = collections.Counter()

  def __iter__(self):
    return self

  def _build(self, kept) -> build.TrajectoryTree:
    return build.build_tree([x.tokens for x in kept], tags=[x.event_tags for x in kept],
                            fields={"weight": [x.loss_mask.astype(np.float32) for x in kept]})

  def _fit(self, rendered) -> list:
    """The trajectories of ``rendered`` kept in order while the tree fits the static sizes."""
    c = self.cfg
    kept = []
    for r in rendered:
      if len(r.tokens) > c.max_len or len(kept) == c.max_traj:
        self._counters["dropped_trajectories"] += 1
        continue
      tree = self._build(kept + [r])
      if tree.n_tree > c.max_tokens or tree.num_nodes > c.max_nodes:
        self._counters["dropped_trajectories"] += 1
        continue
      kept.append(r)
    return kept

  def _tree(self, row_seed: int) -> build.TrajectoryTree:
    seed = row_seed
    for attempt in range(MAX_REDRAWS):
      kept = self._fit(self.source(seed))
      if kept:
        break
      self._counters["skipped_groups"] += 1
      seed = int(np.random.default_rng([row_seed, attempt + 1]).integers(2**31))
    else:
      c = self.cfg
      raise ValueError(
          f"no trajectory of {MAX_REDRAWS} groups drawn for a row fits config.tree (max_len="
          f"{c.max_len}, max_tokens={c.max_tokens}, max_nodes={c.max_nodes}): raise them")
    tree = self._build(kept)
    self._counters["trajectories"] += len(kept)
    self._counters["tree_tokens"] += tree.n_tree
    self._counters["flat_tokens"] += tree.n_flat
    return tree

  def __next__(self) -> dict:
    c = self.cfg
    trees = []
    for row in range(self.batch_size):
      row_seed = [self.seed, self.shard_index, self._index, row]
      trees.append(self._tree(int(np.random.default_rng(row_seed).integers(2**31))))
    self._index += 1
    tb = batch_lib.batch_trees(trees, max_tokens=c.max_tokens, max_nodes=c.max_nodes,
                               max_traj=c.max_traj, max_len=c.max_len)
    # Several processes must agree on the shape: there, the chunk count fits any tree.
    spec = tree_layout.layout_spec(self.attention_impl)
    pinned = (kernel_layout.worst_case_capacity(c.max_tokens, spec.block_sizes.block_q,
                                                spec.block_sizes.block_k)
              if spec is not None and jax.process_count() > 1 else None)
    batch = tree_layout.with_attention_blocks(batch_to_arrays(tb), self.attention_impl,
                                              capacity=pinned, min_capacity=self._chunk_capacity)
    if "fwd_chunk_q" in batch.get(tree_layout.LAYOUT_KEY, {}):
      self._chunk_capacity = batch[tree_layout.LAYOUT_KEY]["fwd_chunk_q"].shape[1]
    return batch

  def get_state(self) -> dict:
    return {"index": self._index}

  def set_state(self, state: dict) -> None:
    self._index = int(state["index"])

  def metrics(self) -> dict:
    flat = max(self._counters["flat_tokens"], 1)
    return {"por": 1.0 - self._counters["tree_tokens"] / flat,
            "dropped_trajectories": float(self._counters["dropped_trajectories"]),
            "skipped_groups": float(self._counters["skipped_groups"]),
            "trajectories": float(self._counters["trajectories"])}
