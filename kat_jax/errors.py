"""Error types shared across layers (below config, model and sharding, so none imports another), and
how a command-line program reports the one that ended it.

``run_main(main)`` is what ``experiments.main`` / ``eval`` / ``convert`` hand to ``absl.app.run``:
on an exception it prints the full traceback, then one last line ``error: <root cause>`` — the
innermost meaningful exception of the chain (ours, which name the field or file, win over the
library errors they wrap) — and exits with status 1 at once, so no interpreter-shutdown noise of
background threads (Orbax's event loop, TensorStore) follows it. ``quiet_library_noise(verbose)``
drops Orbax / TensorStore log records (their own tracebacks of a failure we report in one line)
unless ``--verbosity`` was given, and ``drop_closed_event_loop_noise()`` the tracebacks that
TensorStore callbacks print after a failed read, when Orbax's event loop is already closed.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from typing import Callable


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field and the fix."""


class CheckpointError(RuntimeError):
  """A checkpoint could not be read or written; the message names the step, file and fix."""


class CheckpointReadError(CheckpointError):
  """No checkpoint step (or not the one asked for) could be read."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint save failed (disk full, a write error): the run stops at once."""


class WorkdirLockedError(RuntimeError):
  """Another live trainer holds the workdir's lock; the message names it (pid, host, start)."""


# Exceptions whose message is ours and names the cause: the root cause when present in a chain.
_OURS = (ConfigError, CheckpointError, WorkdirLockedError)


def _chain(error: BaseException) -> list[BaseException]:
  out = []
  while error is not None and error not in out:
    out.append(error)
    error = error.__cause__ if error.__cause__ is not None else (
        None if error.__suppress_context__ else error.__context__)
  return out


def root_cause(error: BaseException) -> str:
  """``Type: message`` (first line, shortened) of the exception that explains ``error``: the
  outermost of ours in its chain, else the innermost exception."""
  chain = _chain(error)
  ours = [e for e in chain if isinstance(e, _OURS)]
  cause = ours[0] if ours else chain[-1]
  text = str(cause).strip()
  first = text.splitlines()[0] if text else ""
  first = first.split(" [tensorstore_spec=")[0]
  if len(first) > 2000:
    first = first[:2000] + "..."
  return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


def run_main(main: Callable) -> Callable:
  """``main`` wrapped for ``absl.app.run``: a failure ends with the traceback and one root-cause
  line (``absl``'s usage errors and ``SystemExit`` pass through unchanged)."""

  def wrapped(argv):
    try:
      return main(argv)
    except Exception as error:  # noqa: BLE001 - reported, then the process exits
      if type(error).__name__ == "UsageError":
        raise
      traceback.print_exc()
      sys.stderr.write(f"error: {root_cause(error)}\n")
      for stream in (sys.stdout, sys.stderr):
        try:
          stream.flush()
        except Exception:  # noqa: BLE001
          pass
      os._exit(1)

  return wrapped


def _is_closed_loop(error: BaseException) -> bool:
  return type(error) is RuntimeError and str(error) == "Event loop is closed"


def drop_closed_event_loop_noise() -> None:
  """Silences ``RuntimeError: Event loop is closed`` raised in background threads or unraisable
  callbacks (TensorStore futures completing after Orbax closed its loop); others pass (once)."""
  if getattr(threading.excepthook, "_kat_jax", False):
    return
  thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

  def on_thread_error(args):
    if not _is_closed_loop(args.exc_value):
      thread_hook(args)

  def on_unraisable(args):
    if not _is_closed_loop(args.exc_value):
      unraisable_hook(args)

  on_thread_error._kat_jax = True
  threading.excepthook, sys.unraisablehook = on_thread_error, on_unraisable


class _LibraryNoise(logging.Filter):
  """Drops log records emitted from Orbax or TensorStore code (below CRITICAL)."""

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    return record.levelno >= logging.CRITICAL or not ("/orbax/" in path or "tensorstore" in path)


def quiet_library_noise(verbose: bool) -> None:
  """Without ``verbose``: no Orbax / TensorStore log records (absl's handler and the root's)."""
  drop_closed_event_loop_noise()
  if verbose:
    return
  for logger in (logging.getLogger("absl"), logging.getLogger()):
    for handler in logger.handlers:
      if not any(isinstance(f, _LibraryNoise) for f in handler.filters):
        handler.addFilter(_LibraryNoise())
    if not any(isinstance(f, _LibraryNoise) for f in logger.filters):
      logger.addFilter(_LibraryNoise())
