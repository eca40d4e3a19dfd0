"""A deterministic synthetic token stream with exact resume, for benchmarks and loop tests.

Each row is a packed batch of random "documents" whose second half repeats the first half, so a model
can lower the loss by copying (a real learning signal with no corpus). Row r of batch i depends only
on (seed, i, global row = shard_index × batch_size + r), so the global batch is the same however
many processes share it: ``get_state``/``set_state`` is the batch counter.
"""
from __future__ import annotations

import numpy as np


class SyntheticCopyIterator:

  def __init__(self, *, vocab_size: int, batch_size: int, seq_len: int, seed: int,
               shard_index: int = 0, doc_len: int = 32, num_reserved: int = 16):
    self.vocab_size, self.batch_size, self.seq_len = vocab_size, batch_size, seq_len
    self.seed, self.shard_index, self.doc_len, self.num_reserved = seed, shard_index, doc_len, num_reserved
    self._index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    b, t, d = self.batch_size, self.seq_len, self.doc_len
    first_row = self.shard_index * b
    half = np.stack([
        np.random.default_rng([self.seed, self._index, first_row + r]).integers(
            self.num_reserved, self.vocab_size, (t // d + 1, d // 2)) for r in range(b)])
    self._index += 1
    docs = np.concatenate([half, half], axis=-1).reshape(b, -1)[:, :t + 1].astype(np.int32)
    idx = np.arange(t)
    segment_ids = np.broadcast_to(idx // d + 1, (b, t)).astype(np.int32)
    positions = np.broadcast_to(idx % d, (b, t)).astype(np.int32)
    weights = np.broadcast_to(((idx % d) != d - 1).astype(np.float32), (b, t)).copy()
    return dict(inputs=docs[:, :-1], targets=docs[:, 1:], positions=positions.copy(),
                segment_ids=segment_ids.copy(), weights=weights)

  def get_state(self) -> dict:
    return {"index": self._index}

  def set_state(self, state: dict) -> None:
    self._index = int(state["index"])

  def metrics(self) -> dict:
    return {}
