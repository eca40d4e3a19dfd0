"""Tree rollouts (``rollout.rollout_groups``): with forks off they are ``rollout`` of every task
repeated group_size times, exactly; with forks on, a forked trajectory shares its source's prefix
token for token (and every per-token value on it), a greedy continuation after a fork (the KV cache
copied, never recomputed) is the plain greedy rollout's, the realized POR is higher than the plain
group's, every group has exactly group_size trajectories however rows end, ``max_entropy`` forks
before the highest-entropy turn so far, a copy's environment is replayed and checked (a mismatch or a
crash is recorded, never raised; ``clone()`` is used when offered), and the fork settings are
validated with errors naming the field."""
import dataclasses
import itertools
import os
import random
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_rollout import TOK, EchoEnv, _numpy_init, check_aligned, model_ids  # noqa: E402

from kat_jax.data import chat  # noqa: E402
from kat_jax.data.chat import Message  # noqa: E402
from kat_jax.errors import ConfigError  # noqa: E402
from kat_jax.model import ModelConfig, Transformer, get_preset  # noqa: E402
from kat_jax.model import intervals_from_segment_ids  # noqa: E402
from kat_jax.rl import rollout  # noqa: E402
from kat_jax.rl.envs import base  # noqa: E402
from kat_jax.sample import Episode, SampleOutput, Sampler  # noqa: E402

ARRAYS = ("tokens", "sampled", "logp_policy", "logp_sampling", "entropy", "event_tag", "turn",
          "policy_version")


def config(**overrides):
  cfg = rollout.default_rollout_config()
  cfg.update(overrides)
  return cfg


def assert_same_trajectory(a, b):
  for name in ARRAYS:
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
  assert (a.task_id, a.prompt_len, a.status, a.num_turns, a.grade, a.reward_terms) == (
      b.task_id, b.prompt_len, b.status, b.num_turns, b.grade, b.reward_terms)
  assert a.info == b.info


def assert_prefixes_shared(group):
  """Any two trajectories of one root that forked apart at (boundary, prefix) agree on every
  per-token value of their first ``prefix`` tokens. Returns the number of such pairs."""
  pairs = 0
  for a, b in itertools.combinations(group, 2):
    ta, tb = a.info["tree"], b.info["tree"]
    if ta["topup"] or tb["topup"] or ta["root"] != tb["root"]:
      continue
    for (ba, pa, sa), (bb, pb, sb) in zip(ta["path"], tb["path"]):
      assert (ba, pa) == (bb, pb), (ta, tb)   # same lineage so far: the same fork
      if sa != sb:
        for name in ARRAYS:
          np.testing.assert_array_equal(getattr(a, name)[:pa], getattr(b, name)[:pa])
        assert a.prompt_len == b.prompt_len
        pairs += 1
        break
  return pairs


# -- a real tiny model ----------------------------------------------------------------------------


class Counting:
  """Wraps a sampler; counts the prompts it prefilled and the forks it made."""

  def __init__(self, sampler):
    self.sampler, self.max_len = sampler, sampler.max_len
    self.prefilled, self.forks, self.extended = [], [], []

  def start_episode(self, prompts, rng):
    self.prefilled += [len(p) for p in prompts]
    return self.sampler.start_episode(prompts, rng)

  def generate_turn(self, episode, config, tokenizer=None):
    return self.sampler.generate_turn(episode, config, tokenizer)

  def extend(self, episode, new_tokens):
    self.extended += [len(t) for t in new_tokens if t is not None]
    return self.sampler.extend(episode, new_tokens)

  def fork(self, episode, rows, rng=None):
    self.forks.append(list(rows))
    return self.sampler.fork(episode, rows, rng)


@pytest.fixture(scope="module")
def sampler():
  c = get_preset("tiny")
  c.update(dict(vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, mlp_dim=128))
  model = Transformer(ModelConfig.from_config(c))
  t = jnp.zeros((1, 8), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), t, t, intervals_from_segment_ids(jnp.ones((1, 8), jnp.int32)))["params"])
  return Sampler(model, _numpy_init(nn.unbox(abstract)), max_len=256, prefill_bucket=64,
                 output_bucket=8, extend_bucket=64)


def test_without_forks_groups_are_rollout_of_the_repeated_tasks(sampler):
  tasks, g = ["a", "b"], 2
  cfg = config(max_turns=3, max_new_tokens=8, temperature=0.7, top_p=0.9)
  groups = rollout.rollout_groups(sampler, EchoEnv, tasks, g, jax.random.key(4), cfg, TOK,
                                  policy_version=3)
  rows = [t for t in tasks for _ in range(g)]       # the RL loop's layout: one rollout call
  plain = rollout.rollout(sampler, [EchoEnv() for _ in rows], rows, jax.random.key(4), cfg, TOK,
                          policy_version=3)
  assert [len(group) for group in groups] == [g, g]
  for traj, ref in zip([t for group in groups for t in group], plain):
    assert_same_trajectory(traj, ref)
    assert "tree" not in traj.info
  assert len({tuple(t.tokens.tolist()) for t in plain}) == len(plain)   # sampled, not copies


def test_a_greedy_continuation_after_a_fork_is_the_plain_rollouts(sampler):
  """Forked caches are exact: at T = 0 every leaf of a 2-level tree is the plain greedy episode."""
  cfg = config(max_turns=3, max_new_tokens=8, temperature=0.0, fork_turns=2, fork_width=2)
  counting = Counting(sampler)
  [group] = rollout.rollout_groups(counting, EchoEnv, ["a"], 4, jax.random.key(1), cfg, TOK)
  [plain] = rollout.rollout(sampler, [EchoEnv()], ["a"], jax.random.key(1), cfg, TOK)
  assert plain.status == base.SUBMITTED and plain.num_turns == 3
  assert counting.prefilled == [plain.prompt_len]            # one prompt prefilled, never again
  assert counting.forks == [[0, 0], [0, 0, 1, 1]]            # boundary 1, then boundary 2
  starts = [int(np.flatnonzero(plain.sampled & (plain.turn == t))[0]) for t in (1, 2)]
  paths = set()
  for traj in group:
    check_aligned(traj)
    for name in ("tokens", "sampled", "event_tag", "turn"):
      np.testing.assert_array_equal(getattr(traj, name), getattr(plain, name), err_msg=name)
    np.testing.assert_allclose(traj.logp_policy, plain.logp_policy, atol=1e-5)
    np.testing.assert_allclose(traj.entropy, plain.entropy, atol=1e-5)
    assert (traj.status, traj.info["statuses"], traj.grade) == (
        plain.status, plain.info["statuses"], plain.grade)
    tree = traj.info["tree"]
    assert [(b, p) for b, p, _ in tree["path"]] == [(1, starts[0]), (2, starts[1])]
    paths.add(tuple(s for _, _, s in tree["path"]))
    assert not tree["topup"] and not tree["replay_errors"]
  assert paths == {(0, 0), (0, 1), (1, 0), (1, 1)}
  # Appended chunks: the two roots' observations once, then per row after the forks.
  obs = [int(((~plain.sampled) & (plain.turn == t)).sum()) for t in (0, 1)]
  assert counting.extended == [obs[0]] + [obs[1]] * 2


def test_forked_trajectories_share_the_source_prefix_and_raise_the_por(sampler):
  tasks, g = ["a", "b"], 4
  cfg = config(max_turns=3, max_new_tokens=8, temperature=1.0)
  plain = rollout.rollout_groups(sampler, EchoEnv, tasks, g, jax.random.key(2), cfg, TOK)
  cfg.update(fork_turns=1, fork_width=2, fork_at="first")
  counting = Counting(sampler)
  tree = rollout.rollout_groups(counting, EchoEnv, tasks, g, jax.random.key(2), cfg, TOK)
  assert [len(group) for group in tree] == [g, g]
  assert len(counting.prefilled) == 4 and counting.forks == [[0, 0, 1, 1, 2, 2, 3, 3]]
  for group in tree:
    assert [t.task_id for t in group] == [group[0].task_id] * g
    assert assert_prefixes_shared(group) == 2                 # each root and its copy
    for traj in group:
      check_aligned(traj)
      assert traj.status == base.SUBMITTED and traj.num_turns == 3
      [(boundary, prefix, _)] = traj.info["tree"]["path"]
      assert boundary == 1 and traj.turn[prefix - 1] == 0 and traj.turn[prefix] == 1
    # New keys per copy: the continuations after the fork differ.
    for root in (0, 1):
      a, b = [t for t in group if t.info["tree"]["root"] == root]
      prefix = a.info["tree"]["path"][0][1]
      assert not np.array_equal(a.tokens[prefix:prefix + 8], b.tokens[prefix:prefix + 8])
  stats, plain_stats = rollout.rollout_stats(tree), rollout.rollout_stats(plain)
  assert stats["por"] == pytest.approx(np.mean([rollout.trajectories_to_tree(group)[1]["por"]
                                                for group in tree]))
  assert stats["por"] > plain_stats["por"] + 0.1, (stats, plain_stats)
  assert (stats["forked_trajectories"], stats["topup_trajectories"]) == (4, 0)
  assert plain_stats["forked_trajectories"] == 0


# -- a host sampler with fork, for the scheme -------------------------------------------------------


class HostSampler:
  """``Sampler``'s episode API on the host, ``fork`` included. Row keys are strings (start: the
  rng's words and the row; fork with rng: new keys for every row); a row's turn is
  ``policy(key, turn)`` as model ids, every token of it with entropy ``entropy(key, turn)``."""

  def __init__(self, policy, entropy=lambda key, turn: 1.0, max_len=4096):
    self.policy, self.entropy, self.max_len = policy, entropy, max_len
    self.forks, self.prefilled = [], 0

  @staticmethod
  def _tag(rng):
    return "".join(f"{w:x}" for w in np.asarray(jax.random.key_data(rng)).ravel())[-6:]

  def start_episode(self, prompts, rng):
    self.prefilled += len(prompts)
    tag = self._tag(rng)
    return Episode(state=None, base_keys=[f"{tag}:{i}" for i in range(len(prompts))],
                   contexts=tuple(np.asarray(p, np.int32) for p in prompts),
                   end_reasons=(None,) * len(prompts), turn=0)

  def fork(self, episode, rows, rng=None):
    self.forks.append(list(rows))
    keys = ([episode.base_keys[r] for r in rows] if rng is None else
            [f"{episode.base_keys[r]}>{self._tag(rng)}:{j}" for j, r in enumerate(rows)])
    return Episode(state=None, base_keys=keys,
                   contexts=tuple(episode.contexts[r] for r in rows),
                   end_reasons=tuple(episode.end_reasons[r] for r in rows), turn=episode.turn)

  def generate_turn(self, episode, config, tokenizer=None):
    b, n = episode.num_rows, config.max_new_tokens
    tokens = np.zeros((b, n), np.int32)
    ent = np.zeros((b, n), np.float32)
    lengths, reasons, contexts = np.zeros(b, np.int32), [], []
    for i, (key, context, end) in enumerate(zip(episode.base_keys, episode.contexts,
                                                episode.end_reasons)):
      if end is not None:
        reasons.append(end)
        contexts.append(context)
        continue
      ids = model_ids(self.policy(key, episode.turn))[:n]
      tokens[i, :len(ids)], lengths[i] = ids, len(ids)
      ent[i, :len(ids)] = self.entropy(key, episode.turn)
      reasons.append("stop_token")
      contexts.append(np.concatenate([context, tokens[i, :len(ids)]]))
    lp = -np.ones((b, n), np.float32) * (tokens > 0)
    out = SampleOutput(tokens=tokens, logprobs=lp, entropies=ent, logprobs_policy=lp,
                       entropies_policy=ent, lengths=lengths, finish_reason=reasons,
                       texts=[TOK.decode(tokens[i, :lengths[i]]) for i in range(b)])
    return dataclasses.replace(episode, contexts=tuple(contexts), turn=episode.turn + 1), out

  def extend(self, episode, new_tokens):
    contexts, ends = [], []
    for tokens, context, end in zip(new_tokens, episode.contexts, episode.end_reasons):
      if tokens is None:
        end = end or "inactive"
      elif end is None:
        context = np.concatenate([context, np.asarray(tokens, np.int32)])
      contexts.append(context)
      ends.append(end)
    return dataclasses.replace(episode, contexts=tuple(contexts), end_reasons=tuple(ends))


class StopEnv(base.Environment):
  """Deterministic: a turn containing STOP is graded (done); any other gets a tool result that
  echoes it. Counts instances, resets, steps and closes (class-level log)."""
  made = []

  def __init__(self):
    StopEnv.made.append(self)
    self.closes = 0

  def reset(self, task):
    self.task, self.turn = task, 0
    return base.Observation((Message("system", "Test."), Message("user", f"Task {task}.")))

  def step(self, action):
    self.turn += 1
    if "STOP" in action:
      return base.StepResult(base.Observation(()), True, base.SUBMITTED,
                             info={"grade": base.Grade(True, True, 1, 1)})
    return base.StepResult(base.Observation((chat.tool_result(f"saw {action[:12]}",
                                                              name="echo"),)), False, base.OK)

  def close(self):
    self.closes += 1


def stop_policy(p_stop, seed):
  """Turn text of a row key: STOP with probability p_stop (a seeded function of key and turn)."""
  def policy(key, turn):
    draw = random.Random(f"{seed}/{key}/{turn}").random()
    return ("STOP " if draw < p_stop else "go ") + f"{key[-4:]} t{turn}<|im_end|>"
  return policy


@pytest.mark.parametrize("rule", rollout.FORK_RULES)
def test_every_group_has_exactly_group_size_trajectories_however_rows_end(rule):
  seen = {"topup": 0, "pruned": 0, "wider": 0}
  for seed, (forks, width, max_turns, p_stop) in enumerate(
      [(1, 2, 3, 0.0), (1, 2, 3, 0.5), (2, 2, 4, 0.3), (1, 3, 4, 0.4), (2, 3, 3, 0.2),
       (1, 2, 2, 0.9), (3, 2, 5, 0.25), (2, 2, 5, 0.6)]):
    g = width ** forks * (1 + seed % 2)
    cfg = config(max_turns=max_turns, fork_turns=forks, fork_width=width, fork_at=rule,
                 env_threads=1 + seed % 3)
    sampler = HostSampler(stop_policy(p_stop, seed),
                          entropy=lambda key, turn: random.Random(f"h/{key}/{turn}").random())
    StopEnv.made = []
    groups = rollout.rollout_groups(sampler, StopEnv, ["x", "y", "z"], g,
                                    jax.random.key(seed), cfg, TOK)
    assert [len(group) for group in groups] == [g] * 3, (seed, rule)
    stats = rollout.rollout_stats(groups)
    # Roots, and the top-up rows: nothing else was prefilled.
    assert sampler.prefilled == 3 * g // width ** forks + stats["topup_trajectories"]
    for group, task in zip(groups, ["x", "y", "z"]):
      assert {t.task_id for t in group} == {task}
      assert_prefixes_shared(group)
      for traj in group:
        check_aligned(traj)
        tree = traj.info["tree"]
        assert traj.status in (base.SUBMITTED, base.MAX_TURNS), traj.status
        boundaries = [b for b, _, _ in tree["path"]]
        assert boundaries == sorted(set(boundaries)) and all(0 < b < max_turns
                                                             for b in boundaries)
        if rule == "first" and not tree["topup"] and p_stop == 0:
          assert boundaries == list(range(1, forks + 1))
    assert all(env.closes == 1 for env in StopEnv.made)           # every env made, closed once
    if p_stop == 0:
      assert stats["topup_trajectories"] == 0 and stats["forked_trajectories"] == 3 * (
          g - g // width ** forks)
    seen["topup"] += stats["topup_trajectories"]
    seen["pruned"] += stats["pruned_copies"]
    seen["wider"] += any(s >= width for group in groups for t in group
                         for _, _, s in t.info["tree"]["path"])     # a sibling's share taken
  assert seen["topup"] > 0 and seen["wider"] > 0
  assert (seen["pruned"] > 0) == (rule == "max_entropy")


def test_a_row_that_ends_early_leaves_its_share_to_a_sibling_or_to_the_top_up():
  # Root 0 stops at turn 0, root 1 runs: root 1 forks 3 ways at boundary 1.
  policy = lambda key, turn: ("STOP" if key.endswith(":0") and turn == 0 else "go") + (
      "<|im_end|>")
  cfg = config(max_turns=3, fork_turns=1, fork_width=2)
  [group] = rollout.rollout_groups(HostSampler(policy), StopEnv, ["x"], 4, jax.random.key(0),
                                   cfg, TOK)
  assert [t.num_turns for t in group] == [1, 3, 3, 3]
  assert [s for t in group[1:] for _, _, s in t.info["tree"]["path"]] == [0, 1, 2]
  assert [t.info["tree"]["root"] for t in group] == [0, 1, 1, 1]
  # Every root stops at turn 0: the group is made up by plain rows.
  sampler = HostSampler(lambda key, turn: "STOP<|im_end|>")
  [group] = rollout.rollout_groups(sampler, StopEnv, ["x"], 4, jax.random.key(0), cfg, TOK)
  assert [t.info["tree"]["topup"] for t in group] == [False, False, True, True]
  assert sampler.prefilled == 4 and all(t.status == base.SUBMITTED for t in group)
  assert rollout.rollout_stats([group])["topup_trajectories"] == 2


def test_max_entropy_forks_before_the_highest_entropy_turn_so_far():
  go = lambda key, turn: f"go {turn}<|im_end|>"
  cfg = config(max_turns=4, fork_turns=1, fork_width=2, fork_at="max_entropy")
  cases = [([1.0, 0.5, 2.0, 0.1], 2, 1),    # turn 1 below turn 0: dropped; turn 2 is the max
           ([1.0, 0.5, 0.4, 0.3], 3, 2),    # never above turn 0: the last boundary forks anyway
           ([0.5, 0.5, 0.1, 0.1], 1, 0)]    # ties keep
  for entropies, boundary, pruned in cases:
    sampler = HostSampler(go, entropy=lambda key, turn: entropies[turn])
    [group] = rollout.rollout_groups(sampler, StopEnv, ["x"], 2, jax.random.key(0), cfg, TOK)
    source, copy = group
    assert [b for b, _, _ in source.info["tree"]["path"]] == [boundary]
    assert [s for _, _, s in copy.info["tree"]["path"]] == [1]
    assert source.info["tree"]["pruned_copies"] == pruned
    assert assert_prefixes_shared(group) == 1
    assert sampler.forks == [[0, 0]] * (pruned + 1)    # a dropped copy leaves at the next one
    assert rollout.rollout_stats([group])["pruned_copies"] == pruned
  # A speculative fork whose source ended at that turn is kept (its last chance).
  stop1 = lambda key, turn: ("STOP" if turn == 1 else "go") + "<|im_end|>"
  sampler = HostSampler(stop1, entropy=lambda key, turn: [1.0, 0.1, 0.1][turn])
  [group] = rollout.rollout_groups(sampler, StopEnv, ["x"], 2, jax.random.key(0),
                                   config(max_turns=3, fork_turns=1, fork_at="max_entropy"), TOK)
  assert [t.num_turns for t in group] == [2, 2] and group[0].info["tree"]["pruned_copies"] == 0


def test_random_forks_at_distinct_drawn_boundaries():
  go = lambda key, turn: f"go {turn}<|im_end|>"
  cfg = config(max_turns=6, fork_turns=2, fork_width=2, fork_at="random")
  seen = set()
  for seed in range(4):
    groups = rollout.rollout_groups(HostSampler(go), StopEnv, ["x", "y"], 8,
                                    jax.random.key(seed), cfg, TOK)
    for group in groups:
      for root in (0, 1):
        paths = {tuple(b for b, _, _ in t.info["tree"]["path"]) for t in group
                 if t.info["tree"]["root"] == root}
        assert len(paths) == 1                  # the root's schedule, inherited by its copies
        [boundaries] = paths
        assert len(boundaries) == 2 and 0 < boundaries[0] < boundaries[1] < 6
        seen.add(boundaries)
  assert len(seen) > 2                          # drawn, not fixed


class CountingEnv(StopEnv):
  """Not deterministic: each instance answers with its own number."""

  def step(self, action):
    result = super().step(action)
    return dataclasses.replace(result, observation=base.Observation(
        (chat.tool_result(f"instance {StopEnv.made.index(self)}", name="echo"),)))


class CrashingReplayEnv(StopEnv):
  """Steps fine in the first instance; any later one raises."""

  def step(self, action):
    if StopEnv.made.index(self) > 0:
      raise RuntimeError("replica broke")
    return super().step(action)


class ClonableEnv(CountingEnv):
  """Not replayable, but copies itself."""

  def __init__(self):
    self.number = len(StopEnv.made)
    super().__init__()

  def clone(self):
    twin = ClonableEnv()
    twin.task, twin.turn, twin.number = self.task, self.turn, self.number
    return twin

  def step(self, action):
    return base.StepResult(base.Observation((chat.tool_result(f"instance {self.number}",
                                                              name="echo"),)), False, base.OK)


def test_a_replay_that_differs_or_crashes_is_recorded_and_clone_is_used_when_offered():
  go = lambda key, turn: f"go {turn}<|im_end|>"
  cfg = config(max_turns=3, fork_turns=1, fork_width=2, env_threads=1)
  for env_class, why in ((CountingEnv, "step 0: the observation, done or status differs"),
                         (CrashingReplayEnv, "replay: RuntimeError: replica broke")):
    StopEnv.made = []
    [group] = rollout.rollout_groups(HostSampler(go), env_class, ["x"], 2, jax.random.key(0),
                                     cfg, TOK)
    root, topup = group
    assert root.status == base.MAX_TURNS and root.info["tree"]["path"] == ()
    errors = root.info["tree"]["replay_errors"]
    assert len(errors) == 2 and all(why in e for e in errors), errors   # boundaries 1 and 2
    assert errors[0].startswith("boundary 1: ") and errors[1].startswith("boundary 2: ")
    assert topup.info["tree"]["topup"] and rollout.rollout_stats([group])["fork_replay_errors"] == 2
  StopEnv.made = []
  [group] = rollout.rollout_groups(HostSampler(go), ClonableEnv, ["x"], 2, jax.random.key(0),
                                   cfg, TOK)
  assert len(StopEnv.made) == 2 and all(env.closes == 1 for env in StopEnv.made)
  source, copy = group
  assert [s for _, _, s in copy.info["tree"]["path"]] == [1]
  assert not source.info["tree"]["replay_errors"]
  # The clone answers as its source would: "instance 0" after the fork too.
  assert "instance 0" in TOK.decode(copy.tokens[copy.turn == 1])


def test_fork_settings_are_validated_naming_the_field():
  sampler = HostSampler(lambda key, turn: "go<|im_end|>")
  cases = [(dict(fork_width=1, fork_turns=1), r"fork_width=1 must be an int >= 2"),
           (dict(fork_width=True, fork_turns=1), r"fork_width=True must be an int >= 2"),
           (dict(max_turns=3, fork_turns=3), r"fork_turns=3 must be an int in \[0, 2\]"),
           (dict(fork_turns=-1), r"fork_turns=-1 must be an int in \[0, 7\]"),
           (dict(fork_turns=1, fork_at="best"), r"fork_at='best': use one of \['first', "
                                                r"'random', 'max_entropy'\]")]
  for overrides, message in cases:
    with pytest.raises(ConfigError, match=message):
      rollout.rollout_groups(sampler, StopEnv, ["x"], 4, jax.random.key(0), config(**overrides),
                             TOK)
  with pytest.raises(ConfigError, match=r"config.rl.group_size=6 is not a multiple of "
                                        r"config.rl.rollout.fork_width \*\* fork_turns = 2 \*\* "
                                        r"2 = 4"):
    rollout.rollout_groups(sampler, StopEnv, ["x"], 6, jax.random.key(0),
                           config(fork_turns=2, fork_width=2), TOK)
  with pytest.raises(ConfigError, match=r"group_size=0 must be an int >= 1"):
    rollout.validate_groups(config(), 0)
  rollout.validate_groups(config(fork_turns=2, fork_width=3), 18)
  with pytest.raises(ConfigError, match="fork_at is missing"):
    cfg = config()
    del cfg.fork_at
    rollout.validate_config(cfg, 64)
