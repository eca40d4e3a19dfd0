"""The RL stage (kat_jax.rl.loop) on a tiny random model and the real code environment: the first
update's ratio is exactly 1 (old log-probs from Trainer.score) and the sampler's T=1 log-probs
agree with them; one update on the same rollouts gives the same params in tree and in flat mode
(grpo, and ppo with a value head and GAE); a group whose rewards are all equal leaves the params
unchanged; the sampler gets the new params without recompiling; the loop's state survives a
checkpoint round trip."""
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data"))
from byte_tokenizer import ByteTokenizer  # noqa: E402

from configs.base import get_base_config  # noqa: E402
from kat_jax.rl import loop as rl_loop  # noqa: E402
from kat_jax.sandbox import SandboxPool  # noqa: E402

TOKENIZER = ByteTokenizer()
GROUP, TASKS = 4, 8   # 8 trees: one per device of the 8-device test mesh


def _config(advantage="grpo", value_head=False, tree_mode=True):
  c = get_base_config("tiny")
  c.stage = "rl"
  c.model.update(dict(vocab_size=TOKENIZER.vocab_size, d_model=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, value_head=value_head))
  c.rl.update(dict(env_name="code_single", iterations=2, tasks_per_iteration=TASKS,
                   group_size=GROUP, tree_mode=tree_mode, eval_every=0, sandbox_workers=1))
  c.rl.env.update(dict(show_visible_tests=False, tool_timeout_s=2.0))
  c.rl.rollout.update(dict(max_turns=1, max_new_tokens=6, max_observation_tokens=0,
                           env_threads=2))
  c.rl.advantage.name = advantage
  # Adam's first step is lr·g / (|g| + eps): with the default eps 1e-8 a near-zero gradient entry
  # gets a ~lr step whose size hangs on its float32 rounding (tree vs flat summation order), so
  # params could differ by ~lr·1e-3 where the gradients agree to 1e-9. eps = 1e-3 keeps the step
  # well-conditioned (linear in g for |g| << eps), so equal params mean equal gradients.
  c.train.update(dict(loss="tree", objective="ppo", batch_size=8, steps=2, warmup_steps=0,
                      eps=1e-3, learning_rate=1e-2, weight_decay=0.0, progress_bar=False, log_every=1,
                      eval_every=0, value_coef=0.5 if value_head else 0.0))
  c.tree.update(dict(max_len=512, max_tokens=560, max_nodes=16, max_traj=GROUP))
  return c


@pytest.fixture(scope="module")
def pool():
  with SandboxPool(num_workers=1) as p:
    yield p


def _stage(config, tmp_path, name, pool):
  return rl_loop.RLStage(config, str(tmp_path / name), pool=pool, tokenizer=TOKENIZER)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_first_ratio_is_one_and_behaviour_logp_matches_score(tmp_path, pool):
  stage = _stage(_config(), tmp_path, "a", pool)
  groups, _ = stage.collect()
  rewards = np.random.default_rng(0).normal(size=(TASKS, GROUP))
  batch, info = stage.build_batch(groups, rewards)
  batch = stage.add_advantages(batch, info)
  w = batch["field/weight"] > 0
  assert w.sum() == TASKS * GROUP * 6
  np.testing.assert_allclose(batch["field/behaviour_logp"][w], batch["field/old_logp"][w],
                             atol=1e-5)
  compiled = stage.sampler._decode._cache_size()
  metrics = stage.update(batch)[0]
  np.testing.assert_allclose(metrics["ratio"], 1.0, atol=1e-6)
  assert metrics["clipped_frac"] == 0.0
  # The sampler samples with the updated params without compiling anything new.
  stage.rollouts(rl_loop.draw_tasks(stage.config, 0, 1, 0, TASKS), jax.random.key(1))
  assert stage.sampler._decode._cache_size() == compiled
  stage.close()


@pytest.mark.parametrize("advantage,value_head", [("grpo", False), ("gae", True)])
def test_tree_and_flat_updates_are_equal(tmp_path, pool, advantage, value_head):
  tree = _stage(_config(advantage, value_head, tree_mode=True), tmp_path, "tree", pool)
  flat = _stage(_config(advantage, value_head, tree_mode=False), tmp_path, "flat", pool)
  for a, b in zip(_leaves(tree.trainer.params), _leaves(flat.trainer.params)):
    np.testing.assert_array_equal(a, b)
  groups, _ = tree.collect()
  rewards = np.random.default_rng(1).normal(size=(TASKS, GROUP))
  for stage in (tree, flat):
    batch, info = stage.build_batch(groups, rewards)
    stage.update(stage.add_advantages(batch, info))
  assert tree.trainer.step_count == flat.trainer.step_count == 1
  for a, b in zip(_leaves(tree.trainer.params), _leaves(flat.trainer.params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(
      _leaves(tree.trainer.params), _leaves(tree.trainer._initial_params())))
  assert moved > 1e-4
  tree.close(), flat.close()


def test_equal_rewards_leave_params_unchanged(tmp_path, pool):
  stage = _stage(_config(), tmp_path, "eq", pool)
  before = _leaves(stage.trainer.params)
  groups, _ = stage.collect()
  batch, info = stage.build_batch(groups, np.full((TASKS, GROUP), 0.7))
  batch = stage.add_advantages(batch, info)
  assert not batch["field/advantage"].any()
  stage.update(batch)
  for a, b in zip(before, _leaves(stage.trainer.params)):
    np.testing.assert_array_equal(a, b)
  stage.close()


def test_iteration_metrics_and_loop_state_round_trip(tmp_path, pool):
  config = _config()
  config.rl.filter.dynamic_sampling = True
  config.rl.filter.max_sampling_rounds = 2
  stage = _stage(config, tmp_path, "it", pool)
  metrics = stage.iterate()
  for key in ("reward", "pass_rate", "por", "rollout_s", "env_s", "score_s", "train_s",
              "reward/compile", "advantage/std", "sampling_rounds"):
    assert key in metrics, key
  assert 0.0 < metrics["por"] < 1.0
  stage.trainer.save(stage.extra_state(), force=True)
  saved = stage.extra_state()
  stage.close()
  again = _stage(config, tmp_path, "it", pool)
  assert again.extra_state() == saved and again.iteration == 1
  for a, b in zip(_leaves(stage.trainer.params), _leaves(again.trainer.params)):
    np.testing.assert_array_equal(a, b)
  again.close()


def test_compacted_pruned_update_equals_the_masked_one(tmp_path, pool):
  """rl.prune (host pruning + compaction: score and train see only the kept tokens) gives the same
  update as config.train.prune (the same keep mask gating the loss inside the step) on the same
  rollouts, with fewer tree tokens in the batch."""
  def config(where):
    c = _config()
    c.rl.rollout.max_new_tokens = 16
    prune = c.rl.prune if where == "rl" else c.train.prune
    prune.update(dict(enabled=True, budget_fraction=0.9))
    return c
  compacted = _stage(config("rl"), tmp_path, "compacted", pool)
  masked = _stage(config("train"), tmp_path, "masked", pool)
  groups, _ = compacted.collect()
  rewards = np.random.default_rng(2).normal(size=(TASKS, GROUP))
  batch, info = compacted.build_batch(groups, rewards)
  small = compacted.prepare(batch, info)
  assert info["prune"]["kept_fraction"] < 0.95
  assert small["tokens"].shape[1] < batch["tokens"].shape[1]
  assert small["token_valid"].sum() < batch["token_valid"].sum()
  assert (small["field/weight"] > 0).sum() > 0      # some sampled tokens survive the budget
  [m_small] = compacted.update(small)
  full, full_info = masked.build_batch(groups, rewards)
  [m_full] = masked.update(masked.add_advantages(full, full_info))
  np.testing.assert_allclose(m_small["loss"], m_full["loss"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m_full["prune/kept_fraction"], info["prune"]["kept_fraction"],
                             rtol=1e-5)
  for a, b in zip(_leaves(compacted.trainer.params), _leaves(masked.trainer.params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  with pytest.raises(rl_loop.ConfigError, match="rl.prune.enabled and config.train.prune"):
    c = config("rl")
    c.train.prune.enabled = True
    rl_loop.validate(c)
  compacted.close(), masked.close()
