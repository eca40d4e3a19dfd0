"""The Trainer: the one seam every stage drives.

Offline stages (mid-training, SFT) feed it batches from a data iterator (``kat_jax.train.loop``);
online stages (RL, RFT, self-debugging) feed it batches they built from rollouts sampled with its
current params. Nothing else owns a mesh, a train state or a checkpoint::

    trainer = Trainer(config, workdir)        # restores the latest checkpoint, else config.init_from,
                                              # else a fresh init; loop state in trainer.extra_state
    sampler = Sampler(trainer.model, trainer.params, ...)
    while trainer.step_count < config.train.steps:
      batch = ...                             # host-local numpy dict (docs/DESIGN.md: batch contract)
      scores = trainer.score(batch)           # no-grad log-probs / entropies / values (old_logp, GAE)
      ref = trainer.score(batch, params=trainer.reference_params)   # when config.train.use_reference
      metrics = trainer.step(batch)           # the shared sharded jitted step (kat_jax.train.step)
      trainer.log(metrics)                    # every config.train.log_every steps
      trainer.save({"rng": key, "curriculum": level})   # every config.train.checkpoint_every steps
    trainer.close()

One trainer writes a workdir: the constructor takes its lock (``workdir.WorkdirLock``; process 0
of a multi-host job, for the job) and a second trainer is refused at once naming the holder;
``lock=False`` opens a workdir read-only (evaluating a checkpoint beside a live run; ``save`` then
refuses). A save that fails (disk full) stops the run: ``save`` — or, for an asynchronous save,
the next ``step`` — raises ``CheckpointWriteError`` naming the step, directory, OS error and last
good checkpoint. Restoring skips unreadable steps (moved to ``checkpoints/corrupt/``) and a
changed model is a ``ConfigError`` naming each parameter (``kat_jax.checkpoint``).

``extra_state`` is any pytree of JSON values, numpy / JAX arrays and PRNG keys the driving loop owns
(``kat_jax.checkpoint`` stores it exactly beside the train state); a restarted run gets it back from
``trainer.extra_state`` with bitwise-equal params.

The reference params (``config.train.use_reference``) are the run's starting point — the
``init_from`` checkpoint, else the seed's fresh init — re-created the same way on restore, sharded
like the params and never updated.

LoRA (``config.model.lora.rank > 0``, kat_jax.model.lora): the train state — optimizer moments and
checkpoints included — holds the adapters only; the frozen base (``trainer.base``: ``init_from``,
else the seed's fresh init, int8 / NF4-quantized with ``quantize_base``) is re-created on every
start, never checkpointed, and passed to the step beside the state. ``trainer.params`` is base and
adapters together (what ``model.apply`` and a sampler take); ``trainer.reference_params`` is the base
with zero adapters — the base itself, no second copy. ``WORKDIR/lora_run.json`` names the base, so
a restart on another base is refused and ``experiments.convert`` can export the merged model.

Distillation (``config.train.loss='distill'``, kat_jax.train.distill): ``trainer.teacher`` is the
frozen teacher restored from ``config.train.distill.teacher`` (any size, the student's vocabulary),
sharded by the run's rules, never checkpointed; the train and eval steps take its params as their
last argument. With precomputed top-k (``distill.topk_data``) no teacher is loaded.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from kat_jax import checkpoint as checkpoint_lib
from kat_jax import config as config_lib
from kat_jax import errors
from kat_jax import sharding as sharding_lib
from kat_jax import workdir as workdir_lib
from kat_jax.model import ModelConfig, Transformer
from kat_jax.model import lora as lora_lib
from kat_jax.model.attention import intervals_from_segment_ids
from kat_jax.train import distill as distill_lib
from kat_jax.train import losses, metrics as metrics_lib, optimizer, stages
from kat_jax.train import state as state_lib
from kat_jax.train import step as step_lib


def _is_tree_batch(batch: dict) -> bool:
  return "tin" in batch


def score_fn(apply_fn: Callable, params: Any, batch: dict, logits_chunk: int = 0) -> dict:
  """Per-token log-probs, entropies and (with a value head) values of a batch, no gradient.

  Tree batches (``tin`` present): ``logp``, ``entropy``, ``values`` [B, K, L-1] aligned with each
  trajectory's prediction pairs (``kat_jax.tree.logprobs``), and ``row_entropy`` [B, T]. Flat LM
  batches (``inputs``, ``positions``, ``segment_ids``, ``targets``): ``logp`` of each target,
  ``entropy`` and ``values`` at each position, [B, T]."""
  if _is_tree_batch(batch):
    from kat_jax.tree.logprobs import tree_logprobs
    return tree_logprobs(apply_fn, params, batch, return_values=True, logits_chunk=logits_chunk)
  from kat_jax.tree.logprobs import row_statistics
  mask = intervals_from_segment_ids(batch["segment_ids"])
  out = apply_fn({"params": params}, batch["inputs"], batch["positions"], mask)
  logp, _ = losses.token_log_probs(out.logits, batch["targets"])
  result = {"logp": logp, "entropy": row_statistics(out.logits)[1]}
  if out.values is not None:
    result["values"] = out.values
  return result


class Trainer:
  """Mesh, model, optimizer, sharded state, jitted train / eval / score steps, checkpoints, metrics.

  ``loss`` overrides ``config.train.loss`` (a registered name; both empty: the default loss of
  ``config.stage``); ``total_steps`` bounds the progress
  bar (default ``config.train.steps``; the schedule always spans ``config.train.steps``);
  ``restore_step`` restores that checkpoint step instead of the latest; ``lock=False`` opens the
  workdir read-only (no lock taken, no partial saves cleaned up, ``save`` refuses)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               loss: Optional[str] = None, total_steps: Optional[int] = None,
               restore_step: Optional[int] = None, lock: bool = True):
    config_lib.validate(config, jax.device_count())
    self.config, self.workdir = config, workdir
    os.makedirs(workdir, exist_ok=True)
    self._writable = lock
    self._lock = self._take_lock(workdir) if lock else None
    self._writer: Optional[metrics_lib.MetricWriter] = None
    try:
      self._build(restore_step, loss, total_steps)
    except BaseException:
      try:
        if hasattr(self, "checkpointer"):
          self.checkpointer.close()
      finally:
        if self._lock is not None:
          self._lock.release()
      raise

  @staticmethod
  def _take_lock(workdir: str) -> Optional[workdir_lib.WorkdirLock]:
    """Process 0 locks the workdir for the whole job; every process learns whether it could."""
    held, refusal = None, None
    if jax.process_index() == 0:
      held = workdir_lib.WorkdirLock(workdir)
      try:
        held.acquire()
      except errors.WorkdirLockedError as e:
        refusal = e
    if jax.process_count() > 1:
      ok = int(multihost_utils.broadcast_one_to_all(np.int32(refusal is None)))
      if not ok and refusal is None:
        refusal = errors.WorkdirLockedError(
            f"process 0 could not lock workdir {workdir} (its log names the holder)")
    if refusal is not None:
      raise refusal
    return held

  def _build(self, restore_step: Optional[int], loss: Optional[str],
             total_steps: Optional[int]) -> None:
    config, workdir = self.config, self.workdir
    train_cfg = config.train
    self.mesh = sharding_lib.make_mesh(config.mesh)
    self.rules = sharding_lib.rules_from_config(config)
    self.loss_name = loss or train_cfg.loss or stages.get_stage(config.stage).loss
    self.loss = losses.get_loss(self.loss_name)
    if self.loss_name == distill_lib.NAME:
      config_lib.validate_distill(config, self.loss_name)   # also when the loss is the argument
    self.model_cfg = ModelConfig.from_config(config.model)
    self.model = Transformer(self.model_cfg, mesh=self.mesh, rules=self.rules)
    self.tx, self.schedule = optimizer.make_optimizer(train_cfg)
    self.total_steps = train_cfg.steps if total_steps is None else total_steps
    self._example = {"inputs": jax.ShapeDtypeStruct((train_cfg.batch_size, train_cfg.seq_len),
                                                    np.int32)}
    self.lora = lora_lib.enabled(self.model_cfg)
    self.abstract, self.shardings = state_lib.abstract_state(
        self.model, self.tx, self._example, self.mesh, self.rules,
        trainable=lora_lib.adapters_of if self.lora else None)
    self.base: Any = None
    self.params_shardings = self.shardings.params
    if self.lora:
      base_abstract = lora_lib.split(lora_lib.abstract_params(self.model_cfg, self.mesh,
                                                              self.rules))[0]
      self.base_shardings = jax.tree.map(lambda a: a.sharding, base_abstract)
      self.params_shardings = lora_lib.combine(self.base_shardings, self.shardings.params)
    self.checkpointer = checkpoint_lib.Checkpointer(
        workdir_lib.checkpoints_dir(workdir), save_every=train_cfg.checkpoint_every,
        keep=train_cfg.keep_checkpoints, async_save=train_cfg.async_checkpoint,
        cleanup_partial=self._writable)
    self.extra_state: Any = {}
    self.restored_step: Optional[int] = None
    resuming = restore_step is not None or self.checkpointer.latest_step() is not None
    if self.lora:
      self._check_lora_run(resuming)
      self.base = lora_lib.initial_base(self.model_cfg, self.mesh, self.rules,
                                        init_from=config.init_from, seed=config.seed)
      if config.init_from and not resuming:
        metrics_lib.console(f"initialized the LoRA base from {config.init_from}")
    if resuming:
      self.restore(restore_step)
    else:
      self.state = self._initial_state()
    self.reference_params = None
    if train_cfg.use_reference:
      self.reference_params = (self._lora_reference() if self.lora else self._initial_params())
    self._rng = jax.random.key(config.seed + 1)
    self.teacher: Optional[distill_lib.FrozenTeacher] = None
    if self.loss_name == distill_lib.NAME and not train_cfg.distill.topk_data:
      self.teacher = distill_lib.load_teacher(config, self.mesh, self.rules)
    lora_step = dict(frozen_shardings=self.base_shardings, combine=lora_lib.combine,
                     dropout_rng=self.model_cfg.lora.dropout > 0) if self.lora else {}
    self._train_step = step_lib.make_train_step(
        self.model.apply, self.loss, self.tx, self.schedule, train_cfg, self.shardings, self.mesh,
        self.rules, **lora_step, **self._teacher_step_args())
    self._eval_step = None
    self._score_step = None
    self._last_log = (time.perf_counter(), self.step_count)

  def _teacher_step_args(self) -> dict:
    if self.teacher is None:
      return {}
    return dict(teacher_apply=self.teacher.model.apply, teacher_shardings=self.teacher.shardings)

  def _teacher_args(self) -> tuple:
    return () if self.teacher is None else (self.teacher.params,)

  # ------------------------------------------------------------------------------- state

  @property
  def read_only(self) -> bool:
    """True when opened with ``lock=False``: the workdir is not this trainer's to write."""
    return not self._writable

  @property
  def params(self) -> Any:
    """The current params (sharded; a LoRA run's base and adapters together); valid until the next
    ``step`` (the step donates the state)."""
    if self.lora:
      return lora_lib.combine(self.base, self.state.params)
    return self.state.params

  def _check_lora_run(self, resuming: bool) -> None:
    """Refuses to resume a LoRA run on another base (its adapters would silently change meaning);
    records the base of a new run in ``lora_run.json``."""
    info = lora_lib.run_info(self.config)
    saved = lora_lib.read_run_info(self.workdir)
    if resuming and saved is not None:
      diffs = lora_lib.base_differences(saved, info)
      if diffs:
        raise errors.ConfigError(
            f"{self.workdir} holds a LoRA run whose adapters were trained on another base "
            f"({'; '.join(diffs)}; see {lora_lib.RUN_INFO_FILENAME}): restore those values, or use "
            "a new --workdir")
    if self._writable and jax.process_index() == 0 and (saved is None or not resuming):
      lora_lib.write_run_info(self.workdir, info)

  def _lora_reference(self) -> Any:
    """The base with zero adapters: the LoRA run's starting model, sharing the base's arrays."""
    zeros = jax.jit(lora_lib.zeros_like, out_shardings=self.shardings.params)(self.state.params)
    return lora_lib.combine(self.base, zeros)

  @property
  def step_count(self) -> int:
    return self._step_count

  def _fresh_state(self) -> state_lib.TrainState:
    state, _ = state_lib.create_sharded_state(
        self.model, self.tx, self._example, self.mesh, self.rules, jax.random.key(self.config.seed),
        trainable=lora_lib.adapters_of if self.lora else None)
    return state

  def _initial_params(self) -> Any:
    """The run's starting params: ``init_from`` if set, else the seed's fresh init (a new copy)."""
    if self.lora:
      return lora_lib.combine(self.base, self._fresh_state().params)
    if self.config.init_from:
      from kat_jax.model import hf as hf_lib
      return hf_lib.init_params_from(self.config.init_from, self.abstract.params, self.model_cfg)
    return self._fresh_state().params

  def _initial_state(self) -> state_lib.TrainState:
    self._step_count = 0
    if not self.config.init_from or self.lora:
      return self._fresh_state()      # LoRA: fresh adapters (b = 0) on the base from init_from
    # A pretrained start (an HF checkpoint directory or a kat_jax workdir[@step]): params placed
    # directly into their shards, fresh optimizer state.
    params = self._initial_params()
    tx = self.tx
    state = jax.jit(lambda p: state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                   opt_state=tx.init(p)),
                    out_shardings=self.shardings, donate_argnums=0)(params)
    metrics_lib.console(f"initialized params from {self.config.init_from}")
    return state

  def restore(self, step: Optional[int] = None) -> Any:
    """Loads checkpoint ``step`` (default: latest) into the state; returns its extra state."""
    self.state, self.extra_state, self.restored_step = self.checkpointer.restore(self.abstract,
                                                                                 step)
    self._step_count = self.restored_step
    metrics_lib.console(f"restored step {self.restored_step} from {self.checkpointer.directory}")
    return self.extra_state

  def save(self, extra_state: Any = None, force: bool = False) -> bool:
    """Checkpoints the state and ``extra_state`` at the current step when the interval says so
    (always with ``force``); True if a save started."""
    if not self._writable:
      raise RuntimeError(f"this Trainer opened {self.workdir} read-only (lock=False): it does not "
                         "save checkpoints there")
    if extra_state is not None:
      self.extra_state = extra_state
    return self.checkpointer.save(self.step_count, self.state, self.extra_state, force=force)

  # ------------------------------------------------------------------------------- steps

  def to_global(self, batch: dict) -> dict:
    """This process's rows of a batch as global arrays sharded over data×fsdp. A tree batch must
    carry the block layout its attention implementation reads (``tree.layout``), or block-sparse
    attention would silently visit every block."""
    if _is_tree_batch(batch):
      from kat_jax.tree import layout as tree_layout
      tree_layout.check_attention_blocks(batch, self.model_cfg.attention_impl)
    return sharding_lib.host_to_global(batch, self.mesh, self.rules)

  def step(self, batch: dict) -> dict:
    """One optimizer step on a host-local batch; returns the metrics (device arrays). Checks them
    for finiteness every ``config.train.check_finite_every`` steps (``check_finite``). Raises
    ``CheckpointWriteError`` first if an asynchronous save has failed since the last step."""
    self.checkpointer.check()
    frozen = (self.base,) if self.lora else ()
    self.state, metrics = self._train_step(self.state, self.to_global(batch), self._rng, *frozen,
                                           *self._teacher_args())
    self._step_count += 1
    if self._step_count % self.config.train.check_finite_every == 0:
      self.check_finite(metrics)
    return metrics

  def check_finite(self, metrics: dict) -> None:
    """Raises ``FloatingPointError`` naming the step and metric if the step's loss or gradient norm
    was not finite (the step left the state untouched; the last checkpoint is the last good one)."""
    host = jax.device_get(metrics)
    if host["finite"]:
      return
    bad = [k for k in ("loss", "grad_norm") if not np.isfinite(host[k])]
    self.checkpointer.wait()
    raise FloatingPointError(
        f"non-finite {' and '.join(bad)} at step {self.step_count} "
        f"({', '.join(f'{k}={host[k]}' for k in bad)}); the state was not updated and the "
        f"last good checkpoint is step {self.checkpointer.latest_step()} in "
        f"{self.checkpointer.directory}")

  def evaluate(self, make_iterator: Callable[[], Iterator[dict]],
               num_batches: Optional[int] = None) -> dict:
    """Loss (and metric) means over ``num_batches`` (default ``config.train.eval_steps``) batches
    of a fresh iterator, each summed exactly (numerator / denominator over all of them)."""
    if self._eval_step is None:
      self._eval_step = step_lib.make_eval_step(
          self.model.apply, self.loss, self.config.train,
          self.shardings.replace(params=self.params_shardings), self.mesh, self.rules,
          **self._teacher_step_args())
    it = make_iterator()
    sums: dict[str, float] = {}
    for _ in range(num_batches or self.config.train.eval_steps):
      out = jax.device_get(self._eval_step(self.params, self.to_global(next(it)),
                                           *self._teacher_args()))
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    den = max(sums.pop("denominator"), 1e-9)
    result = {"loss": sums.pop("numerator") / den}
    result.update({k.removesuffix("_sum"): v / den for k, v in sums.items()})
    return result

  def score(self, batch: dict, params: Any = None) -> dict[str, np.ndarray]:
    """``score_fn`` of a host-local batch under ``params`` (default: the current params; pass
    ``trainer.reference_params`` for the reference), jitted, no gradient; returns this process's
    rows as numpy arrays."""
    if self._score_step is None:
      batch_sh = sharding_lib.batch_sharding(self.mesh, self.rules)
      chunk, apply_fn = self.config.train.logits_chunk, self.model.apply
      self._score_step = jax.jit(lambda p, b: score_fn(apply_fn, p, b, chunk),
                                 in_shardings=(self.params_shardings, batch_sh),
                                 out_shardings=batch_sh)
    out = self._score_step(self.params if params is None else params, self.to_global(batch))
    spec = sharding_lib.batch_sharding(self.mesh, self.rules).spec
    return {k: np.asarray(multihost_utils.global_array_to_host_local_array(v, self.mesh, spec))
            for k, v in out.items()}

  # ------------------------------------------------------------------------------- metrics

  @property
  def writer(self) -> metrics_lib.MetricWriter:
    if self._writer is None:
      self._writer = metrics_lib.MetricWriter(
          workdir_lib.tensorboard_dir(self.workdir), self.total_steps, self.step_count,
          self.config.train.progress_bar)
    return self._writer

  def log(self, metrics: dict, extra: Any = None, force: bool = False) -> Optional[dict]:
    """Writes the step's metrics (plus throughput, step time, MFU and ``extra`` scalars: a dict, or
    a callable returning one, called only when logging) every ``config.train.log_every`` steps (or
    with ``force``); returns the host scalars it wrote."""
    self.writer.advance()
    if not force and self.step_count % self.config.train.log_every:
      return None
    host = jax.device_get(metrics)
    now = time.perf_counter()
    last_time, last_step = self._last_log
    dt = (now - last_time) / max(self.step_count - last_step, 1)
    self._last_log = (now, self.step_count)
    scalars = {k: float(v) for k, v in host.items() if k != "finite"}
    tokens = self.config.train.batch_size * self.config.train.seq_len
    scalars.update(tokens_per_s=tokens / dt, step_time_s=dt, mfu=self._step_flops() / dt /
                   self._peak_flops())
    scalars.update((extra() if callable(extra) else extra) or {})
    self.writer.write(self.step_count, scalars)
    return scalars

  def _step_flops(self) -> float:
    train_cfg = self.config.train
    return (self.model_cfg.matmul_flops_per_token(train_cfg.seq_len) * train_cfg.batch_size *
            train_cfg.seq_len)

  def _peak_flops(self) -> float:
    if not hasattr(self, "_peak"):
      self._peak = metrics_lib.peak_flops_per_device(
          self.config.train.peak_flops_per_device) * jax.device_count()
    return self._peak

  def close(self) -> None:
    """Waits for pending checkpoint writes and closes the checkpointer and the metric writer."""
    try:
      self.checkpointer.wait()
    finally:
      try:
        self.checkpointer.close()
        if self._writer is not None:
          self._writer.close()
      finally:
        if self._lock is not None:
          self._lock.release()
