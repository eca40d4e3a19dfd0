"""The trajectory manager (kat_jax.rl.manager), partial rollout (kat_jax.rl.partial_rollout) and
tag-driven placement (kat_jax.rl.placement): η = 0 gives exactly the synchronous loop's params;
with η >= 1 rollout runs beside training and every trained token's version is within the bound
(also over random completion orders of the store alone); a partial rollout across a weight
update gives the uninterrupted run's tokens when the weights do not change (greedy, KV kept or
recomputed) and, when they do, per-token version tags and behaviour log-probs of the version
that sampled each token; config and placement errors name their field."""
import dataclasses
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data"))
from byte_tokenizer import ByteTokenizer  # noqa: E402

from configs.base import get_base_config  # noqa: E402
from kat_jax.data.chat import Message  # noqa: E402
from kat_jax.errors import ConfigError  # noqa: E402
from kat_jax.model import ModelConfig, Transformer, get_preset  # noqa: E402
from kat_jax.model import intervals_from_segment_ids  # noqa: E402
from kat_jax.rl import loop as rl_loop  # noqa: E402
from kat_jax.rl import manager as manager_lib  # noqa: E402
from kat_jax.rl import partial_rollout, placement  # noqa: E402
from kat_jax.rl import rollout as rollout_lib  # noqa: E402
from kat_jax.rl.envs import base  # noqa: E402
from kat_jax.sample import Sampler  # noqa: E402
from kat_jax.sandbox import SandboxPool  # noqa: E402

TOK = ByteTokenizer()
GROUP, TASKS = 4, 8


# -- partial rollout on a tiny random model and a scripted environment -------------------------

GRADE = base.Grade(passed=False, compiled=True, tests_passed=1, tests_total=2)


class ScriptedEnv(base.Environment):
  """Two observed turns, graded at the third; records every call it gets."""

  def __init__(self):
    self.calls = []

  def reset(self, task):
    self.turn = 0
    self.calls.append(("reset", task))
    return base.Observation((Message("user", f"Task {task}: write f."),))

  def step(self, action):
    self.calls.append(("step", action))
    self.turn += 1
    if self.turn == 3:
      return base.StepResult(base.Observation((Message("user", "Graded."),)), True,
                             base.SUBMITTED, info={"grade": GRADE})
    return base.StepResult(base.Observation((Message("user", f"Try again ({self.turn})."),)),
                           False, base.NO_ACTION)


class ScriptedSource(partial_rollout.WeightSource):
  """Version 0 at the start of the episodes, ``later`` from the first turn boundary on."""

  def __init__(self, first, later):
    super().__init__(*first)
    self.later, self.calls = later, 0

  def latest(self):
    self.calls += 1
    return (0, self._params) if self.calls == 1 else self.later


def _numpy_init(abstract, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape) * a.shape[0] ** -0.5 if a.ndim > 1
                            else np.ones(a.shape), a.dtype), abstract)


@pytest.fixture(scope="module")
def tiny():
  c = get_preset("tiny")
  c.update(dict(vocab_size=384, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
                head_dim=16, mlp_dim=64))
  model = Transformer(ModelConfig.from_config(c))
  t = jnp.zeros((1, 8), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), t, t, intervals_from_segment_ids(jnp.ones((1, 8), jnp.int32)))["params"]))
  p0, p1 = _numpy_init(abstract, 0), _numpy_init(abstract, 1)
  sampler = Sampler(model, p0, max_len=256, prefill_bucket=64, output_bucket=8, extend_bucket=64)

  @jax.jit
  def log_probs(params, tokens_t):
    tokens_bt = tokens_t[None]
    pos = jnp.arange(tokens_bt.shape[1])[None]
    seg = jnp.ones_like(tokens_bt)
    logits = model.apply({"params": params}, tokens_bt, pos,
                         intervals_from_segment_ids(seg)).logits[0]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return jnp.take_along_axis(lp[:-1], tokens_t[1:, None], 1)[:, 0]   # [L-1]: logp of token j+1

  return sampler, p0, p1, log_probs


def _cfg(temperature=0.0):
  cfg = rollout_lib.default_rollout_config()
  cfg.update(dict(max_turns=3, max_new_tokens=8, temperature=temperature,
                  max_observation_tokens=0, env_threads=1))
  return cfg


def _run(sampler, source, partial=True, kv="keep", temperature=0.0):
  envs = [ScriptedEnv() for _ in range(3)]
  trajs, stats = partial_rollout.rollout(sampler, envs, ["a", "bb", "ccc"], jax.random.key(7),
                                         _cfg(temperature), TOK, source, partial=partial,
                                         kv_on_resume=kv)
  return trajs, stats, [e.calls for e in envs]


@pytest.mark.parametrize("kv", ["keep", "recompute"])
def test_partial_rollout_keeps_tokens_when_weights_do_not_change(tiny, kv):
  sampler, p0, _, _ = tiny
  ref, ref_stats, ref_calls = _run(sampler, partial_rollout.WeightSource(0, p0), partial=False)
  same = jax.tree.map(jnp.copy, p0)
  trajs, stats, calls = _run(sampler, ScriptedSource((0, p0), (1, same)), kv=kv)
  assert ref_stats.swaps == 0 and stats.swaps == 1 and stats.turn_versions == [0, 1, 1]
  assert calls == ref_calls                     # the environment saw exactly the same episode
  for a, b in zip(ref, trajs):
    assert a.num_turns == b.num_turns == 3 and b.status == base.SUBMITTED
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logp_policy, b.logp_policy, atol=1e-5)
    np.testing.assert_array_equal(a.policy_version[a.sampled], 0)
    np.testing.assert_array_equal(b.policy_version[b.sampled],
                                  np.where(b.turn[b.sampled] == 0, 0, 1))
    np.testing.assert_array_equal(b.policy_version[~b.sampled], 0)


@pytest.mark.parametrize("kv", ["keep", "recompute"])
def test_partial_rollout_tags_each_token_with_the_version_that_sampled_it(tiny, kv):
  sampler, p0, p1, log_probs = tiny
  trajs, stats, _ = _run(sampler, ScriptedSource((0, p0), (1, p1)), kv=kv, temperature=1.0)
  assert stats.swaps == 1
  for t in trajs:
    turns = t.turn[t.sampled]
    assert set(turns.tolist()) >= {0, 1}
    np.testing.assert_array_equal(t.policy_version[t.sampled], np.where(turns == 0, 0, 1))
    # Turn 0 was sampled by p0: its behaviour log-probs are p0's full-forward ones.
    lp0 = np.concatenate([[0.0], np.asarray(log_probs(p0, jnp.asarray(t.tokens)))])
    first = t.sampled & (t.turn == 0)
    np.testing.assert_allclose(t.logp_policy[first], lp0[first], atol=1e-4)
    later = t.sampled & (t.turn >= 1)
    lp1 = np.concatenate([[0.0], np.asarray(log_probs(p1, jnp.asarray(t.tokens)))])
    if kv == "recompute":      # caches rebuilt by p1: exactly p1's log-probs after the swap
      np.testing.assert_allclose(t.logp_policy[later], lp1[later], atol=1e-4)
    else:                      # p1 on p0's keys / values of the history: not p1's log-probs
      assert np.abs(t.logp_policy[later] - lp1[later]).max() > 1e-2


# -- the store alone: the staleness bound over random completion orders -----------------------


@dataclasses.dataclass
class FakeTraj:
  tokens: np.ndarray
  sampled: np.ndarray
  policy_version: np.ndarray

  def __len__(self):
    return len(self.tokens)


@pytest.mark.parametrize("eta", [0, 1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_store_bound_holds_for_any_completion_order(eta, seed):
  rng = np.random.default_rng(seed)
  b, g, slots = 3, 2, 16
  store = manager_lib.TrajectoryManager(
      batch_groups=b, group_size=g, eta=eta, end_slot=slots,
      make_ticket=lambda n, slot, pos, v: manager_lib.Ticket(n, slot, pos, v, None, None))
  running, version = [], 0
  for _ in range(100_000):                  # never stuck: some event always makes progress
    if version == slots:
      break
    if store.capacity() and rng.random() < 0.5:
      running += store.admit(int(rng.integers(1, b + 1)))
    assert store.stats()["admitted"] <= (eta + version + 1) * b
    if running and rng.random() < 0.5:       # complete a random running group
      ticket = running.pop(int(rng.integers(len(running))))
      for _ in range(g):
        store.push(ticket, FakeTraj(np.arange(4), np.ones(4, bool),
                                    np.full(4, ticket.version, np.int32)))
    try:
      batch = store.take(version, timeout=0)
    except TimeoutError:
      continue
    assert len(batch) == b
    stale = manager_lib.staleness_of(batch, version)
    assert stale.min() >= 0 and stale.max() <= eta
    if eta == 0:            # the synchronous loop: slot `version`, in order
      assert [x.ticket.index for x in batch] == list(range(version * b, (version + 1) * b))
    version += 1
    store.publish(version, None)
  assert version == slots
  assert store.admit(1) == []       # the run's last slot was admitted


# -- the RL stage through the manager ----------------------------------------------------------


def _config(eta=0, objective="ppo", iterations=2):
  c = get_base_config("tiny")
  c.stage = "rl"
  c.model.update(dict(vocab_size=TOK.vocab_size, d_model=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64))
  c.rl.update(dict(env_name="code_single", iterations=iterations, tasks_per_iteration=TASKS,
                   group_size=GROUP, eval_every=0, sandbox_workers=1))
  c.rl.env.update(dict(show_visible_tests=False, tool_timeout_s=2.0))
  c.rl.rollout.update(dict(max_turns=1, max_new_tokens=6, max_observation_tokens=0,
                           env_threads=2))
  c.rl.manager.update(dict(enabled=True, eta=eta))
  c.train.update(dict(loss="tree", objective=objective, batch_size=8, steps=iterations,
                      warmup_steps=0, learning_rate=1e-2, weight_decay=0.0, progress_bar=False,
                      log_every=1, eval_every=0))
  c.tree.update(dict(max_len=512, max_tokens=560, max_nodes=16, max_traj=GROUP))
  return c


@pytest.fixture(scope="module")
def pool():
  with SandboxPool(num_workers=1) as p:
    yield p


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_eta0_gives_exactly_the_synchronous_update(tmp_path, pool):
  config = _config(eta=0)
  sync = rl_loop.RLStage(config, str(tmp_path / "sync"), pool=pool, tokenizer=TOK)
  sync_metrics = [sync.iterate() for _ in range(2)]
  stage = rl_loop.RLStage(config, str(tmp_path / "async"), pool=pool, tokenizer=TOK)
  run = manager_lib.AsyncRL(stage, end_iteration=2)
  try:
    async_metrics = [run.iterate(timeout=300) for _ in range(2)]
  finally:
    run.close()
  assert stage.trainer.step_count == sync.trainer.step_count == 2
  for a, b in zip(_leaves(sync.trainer.params), _leaves(stage.trainer.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(sync_metrics, async_metrics):
    assert a["reward"] == b["reward"] and a["train/loss"] == b["train/loss"]
    assert b["staleness/max"] == 0
  assert run.summary()["max_staleness"] == 0
  sync.close(), stage.close()


def test_a_separate_rollout_slice_with_eta1_is_refused_on_cpu(tmp_path, pool):
  """A sampler on its own device slice stepping while the trainer steps segfaults XLA's CPU
  client (seen reproducibly here): refused with the fix, not crashed."""
  config = _config(eta=1, objective="decoupled_ppo", iterations=3)
  config.train.steps = 3
  config.rl.placement.groups = "all:trainer;4:8:rollout"
  stage = rl_loop.RLStage(config, str(tmp_path / "slice"), pool=pool, tokenizer=TOK)
  try:
    with pytest.raises(ConfigError, match="own device slice.*all:trainer,rollout"):
      manager_lib.AsyncRL(stage, end_iteration=3)
  finally:
    stage.close()


def test_eta1_trains_concurrently_within_the_bound(tmp_path, pool):
  config = _config(eta=1, objective="decoupled_ppo", iterations=3)
  config.train.steps = 3
  config.rl.manager.update(dict(rollout_workers=2, batch_groups=TASKS // 2))
  config.rl.placement.groups = "all:trainer,rollout"
  stage = rl_loop.RLStage(config, str(tmp_path / "eta1"), pool=pool, tokenizer=TOK)
  run = manager_lib.AsyncRL(stage, end_iteration=3)
  run.keep_groups = True
  assert jax.tree.leaves(run.manager.latest()[1])
  try:
    for _ in range(3):
      metrics = run.iterate(timeout=300)
      assert np.isfinite(metrics["train/loss"])
  finally:
    run.close()
  summary = run.summary()
  stale_seen = 0
  for version, groups in run.consumed:
    assert len(groups) == TASKS
    for g in groups:
      for t in g.trajectories:
        v = t.policy_version[t.sampled]
        assert v.size and v.min() >= version - 1 and v.max() <= version
        stale_seen += int((v < version).sum())
  assert stale_seen > 0                    # rollout really ran ahead of training
  assert summary["max_staleness"] == 1 and summary["trained_trajectories"] == 3 * TASKS * GROUP
  for key in ("trainer_idle_fraction", "rollout_idle_fraction"):
    assert 0.0 <= summary[key] <= 1.0, key
  assert summary["trajectories_per_s"] > 0
  assert abs(sum(summary["staleness_histogram"].values()) - 1.0) < 1e-9
  stage.close()


def test_loop_train_runs_through_the_manager(tmp_path, monkeypatch):
  config = _config(eta=1, objective="decoupled_ppo", iterations=1)
  config.rl.manager.enabled = False                  # eta > 0 alone switches it on
  monkeypatch.setattr(rl_loop, "load_tokenizer", lambda config, workdir: TOK)
  result = rl_loop.train(config, str(tmp_path / "train"))
  assert result["iteration"] == 1 and result["step"] == 1
  assert result["manager_trained_trajectories"] == TASKS * GROUP
  assert "manager_trainer_idle_fraction" in result and result["manager_max_staleness"] <= 1


# -- config and placement ----------------------------------------------------------------------


@pytest.mark.parametrize("field,value,needle", [
    ("eta", -1, "config.rl.manager.eta"),
    ("kv_on_resume", "drop", "config.rl.manager.kv_on_resume"),
    ("rollout_workers", 0, "config.rl.manager.rollout_workers"),
])
def test_manager_config_errors_name_the_field(field, value, needle):
  c = _config()
  c.rl.manager[field] = value
  with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
    manager_lib.validate_config(c)


def test_stale_training_requires_decoupled_ppo_and_a_known_executor():
  with pytest.raises(ConfigError, match=r"config\.train\.objective='decoupled_ppo'"):
    manager_lib.validate_config(_config(eta=1, objective="ppo"))
  c = _config()
  c.rl.executor = "dask"
  with pytest.raises(ConfigError, match=r"config\.rl\.executor='dask'"):
    manager_lib.validate_config(c)
  assert not manager_lib.enabled(get_base_config("tiny"))
  assert manager_lib.enabled(_config(eta=0))


def _placement(groups, host="sandbox"):
  return ml_collections.ConfigDict(dict(groups=groups, host_tags=host))


def test_placement_resolves_roles_by_tag():
  devices = jax.devices()
  plan = placement.resolve(placement.default_placement_config())
  assert plan.rollout_shared and plan.trainer.devices == tuple(devices)
  assert plan.rollout_mesh() is None and plan.sandbox.kind == "host"
  plan = placement.resolve(_placement("all:trainer;4:8:rollout"))
  assert not plan.rollout_shared and plan.rollout.devices == tuple(devices[4:8])
  mesh = plan.rollout_mesh()
  assert set(mesh.devices.flat) == set(devices[4:8])
  # Published params land on the rollout devices with the trainer's partition specs.
  x = jax.device_put(jnp.arange(16.0).reshape(8, 2), jax.sharding.NamedSharding(
      jax.make_mesh((8,), ("fsdp",), devices=devices), jax.sharding.PartitionSpec("fsdp")))
  put = plan.params_placer({"w": x.sharding}, mesh)
  y = put({"w": x})["w"]
  assert set(y.devices()) == set(devices[4:8])
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  same = placement.resolve(_placement("all:trainer,rollout")).params_placer(None)({"w": x})["w"]
  assert same is not x and set(same.devices()) == set(devices)


@pytest.mark.parametrize("groups,host,needle", [
    ("all:trainer", "sandbox", "no resource group is tagged 'rollout'"),
    ("0:4:trainer,rollout", "sandbox", "the Trainer builds its mesh over every device"),
    ("all:trainer,rollout", "", "no resource group is tagged 'sandbox'"),
    ("all:trainer,rollout,sandbox", "", "sandbox role runs processes on the host"),
    ("all:trainer;9:12:rollout", "sandbox", "device slice '9:12'"),
    ("all:trainer", "sandbox,rollout", "rollout role runs the model and needs devices"),
])
def test_placement_errors_name_the_field(groups, host, needle):
  with pytest.raises(ConfigError, match="config.rl.placement"):
    try:
      placement.resolve(_placement(groups, host))
    except ConfigError as e:
      assert needle in str(e), str(e)
      raise
