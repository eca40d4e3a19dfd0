"""Partial rollout: episodes that take new policy weights at turn boundaries, with every sampled
token tagged by the policy version that sampled it.

    source = WeightSource(version=0, params=trainer_params_copy)     # or the TrajectoryManager
    trajs, stats = partial_rollout.rollout(sampler, envs, tasks, row_keys, cfg, tokenizer,
                                           source, partial=True, kv_on_resume="keep")
    trajs[i].policy_version        # int32 [L]: the version of each sampled token (0 elsewhere)
    source.publish(1, new_params)  # from the trainer's thread, while episodes run

The episode loop is ``kat_jax.rl.rollout.rollout`` itself (lockstep turns, statuses, rewards): it
runs on a ``VersionedSampler``, a view of the shared ``Sampler`` (same compiled programs, its own
``params``) whose ``generate_turn`` first asks the weight source for its latest version. When the
version moved (``partial=True``) the episode *pauses at this turn boundary* — after the
environment answered the previous turn and its observation was appended, before the next token is
sampled — takes the new params and resumes; the environment never notices (it sees the same
``reset`` / ``step`` calls). ``kv_on_resume`` says what happens to the rows' KV caches: ``keep``
continues on the caches written by the older params (cheap; the new policy then conditions on
keys / values of the old one for the history — the usual partial-rollout approximation), or
``recompute`` rebuilds them with the new params (``Sampler.recompute``: one prefill of every
running row), so the next turn's tokens and their T = 1 log-probs are exactly the new policy's.
The sampled tokens of turn k carry the version used for the k-th ``generate_turn``; their
``logp_policy`` is that version's T = 1 log-prob, the behaviour policy of ``decoupled_ppo``.

With ``partial=False`` an episode finishes on the params it started with (its tokens all carry
that version).
"""
from __future__ import annotations

import copy
import dataclasses
import threading
import time
from typing import Any, Optional, Sequence

import numpy as np

from kat_jax.errors import ConfigError
from kat_jax.rl import rollout as rollout_lib

KV_ON_RESUME = ("keep", "recompute")


class WeightSource:
  """The latest published (version, params), thread-safe: the trainer publishes, episodes read."""

  def __init__(self, version: int = 0, params: Any = None):
    self._lock = threading.Lock()
    self._version, self._params = int(version), params

  def publish(self, version: int, params: Any) -> None:
    with self._lock:
      if version < self._version:
        raise ValueError(f"publish(version={version}) after version {self._version}: versions "
                         f"only go up")
      self._version, self._params = int(version), params

  def latest(self) -> tuple[int, Any]:
    with self._lock:
      return self._version, self._params

  @property
  def version(self) -> int:
    with self._lock:
      return self._version


@dataclasses.dataclass
class ResumeStats:
  """What the weight swaps of one rollout call cost."""
  swaps: int = 0                 # turn boundaries at which new params were taken
  recompute_s: float = 0.0       # wall time of the cache rebuilds (kv_on_resume=recompute)
  turn_versions: list = dataclasses.field(default_factory=list)   # version of each turn


# JAX calls of the rollout workers and of the trainer (manager.AsyncRL) run one at a time: threads
# tracing and running programs at once crashed the process (segfaults inside XLA's CPU client, in
# the test suite). Environments and sandbox grading still overlap them — the latency the manager
# hides on this machine (docs/PERFORMANCE.md, "Trajectory manager").
DEVICE_CALLS = threading.RLock()


class VersionedSampler:
  """A ``Sampler`` view for one lockstep batch of episodes: shares the sampler's compiled programs
  and reads its params from a ``WeightSource`` at every turn boundary (module docstring)."""

  def __init__(self, sampler, source: WeightSource, *, partial: bool, kv_on_resume: str,
               placer=None):
    if kv_on_resume not in KV_ON_RESUME:
      raise ConfigError(f"config.rl.manager.kv_on_resume={kv_on_resume!r}: use one of "
                        f"{list(KV_ON_RESUME)}")
    self._sampler = copy.copy(sampler)      # own `params` attribute, shared jitted functions
    self._source, self._partial, self._kv = source, partial, kv_on_resume
    self._placer = placer or (lambda params: params)
    self.version, params = source.latest()
    self._sampler.params = self._placer(params)
    self.stats = ResumeStats()

  @property
  def max_len(self) -> int:
    return self._sampler.max_len

  @property
  def params(self):
    return self._sampler.params

  def start_episode(self, prompts, rng):
    with DEVICE_CALLS:
      return self._sampler.start_episode(prompts, rng)

  def extend(self, episode, new_tokens):
    with DEVICE_CALLS:
      return self._sampler.extend(episode, new_tokens)

  def generate_turn(self, episode, config, tokenizer=None):
    if self._partial and episode.turn > 0:
      version, params = self._source.latest()
      if version != self.version:           # a weight update happened: pause, swap, resume
        self.version = version
        self._sampler.params = self._placer(params)
        self.stats.swaps += 1
        if self._kv == "recompute":
          t0 = time.perf_counter()
          with DEVICE_CALLS:
            episode = self._sampler.recompute(episode)
          self.stats.recompute_s += time.perf_counter() - t0
    self.stats.turn_versions.append(self.version)
    with DEVICE_CALLS:
      return self._sampler.generate_turn(episode, config, tokenizer)


def tag_versions(traj: rollout_lib.Trajectory, turn_versions: Sequence[int]
                 ) -> rollout_lib.Trajectory:
  """``traj`` with ``policy_version`` = the version of the turn each sampled token belongs to."""
  if not len(traj):
    return traj
  versions = np.asarray(list(turn_versions) or [0], np.int32)
  turns = np.clip(traj.turn.astype(np.int64), 0, len(versions) - 1)
  return dataclasses.replace(traj, policy_version=np.where(traj.sampled, versions[turns],
                                                           0).astype(np.int32))


def rollout(sampler, envs_list, tasks, rng, cfg, tokenizer, source: WeightSource, *,
            partial: bool = True, kv_on_resume: str = "keep", placer=None,
            task_ids: Optional[Sequence[str]] = None
            ) -> tuple[list[rollout_lib.Trajectory], ResumeStats]:
  """``rollout.rollout`` of one lockstep batch on the source's latest params, taking newer ones at
  turn boundaries when ``partial``; trajectories tagged per token (``tag_versions``) and the
  swap statistics. ``placer`` maps published params onto the rollout devices (placement)."""
  view = VersionedSampler(sampler, source, partial=partial, kv_on_resume=kv_on_resume,
                          placer=placer)
  trajs = rollout_lib.rollout(view, envs_list, tasks, rng, cfg, tokenizer,
                              policy_version=view.version, task_ids=task_ids)
  return [tag_versions(t, view.stats.turn_versions) for t in trajs], view.stats
