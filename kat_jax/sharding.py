"""Mesh from config, logical-axis rules, and helpers to place arrays and state by logical names.

Three layers, as in MaxText: physical mesh axes (``data``, ``fsdp``, ``tensor``) → a rules table in the
config mapping logical names to mesh axes → logical names on every parameter (``nn.with_logical_partitioning``)
and main activation (``constrain``). Changing the parallelism is a config edit.

Parameters use ``embed``, ``mlp``, ``heads``, ``kv_heads``, ``head_dim``, ``vocab``, ``norm``, ``layers``;
activations use the ``act_*`` names so that weights and activations can be sharded differently.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kat_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, Any]]

# FSDP shards weights over `fsdp` on their embed dimension; tensor parallelism splits heads and the MLP.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


def default_mesh_config() -> ml_collections.ConfigDict:
  """data/fsdp/tensor sizes; one of them may be -1 (= all remaining devices)."""
  return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  unknown = sorted(set(mesh_cfg.keys()) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"config.mesh has unknown axes {unknown}: the mesh axes are {MESH_AXES}")
  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"config.mesh has -1 for {fill}: at most one axis may be -1 (fill)")
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f"config.mesh.{a}={s}: use a positive size or -1 (fill)")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if fill:
    if num_devices % known:
      raise ConfigError(
          f"config.mesh: {num_devices} devices cannot be split with "
          f"{'×'.join(f'{a}={s}' for a, s in sizes.items())}: the fixed axes ({known}) must divide "
          f"the device count")
    sizes[fill[0]] = num_devices // known
  total = int(np.prod(list(sizes.values())))
  if total != num_devices:
    raise ConfigError(
        f"config.mesh: mesh has {num_devices} devices but config asks "
        f"{'×'.join(str(sizes[a]) for a in MESH_AXES)}={total} (data×fsdp×tensor); set the sizes "
        f"so their product is {num_devices}, or make one of them -1")
  return sizes


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rules_from_config(cfg: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  out = []
  for entry in cfg.sharding_rules:
    name, axes = entry
    axes = tuple(axes) if isinstance(axes, list) else axes
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ConfigError(f"config.sharding_rules: logical axis {name!r} maps to unknown mesh axis "
                          f"{a!r}; mesh axes are {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


def logical_to_mesh(logical_specs: Any, mesh: Mesh, rules: Rules) -> Any:
  """Tree of logical PartitionSpecs -> tree of NamedShardings on ``mesh``."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def constrain(x: jax.Array, names: tuple[Optional[str], ...], mesh: Optional[Mesh],
              rules: Rules) -> jax.Array:
  """``with_sharding_constraint`` by logical names; a no-op without a mesh (plain apply)."""
  if mesh is None:
    return x
  spec = nn.logical_to_mesh_axes(names, list(rules))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
  """Sharding of [batch, ...] input arrays (the leading axis over data×fsdp, the rest replicated)."""
  spec = nn.logical_to_mesh_axes(("act_batch",) + (None,) * (ndim - 1), list(rules))
  return NamedSharding(mesh, spec)


def batch_shards(mesh: Mesh, rules: Rules) -> int:
  """How many ways ``batch_sharding`` splits the batch axis (a batch's rows must divide by it)."""
  axes = batch_sharding(mesh, rules).spec
  axes = axes[0] if len(axes) else None
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
  """Assembles this process's slice of the batch into global arrays sharded over data×fsdp (every
  leaf, nested dicts such as ``attention_blocks`` included)."""
  return jax.tree.map(
      lambda v: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v),
      batch)


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
  """Bytes one device holds for a tree of ShapeDtypeStructs under the given shardings (max over
  devices, so an unevenly sharded tensor counts its largest shard)."""
  total = 0
  for leaf, sh in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(
      shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))):
    shard_shape = sh.shard_shape(leaf.shape)
    total += int(np.prod(shard_shape)) * np.dtype(leaf.dtype).itemsize
  return total
