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
Orbax finalizes a step directory atomically; leftover ``<step>.orbax-checkpoint-tmp*`` directories
are removed when the checkpointer opens).

Faults (docs/RELIABILITY.md):

* A step that cannot be read (a missing or corrupt file, unreadable metadata) is moved aside to
  ``checkpoints/corrupt/<step>-<reason>`` (never deleted) with a warning naming the step, the file
  and the reason, and the next older step is restored; if no step can be read, nothing is moved and
  ``CheckpointReadError`` lists every step with its file and reason.
* A step whose stored shapes differ from the requested state (the model config changed) is a
  ``ConfigError`` naming each differing parameter, stored vs requested shape, and the fix.
* A save that fails (disk full, a write error) raises ``CheckpointWriteError`` with one line: the
  step, the directory, the OS error and the last good checkpoint; its partial temporary directory
  is removed, so a restart in place resumes from the last good step. An asynchronous save's failure
  is raised by the next ``check()`` / ``save()`` / ``wait()`` — ``Trainer.step`` calls ``check()``
  first, so no step runs after a failure is known.
"""
from __future__ import annotations

import base64
import glob
import os
import re
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from kat_jax.errors import (CheckpointReadError, CheckpointWriteError, ConfigError,
                            drop_closed_event_loop_noise)

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


CORRUPT_DIR = "corrupt"          # checkpoints/corrupt/<step>-<reason>: steps that could not be read
TMP_SUFFIX = ".orbax-checkpoint-tmp"   # Orbax's name for a step (or item) still being written
_STATUS = re.compile(r"\b(DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION|NOT_FOUND|INVALID_ARGUMENT|"
                     r"INTERNAL|UNKNOWN|PERMISSION_DENIED|RESOURCE_EXHAUSTED)\b")
_FILE = re.compile(r'(?:local )?file "([^"]+)"')
_OS_CODE = re.compile(r"os_error_code='(\d+)'")


def _key_name(key) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{"params/layer_0/mlp/wi": shape}`` of every array leaf; attribute, dict and index keys are
  named alike, so a dataclass state and Orbax's stored dict tree of it compare key by key."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in leaves if hasattr(leaf, "shape")}


def _chain(error: BaseException) -> list[BaseException]:
  out = []
  while error is not None and error not in out:
    out.append(error)
    error = error.__cause__ or error.__context__
  return out


def _short(text: str, limit: int = 300) -> str:
  text = text.split(" [tensorstore_spec=")[0].strip().splitlines()[0] if text.strip() else text
  return text if len(text) <= limit else text[:limit] + "..."


def describe_read_error(error: BaseException, step_dir: str) -> tuple[str, str, str]:
  """(file, reason slug, one-line message) of an exception raised reading a checkpoint step."""
  files, reason, message = [], "", ""
  for e in _chain(error):
    text = str(e)
    files += [f for f in _FILE.findall(text) if os.path.isfile(f) or not f.endswith("/")]
    status = _STATUS.search(text)
    if status and not reason:
      where = list(re.finditer(r'local file "[^"]+": ', text))
      reason = status.group(1).lower().replace("_", "-")
      message = _short(text[where[-1].end():] if where else text)
    if isinstance(e, FileNotFoundError) and not reason:
      reason, message = "missing-file", _short(text)
      files += [f for f in (e.filename,) if f]
      missing = re.search(r"named (\S+)\) does not exist at (\S+?)\.?$", text)
      if missing:
        files.append(os.path.join(missing.group(2), missing.group(1)))
      if files and "METADATA" in os.path.basename(files[-1]):
        reason = "missing-metadata"
  if not reason:
    reason, message = type(error).__name__.lower(), _short(str(error)) or type(error).__name__
  return (files[-1] if files else step_dir), reason, message


def os_error_text(error: BaseException) -> str:
  """``[Errno 28] No space left on device`` from an OSError anywhere in the chain, or from a
  TensorStore message's ``os_error_code``; else the innermost message, shortened."""
  chain = _chain(error)
  for e in chain:
    if isinstance(e, OSError) and e.errno:
      return f"[Errno {e.errno}] {e.strerror or os.strerror(e.errno)}"
  for e in chain:
    code = _OS_CODE.search(str(e))
    if code:
      n = int(code.group(1))
      return f"[Errno {n}] {os.strerror(n)}"
  return _short(str(chain[-1])) or type(chain[-1]).__name__


def is_write_failure(error: BaseException) -> bool:
  """An OS-level write failure (disk full, I/O or permission error) anywhere in the chain."""
  return any(isinstance(e, OSError) or _OS_CODE.search(str(e)) or "Failed writing" in str(e)
             for e in _chain(error))


def _all_processes_ok(ok: bool) -> bool:
  """True when ``ok`` on every process (a step one process cannot read is unreadable for all)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
  """Orbax ``CheckpointManager`` over ``directory`` (items ``state`` and ``data``) with the fault
  handling of the module docstring."""

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True,
               cleanup_partial: bool = True):
    """``cleanup_partial``: remove leftover partial saves on opening — only for the one writer of
    the directory (a reader next to a live run would delete that run's save in flight)."""
    self.directory = os.path.abspath(directory)
    drop_closed_event_loop_noise()   # TensorStore's tracebacks after a failed read (see errors)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=cleanup_partial)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending: Optional[int] = None   # step of an asynchronous save not yet known complete

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # ----------------------------------------------------------------------------- writing

  def save(self, step: int, state: Any, data_state: Any, force: bool = False) -> bool:
    """Saves at ``step`` if the interval says so (always with ``force``); True if it saved.
    Raises ``CheckpointWriteError`` if this save, or a previous asynchronous one, failed."""
    if not (force or self._manager.should_save(step)):
      self.check()
      return False
    if self._pending is not None:
      self.wait()     # Orbax would wait for it anyway; a failure is then blamed on its own step
    try:
      saved = self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        data=ocp.args.JsonSave(encode_json_tree(data_state))),
          force=force)
    except Exception as error:  # noqa: BLE001 - only write failures are turned into one line
      if not is_write_failure(error):
        raise
      self._write_failed(step, error)
    if saved:
      self._pending = step
    return saved

  def check(self) -> None:
    """Raises ``CheckpointWriteError`` if an asynchronous save has failed (never blocks on one
    still running)."""
    if self._pending is None or self._manager.is_saving_in_progress():
      return
    self.wait()

  def wait(self) -> None:
    """Blocks until pending writes finish; ``CheckpointWriteError`` if one failed."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as error:  # noqa: BLE001 - any failure of a background write
      self._write_failed(step, error)

  def _write_failed(self, step: Optional[int], error: BaseException) -> None:
    self._pending = None
    self.remove_partial_saves()
    try:
      self._manager.reload()
      good = [s for s in self._manager.all_steps() if s != step and
              os.path.isdir(self.step_dir(s))]
    except Exception:  # noqa: BLE001 - the directory may be unreadable too
      good = []
    last = (f"the last good checkpoint is step {max(good)} ({self.step_dir(max(good))})" if good
            else "there is no good checkpoint")
    where = self.step_dir(step) if step is not None else self.directory
    raise CheckpointWriteError(
        f"checkpoint save of step {step} to {where} failed: {os_error_text(error)}; training "
        f"stopped; {last}. Free space (or fix the error) and restart in place to resume from it"
    ) from error

  def remove_partial_saves(self) -> list[str]:
    """Removes ``<step>.orbax-checkpoint-tmp*`` directories (process 0); returns their paths."""
    if jax.process_index() != 0:
      return []
    partial = sorted(glob.glob(os.path.join(self.directory, f"*{TMP_SUFFIX}*")))
    for path in partial:
      shutil.rmtree(path, ignore_errors=True)
    return partial

  # ----------------------------------------------------------------------------- reading

  def _check_shapes(self, abstract_state: Any, step: int) -> None:
    """ConfigError naming each parameter whose stored shape differs from ``abstract_state``'s.
    Unreadable metadata propagates (the step is then corrupt)."""
    from etils import epath
    handler = ocp.StandardCheckpointHandler()
    try:
      stored = flat_shapes(handler.metadata(epath.Path(self.step_dir(step)) / "state"))
    finally:
      handler.close()
    wanted = flat_shapes(abstract_state)
    diffs = [f"{name}: stored {stored.get(name, 'absent')} vs requested "
             f"{wanted.get(name, 'absent')}"
             for name in sorted(set(stored) | set(wanted)) if stored.get(name) != wanted.get(name)]
    if not diffs:
      return
    params = [d for d in diffs if d.startswith("params/")] or diffs
    more = f"; ... ({len(params) - 12} more)" if len(params) > 12 else ""
    shown = "; ".join(params[:12]) + more
    workdir = os.path.dirname(self.directory)
    raise ConfigError(
        f"checkpoint step {step} in {self.directory} does not match the requested model "
        f"(config.model or config.train changed since it was written): {shown}. Use a new "
        f"--workdir, or start a new workdir from these weights with "
        f"--config.init_from={workdir} (params only, fresh optimizer; a partial start)")

  def _restore_step(self, abstract_state: Any, step: int):
    self._check_shapes(abstract_state, step)
    return self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, Any, int]:
    """(state, data state, step) of ``step`` (default: the latest readable one, moving newer
    unreadable steps aside; see the module docstring)."""
    candidates = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not candidates:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failed: list[tuple[int, str, str, str]] = []    # (step, file, reason, message)
    for candidate in candidates:
      error = None
      try:
        restored = self._restore_step(abstract_state, candidate)
      except ConfigError:
        raise
      except (MemoryError, KeyboardInterrupt):
        raise
      except Exception as e:  # noqa: BLE001 - any failure to read the step's files
        error = e
      if _all_processes_ok(error is None):
        self._set_aside(failed)
        return restored.state, decode_json_tree(restored.data), candidate
      failed.append((candidate, *describe_read_error(
          error or RuntimeError("another process could not read it"), self.step_dir(candidate))))
      if step is not None:
        break
    lines = "; ".join(f"step {s}: {reason} in {path} ({message})"
                      for s, path, reason, message in failed)
    raise CheckpointReadError(
        f"no readable checkpoint in {self.directory}: {lines}. Nothing was moved; remove or repair "
        f"these step directories (or start a new --workdir)"
        if step is None else f"checkpoint step {step} in {self.directory} cannot be read: {lines}")

  def _set_aside(self, failed: list[tuple[int, str, str, str]]) -> None:
    """Moves each unreadable step to ``corrupt/<step>-<reason>`` (process 0) with a warning."""
    if not failed:
      return
    if jax.process_index() == 0:
      os.makedirs(os.path.join(self.directory, CORRUPT_DIR), exist_ok=True)
      for step, path, reason, message in failed:
        target = os.path.join(self.directory, CORRUPT_DIR, f"{step}-{reason}")
        n = 1
        while os.path.exists(target):
          n += 1
          target = os.path.join(self.directory, CORRUPT_DIR, f"{step}-{reason}-{n}")
        os.rename(self.step_dir(step), target)
        logging.warning("checkpoint step %d is unreadable (%s: %s, file %s); moved it to %s and "
                        "fell back to an older step", step, reason, message, path, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("kat_jax checkpoint set aside")
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()
