"""Tag-driven placement of the RL roles: which devices / processes the trainer, the rollout
sampler and the sandbox graders run on.

    cfg = default_placement_config()               # config.rl.placement
    cfg.groups = "all:trainer;4:8:rollout"         # device groups, each 'slice:tag,tag'
    plan = resolve(cfg, executor="inprocess")
    plan.trainer.devices, plan.rollout.devices, plan.rollout_shared, plan.sandbox.kind
    sampler_mesh = plan.rollout_mesh()             # None when rollout shares the trainer's mesh
    put = plan.params_placer(trainer.shardings.params)   # published params -> rollout devices

A *resource group* is a set of devices (a slice of ``jax.devices()``: ``all``, ``a:b``, or one
index) with capability tags; the host CPU is the group ``host`` with ``config.rl.placement
.host_tags``. A *role* asks for a tag — ``trainer``, ``rollout``, ``sandbox`` — and gets the first
group that carries it (a role no group tags is a ``ConfigError`` naming the field). SeamlessFlow
schedules on such capability tags; Tunix gives each role its own mesh the same way.

On this machine (CPU, or one host with simulated devices) the Trainer builds its mesh over every
device (``kat_jax.train.trainer``), so its group must be ``all``; the rollout role either shares
it (``rollout_shared``: the sampler uses the trainer's mesh, each published version is a device
copy of the params) or gets a mesh of its own over its slice (the default mesh shape: fsdp over
the slice; each version is ``device_put`` onto it with the trainer's partition specs — the
weight transfer). Threads and processes share the CPU
cores whatever the tags say. The sandbox role runs on the host: sandbox worker processes
(``executor="inprocess"``) or Ray actors (``executor="ray"``, ``kat_jax.rl.executor``).

On a pod the same config maps onto disjoint device sets, e.g. ``"0:192:trainer;192:256:rollout"``
on 256 chips: the trainer's mesh over its slice (this needs ``Trainer`` to accept a device list —
not done yet), the sampler's over the other, the published params moved between them once per
version; sandbox and environment workers go to the CPU hosts (Ray actors on the cluster).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import ml_collections

from kat_jax.errors import ConfigError

CONFIG_PATH = "config.rl.placement"
ROLES = ("trainer", "rollout", "sandbox")
HOST = "host"


def default_placement_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.groups = "all:trainer,rollout"   # device groups 'slice:tag,tag;...' (slice: all | a:b | i)
  c.host_tags = "sandbox"            # tags of the host CPU (sandbox graders, env workers)
  return c


@dataclasses.dataclass(frozen=True)
class ResourceGroup:
  name: str                          # the slice as written, or "host"
  devices: tuple                     # jax devices; () for the host
  tags: frozenset

  @property
  def kind(self) -> str:
    return "host" if self.name == HOST else "devices"


def _parse_slice(text: str, devices: Sequence[Any]) -> tuple:
  n = len(devices)
  if text == "all":
    return tuple(devices)
  try:
    parts = [int(p) for p in text.split(":")]
  except ValueError:
    parts = []
  if len(parts) == 1:
    parts = [parts[0], parts[0] + 1]
  if len(parts) != 2 or not 0 <= parts[0] < parts[1] <= n:
    raise ConfigError(f"{CONFIG_PATH}.groups: device slice {text!r} must be 'all', 'a:b' with "
                      f"0 <= a < b <= {n} (this process sees {n} devices), or one index")
  return tuple(devices[parts[0]:parts[1]])


def parse_groups(cfg, devices: Optional[Sequence[Any]] = None) -> list[ResourceGroup]:
  """The device groups of ``cfg.groups`` plus the host group (``cfg.host_tags``)."""
  devices = list(jax.devices() if devices is None else devices)
  groups = []
  for entry in [e.strip() for e in cfg.groups.split(";") if e.strip()]:
    where, sep, tags = entry.rpartition(":")
    if not sep or not where:
      raise ConfigError(f"{CONFIG_PATH}.groups entry {entry!r} must be 'slice:tag,tag' (e.g. "
                        f"'all:trainer,rollout' or '4:8:rollout')")
    groups.append(ResourceGroup(where, _parse_slice(where, devices),
                                frozenset(t.strip() for t in tags.split(",") if t.strip())))
  groups.append(ResourceGroup(HOST, (), frozenset(
      t.strip() for t in cfg.host_tags.split(",") if t.strip())))
  return groups


@dataclasses.dataclass(frozen=True)
class Placement:
  """Each role's resource group (see the module docstring)."""
  trainer: ResourceGroup
  rollout: ResourceGroup
  sandbox: ResourceGroup
  executor: str

  @property
  def rollout_shared(self) -> bool:
    return self.rollout.devices == self.trainer.devices

  def rollout_mesh(self):
    """The sampler's own mesh over the rollout devices (fsdp over them), or None when shared."""
    if self.rollout_shared:
      return None
    from kat_jax import sharding as sharding_lib
    mesh_cfg = sharding_lib.default_mesh_config()
    return sharding_lib.make_mesh(mesh_cfg, self.rollout.devices)

  def params_placer(self, trainer_shardings: Any, mesh=None):
    """A function published params -> params on the rollout devices: a device copy when the
    rollout shares the trainer's devices (the next train step donates the trainer's buffers),
    else a transfer to the same partition specs on the rollout mesh."""
    import jax.numpy as jnp
    if self.rollout_shared:
      return lambda params: jax.tree.map(jnp.copy, params)
    mesh = mesh if mesh is not None else self.rollout_mesh()
    target = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s.spec), trainer_shardings)
    # may_alias=False: shards already on a rollout device must still be copied, or the trainer's
    # next (donating) step frees buffers the sampler reads — a use-after-free (a segfault).
    return lambda params: jax.device_put(params, target, may_alias=False)


def resolve(cfg, executor: str = "inprocess",
            devices: Optional[Sequence[Any]] = None) -> Placement:
  """Every role's group by tag; ``ConfigError`` naming the field when a role has none, a device
  role lands on the host, or the trainer's group is not every device (see the docstring)."""
  devices = list(jax.devices() if devices is None else devices)
  groups = parse_groups(cfg, devices)
  chosen = {}
  for role in ROLES:
    match = [g for g in groups if role in g.tags]
    if not match:
      raise ConfigError(f"no resource group is tagged {role!r}: add the tag to "
                        f"{CONFIG_PATH}.groups={cfg.groups!r} or {CONFIG_PATH}.host_tags="
                        f"{cfg.host_tags!r}")
    chosen[role] = match[0]
  for role in ("trainer", "rollout"):
    if chosen[role].kind == HOST:
      raise ConfigError(f"{CONFIG_PATH}: the {role} role runs the model and needs devices; tag a "
                        f"device group in {CONFIG_PATH}.groups, not host_tags")
  if chosen["sandbox"].kind != HOST:
    raise ConfigError(f"{CONFIG_PATH}: the sandbox role runs processes on the host CPU; tag it in "
                      f"{CONFIG_PATH}.host_tags, not in groups")
  if chosen["trainer"].devices != tuple(devices):
    raise ConfigError(f"{CONFIG_PATH}.groups={cfg.groups!r} puts the trainer on "
                      f"{len(chosen['trainer'].devices)} of {len(devices)} devices: the Trainer "
                      f"builds its mesh over every device, so tag 'all' with trainer")
  return Placement(chosen["trainer"], chosen["rollout"], chosen["sandbox"], executor)
