"""The training loop shared by every stage: data → sharded jitted step → metrics → checkpoints.

``train(config, workdir)`` builds the mesh and state from the config (restoring the latest checkpoint
in ``workdir`` if there is one, data-iterator position included), runs ``config.train.steps`` steps,
evaluates on the held-out split every ``config.train.eval_every`` steps, and returns the final metrics.
A non-finite loss or gradient norm stops the run with a ``FloatingPointError`` naming the step and the
metric; the state that produced it is never saved, so the last checkpoint is the last good one.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from kat_jax import config as config_lib
from kat_jax import sharding as sharding_lib
from kat_jax.model import ModelConfig, Transformer
from kat_jax.train import checkpoint as checkpoint_lib
from kat_jax.train import losses, metrics as metrics_lib, optimizer, stages
from kat_jax.train import state as state_lib
from kat_jax.train import step as step_lib


def _evaluate(eval_step, params, make_eval_iterator, num_batches, mesh, rules) -> dict:
  it = make_eval_iterator()
  sums: dict[str, float] = {}
  for _ in range(num_batches):
    out = jax.device_get(eval_step(params, sharding_lib.host_to_global(next(it), mesh, rules)))
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  den = max(sums.pop("denominator"), 1e-9)
  result = {"loss": sums.pop("numerator") / den}
  result.update({k.removesuffix("_sum"): v / den for k, v in sums.items()})
  return result


def train(config: ml_collections.ConfigDict, workdir: str,
          max_steps: Optional[int] = None) -> dict[str, Any]:
  """Trains ``config.stage`` in ``workdir``; ``max_steps`` stops early (the schedule still spans
  ``config.train.steps``), which tests use to interrupt a run."""
  config_lib.validate(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  train_cfg = config.train
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config)
  stage = stages.get_stage(config.stage)
  loss = losses.get_loss(train_cfg.get("loss", None) or stage.loss)
  model_cfg = ModelConfig.from_config(config.model)
  model = Transformer(model_cfg, mesh=mesh, rules=rules)
  tx, schedule = optimizer.make_optimizer(train_cfg)

  nproc, pid = jax.process_count(), jax.process_index()
  local_batch = train_cfg.batch_size // nproc
  data_kwargs = dict(batch_size=local_batch, seed=config.seed, shard_index=pid, shard_count=nproc)
  train_it, tokenizer = stage.make_data(config, workdir, split="train", **data_kwargs)
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  if (tokenizer is not None and pid == 0
      and not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.model"))):
    tokenizer.save(tokenizer_dir)   # beside the checkpoints, for eval and sampling

  example = {"inputs": jax.ShapeDtypeStruct((train_cfg.batch_size, train_cfg.seq_len), np.int32)}
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every=train_cfg.checkpoint_every,
      keep=train_cfg.get("keep_checkpoints", 3), async_save=train_cfg.get("async_checkpoint", True))
  abstract, shardings = state_lib.abstract_state(model, tx, example, mesh, rules)
  if ckpt.latest_step() is not None:
    state, data_state, start = ckpt.restore(abstract)
    train_it.set_state(data_state["train"])
    logging.info("restored step %d from %s", start, ckpt.directory)
  elif config.get("init_from", ""):
    # A pretrained start (an HF checkpoint directory or a kat_jax workdir[@step]): params placed
    # directly into their shards, fresh optimizer state.
    from kat_jax.model import hf as hf_lib
    params = hf_lib.init_params_from(config.init_from, abstract.params, model_cfg)
    state = jax.jit(lambda p: state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                   opt_state=tx.init(p)),
                    out_shardings=shardings, donate_argnums=0)(params)
    start = 0
    logging.info("initialized params from %s", config.init_from)
  else:
    state, shardings = state_lib.create_sharded_state(
        model, tx, example, mesh, rules, jax.random.key(config.seed))
    start = 0

  train_step = step_lib.make_train_step(model.apply, loss, tx, schedule, train_cfg, shardings,
                                        mesh, rules)
  eval_every = train_cfg.get("eval_every", 0)
  eval_step = (step_lib.make_eval_step(model.apply, loss, train_cfg, shardings, mesh, rules)
               if eval_every else None)
  make_eval_it = lambda: stage.make_data(config, workdir, split="eval", **data_kwargs)[0]

  tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
  step_flops = model_cfg.matmul_flops_per_token(train_cfg.seq_len) * tokens_per_step
  peak = metrics_lib.peak_flops_per_device(train_cfg.get("peak_flops_per_device", 0.0))
  peak_total = peak * jax.device_count()
  total = train_cfg.steps if max_steps is None else min(train_cfg.steps, max_steps)
  writer = metrics_lib.MetricWriter(workdir, total, start, train_cfg.get("progress_bar", True))
  rng = jax.random.key(config.seed + 1)
  last_time, last_step = time.perf_counter(), start
  result: dict[str, Any] = {"step": start}
  try:
    for step in range(start, total):
      batch = sharding_lib.host_to_global(next(train_it), mesh, rules)
      state, metrics = train_step(state, batch, rng)
      if (step + 1) % train_cfg.get("check_finite_every", 1) == 0 or step + 1 == total:
        host = jax.device_get(metrics)
        if not host["finite"]:
          bad = [k for k in ("loss", "grad_norm") if not np.isfinite(host[k])]
          ckpt.wait()
          raise FloatingPointError(
              f"non-finite {' and '.join(bad)} at step {step + 1} "
              f"({', '.join(f'{k}={host[k]}' for k in bad)}); the state was not updated and the "
              f"last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
      writer.advance()
      if (step + 1) % train_cfg.log_every == 0 or step + 1 == total:
        host = jax.device_get(metrics)
        now = time.perf_counter()
        dt = (now - last_time) / max(step + 1 - last_step, 1)
        last_time, last_step = now, step + 1
        scalars = {k: v for k, v in host.items() if k != "finite"}
        scalars.update(tokens_per_s=tokens_per_step / dt, step_time_s=dt,
                       mfu=step_flops / dt / peak_total)
        scalars.update({f"data/{k}": v for k, v in train_it.metrics().items()})
        writer.write(step + 1, scalars)
        result.update(step=step + 1, **{f"train_{k}": float(v) for k, v in scalars.items()})
      if eval_step is not None and ((step + 1) % eval_every == 0 or step + 1 == total):
        ev = _evaluate(eval_step, state.params, make_eval_it, train_cfg.get("eval_steps", 4),
                       mesh, rules)
        writer.write(step + 1, ev, prefix="eval")
        result.update({f"eval_{k}": v for k, v in ev.items()})
      ckpt.save(step + 1, state, {"train": train_it.get_state()})
    if total > start and ckpt.latest_step() != total:
      ckpt.save(total, state, {"train": train_it.get_state()}, force=True)
    result["step"] = total
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  result["state"] = state
  return result


def load_state(config: ml_collections.ConfigDict, workdir: str, step: Optional[int] = None):
  """Restores the train state saved in ``workdir`` (latest step by default) onto the config's mesh.

  Returns (state, model, mesh, step)."""
  config_lib.validate(config, jax.device_count())
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config)
  model = Transformer(ModelConfig.from_config(config.model), mesh=mesh, rules=rules)
  tx, _ = optimizer.make_optimizer(config.train)
  example = {"inputs": jax.ShapeDtypeStruct((config.train.batch_size, config.train.seq_len),
                                            np.int32)}
  abstract, _ = state_lib.abstract_state(model, tx, example, mesh, rules)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1000)
  try:
    state, _, restored_step = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  return state, model, mesh, restored_step
