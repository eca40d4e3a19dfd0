"""The RFT stage (kat_jax.rl.rft, kat_jax.rl.rft_loop) in the real code environment: teachers are
verified by the environment; a rollout that copies a teacher gets the top relative reward; a
rollout that deviates past the threshold is stopped at the boundary of the turn that deviated, and
its corrected branch shares its tokens up to the splice (POR > 0), takes the teacher's turn as
untrained context and is graded by the environment; the tree loss of rollouts + branches equals
the flat computation; the teacher-NLL measure is the model's own NLL of the teacher's next turn;
the stage runs and checkpoints through the RL loop; bad settings name the field."""
import dataclasses
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_rollout import ENV_CONFIG, LIMITS, TOK, ScriptedSampler, check_aligned  # noqa: E402

from configs.base import get_base_config  # noqa: E402
from kat_jax.data import chat  # noqa: E402
from kat_jax.data import procedural  # noqa: E402
from kat_jax.data import special_tokens as st  # noqa: E402
from kat_jax.errors import ConfigError  # noqa: E402
from kat_jax.model import intervals_from_segment_ids  # noqa: E402
from kat_jax.rl import envs, rft, rft_loop, rollout  # noqa: E402
from kat_jax.rl import loop as rl_loop  # noqa: E402
from kat_jax.rl.envs import base  # noqa: E402
from kat_jax.sandbox import SandboxPool  # noqa: E402

SOURCES = ("reference", "code_direct", "code_fix")


@pytest.fixture(scope="module")
def pool():
  with SandboxPool(num_workers=2, limits=LIMITS) as sandbox_pool:
    yield sandbox_pool


@pytest.fixture(scope="module")
def task():
  return procedural.generate_tasks(seed=0, num_tasks=1, split="train", levels=(0,))[0]


def make_env(pool):
  return lambda: envs.make("code", ENV_CONFIG, pool=pool)


def rft_config(**monitor):
  c = rft.default_rft_config()
  c.teachers = ",".join(SOURCES)
  c.monitor.update(monitor)
  return c


@pytest.fixture(scope="module")
def teachers(pool, task):
  found, rejected = rft.teachers_for(task, SOURCES, make_env(pool), env_tools=True)
  return found, rejected


def test_teachers_are_verified_and_distinct(pool, teachers, task):
  found, rejected = teachers
  assert [t.name for t in found] == list(SOURCES) and not rejected
  direct, fix = found[1], found[2]
  assert direct.calls == ("run_tests", "submit") and direct.final_code == task.solution
  assert fix.calls == ("run_tests", "run_tests", "submit") and fix.final_code == task.solution
  assert found[0].calls == ("submit",)
  assert len({t.actions for t in found}) == 3
  # Every teacher turn can be spliced, the untrained mutant turn of code_fix too: its ids are
  # chat's rendering of the turn (body, then <|im_end|>).
  assert fix.messages[0].train is False
  for message in direct.messages + fix.messages:
    ids = rollout.assistant_turn_tokens(message, TOK)
    rendered = chat.render(chat.Conversation((message,)), TOK).tokens
    np.testing.assert_array_equal(ids, rendered[len(rendered) - len(ids) - 1:-1])
  # A source that the environment does not pass is reported, never kept.
  broken = dataclasses.replace(task, solution="def nothing():\n  pass\n")
  kept, why = rft.teachers_for(broken, ("reference",), make_env(pool), env_tools=True)
  assert kept == [] and why == {"reference": "not passed"}


class PhasedSampler(ScriptedSampler):
  """``ScriptedSampler`` whose policy also sees which ``start_episode`` call (0: the rollouts,
  1..: the batches of spliced branches) a row belongs to."""

  def __init__(self, policy, max_len):
    self.calls = -1
    super().__init__(lambda i, t: policy(self.calls, i, t), max_len)

  def start_episode(self, prompts, rng):
    self.calls += 1
    return super().start_episode(prompts, rng)


def turn_text(message):
  return chat.render_assistant_body(message) + st.IM_END


def watched(pool, task, teachers, policy, rows, **monitor):
  """``rows`` watched rollouts of ``task`` under ``policy`` (a group of their size)."""
  cfg = rft_config(**monitor)
  sampler = PhasedSampler(policy, max_len=4096)
  monitor = rft.DeviationMonitor(cfg, lambda _: teachers, group_of=lambda s: 0)
  groups = rollout.rollout_groups(sampler, make_env(pool), [task], rows, jax.random.key(0),
                                  rollout_config(), TOK, monitor=monitor)
  return groups[0], monitor, cfg


def rollout_config():
  c = rollout.default_rollout_config()
  c.update(max_turns=4, max_new_tokens=1024, env_threads=1)
  return c


def test_a_rollout_that_copies_a_teacher_gets_the_top_relative_reward(pool, task, teachers):
  found, _ = teachers
  direct, fix = found[1], found[2]
  wrong = f"def {task.entry_point}(*args):\n    return None\n"
  scripts = [direct.messages, fix.messages,
             (chat.Message("assistant", "Submitting.", (rft.toolcall.ToolCall(
                 "submit", {"code": wrong}),)),)]
  group, _, cfg = watched(pool, task, found, lambda call, i, t: turn_text(scripts[i][t]), 3,
                          threshold=1.0)   # nothing is stopped
  top = cfg.reward.test_weight + cfg.reward.similarity_weight
  for traj, teacher in zip(group[:2], (direct, fix)):
    assert traj.status == base.SUBMITTED and traj.grade.passed
    assert tuple(a.removesuffix(st.IM_END) for a in traj.info["actions"]) == teacher.actions
    terms = rft.relative_reward(traj.grade, traj.info["actions"], traj.status, found, cfg.reward)
    assert terms == {"reward": top, "test": 1.0, "similarity": 1.0, "deviated": 0.0}
  bad = group[2]
  terms = rft.relative_reward(bad.grade, bad.info["actions"], bad.status, found, cfg.reward)
  assert terms["test"] == 0.0 and 0.0 < terms["similarity"] < 1.0 and terms["reward"] < top
  # Without a submission the test term is 0, the similarity still counts the calls made.
  none = rft.relative_reward(None, direct.actions[:1], base.MAX_TURNS, found, cfg.reward)
  assert none["test"] == 0.0 and none["reward"] == cfg.reward.similarity_weight * none[
      "similarity"] > 0


def test_deviating_rollouts_stop_at_their_turn_and_corrected_branches_share_the_prefix(
    pool, task, teachers):
  found, _ = teachers
  direct = found[1]
  idle = chat.Message("assistant", "Let me think about something else entirely for a while.")
  junk = chat.Message("assistant", "", (rft.toolcall.ToolCall(
      "run_tests", {"code": "print('hello world')\n" * 3}),))

  def policy(call, i, t):
    if call > 0:                               # every branch: the teacher's next turn
      return turn_text(direct.messages[min(t + 1, 1)])
    return turn_text([direct.messages, (direct.messages[0], idle), (junk, idle)][i][t])

  group, monitor, cfg = watched(pool, task, found, policy, 3, threshold=0.7)
  follows, late, early = group[:3]
  assert follows.status == base.SUBMITTED and "deviation" not in follows.info
  # Row 1 follows the teacher for turn 0 and deviates at turn 1: stopped right after it.
  assert (late.status, late.num_turns, late.info["deviation"]["turn"]) == (base.DEVIATED, 2, 1)
  assert late.info["deviation"]["score"] > 0.7 and late.info["statuses"] == (base.OK, base.NO_ACTION)
  assert late.tokens[-1] == TOK.token_id(st.IM_END) and late.sampled[-1]   # ends on its turn
  assert (early.status, early.info["deviation"]["turn"]) == (base.DEVIATED, 0)
  assert early.num_turns == 1
  branches = group[3:]
  assert [b.info["branch_of"] for b in branches] == [2, 1]   # spliced at turn 0, then turn 1
  assert monitor.stats["stopped"] == 2 and monitor.stats["spliced"] == 2
  for branch in branches:
    check_aligned(branch)
    source = group[branch.info["branch_of"]]
    turn = branch.info["spliced_turn"]
    cut = int(np.flatnonzero((source.turn == turn) & source.sampled)[0])
    np.testing.assert_array_equal(branch.tokens[:cut], source.tokens[:cut])
    np.testing.assert_array_equal(branch.sampled[:cut], source.sampled[:cut])
    assert branch.tokens[cut] != source.tokens[cut] or not np.array_equal(
        branch.tokens[cut:cut + 40], source.tokens[cut:cut + 40])
    spliced = branch.turn == turn
    assert not branch.sampled[spliced].any()       # the teacher's turn is context, not trained
    assert branch.info["finish_reasons"][turn] == "spliced"
    assert branch.info["actions"][turn] == direct.actions[turn]
    assert branch.status == base.SUBMITTED and branch.grade.passed
    tree, stats = rollout.trajectories_to_tree([source, branch])
    assert stats["por"] >= cut / (len(source) + len(branch)) > 0
  # The branch spliced at turn 0 then sampled the teacher's submit itself (trainable tokens).
  assert branches[0].sampled[branches[0].turn == 1].any()
  # Stopped rollouts keep their status and reward: trained on, never dropped.
  for traj in (late, early):
    terms = rft.relative_reward(traj.grade, traj.info["actions"], traj.status, found, cfg.reward)
    assert terms["deviated"] == 1.0 and terms["test"] == 0.0


def test_patience_and_min_turn_delay_the_stop(pool, task, teachers):
  found, _ = teachers
  idle = chat.Message("assistant", "Let me think about something else entirely for a while.")
  policy = lambda call, i, t: turn_text(idle)
  for monitor, turn in ((dict(patience=2), 1), (dict(min_turn=2), 2)):
    group, _, _ = watched(pool, task, found, policy, 1, threshold=0.7, **monitor)
    assert group[0].status == base.DEVIATED and group[0].info["deviation"]["turn"] == turn


# -- the stage: a tiny random model --------------------------------------------------------------

GROUP, TASKS = 2, 8


def stage_config(tree_mode=True, **rft_fields):
  c = get_base_config("tiny")
  c.stage = "rft" if tree_mode else "rl"
  c.model.update(dict(vocab_size=TOK.vocab_size, d_model=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64))
  c.rl.update(dict(env_name="code", iterations=1, tasks_per_iteration=TASKS, group_size=GROUP,
                   tree_mode=tree_mode, eval_every=0, sandbox_workers=1, checkpoint_every=1))
  c.rl.env.update(dict(ENV_CONFIG, with_system_prompt=False, show_visible_tests=False))
  c.rl.rollout.update(dict(max_turns=2, max_new_tokens=8, max_observation_tokens=512,
                           env_threads=2))
  c.rl.rft.teachers = "code_direct"
  c.rl.rft.update(rft_fields)
  c.train.update(dict(loss="tree", objective="ppo", batch_size=8, steps=1, warmup_steps=0,
                      eps=1e-3, learning_rate=1e-2, weight_decay=0.0, progress_bar=False,
                      log_every=1, eval_every=0))
  c.tree.update(dict(max_len=2048, max_tokens=4096, max_nodes=32, max_traj=GROUP + 2))
  return c


def _loss(stage, batch):
  rows = batch["tokens"].shape[0]
  pad = -rows % 8
  if pad:   # weightless copies of the last row (the step's batch divides over 8 devices)
    batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in batch.items()
             if k != "attention_blocks"}
    batch["field/weight"][rows:] = 0
  return stage.trainer.evaluate(lambda: iter([stage._with_layout(batch)]), 1)["loss"]


def test_rft_groups_train_as_one_tree_with_the_flat_loss(tmp_path, pool):
  stage = rft_loop.RFTStage(stage_config(), str(tmp_path / "rft"), pool=pool, tokenizer=TOK)
  groups, _ = stage.collect()
  assert len(groups) == TASKS
  for group, _ in groups:
    main = group[:GROUP]
    # A random model never writes the teacher's run_tests: every rollout stops after turn 0 and
    # gets one corrected branch (the budget is 2 per group).
    assert [t.status for t in main] == [base.DEVIATED] * GROUP
    assert all(t.info["deviation"]["turn"] == 0 for t in main)
    assert [b.info["branch_of"] for b in group[GROUP:]] == list(range(GROUP))
    for t in group:
      assert set(t.reward_terms) == {"reward", "test", "similarity", "deviated"}
  stats = stage.last_rollout_stats
  assert stats["rft/stopped_fraction"] == 1.0 and stats["rft/branches"] == TASKS * GROUP
  rewards = stage.rewards_of(groups)
  assert rewards.shape == (TASKS, GROUP + 2)
  tree_batch, info = stage.build_batch(groups, rewards)
  assert tree_batch["tokens"].shape[0] == TASKS and info["por"] > 0.3
  tree_batch = stage.add_advantages(tree_batch, info)
  flat = rl_loop.RLStage(stage_config(tree_mode=False), str(tmp_path / "flat"), pool=pool,
                         tokenizer=TOK)
  flat_batch, flat_info = flat.build_batch(groups, rewards)
  assert flat_batch["tokens"].shape[0] == sum(len(g) for g, _ in groups)
  flat_batch = flat.add_advantages(flat_batch, flat_info)
  w = tree_batch["field/weight"] > 0
  assert w.any() and np.abs(tree_batch["field/advantage"][w]).max() > 0
  np.testing.assert_allclose(_loss(stage, tree_batch), _loss(flat, flat_batch), rtol=1e-5,
                             atol=1e-7)
  # The teacher-NLL measure: the model's own NLL of a continuation after a context.
  pairs = [(groups[0][0][0].tokens[:300], groups[0][0][0].tokens[300:340]),
           (groups[1][0][0].tokens[:500], groups[1][0][0].tokens[500:510])]
  got = stage.continuation_nll(pairs)
  model, params = stage.trainer.model, stage.trainer.params
  for (context, cont), value in zip(pairs, got):
    tokens = np.repeat(np.concatenate([context, cont])[None], 8, 0)   # one row per device
    positions = np.repeat(np.arange(tokens.shape[1])[None], 8, 0)
    mask = intervals_from_segment_ids(np.ones_like(tokens))
    logits = model.apply({"params": params}, tokens, positions, mask).logits[0]
    logp = jax.nn.log_softmax(logits.astype(np.float32), -1)
    want = -np.mean([logp[len(context) + k - 1, cont[k]] for k in range(len(cont))])
    np.testing.assert_allclose(value, want, rtol=1e-4)
  stage.close(), flat.close()


def test_rft_stage_runs_through_the_rl_loop_and_checkpoints(tmp_path, pool, monkeypatch):
  config = stage_config(monitor=dict(measure="teacher_nll", threshold=1e-3, patience=1,
                                     min_turn=0))
  result = rft_loop.train(config, str(tmp_path / "run"), tokenizer=TOK)
  assert result["iteration"] == 1 and result["step"] == 1
  last = result["history"][-1]
  # Any NLL is above 1e-3 nats: every rollout that had a teacher turn left stops.
  assert last["rft/scored_pairs"] > 0 and last["rft/stopped_fraction"] == 1.0
  assert last["status/deviated"] > 0 and "reward/similarity" in last
  assert os.listdir(result["checkpoint_dir"])


def test_bad_rft_settings_name_the_field(tmp_path, pool):
  cases = [
      (dict(teachers="nobody"), "rl.rft.teachers names 'nobody'"),
      (dict(monitor=dict(measure="vibes", threshold=0.7, patience=1, min_turn=0)),
       "monitor.measure='vibes'"),
  ]
  for fields, message in cases:
    with pytest.raises(ConfigError, match=message):
      rft_loop.validate(stage_config(**fields))
  c = stage_config()
  c.tree.max_traj = GROUP
  with pytest.raises(ConfigError, match="max_traj=4"):
    rft_loop.validate(c)
  c = stage_config()
  c.rl.env_name, c.rl.rft.teachers = "code_single", "code_direct"
  with pytest.raises(ConfigError, match="env_name='code_single'"):
    rft_loop.validate(c)
  c = stage_config()
  c.rl.tree_mode = False
  with pytest.raises(ConfigError, match="tree_mode"):
    rft_loop.validate(c)
