"""The tree-attention block layout of a tree batch, for the attention implementations that skip
key blocks through one (``config.model.attention_impl`` = ``blocksparse`` or ``pallas``).

A tree batch's DFS intervals decide which (query block, key block) pairs hold a visible pair;
``kernels.tree_attention.layout.block_layout`` lists them on the host, and the model reads them
from the batch key ``attention_blocks`` (``logprobs.tree_mask``). Without it ``blocksparse``
computes every key block (the reference path) and ``pallas`` derives conservative lists from
per-block interval bounds in the graph. Add it after batching (and after compaction, which
changes the intervals)::

  batch = with_attention_blocks(batch, config.model.attention_impl)
  check_attention_blocks(batch, config.model.attention_impl)   # clear error if it is missing

The block sizes are the ones the implementation uses by default (``blocksparse``:
``BlockSizes()``; ``pallas``: ``pallas.default_block_sizes`` of this process's backend), chosen by
name from ``_SPECS``; other names (``xla``, ``reference``, ``module:function`` paths) get no
layout. ``blocksparse`` also reads the forward chunk lists, whose count C per row is data
dependent: ``capacity`` pins it, ``min_capacity`` pads it up (so a data pipeline can keep one shape
once it has seen its largest tree; see the static-size policy in the kernels' layout module).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import jax
import numpy as np

from kernels.tree_attention import layout as kernel_layout
from kernels.tree_attention.layout import BlockSizes

LAYOUT_KEY = "attention_blocks"


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
  """What one attention implementation reads from ``AttentionMask.blocks``."""
  block_sizes: BlockSizes
  keys: tuple          # layout keys kept in the batch (the others are not read)
  chunked: bool        # reads the forward chunk lists (data-dependent capacity)


def _blocksparse_spec() -> LayoutSpec:
  # blocksparse.tree_attention: block_sizes or BlockSizes(); reads kv_ids and the chunk lists
  # (kv_counts is kept for accounting: kernels.tree_attention.layout.visited_fraction).
  return LayoutSpec(BlockSizes(), ("kv_ids", "kv_counts", "fwd_chunk_q", "fwd_chunk_kv"),
                    chunked=True)


def _pallas_spec() -> LayoutSpec:
  from kernels.tree_attention import pallas
  backend = jax.default_backend()
  variant = backend if backend in pallas.VARIANTS else pallas.CPU_VARIANT  # as tree_attention
  return LayoutSpec(pallas.default_block_sizes(variant, backend), kernel_layout.LIST_KEYS,
                    chunked=False)


_SPECS: dict[str, Callable[[], LayoutSpec]] = {
    "blocksparse": _blocksparse_spec,
    "pallas": _pallas_spec,
}


def layout_spec(attention_impl: str) -> Optional[LayoutSpec]:
  """The layout ``attention_impl`` reads, or None if it reads none."""
  make = _SPECS.get(attention_impl)
  return None if make is None else make()


def attention_blocks(tin, tout, attention_impl: str, *, capacity: Optional[int] = None,
                     min_capacity: int = 0) -> Optional[dict]:
  """Host-side layout (dict of int32 numpy arrays) of [B, T] intervals for ``attention_impl``,
  or None if it reads none. ``capacity`` / ``min_capacity``: chunk count per row (module
  docstring)."""
  spec = layout_spec(attention_impl)
  if spec is None:
    return None
  blocks = kernel_layout.block_layout(tin, tout, spec.block_sizes.block_q,
                                      spec.block_sizes.block_k, capacity=capacity)
  if spec.chunked and blocks["fwd_chunk_q"].shape[1] < min_capacity:
    blocks = kernel_layout.pad_chunks(blocks, min_capacity)
  return {key: blocks[key] for key in spec.keys}


def with_attention_blocks(batch: Mapping[str, np.ndarray], attention_impl: str, *,
                          capacity: Optional[int] = None, min_capacity: int = 0) -> dict:
  """``batch`` (a tree batch dict) plus ``attention_blocks`` when ``attention_impl`` reads a
  layout; otherwise the batch unchanged. A new dict; the input is not modified."""
  blocks = attention_blocks(batch["tin"], batch["tout"], attention_impl, capacity=capacity,
                            min_capacity=min_capacity)
  return dict(batch) if blocks is None else {**batch, LAYOUT_KEY: blocks}


def check_attention_blocks(batch: Mapping[str, np.ndarray], attention_impl: str) -> None:
  """Raises ValueError naming the fix when ``attention_impl`` reads a layout and the tree batch
  (``tin`` present) lacks it or carries one built for other block sizes; flat LM batches and
  implementations without a layout pass."""
  spec = layout_spec(attention_impl)
  if spec is None or "tin" not in batch:
    return
  if LAYOUT_KEY not in batch:
    raise ValueError(
        f"config.model.attention_impl={attention_impl!r} skips key blocks through a block layout "
        f"but this tree batch has no {LAYOUT_KEY!r}, so it would visit more key blocks than "
        "needed (blocksparse: every one, the reference path): add it on the host after batching "
        "with kat_jax.tree.layout.with_attention_blocks(batch, config.model.attention_impl)")
  b, t = np.shape(batch["tin"])
  kernel_layout.check_layout(batch[LAYOUT_KEY], b, t, spec.block_sizes, spec.keys)
