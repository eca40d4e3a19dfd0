"""The offline training loop shared by every data-iterator stage: data → ``Trainer.step`` → metrics →
checkpoints.

``train(config, workdir)`` builds a ``Trainer`` (restoring the latest checkpoint in ``workdir`` if there
is one, data-iterator position included), runs ``config.train.steps`` steps, evaluates on the
held-out split every ``config.train.eval_every`` steps, and returns the final metrics. A non-finite
loss or gradient norm stops the run with a ``FloatingPointError`` naming the step and the metric;
the state that produced it is never saved, so the last checkpoint is the last good one.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

import jax
import ml_collections

from kat_jax import workdir as workdir_lib
from kat_jax.train import stages
from kat_jax.train.trainer import Trainer


def train(config: ml_collections.ConfigDict, workdir: str,
          max_steps: Optional[int] = None) -> dict[str, Any]:
  """Trains ``config.stage`` in ``workdir``; ``max_steps`` stops early (the schedule still spans
  ``config.train.steps``), which tests use to interrupt a run."""
  start_time = time.perf_counter()
  train_cfg = config.train
  stage = stages.get_stage(config.stage)
  total = train_cfg.steps if max_steps is None else min(train_cfg.steps, max_steps)
  trainer = Trainer(config, workdir, total_steps=total)
  nproc, pid = jax.process_count(), jax.process_index()
  data_kwargs = dict(batch_size=train_cfg.batch_size // nproc, seed=config.seed, shard_index=pid,
                     shard_count=nproc)
  train_it, tokenizer = stage.make_data(config, workdir, split="train", **data_kwargs)
  if tokenizer is not None and pid == 0 and not workdir_lib.has_saved_tokenizer(workdir):
    tokenizer.save(workdir_lib.tokenizer_dir(workdir))   # beside the checkpoints, for eval
  if "train" in trainer.extra_state:
    train_it.set_state(trainer.extra_state["train"])
  make_eval_it = lambda: stage.make_data(config, workdir, split="eval", **data_kwargs)[0]
  eval_every = train_cfg.eval_every
  start = trainer.step_count
  result: dict[str, Any] = {"step": start, "start_step": start}
  try:
    for _ in range(start, total):
      metrics = trainer.step(next(train_it))
      step = trainer.step_count
      if step == total:
        trainer.check_finite(metrics)
      data_metrics = lambda: {f"data/{k}": v for k, v in train_it.metrics().items()}
      scalars = trainer.log(metrics, data_metrics, force=step == total)
      if scalars is not None:
        result.update(step=step, **{f"train_{k}": v for k, v in scalars.items()})
      if eval_every and (step % eval_every == 0 or step == total):
        ev = trainer.evaluate(make_eval_it)
        trainer.writer.write(step, ev, prefix="eval")
        result.update({f"eval_{k}": v for k, v in ev.items()})
      trainer.save({"train": train_it.get_state()})
    if total > start and trainer.checkpointer.latest_step() != total:
      trainer.save({"train": train_it.get_state()}, force=True)
    result["step"] = total
  finally:
    trainer.close()
  result.update(state=trainer.state, wall_time_s=time.perf_counter() - start_time,
                checkpoint_dir=trainer.checkpointer.directory,
                tensorboard_dir=workdir_lib.tensorboard_dir(workdir))
  return result


def load_state(config: ml_collections.ConfigDict, workdir: str, step: Optional[int] = None):
  """Restores the train state saved in ``workdir`` (latest step by default) onto the config's mesh.

  Returns (state, model, mesh, step)."""
  ckpt_dir = workdir_lib.checkpoints_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
  trainer = Trainer(config, workdir, restore_step=step, lock=False)
  trainer.close()
  if trainer.restored_step is None:
    raise FileNotFoundError(f"no checkpoint in {trainer.checkpointer.directory}")
  # A LoRA run's state holds the adapters only: give the callers base + adapters.
  return (trainer.state.replace(params=trainer.params), trainer.model, trainer.mesh,
          trainer.restored_step)
