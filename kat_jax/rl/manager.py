"""The trajectory manager: a store between rollout workers and the trainer, with AReaL's
staleness bound, so rollout runs concurrently with training (SeamlessFlow's trajectory manager).

    run = AsyncRL(stage)                  # stage: kat_jax.rl.loop.RLStage; config.rl.manager
    metrics = run.iterate()               # one update: take B complete groups, score, train,
                                          # publish the new version to the rollout workers
    run.summary()                         # trainer / rollout idle fractions, staleness histogram
    run.close()

or as the RL stage's driver: ``kat_jax.rl.loop.train`` iterates through ``AsyncRL`` when
``enabled(config)`` (``config.rl.manager.enabled``, ``eta > 0`` or the Ray executor).

**Units.** B = ``config.rl.tasks_per_iteration`` groups (a group: one task rolled out
``group_size`` times, one trajectory tree); the policy version v = updates done (= the stage's
iteration). Group n in admission order belongs to slot n // B and gets exactly the task and the
row keys the synchronous loop gives position n % B of iteration n // B (``draw_tasks``,
``fold_in(fold_in(key(seed + 2), slot), 0)`` then the row index).

**Staleness bound (AReaL).** A rollout worker may admit a new group only while
``accepted + running + 1 <= (η + v + 1)·B`` (accepted: completed groups, consumed or not;
running: admitted, not complete), and never past the run's last slot. A group admitted at version
a must be trained by version a + η; the trainer's batch at version i is the B complete groups of
oldest admission version (then earliest completed) — which includes every group whose deadline is
i — provided every later deadline can still be met: for k = 1 .. η - 1 at most k·B groups with a
deadline <= i + k may remain (else it waits for one of them to complete; k >= η holds by the
admission bound). So every token trained at version i was sampled by a version >= i - η (tested
over random completion orders). η = 0 is the synchronous loop exactly: B groups per version, one
lockstep batch of the same rows and keys, the same update (tested: params equal to
``RLStage.iterate``'s).

**Trees.** Workers push each finished trajectory with the policy version of every token
(``partial_rollout``); the manager files it under its group and, when the group is complete,
merges the group's trajectories into one trajectory tree by longest-prefix match
(``tree.build.build_tree``: the realized POR) and hands the complete groups to the trainer, which
builds its tree batch from them (``RLStage.build_batch``). Stale tokens are trained with
``decoupled_ppo`` (required for η > 0): behaviour log-probs = the sampler's T = 1 log-probs at
the version that sampled each token, proximal = ``Trainer.score`` at the current params.

**Partial rollout** (``config.rl.manager.partial_rollout``): at a weight update in-flight
episodes take the new params at their next turn boundary (``kat_jax.rl.partial_rollout``),
keeping or recomputing their KV caches (``kv_on_resume``).

**Metrics.** Trainer idle fraction (time blocked waiting for a batch / trainer wall time),
rollout idle fraction (time workers were blocked by the staleness bound / their wall time),
the staleness histogram over trained sampled tokens (version at training − version that sampled
it), trajectories trained per second, weight swaps of in-flight episodes.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from kat_jax.errors import ConfigError
from kat_jax.rl import executor as executor_lib
from kat_jax.rl import partial_rollout
from kat_jax.rl import placement as placement_lib
from kat_jax.tree import build

CONFIG_PATH = "config.rl.manager"


def enabled(config) -> bool:
  """Whether the RL stage runs through the manager."""
  rl = config.rl
  return bool(rl.manager.enabled or rl.manager.eta > 0 or rl.executor != "inprocess")


def validate_config(config) -> None:
  """``ConfigError`` naming the field for a manager / executor config that cannot run."""
  m, rl = config.rl.manager, config.rl
  for field, low in (("eta", 0), ("rollout_workers", 1), ("batch_groups", 0)):
    value = m[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ConfigError(f"{CONFIG_PATH}.{field}={value!r} must be an int >= {low}")
  if m.kv_on_resume not in partial_rollout.KV_ON_RESUME:
    raise ConfigError(f"{CONFIG_PATH}.kv_on_resume={m.kv_on_resume!r}: use one of "
                      f"{list(partial_rollout.KV_ON_RESUME)}")
  if m.eta > 0 and config.train.objective != "decoupled_ppo":
    raise ConfigError(f"{CONFIG_PATH}.eta={m.eta} trains on tokens up to η versions old: set "
                      f"config.train.objective='decoupled_ppo' (behaviour vs proximal policy), "
                      f"not {config.train.objective!r}")
  if "fork_turns" in rl.rollout and rl.rollout.fork_turns:
    raise ConfigError(f"config.rl.rollout.fork_turns={rl.rollout.fork_turns}: tree rollouts are not "
                      f"supported with the trajectory manager ({CONFIG_PATH}) yet; set it to 0")
  if rl.filter.dynamic_sampling:
    raise ConfigError("config.rl.filter.dynamic_sampling is not supported with the trajectory "
                      f"manager ({CONFIG_PATH}): turn one of them off")
  executor_lib.validate_config(rl)


# -- the store ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ticket:
  """One admitted group."""
  index: int             # admission order (slot * B + position)
  slot: int              # the synchronous iteration this group would belong to
  position: int          # its place in that iteration's tasks
  version: int           # the policy version when it was admitted
  task: Any
  row_keys: Any          # PRNG keys [G]: the synchronous loop's keys of its rows


@dataclasses.dataclass
class Group:
  """A group in the store: its trajectories as they arrive, then its tree."""
  ticket: Ticket
  trajectories: list = dataclasses.field(default_factory=list)
  complete_time: Optional[float] = None
  tree_stats: dict = dataclasses.field(default_factory=dict)


class Stopped(Exception):
  """Raised inside a rollout worker when the manager closed (ends its in-flight episodes)."""


class TrajectoryManager(partial_rollout.WeightSource):
  """The thread-safe store (see the module docstring). ``make_ticket(index, slot, position,
  version)`` gives the task and row keys of an admission; ``start_slot`` is the first slot (the
  stage's iteration when the run began), ``end_slot`` the one past the last."""

  def __init__(self, *, batch_groups: int, group_size: int, eta: int,
               make_ticket: Callable[..., Ticket], start_slot: int = 0,
               end_slot: Optional[int] = None, params: Any = None):
    super().__init__(start_slot, params)
    self.B, self.G, self.eta = int(batch_groups), int(group_size), int(eta)
    self._make_ticket = make_ticket
    self._cv = threading.Condition()
    self._next_index = start_slot * self.B
    self._end_index = None if end_slot is None else end_slot * self.B
    self._groups: dict[int, Group] = {}          # unconsumed, by admission index
    self._closed = False
    self._error: Optional[BaseException] = None
    self.counts = collections.Counter()          # admitted, completed, consumed, trajectories

  # versions
  def publish(self, version: int, params: Any) -> None:
    super().publish(version, params)
    with self._cv:
      self._cv.notify_all()

  def capacity(self) -> int:
    """Groups that may be admitted now: (η + v + 1)·B - (accepted + running), capped at the
    run's end."""
    with self._cv:
      return self._capacity_locked()

  def _capacity_locked(self) -> int:
    cap = (self.eta + self.version + 1) * self.B - self._next_index
    if self._end_index is not None:
      cap = min(cap, self._end_index - self._next_index)
    return max(cap, 0)

  # rollout side
  def admit(self, max_groups: int) -> list[Ticket]:
    """Blocks until at least one group may be admitted; admits up to ``max_groups``. Empty when
    the manager closed or the run's last slot was admitted."""
    with self._cv:
      while True:
        self._check_error()
        if self._closed or (self._end_index is not None and self._next_index >= self._end_index):
          return []
        cap = self._capacity_locked()
        if cap > 0:
          break
        self._cv.wait()
      version = self.version
      tickets = []
      for _ in range(min(cap, max_groups)):
        n = self._next_index
        ticket = self._make_ticket(n, n // self.B, n % self.B, version)
        self._groups[n] = Group(ticket)
        tickets.append(ticket)
        self._next_index += 1
      self.counts["admitted"] += len(tickets)
      return tickets

  def push(self, ticket: Ticket, trajectory) -> None:
    """A finished trajectory of ``ticket``'s group (per-token versions in ``policy_version``);
    the G-th completes the group: its tree is built and the trainer is woken."""
    with self._cv:
      group = self._groups[ticket.index]
      group.trajectories.append(trajectory)
      self.counts["trajectories"] += 1
      if len(group.trajectories) == self.G:
        kept = [t for t in group.trajectories if len(t)]
        if kept:
          tree = build.build_tree([t.tokens for t in kept])
          group.tree_stats = {"por": tree.por, "n_tree": tree.n_tree, "n_flat": tree.n_flat}
        group.complete_time = time.perf_counter()
        self.counts["completed"] += 1
        self._cv.notify_all()

  @property
  def closed(self) -> bool:
    return self._closed

  def fail(self, error: BaseException) -> None:
    """A rollout worker's crash (a bug, not an episode fault): re-raised in the trainer."""
    with self._cv:
      self._error = error
      self._cv.notify_all()

  def _check_error(self) -> None:
    if self._error is not None:
      raise RuntimeError(f"a rollout worker failed: {type(self._error).__name__}: "
                         f"{self._error}") from self._error

  # trainer side
  def take(self, version: int, timeout: Optional[float] = None) -> list[Group]:
    """The trainer's batch at ``version``: B complete groups, oldest admission version first
    (then earliest completed), such that the bound still holds for every later batch (module
    docstring); returned in admission order. Blocks until such a batch exists."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with self._cv:
      while True:
        self._check_error()
        chosen = self._choose_locked(version)
        if chosen is not None:
          break
        if self._closed:
          raise RuntimeError("the trajectory manager closed while the trainer waited for a batch")
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
          raise TimeoutError(f"no complete batch of {self.B} groups at version {version} within "
                             f"{timeout} s")
        self._cv.wait(remaining)
      for g in chosen:
        del self._groups[g.ticket.index]
      self.counts["consumed"] += len(chosen)
      self._cv.notify_all()
      return sorted(chosen, key=lambda g: g.ticket.index)

  def _choose_locked(self, version: int) -> Optional[list[Group]]:
    groups = list(self._groups.values())
    forced = [g for g in groups if g.ticket.version <= version - self.eta]
    if len(forced) > self.B:
      raise RuntimeError(f"staleness bound broken: {len(forced)} groups must be trained at "
                         f"version {version} but a batch holds {self.B}")
    if any(g.complete_time is None for g in forced):
      return None
    done = sorted((g for g in groups if g.complete_time is not None),
                  key=lambda g: (g.ticket.version, g.complete_time))
    chosen = done[:self.B]          # the forced groups first: their versions are the oldest
    if len(chosen) < self.B:
      return None
    # Groups admitted at version <= version + k - eta must all be trained within the next k
    # batches (k < eta; k = eta holds by the admission bound, k = 0 is `forced`).
    for k in range(1, self.eta):
      w = version + k - self.eta
      left = sum(g.ticket.version <= w for g in groups) - sum(g.ticket.version <= w
                                                                for g in chosen)
      if left > k * self.B:
        return None                 # wait for one of those older groups to complete
    return chosen

  def close(self) -> None:
    with self._cv:
      self._closed = True
      self._cv.notify_all()

  def stats(self) -> dict:
    with self._cv:
      running = sum(g.complete_time is None for g in self._groups.values())
      return {"admitted": self.counts["admitted"], "completed": self.counts["completed"],
              "consumed": self.counts["consumed"], "running": running,
              "buffered": len(self._groups) - running, "version": self.version}


# -- the rollout workers -----------------------------------------------------------------------


class _StopAware:
  """The manager as a weight source that ends a worker's episodes at a turn boundary once it
  closed (so a finished run does not wait for rollouts nobody will train on)."""

  def __init__(self, manager: TrajectoryManager):
    self.manager = manager

  def latest(self):
    if self.manager.closed:
      raise Stopped()
    return self.manager.latest()


class RolloutWorker(threading.Thread):
  """An episode driver: admits up to ``batch_groups`` groups, rolls their rows out as one
  lockstep batch on the latest published params (partial rollout at turn boundaries), pushes
  the trajectories, and loops until the manager closes."""

  def __init__(self, index: int, manager: TrajectoryManager, sampler, env_factory, cfg,
               tokenizer, *, batch_groups: int, partial: bool, kv_on_resume: str,
               env_wrapper: Optional[Callable] = None):
    super().__init__(name=f"kat-rollout-{index}", daemon=True)
    self.manager, self.sampler, self.env_factory = manager, sampler, env_factory
    self.cfg, self.tokenizer = cfg, tokenizer
    self.batch_groups, self.partial, self.kv_on_resume = batch_groups, partial, kv_on_resume
    self.env_wrapper = env_wrapper
    self.idle_s = 0.0
    self.busy_s = 0.0
    self.swaps = 0
    self.start_time: Optional[float] = None

  def run(self) -> None:
    self.start_time = time.perf_counter()
    try:
      while True:
        t0 = time.perf_counter()
        tickets = self.manager.admit(self.batch_groups)
        t1 = time.perf_counter()
        self.idle_s += t1 - t0
        if not tickets:
          return
        self._roll(tickets)
        self.busy_s += time.perf_counter() - t1
    except Stopped:
      return
    except BaseException as e:   # a bug: surfaces in the trainer instead of a silent hang
      self.manager.fail(e)

  def _roll(self, tickets: list[Ticket]) -> None:
    g = self.manager.G
    rows = [t.task for t in tickets for _ in range(g)]
    keys = jax.numpy.concatenate([t.row_keys for t in tickets])
    env_list = self.env_factory.make(len(rows))
    if self.env_wrapper is not None:
      env_list = [self.env_wrapper(e) for e in env_list]
    try:
      trajs, stats = partial_rollout.rollout(
          self.sampler, env_list, rows, keys, self.cfg, self.tokenizer,
          _StopAware(self.manager), partial=self.partial, kv_on_resume=self.kv_on_resume)
    finally:
      for env in env_list:
        env.close()
    self.swaps += stats.swaps
    for i, ticket in enumerate(tickets):
      for traj in trajs[i * g:(i + 1) * g]:
        self.manager.push(ticket, traj)


# -- the asynchronous RL driver ----------------------------------------------------------------


def staleness_of(groups: list[Group], version: int) -> np.ndarray:
  """int [sampled tokens]: ``version`` - the version that sampled each trained token."""
  parts = [version - t.policy_version[t.sampled] for g in groups for t in g.trajectories]
  return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0,), np.int64)


class AsyncRL:
  """Drives an ``RLStage`` through a ``TrajectoryManager``: rollout worker threads (their
  environments from ``kat_jax.rl.executor``) and the trainer in the calling thread."""

  def __init__(self, stage, *, end_iteration: Optional[int] = None,
               env_wrapper: Optional[Callable] = None):
    config = stage.config
    validate_config(config)
    self.stage, self.config = stage, config
    m, rl = config.rl.manager, config.rl
    self.B = rl.tasks_per_iteration
    self.plan = placement_lib.resolve(rl.placement, rl.executor)
    if not self.plan.rollout_shared and rl.manager.eta > 0 and jax.default_backend() == "cpu":
      # Seen reproducibly on this stack (jax 0.10.2, simulated CPU devices): a sampler on its own
      # device slice running while the trainer steps segfaults inside XLA's CPU client.
      raise ConfigError(
          f"config.rl.placement.groups={rl.placement.groups!r} gives the rollout its own device "
          f"slice, and config.rl.manager.eta={rl.manager.eta} runs it concurrently with training: "
          "on the CPU backend this crashes XLA's client. Share the devices "
          "(e.g. 'all:trainer,rollout') or use eta=0")
    sampler = stage.sampler
    mesh = self.plan.rollout_mesh()
    if mesh is not None:
      from kat_jax.sample import Sampler
      sampler = Sampler(stage.trainer.model, None, max_len=sampler.max_len, mesh=mesh,
                        rules=stage.trainer.rules)
    self.placer = self.plan.params_placer(stage.trainer.params_shardings, mesh)
    end = rl.iterations if end_iteration is None else end_iteration
    self.manager = TrajectoryManager(
        batch_groups=self.B, group_size=rl.group_size, eta=m.eta, make_ticket=self._ticket,
        start_slot=stage.iteration, end_slot=end, params=self._snapshot())
    self.env_factory = executor_lib.make(config, pool=stage.pool)
    self._slot_tasks: dict[int, list] = {}
    self._lock = threading.Lock()
    self.workers = [RolloutWorker(
        i, self.manager, sampler, self.env_factory, rl.rollout, stage.tokenizer,
        batch_groups=m.batch_groups or self.B, partial=m.partial_rollout,
        kv_on_resume=m.kv_on_resume, env_wrapper=env_wrapper)
        for i in range(m.rollout_workers)]
    self.trainer_idle_s = 0.0
    self.trained_trajectories = 0
    self.staleness = collections.Counter()
    self.consumed: list[tuple[int, list[Group]]] = []   # (version, groups) of every update
    self.keep_groups = False          # tests: keep what each update trained on in `consumed`
    self.start_time = time.perf_counter()
    for w in self.workers:
      w.start()

  def _snapshot(self):
    """The current params as the rollout devices hold them (a copy: the next step donates)."""
    return self.placer(self.stage.trainer.params)

  def _ticket(self, index: int, slot: int, position: int, version: int) -> Ticket:
    from kat_jax.rl import loop as loop_lib
    stage, cfg = self.stage, self.config
    with self._lock:
      if slot not in self._slot_tasks:
        level = stage.levels[stage.level_index]
        self._slot_tasks[slot] = loop_lib.draw_tasks(cfg, level, slot, 0, self.B)
      task = self._slot_tasks[slot][position]
      if position == self.B - 1:
        self._slot_tasks.pop(slot)
    g = cfg.rl.group_size
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed + 2), slot), 0)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        rng, jax.numpy.arange(position * g, (position + 1) * g))
    return Ticket(index, slot, position, version, task, keys)

  def iterate(self, timeout: Optional[float] = None) -> dict:
    """One update at the current version (see the module docstring); its metrics."""
    stage = self.stage
    version = stage.iteration
    t0 = time.perf_counter()
    groups = self.manager.take(version, timeout=timeout)
    wait_s = time.perf_counter() - t0
    self.trainer_idle_s += wait_s
    # The stage's own update path (rewards, trees, pruning, scores, advantages, updates,
    # curriculum): iteration advances.
    # JAX calls of the trainer and of the rollout workers take turns (partial_rollout.DEVICE_CALLS:
    # concurrent calls from threads crashed XLA's CPU client); environments overlap them.
    with partial_rollout.DEVICE_CALLS:
      metrics = stage.learn([(g.trajectories, True) for g in groups])
    stale = staleness_of(groups, version)
    self.staleness.update(stale.tolist())
    self.trained_trajectories += sum(len(g.trajectories) for g in groups)
    if self.keep_groups:
      self.consumed.append((version, groups))
    metrics.update({"trainer_wait_s": wait_s,
                    "staleness/max": int(stale.max()) if stale.size else 0,
                    "staleness/mean": float(stale.mean()) if stale.size else 0.0,
                    "manager/swaps": sum(w.swaps for w in self.workers),
                    "manager/por": float(np.mean([g.tree_stats.get("por", 0.0) for g in groups])),
                    **{f"manager/{k}": v for k, v in self.manager.stats().items()}})
    with partial_rollout.DEVICE_CALLS:
      snapshot = self._snapshot()
    self.manager.publish(stage.iteration, snapshot)
    return metrics

  def summary(self) -> dict:
    """Run-level figures: idle fractions, trajectories/s, the staleness histogram."""
    wall = time.perf_counter() - self.start_time
    rollout = [(w.idle_s, (time.perf_counter() - w.start_time) if w.start_time else 0.0)
               for w in self.workers]
    total_tokens = sum(self.staleness.values())
    return {"wall_s": wall, "trainer_idle_fraction": self.trainer_idle_s / max(wall, 1e-9),
            "rollout_idle_fraction": float(np.mean([i / max(t, 1e-9) for i, t in rollout])),
            "trajectories_per_s": self.trained_trajectories / max(wall, 1e-9),
            "trained_trajectories": self.trained_trajectories,
            "max_staleness": max(self.staleness) if self.staleness else 0,
            "staleness_histogram": {int(s): n / total_tokens
                                    for s, n in sorted(self.staleness.items())},
            "swaps": sum(w.swaps for w in self.workers)}

  def close(self) -> None:
    """Stops the workers (in-flight episodes end at their next turn boundary) and joins them."""
    self.manager.close()
    for w in self.workers:
      w.join()
    self.env_factory.close()


def train(config, workdir: str, max_iterations: Optional[int] = None) -> dict[str, Any]:
  """The RL stage through the manager: ``loop.train``, which drives ``AsyncRL`` whenever
  ``enabled(config)`` (kept as the manager's entry point)."""
  from kat_jax.rl import loop as loop_lib
  if not enabled(config):
    raise ValueError("manager.train: config.rl.manager does not enable the manager (set "
                     "manager.enabled=True, manager.eta > 0 or executor='ray')")
  return loop_lib.train(config, workdir, max_iterations)
