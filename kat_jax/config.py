"""Typed access and validation for ml_collections experiment configs.

Every check raises ``ConfigError`` whose message names the offending field, its value and the fix,
so a typo on the command line (``--config.mesh.tensor=3``) fails before any compilation.
"""
from __future__ import annotations

import ml_collections

from kat_jax import sharding
from kat_jax.errors import ConfigError
from kat_jax.model import presets


def require(cfg: ml_collections.ConfigDict, path: str):
  """Returns ``cfg.<path>`` or raises a ConfigError naming the missing field."""
  node = cfg
  for part in path.split("."):
    if part not in node:
      raise ConfigError(f"config.{path} is missing: set it in the experiment config or with "
                        f"--config.{path}=...")
    node = node[part]
  return node


def _positive(train, fields) -> None:
  for field in fields:
    if train[field] <= 0:
      raise ConfigError(f"config.train.{field}={train[field]} must be positive")


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """Cross-field checks of a full experiment config against the devices at hand."""
  model = presets.ModelConfig.from_config(require(cfg, "model"))
  mesh_shape = sharding.mesh_shape(require(cfg, "mesh"), num_devices)
  train = require(cfg, "train")
  _positive(train, ("steps", "batch_size", "seq_len", "log_every", "checkpoint_every",
                    "keep_checkpoints", "check_finite_every", "eval_steps", "learning_rate"))
  batch_shards = mesh_shape["data"] * mesh_shape["fsdp"]
  if train.batch_size % batch_shards:
    raise ConfigError(
        f"config.train.batch_size={train.batch_size} is not divisible by data×fsdp="
        f"{mesh_shape['data']}×{mesh_shape['fsdp']}={batch_shards}: use a multiple of {batch_shards}")
  accum = train.grad_accum_steps
  if accum < 1 or (train.batch_size // batch_shards) % accum:
    raise ConfigError(
        f"config.train.grad_accum_steps={accum} must be >= 1 and divide the per-shard batch "
        f"{train.batch_size // batch_shards} (config.train.batch_size / data×fsdp)")
  if train.logits_chunk < 0:
    raise ConfigError(f"config.train.logits_chunk={train.logits_chunk} must be >= 0 "
                      f"(0 = the whole [T, V] logits at once)")
  if not 0.0 <= train.warmup_steps <= train.steps:
    raise ConfigError(f"config.train.warmup_steps={train.warmup_steps} must be in [0, "
                      f"config.train.steps={train.steps}]")
  if train.eval_every < 0:
    raise ConfigError(f"config.train.eval_every={train.eval_every} must be >= 0 (0 = never)")
  _validate_objective(train, model)
  from kat_jax.tree.prune import settings_from_config  # local: the pruning module imports jax
  try:
    settings_from_config(train.prune)
  except ValueError as e:
    raise ConfigError(f"config.train.{e}") from None


def _validate_objective(train, model) -> None:
  """The tree losses' objective, KL, value and aggregation knobs (names from the registries of
  kat_jax.train.objectives and kat_jax.train.losses)."""
  from kat_jax.train import losses, objectives  # local: the loss modules import jax
  for field, known in (("objective", objectives.names()),
                       ("kl_estimator", sorted(objectives.KL_ESTIMATORS)),
                       ("loss_agg", sorted(losses.AGGREGATIONS))):
    if train[field] not in known:
      raise ConfigError(f"config.train.{field}={train[field]!r} is not one of {known}")
  for low, high in (("clip_eps", "clip_eps_high"), ("gspo_clip_eps", "gspo_clip_eps_high")):
    if train[low] < 0 or (train[high] < 0 and train[high] != -1):
      raise ConfigError(f"config.train.{low}={train[low]} and {high}={train[high]} must be >= 0 "
                        f"({high}=-1: same as {low})")
  for field in ("kl_coef", "value_coef", "entropy_coef", "value_clip"):
    if train[field] < 0:
      raise ConfigError(f"config.train.{field}={train[field]} must be >= 0")
  if train.dual_clip != 0 and train.dual_clip <= 1:
    raise ConfigError(f"config.train.dual_clip={train.dual_clip} must be > 1 (the loss of a pair "
                      "with advantage A < 0 is capped at dual_clip·|A|) or 0 (off)")
  if train.decoupled_max_weight != 0 and train.decoupled_max_weight < 1:
    raise ConfigError(f"config.train.decoupled_max_weight={train.decoupled_max_weight} must be "
                      ">= 1 (a cap below 1 down-weights on-policy tokens) or 0 (no cap)")
  if train.agg_constant <= 0:
    raise ConfigError(f"config.train.agg_constant={train.agg_constant} must be positive (the "
                      "per-trajectory token count of loss_agg='constant', e.g. the max length)")
  if train.value_coef > 0 and not model.value_head:
    raise ConfigError(
        f"config.train.value_coef={train.value_coef} trains a value head but "
        "config.model.value_head=False: set --config.model.value_head=True (a checkpoint without "
        "one gets a zero-initialized head) or --config.train.value_coef=0")
  if train.kl_coef > 0 and not train.use_reference:
    raise ConfigError(
        f"config.train.kl_coef={train.kl_coef} needs the reference policy's log-probs: set "
        "--config.train.use_reference=True (or --config.train.kl_coef=0)")
