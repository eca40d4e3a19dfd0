"""Where the CPU-bound side of RL runs: the environments and their sandbox graders, in-process
(threads + sandbox worker processes) or as Ray actors (``config.rl.executor``).

    envs = executor.make(config, pool=pool)        # EnvFactory
    env_list = envs.make(len(rows))                # base.Environment objects, one per row
    ...  rollout(sampler, env_list, rows, ...)     # the agent loop never knows the difference
    envs.close()

``inprocess``: ``envs.make(config.rl.env_name, config.rl.env, pool=pool)`` — the environments run
in the episode driver's threads, grading on the shared ``SandboxPool``.

``ray``: ``config.rl.ray.env_workers`` Ray actors (``EnvWorker``), each with its own sandbox pool
(``config.rl.ray.sandbox_workers`` processes) and up to ``max_concurrency`` environments
stepped concurrently; a row's environment is a ``RayEnvironment`` proxy whose ``reset`` / ``step``
are remote calls (tasks, observations and grades cross as pickles). The JAX learner and sampler stay
in this process — JAX's own runtime owns the accelerators — and so does the episode driver (it
feeds the sampler; only its environment calls go out). Ray is started here on a local cluster
(``ray.init(num_cpus=config.rl.ray.num_cpus, include_dashboard=False)``) when
``config.rl.ray.address`` is empty and no cluster is running, else it connects to that address.
A worker that dies (killed, out of memory) makes the calls of its environments raise, which the
agent loop records as the episode's ``env_error`` status (``info["env_error"]`` names the Ray
error) — never a trainer crash; the next ``make`` replaces dead workers.
"""
from __future__ import annotations

import itertools
import os
import threading
from typing import Any, Optional

import ml_collections

from kat_jax.errors import ConfigError
from kat_jax.rl import envs as envs_lib
from kat_jax.rl.envs import base

EXECUTORS = ("inprocess", "ray")


def default_ray_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.address = ""               # Ray cluster to join; '' = start a local one (or reuse a running one)
  c.num_cpus = 2               # CPUs of the local cluster this process starts
  c.env_workers = 2            # EnvWorker actors (environments + their sandbox pool each)
  c.sandbox_workers = 1        # sandbox processes in each EnvWorker
  c.max_concurrency = 16       # environments one EnvWorker steps at the same time (threads)
  return c


def validate_config(rl_cfg) -> None:
  if rl_cfg.executor not in EXECUTORS:
    raise ConfigError(f"config.rl.executor={rl_cfg.executor!r}: use one of {list(EXECUTORS)}")
  for field in ("num_cpus", "env_workers", "sandbox_workers", "max_concurrency"):
    value = rl_cfg.ray[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ConfigError(f"config.rl.ray.{field}={value!r} must be an int >= 1")


class EnvFactory:
  """Makes one environment per rollout row; ``close`` releases what it started."""

  def make(self, n: int) -> list[base.Environment]:
    raise NotImplementedError

  def close(self) -> None:
    pass


class InProcessEnvs(EnvFactory):
  def __init__(self, env_name: str, env_cfg, pool):
    self.env_name, self.env_cfg, self.pool = env_name, env_cfg, pool

  def make(self, n: int) -> list[base.Environment]:
    return [envs_lib.make(self.env_name, self.env_cfg, pool=self.pool) for _ in range(n)]


# -- Ray ---------------------------------------------------------------------------------------


class EnvWorker:
  """The body of a Ray actor: environments by id over this process's own sandbox pool."""

  def __init__(self, env_name: str, env_cfg: dict, sandbox_workers: int):
    from kat_jax.sandbox import SandboxPool
    self.env_name = env_name
    self.env_cfg = ml_collections.ConfigDict(env_cfg)
    self.pool = SandboxPool(num_workers=sandbox_workers)
    self.envs: dict = {}
    self.lock = threading.Lock()

  def pid(self) -> int:
    return os.getpid()

  def open(self, env_id: int) -> tuple:
    env = envs_lib.make(self.env_name, self.env_cfg, pool=self.pool)
    with self.lock:
      self.envs[env_id] = env
    return tuple(env.tools)

  def _env(self, env_id: int) -> base.Environment:
    with self.lock:
      if env_id not in self.envs:
        raise KeyError(f"environment {env_id} is not open on this worker (pid {os.getpid()}): "
                       f"the worker restarted and lost it")
      return self.envs[env_id]

  def reset(self, env_id: int, task: Any) -> base.Observation:
    return self._env(env_id).reset(task)

  def step(self, env_id: int, action: str) -> base.StepResult:
    return self._env(env_id).step(action)

  def close_env(self, env_id: int) -> None:
    with self.lock:
      env = self.envs.pop(env_id, None)
    if env is not None:
      env.close()


class RayEnvironment(base.Environment):
  """A row's environment living in an ``EnvWorker`` actor; calls block on the remote result. A
  dead worker raises ``RuntimeError`` naming the Ray error (the loop's ``env_error``)."""

  def __init__(self, factory: "RayEnvs", slot: int, env_id: int):
    self.factory, self.slot, self.env_id = factory, slot, env_id
    self._open_error: Optional[str] = None
    try:
      self.tools = self._call("open")
    except RuntimeError as e:           # the worker died before the episode began
      self.tools, self._open_error = (), str(e)

  @property
  def actor(self):
    return self.factory.actors[self.slot]

  def _call(self, method: str, *args):
    ray = self.factory.ray
    try:
      return ray.get(getattr(self.actor, method).remote(*((self.env_id,) + args)))
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
      self.factory.mark_dead(self.slot)
      raise RuntimeError(f"Ray env worker {self.slot} died during {method}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

  def reset(self, task: Any) -> base.Observation:
    if self._open_error is not None:
      raise RuntimeError(self._open_error)
    return self._call("reset", task)

  def step(self, action: str) -> base.StepResult:
    return self._call("step", action)

  def close(self) -> None:
    try:
      self._call("close_env")
    except RuntimeError:
      pass


def start_ray(ray_cfg):
  """The ``ray`` module, connected: to ``ray_cfg.address``, else a running local cluster, else a
  new local one with ``ray_cfg.num_cpus`` CPUs and no dashboard."""
  try:
    import ray
  except ImportError:
    raise ConfigError("config.rl.executor='ray' needs Ray: pip install -e '.[ray]'") from None
  if not ray.is_initialized():
    if ray_cfg.address:
      ray.init(address=ray_cfg.address, include_dashboard=False, log_to_driver=False)
    else:
      ray.init(num_cpus=int(ray_cfg.num_cpus), include_dashboard=False, log_to_driver=False,
               configure_logging=False)
  return ray


class RayEnvs(EnvFactory):
  """Environments on ``ray_cfg.env_workers`` ``EnvWorker`` actors, rows assigned round-robin."""

  def __init__(self, env_name: str, env_cfg, ray_cfg):
    self.ray = start_ray(ray_cfg)
    self.ray_cfg = ray_cfg
    self._remote = self.ray.remote(EnvWorker).options(
        num_cpus=0, max_concurrency=int(ray_cfg.max_concurrency))
    self.env_name, self.env_cfg = env_name, env_cfg.to_dict()
    self.actors = [self._start() for _ in range(int(ray_cfg.env_workers))]
    self._dead: set = set()
    self._ids = itertools.count()
    self._next = itertools.count()
    self._lock = threading.Lock()

  def _start(self):
    return self._remote.remote(self.env_name, self.env_cfg, int(self.ray_cfg.sandbox_workers))

  def mark_dead(self, slot: int) -> None:
    with self._lock:
      self._dead.add(slot)

  def make(self, n: int) -> list[base.Environment]:
    with self._lock:
      for slot in sorted(self._dead):       # replace the workers that died
        self.actors[slot] = self._start()
      self._dead.clear()
      slots = [next(self._next) % len(self.actors) for _ in range(n)]
      ids = [next(self._ids) for _ in range(n)]
    return [RayEnvironment(self, s, i) for s, i in zip(slots, ids)]

  def pids(self) -> list[int]:
    return self.ray.get([a.pid.remote() for a in self.actors])

  def close(self) -> None:
    for actor in self.actors:
      try:
        self.ray.kill(actor)
      except Exception:   # already dead
        pass
    self.actors = []


def make(config, pool=None) -> EnvFactory:
  """The environment factory of ``config.rl.executor`` (see the module docstring)."""
  rl = config.rl
  validate_config(rl)
  if rl.executor == "ray":
    return RayEnvs(rl.env_name, rl.env, rl.ray)
  if pool is None:
    raise ValueError("the in-process executor needs the sandbox pool: executor.make(config, "
                     "pool=SandboxPool(...))")
  return InProcessEnvs(rl.env_name, rl.env, pool)

