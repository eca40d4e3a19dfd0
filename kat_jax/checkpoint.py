"""Orbax checkpoints of a sharded state together with the driving loop's own state.

A checkpoint step holds two items: ``state`` (any pytree of sharded arrays — the train state, or
``{"params": ...}`` for a params-only checkpoint) and ``data``, a JSON document with whatever the
loop that drives training owns: the data iterator's position, rollout RNG, curriculum, reward
normalizer, queues. ``data`` may contain numpy / JAX arrays and typed PRNG keys; they are stored
exactly (dtype, shape and every bit) inside the JSON (``encode_json_tree``), so a small array state
needs no second item.

Saves are asynchronous (training continues while shards are written), keep the last K, and a
restore reads each shard straight into the sharded abstract state — a restarted run on the same
workdir resumes from the latest complete checkpoint (an interrupted save is never picked up:
Orbax finalizes a step directory atomically).
"""
from __future__ import annotations

import base64
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

_ARRAY, _KEY = "__ndarray__", "__prng_key__"


def encode_json_tree(tree: Any) -> Any:
  """``tree`` with every array leaf (numpy, JAX, typed PRNG key) replaced by an exact JSON form."""
  if isinstance(tree, dict):
    bad = [k for k in tree if not isinstance(k, str)]
    if bad:
      raise TypeError(f"checkpoint extra state: dict keys must be str for JSON, got {bad[:3]}")
    return {k: encode_json_tree(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [encode_json_tree(v) for v in tree]
  if isinstance(tree, jax.Array) and jax.dtypes.issubdtype(tree.dtype, jax.dtypes.prng_key):
    return {_KEY: str(jax.random.key_impl(tree)), "data": encode_json_tree(
        np.asarray(jax.random.key_data(tree)))}
  if isinstance(tree, (np.ndarray, jax.Array, np.generic)):
    a = np.ascontiguousarray(np.asarray(tree))
    return {_ARRAY: a.dtype.str, "shape": list(a.shape),
            "b64": base64.b64encode(a.tobytes()).decode("ascii")}
  if tree is None or isinstance(tree, (bool, int, float, str)):
    return tree
  raise TypeError(f"checkpoint extra state: {type(tree).__name__} is neither JSON-able nor an "
                  "array; convert it (e.g. to a dict of lists or a numpy array)")


def decode_json_tree(tree: Any) -> Any:
  """Inverse of ``encode_json_tree`` (tuples come back as lists)."""
  if isinstance(tree, dict):
    if _ARRAY in tree:
      raw = base64.b64decode(tree["b64"])
      return np.frombuffer(raw, np.dtype(tree[_ARRAY])).reshape(tree["shape"]).copy()
    if _KEY in tree:
      return jax.random.wrap_key_data(decode_json_tree(tree["data"]), impl=tree[_KEY])
    return {k: decode_json_tree(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [decode_json_tree(v) for v in tree]
  return tree


class Checkpointer:

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any, force: bool = False) -> bool:
    """Saves at ``step`` if the interval says so (always with ``force``); True if it saved."""
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(encode_json_tree(data_state))),
        force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, Any, int]:
    """(state, data state, step) of ``step`` (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored.state, decode_json_tree(restored.data), step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
