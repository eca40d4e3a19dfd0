"""Stages = (data source, loss), by name. The loop, step and checkpointing are shared by all stages;
a new stage registers a data factory and names a registered loss — it never copies the loop.

A data factory has the signature ``factory(config, workdir, *, split, batch_size, seed, shard_index,
shard_count) -> (iterator, tokenizer_or_None)``; the iterator yields dicts of numpy arrays with a
leading per-process batch axis and has ``get_state()`` / ``set_state()`` (saved with checkpoints) and
``metrics()`` (data-side counters reported beside the training metrics).

With ``config.train.loss='distill'`` every data stage's batches pass through
``kat_jax.train.distill.attach_teacher_data``: the teacher's tokenizer is checked to be the
student's, and precomputed teacher top-k (``config.train.distill.topk_data``) join each batch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

from kat_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
  """``make_data`` feeds the offline loop; an online stage (RL) instead names ``run``, its own loop
  ``run(config, workdir) -> result`` that drives the ``Trainer`` (never a copy of the loop)."""
  name: str
  loss: str
  make_data: Optional[Callable] = None
  run: Optional[Callable] = None


_STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
  if stage.make_data is not None:
    stage = dataclasses.replace(stage, make_data=_with_teacher_data(stage.make_data))
  _STAGES[stage.name] = stage
  return stage


def _with_teacher_data(make_data: Callable) -> Callable:
  """``make_data`` and, for the distill loss, the teacher's side of the data
  (``kat_jax.train.distill.attach_teacher_data``)."""
  @functools.wraps(make_data)
  def factory(config, workdir, **kwargs):
    it, tokenizer = make_data(config, workdir, **kwargs)
    if config.train.loss != "distill":
      return it, tokenizer
    from kat_jax.train import distill   # local: the loss modules import jax
    return distill.attach_teacher_data(config, it, tokenizer, split=kwargs["split"])
  return factory


def run(config, workdir: str) -> dict:
  """Trains ``config.stage``: its own loop if it has one, else the offline loop over its data."""
  stage = get_stage(config.stage)
  if stage.run is not None:
    return stage.run(config, workdir)
  from kat_jax.train import loop
  return loop.train(config, workdir)


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
  tokenizer = _checkpoint_tokenizer(config, workdir)   # a model from init_from keeps its ids
  it = pipeline.make_lm_iterator(config.data, tokenizer, split=split, batch_size=batch_size,
                                 seq_len=config.train.seq_len, seed=seed,
                                 shard_index=shard_index, shard_count=shard_count)
  return it, tokenizer


def _sft_tree_data(config, workdir, *, split, batch_size, seed, shard_index, shard_count):
  """Tree SFT: one prefix tree per row from the group source ``config.tree.source`` names
  (procedural tasks, or self-debugging records: ``kat_jax.tree.sft_data``)."""
  from kat_jax.tree.sft_data import TreeSFTIterator
  del shard_count
  tokenizer = _checkpoint_tokenizer(config, workdir)   # init_from's tokenizer, as every LM stage
  it = TreeSFTIterator(config.tree, tokenizer, split=split, batch_size=batch_size, seed=seed,
                       shard_index=shard_index, attention_impl=config.model.attention_impl)
  return it, tokenizer


register(Stage("synthetic", loss="lm", make_data=_synthetic_data))
register(Stage("sft_tree", loss="tree", make_data=_sft_tree_data))
register(Stage("midtrain", loss="lm", make_data=_lm_data))


def _rl_run(config, workdir):
  from kat_jax.rl import loop as rl_loop   # the RL stage's loop (imports the environments)
  return rl_loop.train(config, workdir)


register(Stage("rl", loss="tree", run=_rl_run))


def _rft_run(config, workdir):
  from kat_jax.rl import rft_loop   # the RL loop with teacher-guided rollouts
  return rft_loop.train(config, workdir)


register(Stage("rft", loss="tree", run=_rft_run))


def _check_sft_data(data) -> None:
  """The ``sft`` stage's contract on ``config.data``: teacher trajectories in the mixture, and
  every stream a conversation stream trained on its assistant tokens only."""
  if not data.mixture.trajectories > 0:
    raise ConfigError(
        "config.stage='sft' trains on teacher trajectories: set data.mixture.trajectories > 0 and "
        "data.trajectories.paths (python -m experiments.make_agentic_data writes them)")
  for name, weight in data.mixture.items():
    if not weight > 0:
      continue
    section = data[name] if name in data else None
    if section is None or "loss_on" not in section:
      raise ConfigError(
          f"config.stage='sft' trains on conversations with assistant-only loss, but "
          f"data.mixture.{name}={weight} mixes in documents trained on every token: set it to 0 "
          f"(or use config.stage='midtrain')")
    if section.loss_on != "assistant":
      raise ConfigError(f"config.stage='sft' trains on assistant tokens only: set "
                        f"data.{name}.loss_on='assistant' (got {section.loss_on!r})")
    if "render" in section and section.render != "conversation":
      raise ConfigError(f"config.stage='sft' renders conversations: set "
                        f"data.{name}.render='conversation' (got {section.render!r})")


def _checkpoint_tokenizer(config, workdir):
  """``data.tokenizer_path`` if set; else the tokenizer of the ``init_from`` checkpoint (a kat_jax
  workdir's saved one, a Hugging Face checkpoint's), whose ids the params were trained on; else,
  for a model trained from scratch, the one trained from the code corpus."""
  from kat_jax import workdir as workdir_lib
  from kat_jax.data import tokenizer as tokenizer_lib
  source = config.init_from.rpartition("@")[0] if "@" in config.init_from else config.init_from
  if not source or config.data.tokenizer_path:
    return _tokenizer(config, workdir)
  tokenizer = (tokenizer_lib.maybe_tokenizer(workdir_lib.tokenizer_dir(source))
               or tokenizer_lib.maybe_tokenizer(source))
  if tokenizer is None:
    raise ConfigError(
        f"config.init_from={config.init_from!r} has no tokenizer (neither "
        f"{workdir_lib.tokenizer_dir(source)}/ nor a Hugging Face tokenizer): set "
        "config.data.tokenizer_path to the tokenizer its params were trained with")
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(
        f"the tokenizer of config.init_from has {tokenizer.vocab_size} tokens but "
        f"config.model.vocab_size={config.model.vocab_size}: raise config.model.vocab_size")
  return tokenizer


def _sft_data(config, workdir, *, split, batch_size, seed, shard_index, shard_count):
  """Flat SFT: packed rows of the mixture's conversation streams — the teacher trajectories
  (``data.trajectories``; ``balance='taxonomy'`` draws them balanced over the taxonomy cells by
  ``taxonomy.balanced_sampling_weights``, as configs/sft_tiny.py does) and instruction data —
  with loss on the assistant turns only (``chat.render`` masks → batch ``weights``)."""
  from kat_jax.data import pipeline
  _check_sft_data(config.data)
  tokenizer = _checkpoint_tokenizer(config, workdir)
  it = pipeline.make_lm_iterator(config.data, tokenizer, split=split, batch_size=batch_size,
                                 seq_len=config.train.seq_len, seed=seed,
                                 shard_index=shard_index, shard_count=shard_count)
  return it, tokenizer


register(Stage("sft", loss="lm", make_data=_sft_data))


def _chain_run(config, workdir):
  from kat_jax.train import chain   # stages in order, each from the previous one's checkpoint
  return chain.run_chain(config, workdir)


register(Stage("chain", loss="lm", run=_chain_run))
