"""The layout of a run's working directory, named in one place.

    WORKDIR/
      checkpoints/<step>/     Orbax checkpoints (train state + the driving loop's JSON state)
      tokenizer/              the tokenizer the run trained or imported (tokenizer.model, ...)
      tb/                     TensorBoard event files
      eval/step_<N>.json      evaluation reports (experiments.eval)
      model_config.json       config.model of a params-only checkpoint (experiments.convert)
      hf_config.json          the source config.json of an imported Hugging Face checkpoint

Every module that reads or writes one of these goes through the functions here.
"""
from __future__ import annotations

import os

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"
TENSORBOARD = "tb"
EVAL = "eval"
MODEL_CONFIG_FILENAME = "model_config.json"
HF_CONFIG_FILENAME = "hf_config.json"
TOKENIZER_MODEL_FILENAME = "tokenizer.model"


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS)


def tokenizer_dir(workdir: str) -> str:
  return os.path.join(workdir, TOKENIZER)


def tensorboard_dir(workdir: str) -> str:
  return os.path.join(workdir, TENSORBOARD)


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, EVAL)


def model_config_path(workdir: str) -> str:
  return os.path.join(workdir, MODEL_CONFIG_FILENAME)


def hf_config_path(workdir: str) -> str:
  return os.path.join(workdir, HF_CONFIG_FILENAME)


def has_saved_tokenizer(workdir: str) -> bool:
  return os.path.exists(os.path.join(tokenizer_dir(workdir), TOKENIZER_MODEL_FILENAME))


def find_tokenizer_dir(workdir: str, config) -> str:
  """``WORKDIR/tokenizer`` if it holds a tokenizer, else ``config.data.tokenizer_path``, else the one
  tokenizer cached under ``WORKDIR/tokenizer/<fingerprint>`` by mid-training."""
  root = tokenizer_dir(workdir)
  if has_saved_tokenizer(workdir):
    return root
  path = config.data.tokenizer_path if "data" in config and "tokenizer_path" in config.data else ""
  if path:
    return path
  cached = sorted(d for d in (os.listdir(root) if os.path.isdir(root) else ())
                  if os.path.exists(os.path.join(root, d, TOKENIZER_MODEL_FILENAME)))
  if len(cached) == 1:
    return os.path.join(root, cached[0])
  raise FileNotFoundError(
      f"no tokenizer for {workdir!r}: expected {root}/{TOKENIZER_MODEL_FILENAME} (saved by "
      f"training), config.data.tokenizer_path, or exactly one cached tokenizer under {root}/ (found "
      f"{len(cached)}); the synthetic stage trains none — save one there first")
