"""Typed access and validation for ml_collections experiment configs.

Every check raises ``ConfigError`` whose message names the offending field, its value and the fix,
so a typo on the command line (``--config.mesh.tensor=3``) fails before any compilation.
"""
from __future__ import annotations

import ml_collections


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field and the fix."""


def require(cfg: ml_collections.ConfigDict, path: str):
  """Returns ``cfg.<path>`` or raises a ConfigError naming the missing field."""
  node = cfg
  for part in path.split("."):
    if part not in node:
      raise ConfigError(f"config.{path} is missing: set it in the experiment config or with "
                        f"--config.{path}=...")
    node = node[part]
  return node


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """Cross-field checks of a full experiment config against the devices at hand."""
  from kat_jax.model import presets  # local import: presets imports this module
  from kat_jax import sharding

  presets.ModelConfig.from_config(require(cfg, "model"))
  mesh_shape = sharding.mesh_shape(require(cfg, "mesh"), num_devices)
  train = require(cfg, "train")
  batch_shards = mesh_shape["data"] * mesh_shape["fsdp"]
  if train.batch_size % batch_shards:
    raise ConfigError(
        f"config.train.batch_size={train.batch_size} is not divisible by data×fsdp="
        f"{mesh_shape['data']}×{mesh_shape['fsdp']}={batch_shards}: use a multiple of {batch_shards}")
  accum = train.get("grad_accum_steps", 1)
  if accum < 1 or (train.batch_size // batch_shards) % accum:
    raise ConfigError(
        f"config.train.grad_accum_steps={accum} must be >= 1 and divide the per-shard batch "
        f"{train.batch_size // batch_shards} (config.train.batch_size / data×fsdp)")
  for field in ("steps", "seq_len", "log_every", "checkpoint_every"):
    if train.get(field, 1) <= 0:
      raise ConfigError(f"config.train.{field}={train.get(field)} must be positive")
  if train.get("logits_chunk", 0) < 0:
    raise ConfigError(f"config.train.logits_chunk={train.logits_chunk} must be >= 0 "
                      f"(0 = the whole [T, V] logits at once)")
  if not 0.0 <= train.get("warmup_steps", 0) <= train.steps:
    raise ConfigError(f"config.train.warmup_steps={train.warmup_steps} must be in [0, "
                      f"config.train.steps={train.steps}]")
