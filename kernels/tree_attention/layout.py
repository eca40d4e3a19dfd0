"""How tokens are tiled into blocks, and which (query block, key block) pairs tree attention visits.

Key ``k`` is visible to query ``q`` iff ``tin[k] <= tin[q] < tout[k]`` (DFS entry/exit numbers).
Every implementation in this package pads the sequence to a multiple of the block size with
sentinel tokens (``tin = tout = PAD_INTERVAL``: as keys nobody sees them, as queries they see
nothing), cuts it into query blocks of ``block_q`` and key blocks of ``block_k`` tokens, and visits
only the key blocks that at least one query of the block may attend.

Two ways to know which blocks to visit:

* ``block_layout(tin, tout, ...)`` — host side (numpy), called by the data pipeline next to the
  batch; the result goes into ``AttentionMask.blocks``. It computes the *exact* block mask (a key
  block is visited iff some query of the block sees some key of it) in O(T²/block_k) per row.
* ``block_mask_from_bounds(tin, tout, ...)`` — in graph (jnp), from per-block min/max of the
  intervals; conservative (may visit a block that turns out fully masked, never skips a needed
  one). Used by the Pallas kernels when ``blocks is None``.

``block_layout`` returns a dict of int32 arrays (B = batch, nq/nk = number of query/key blocks):

* ``kv_ids`` [B, nq, nk], ``kv_counts`` [B, nq] — per query block, the key blocks to visit in
  increasing order; entries past the count repeat the last valid id (so a TPU pipeline that walks
  the list issues no new copy for skipped steps).
* ``q_ids`` [B, nk, nq], ``q_counts`` [B, nk] — the transpose: per key block, the query blocks
  that see it (used by the dK/dV backward pass).
* ``fwd_chunk_q`` [B, C], ``fwd_chunk_kv`` [B, C, W] — the same visits as *chunks*: each query
  block's list cut into chunks of ``W = chunk_width`` key blocks; a list shorter than a multiple of
  W is completed with the dummy key block id ``nk``; unused chunks are (query block 0, all dummy).
  The plain-XLA block-sparse path computes all chunks at once and merges chunks of the same query
  block (flash-decoding style), so no query block is padded to the global maximum.

Static-size policy (so that jit does not retrace per batch): all ``*_ids`` lists have the static
width nk or nq (fixed by T and the block sizes). The chunk capacity C is data dependent: by default
it is the batch maximum rounded up to four significant bits (exact up to 16, then 18, 20, ..., 30,
32, 36, ...), so at most 8 distinct shapes per doubling and at most 12.5% padding chunks. Pass
``capacity=C`` to pin it (``worst_case_capacity(T, ...)`` fits any tree; a data pipeline that knows
its trees can pin less); a capacity that is too small raises an error naming the needed value.
``pad_chunks(blocks, C)`` pads a layout's chunk lists up to C (a pipeline that keeps one shape once
it has seen its largest tree); ``chunk_visit_counts`` counts the block pairs chunk lists visit.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np

# Interval value of the tokens added to pad T to a multiple of the block size. Real DFS numbers are
# >= 0, so a padded query sees no key and a padded key (tout == tin) is seen by no query.
PAD_INTERVAL = -(2**30)

DEFAULT_BLOCK = 64
DEFAULT_CHUNK_WIDTH = 4


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the tree-attention kernels (the backward pass uses the same tiling).

  Attributes:
    block_q: query tokens per block.
    block_k: key tokens per block.
  """
  block_q: int = DEFAULT_BLOCK
  block_k: int = DEFAULT_BLOCK

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")


def num_blocks(t: int, block: int) -> int:
  return -(-t // block)


def round_capacity(n: int) -> int:
  """``n`` rounded up to four significant bits (the static-size policy for chunk counts)."""
  n = max(int(n), 1)
  if n <= 8:
    return n
  step = 1 << (n.bit_length() - 4)
  return -(-n // step) * step


def worst_case_capacity(t: int, block_q: int, block_k: int,
                        chunk_width: int = DEFAULT_CHUNK_WIDTH) -> int:
  """Chunk capacity that fits any intervals of length t: every query block visits every key block.

  Pinning ``capacity`` to it gives one shape per (T, block sizes) at the cost of padded work;
  a pipeline that knows its trees can pin a smaller value.
  """
  nq, nk = num_blocks(t, block_q), num_blocks(t, block_k)
  return nq * num_blocks(nk, chunk_width)


def pad_intervals(tin, tout, t_pad: int, xp=jnp):
  """Pads [B, T] intervals to [B, t_pad] with ``PAD_INTERVAL`` (works for numpy and jnp)."""
  t = tin.shape[1]
  if t_pad == t:
    return tin, tout
  widths = ((0, 0), (0, t_pad - t))
  tin = xp.pad(tin, widths, constant_values=PAD_INTERVAL)
  tout = xp.pad(tout, widths, constant_values=PAD_INTERVAL)
  return tin, tout


# ------------------------------------------------------------------------------------------------
# Block masks: which (query block, key block) pairs hold at least one visible pair.


def exact_block_mask(tin: np.ndarray, tout: np.ndarray, block_q: int, block_k: int) -> np.ndarray:
  """Host-side exact block mask, bool [B, nq, nk]: block j has a key visible to a query of block i.

  For each key block the union of its key intervals [tin, tout) is a coverage count over the
  sorted distinct query entry numbers (difference array + cumsum), read at every query:
  O(nk · T) per row instead of the O(T²) token mask.
  """
  tin = np.asarray(tin, np.int64)
  tout = np.asarray(tout, np.int64)
  b, t = tin.shape
  nq, nk = num_blocks(t, block_q), num_blocks(t, block_k)
  out = np.zeros((b, nq, nk), bool)
  for row in range(b):
    q_tin = np.pad(tin[row], (0, nq * block_q - t), constant_values=PAD_INTERVAL)
    k_tin = np.pad(tin[row], (0, nk * block_k - t), constant_values=PAD_INTERVAL)
    k_tout = np.pad(tout[row], (0, nk * block_k - t), constant_values=PAD_INTERVAL)
    u = np.unique(q_tin)  # sorted distinct query entry numbers
    lo = np.searchsorted(u, k_tin, "left")   # first rank with u >= tin[k]
    hi = np.searchsorted(u, k_tout, "left")  # first rank with u >= tout[k]
    live = hi > lo  # keys that some query sees (padding keys have tout == tin)
    key_block = np.arange(nk * block_k) // block_k
    diff = np.zeros((nk, u.size + 1), np.int32)
    np.add.at(diff, (key_block[live], lo[live]), 1)
    np.add.at(diff, (key_block[live], hi[live]), -1)
    covered = np.cumsum(diff, axis=1, dtype=np.int32)[:, :u.size] > 0  # [nk, U]
    q_rank = np.searchsorted(u, q_tin, "left")
    vis_k_q = covered[:, q_rank]  # [nk, nq * block_q]
    out[row] = vis_k_q.reshape(nk, nq, block_q).any(-1).T
  return out


def block_mask_from_bounds(tin, tout, block_q: int, block_k: int):
  """In-graph conservative block mask, bool [B, nq, nk], from per-block interval bounds.

  A visible pair (k, q) needs ``tin[k] <= tin[q] < tout[k]``. Over a query block Q with entry
  numbers in [min_q tin, max_q tin] and the *live* keys of a key block K (tout > tin), such a pair
  can exist only if ``min_K tin <= max_Q tin`` (some key starts no later than the last query) and
  ``max_K tout > min_Q tin`` (some key's subtree ends after the first query). So K is skipped when
  its keys all start after every query of Q — this alone is the causal skip in DFS order, since
  tokens of later blocks have larger entry numbers — or when all their subtrees closed before Q's
  first query: sibling branches to the left, finished trajectories of a packed row. A block of
  only padding keys (no live key) is always skipped. Padded query slots (``PAD_INTERVAL``) are
  left out of the query bounds.
  """
  b, t = tin.shape
  nq, nk = num_blocks(t, block_q), num_blocks(t, block_k)
  big = jnp.int32(2**31 - 1)
  q_tin, _ = pad_intervals(tin, tout, nq * block_q)
  q_real = (q_tin != PAD_INTERVAL).reshape(b, nq, block_q)
  q_tin = q_tin.reshape(b, nq, block_q)
  q_min = jnp.min(jnp.where(q_real, q_tin, big), axis=-1)     # [B, nq]
  q_max = jnp.max(jnp.where(q_real, q_tin, -big), axis=-1)
  k_tin, k_tout = pad_intervals(tin, tout, nk * block_k)
  k_live = (k_tout > k_tin).reshape(b, nk, block_k)
  k_min_tin = jnp.min(jnp.where(k_live, k_tin.reshape(b, nk, block_k), big), axis=-1)  # [B, nk]
  k_max_tout = jnp.max(jnp.where(k_live, k_tout.reshape(b, nk, block_k), -big), axis=-1)
  return ((k_min_tin[:, None, :] <= q_max[:, :, None])
          & (k_max_tout[:, None, :] > q_min[:, :, None])
          & k_live.any(-1)[:, None, :] & q_real.any(-1)[:, :, None])


def visit_lists(block_mask, xp=jnp):
  """Per row of a bool [..., n, m] block mask: (ids [..., n, m], counts [..., n]) int32.

  ``ids[..., i, :counts[i]]`` are the True columns in increasing order; the rest repeat the last
  valid id (0 when the row is empty). Works for numpy (``xp=np``) and jnp.
  """
  m = block_mask.shape[-1]
  counts = block_mask.sum(-1).astype(xp.int32)
  # Stable sort of "not visited" puts visited columns first, in increasing order.
  order = xp.argsort(xp.logical_not(block_mask).astype(xp.int32), axis=-1, stable=True)
  last = xp.maximum(counts - 1, 0)[..., None]
  slot = xp.minimum(xp.arange(m, dtype=xp.int32), last)
  ids = xp.take_along_axis(order, slot, axis=-1).astype(xp.int32)
  return ids, counts


LIST_KEYS = ("kv_ids", "kv_counts", "q_ids", "q_counts")


def mask_visit_lists(mask, block_sizes: BlockSizes):
  """(kv_ids [B,nq,nk], kv_counts [B,nq], q_ids [B,nk,nq], q_counts [B,nk]) int32 for a mask.

  From ``mask.blocks`` when present (checked against the block sizes), else in the graph from
  the per-block interval bounds (``block_mask_from_bounds``).
  """
  b, t = mask.tin.shape
  if mask.blocks is not None:
    check_layout(mask.blocks, b, t, block_sizes, LIST_KEYS)
    return tuple(jnp.asarray(mask.blocks[key], jnp.int32) for key in LIST_KEYS)
  block_mask = block_mask_from_bounds(mask.tin.astype(jnp.int32), mask.tout.astype(jnp.int32),
                                      block_sizes.block_q, block_sizes.block_k)
  kv_ids, kv_counts = visit_lists(block_mask)
  q_ids, q_counts = visit_lists(jnp.swapaxes(block_mask, 1, 2))
  return kv_ids, kv_counts, q_ids, q_counts


def _chunks(ids: np.ndarray, counts: np.ndarray, width: int, dummy: int):
  """Cuts each row's visit list into chunks of ``width``: (owner [B, C], members [B, C, width])."""
  b = ids.shape[0]
  per_row = []
  for row in range(b):
    owners, members = [], []
    for owner, (row_ids, count) in enumerate(zip(ids[row], counts[row])):
      for start in range(0, int(count), width):
        chunk = list(row_ids[start:min(start + width, count)])
        members.append(chunk + [dummy] * (width - len(chunk)))
        owners.append(owner)
    per_row.append((owners, members))
  return per_row


def _pack_chunks(per_row, capacity: int, width: int, dummy: int):
  b = len(per_row)
  owner = np.zeros((b, capacity), np.int32)
  member = np.full((b, capacity, width), dummy, np.int32)
  for row, (owners, members) in enumerate(per_row):
    if len(owners) > capacity:
      raise ValueError(
          f"chunk capacity {capacity} is too small: row {row} needs {len(owners)} chunks; "
          f"pass capacity=None (automatic) or a value >= {max(len(o) for o, _ in per_row)}")
    if owners:
      owner[row, :len(owners)] = owners
      member[row, :len(owners)] = members
  return owner, member


def block_layout(tin, tout, block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK, *,
                 chunk_width: int = DEFAULT_CHUNK_WIDTH,
                 capacity: Optional[int] = None) -> dict:
  """Host-side block metadata for ``AttentionMask.blocks`` (see the module docstring for the keys).

  Args:
    tin, tout: int [B, T] DFS intervals (numpy or array-like; real values >= 0).
    block_q, block_k: block sizes; must match the ``BlockSizes`` the attention function uses.
    chunk_width: key blocks per chunk of the block-sparse XLA path.
    capacity: pins the number of chunks per row; None rounds the batch maximum up to four
      significant bits.
  """
  tin = np.asarray(tin)
  tout = np.asarray(tout)
  if tin.ndim != 2 or tin.shape != tout.shape:
    raise ValueError(f"tin and tout must both be [B, T]; got {tin.shape} and {tout.shape}")
  if chunk_width < 1:
    raise ValueError(f"chunk_width must be >= 1, got {chunk_width}")
  nq, nk = num_blocks(tin.shape[1], block_q), num_blocks(tin.shape[1], block_k)
  mask = exact_block_mask(tin, tout, block_q, block_k)
  kv_ids, kv_counts = visit_lists(mask, np)
  q_ids, q_counts = visit_lists(np.swapaxes(mask, 1, 2), np)
  chunks = _chunks(kv_ids, kv_counts, chunk_width, dummy=nk)
  if capacity is None:
    capacity = round_capacity(max(len(owners) for owners, _ in chunks))
  fwd_q, fwd_kv = _pack_chunks(chunks, capacity, chunk_width, nk)
  return {"kv_ids": kv_ids, "kv_counts": kv_counts, "q_ids": q_ids, "q_counts": q_counts,
          "fwd_chunk_q": fwd_q, "fwd_chunk_kv": fwd_kv}


def visited_fraction(blocks: dict) -> float:
  """Visited (query block, key block) pairs over all nq·nk pairs, averaged over the batch."""
  b, nq, nk = blocks["kv_ids"].shape
  return float(np.asarray(blocks["kv_counts"]).sum()) / (b * nq * nk)


def check_layout(blocks: dict, batch: int, t: int, block_sizes: BlockSizes, keys) -> None:
  """Raises a clear error if ``blocks`` does not fit a [batch, t] input with these block sizes."""
  nq, nk = num_blocks(t, block_sizes.block_q), num_blocks(t, block_sizes.block_k)
  missing = [key for key in keys if key not in blocks]
  if missing:
    raise ValueError(f"mask.blocks lacks {missing}: build it with "
                     "kernels.tree_attention.layout.block_layout(tin, tout, block_q, block_k)")
  got = tuple(blocks["kv_ids"].shape)
  if got != (batch, nq, nk):
    raise ValueError(
        f"mask.blocks['kv_ids'] has shape {got} but a [{batch}, {t}] input with "
        f"block_q={block_sizes.block_q}, block_k={block_sizes.block_k} needs {(batch, nq, nk)}: "
        "build the layout with the same block sizes as the attention function")


def causal_visited_blocks(t: int, block_q: int, block_k: int) -> int:
  """Number of (query block, key block) pairs a causal block-skipping kernel visits for one row."""
  return sum(min(num_blocks(t, block_k), ((i + 1) * block_q - 1) // block_k + 1)
             for i in range(num_blocks(t, block_q)))


def pad_chunks(blocks: dict, capacity: int) -> dict:
  """``blocks`` with its forward chunk lists padded to ``capacity`` chunks per row (unused chunks:
  query block 0, all key slots the dummy block nk), e.g. to keep one static shape across batches;
  the visits are unchanged. Raises if a row already holds more chunks."""
  have = blocks["fwd_chunk_q"].shape[1]
  if capacity < have:
    raise ValueError(f"cannot pad {have} chunks per row down to capacity {capacity}")
  if capacity == have:
    return blocks
  nk = blocks["kv_ids"].shape[2]
  extra = capacity - have
  return {**blocks,
          "fwd_chunk_q": np.pad(blocks["fwd_chunk_q"], ((0, 0), (0, extra))),
          "fwd_chunk_kv": np.pad(blocks["fwd_chunk_kv"], ((0, 0), (0, extra), (0, 0)),
                                 constant_values=nk)}


def chunk_visit_counts(fwd_chunk_q, fwd_chunk_kv, nq: int, nk: int) -> np.ndarray:
  """int32 [B, nq, nk]: how often forward chunk lists visit each (query block, key block) pair
  (the dummy key block ``nk`` of padding slots left out) -- what the block-sparse path computes.
  A layout from ``block_layout`` visits each pair of its block mask exactly once."""
  owner = np.asarray(fwd_chunk_q, np.int64)
  member = np.asarray(fwd_chunk_kv, np.int64)
  out = np.zeros((member.shape[0], nq, nk + 1), np.int32)
  rows = np.broadcast_to(np.arange(member.shape[0])[:, None, None], member.shape)
  np.add.at(out, (rows, np.broadcast_to(owner[:, :, None], member.shape), member), 1)
  return out[:, :, :nk]
