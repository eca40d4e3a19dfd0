"""Tree-mode SFT data: groups of agentic trajectories that share a prompt, one serialized tree per
batch row.

For each procedural task (``kat_jax.data.procedural``) the group holds the direct solution and, per
buggy variant, a self-debugging trajectory (spec → buggy attempt, not trained → test output → fix).
All of them start with the same rendered prompt and fork at the first assistant token; the debug
trajectories share their prefix up to the attempt. Each trajectory is rendered with its loss mask and
event tags (``kat_jax.data.chat``) and the group is merged into a prefix tree with the mask as the
per-trajectory ``weight`` field. Trees are padded to the static sizes in ``config.tree`` so the jitted
step compiles once; a trajectory that does not fit is dropped and counted (``dropped_trajectories``),
never silently. With an ``attention_impl`` that skips key blocks (``blocksparse``, ``pallas``) each
batch also carries its block layout (``kat_jax.tree.layout``); the forward chunk count never shrinks
from one batch to the next, so the step recompiles only when a batch needs more chunks (with several
processes it is pinned to what any tree needs, so that all processes' rows have one shape).

Batch i depends only on (seed, split, shard, i): ``get_state``/``set_state`` is that counter.
"""
from __future__ import annotations

import collections
from typing import Optional

import jax
import ml_collections
import numpy as np

from kat_jax.data import chat
from kat_jax.data.procedural import bugs, generate
from kat_jax.tree import batch as batch_lib
from kat_jax.tree import build
from kat_jax.tree import layout as tree_layout
from kat_jax.tree.logprobs import batch_to_arrays
from kernels.tree_attention import layout as kernel_layout


def default_tree_config() -> ml_collections.ConfigDict:
  """Static shapes of tree batches (one tree per row)."""
  return ml_collections.ConfigDict(dict(max_tokens=512, max_nodes=64, max_traj=4, max_len=256,
                                        levels="0", max_debug_variants=3))


def task_trajectories(task, tokenizer, max_debug_variants: int):
  """Rendered (tokens, loss_mask, tags) of the direct solution and of each debug trajectory."""
  convs = [generate.task_to_conversation(task)]
  for variant in bugs.buggy_variants(task, max_variants=max_debug_variants):
    convs.append(generate.debug_conversation(task, variant.code, variant.feedback))
  return [chat.render(c, tokenizer) for c in convs]


class TreeSFTIterator:
  """Yields dict batches of ``batch_size`` padded trees (see ``kat_jax.tree.batch``), with the
  block layout ``attention_impl`` (``config.model.attention_impl``) reads, if any."""

  def __init__(self, tree_cfg, tokenizer, *, split: str, batch_size: int, seed: int,
               shard_index: int = 0, attention_impl: str = "xla"):
    self.cfg, self.tokenizer, self.split = tree_cfg, tokenizer, split
    self.batch_size, self.seed, self.shard_index = batch_size, seed, shard_index
    self.attention_impl = attention_impl
    self._chunk_capacity = 0   # largest forward chunk count so far (blocksparse layouts)
    self.levels = [int(v) for v in str(tree_cfg.levels).split(",") if v.strip()]
    self._index = 0
    self._counters = collections.Counter()

  def __iter__(self):
    return self

  def _tree(self, row_seed: int) -> build.TrajectoryTree:
    c = self.cfg
    task = next(generate.task_stream(row_seed, split=self.split, levels=self.levels))
    rendered = task_trajectories(task, self.tokenizer, c.max_debug_variants)
    kept = []
    for r in rendered:
      if len(r.tokens) > c.max_len or len(kept) == c.max_traj:
        self._counters["dropped_trajectories"] += 1
        continue
      candidate = kept + [r]
      tree = build.build_tree([x.tokens for x in candidate], tags=[x.event_tags for x in candidate],
                              fields={"weight": [x.loss_mask.astype(np.float32) for x in candidate]})
      if tree.n_tree > c.max_tokens or tree.num_nodes > c.max_nodes:
        self._counters["dropped_trajectories"] += 1
        continue
      kept.append(r)
    tree = build.build_tree([x.tokens for x in kept], tags=[x.event_tags for x in kept],
                            fields={"weight": [x.loss_mask.astype(np.float32) for x in kept]})
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
            "trajectories": float(self._counters["trajectories"])}
