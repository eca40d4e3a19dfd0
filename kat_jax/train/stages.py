"""Stages = (data source, loss), by name. The loop, step and checkpointing are shared by all stages;
a new stage registers a data factory and names a registered loss — it never copies the loop.

A data factory has the signature ``factory(config, workdir, *, split, batch_size, seed, shard_index,
shard_count) -> (iterator, tokenizer_or_None)``; the iterator yields dicts of numpy arrays with a
leading per-process batch axis and has ``get_state()`` / ``set_state()`` (saved with checkpoints) and
``metrics()`` (data-side counters reported beside the training metrics).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from kat_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  loss: str
  make_data: Callable


_STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
  _STAGES[stage.name] = stage
  return stage


def get_stage(name: str) -> Stage:
  if name not in _STAGES:
    raise ConfigError(f"config.stage={name!r} is not a known stage: choose one of {sorted(_STAGES)}")
  return _STAGES[name]


def _synthetic_data(config, workdir, *, split, batch_size, seed, shard_index, shard_count):
  from kat_jax.data.synthetic import SyntheticCopyIterator
  del workdir, shard_count
  seed = seed + (1_000_003 if split == "eval" else 0)
  it = SyntheticCopyIterator(vocab_size=config.model.vocab_size, batch_size=batch_size,
                             seq_len=config.train.seq_len, seed=seed, shard_index=shard_index)
  return it, None


def _tokenizer(config, workdir):
  from kat_jax.data import pipeline
  tokenizer = pipeline.get_or_train_tokenizer(config.data, workdir)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(
        f"tokenizer has {tokenizer.vocab_size} tokens but config.model.vocab_size="
        f"{config.model.vocab_size}: raise config.model.vocab_size to at least "
        f"{tokenizer.vocab_size} (or lower config.data's vocab size)")
  return tokenizer


def _lm_data(config, workdir, *, split, batch_size, seed, shard_index, shard_count):
  from kat_jax.data import pipeline
  tokenizer = _tokenizer(config, workdir)
  it = pipeline.make_lm_iterator(config.data, tokenizer, split=split, batch_size=batch_size,
                                 seq_len=config.train.seq_len, seed=seed,
                                 shard_index=shard_index, shard_count=shard_count)
  return it, tokenizer


def _sft_tree_data(config, workdir, *, split, batch_size, seed, shard_index, shard_count):
  from kat_jax.tree.sft_data import TreeSFTIterator
  del shard_count
  tokenizer = _tokenizer(config, workdir)
  it = TreeSFTIterator(config.tree, tokenizer, split="heldout" if split == "eval" else split,
                       batch_size=batch_size, seed=seed, shard_index=shard_index)
  return it, tokenizer


register(Stage("synthetic", loss="lm", make_data=_synthetic_data))
register(Stage("sft_tree", loss="tree", make_data=_sft_tree_data))
register(Stage("midtrain", loss="lm", make_data=_lm_data))
