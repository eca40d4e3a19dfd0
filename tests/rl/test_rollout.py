"""The agent loop (``kat_jax.rl.rollout``): token-in / token-out trajectories of a real sampler are
the prompt, the sampled ids and chat's rendering of each observation, exactly; the recorded
behaviour log-probs are those of a full forward pass; a scripted policy on the ``code`` env gives
the very tokens, loss mask and event tags of ``chat.render`` of the conversation, reaches
``submitted`` with the kat_composite reward, and builds one tree per task; the loop's limits end
episodes with their statuses; a fuzz of 1,000 episodes of malformed, hostile and failing turns
(and a flaky environment and a NaN reward) never crashes the loop and records every fault."""
import dataclasses
import json
import math
import os
import random
import re
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "data"))
from byte_tokenizer import ByteTokenizer  # noqa: E402

from kat_jax.data import chat  # noqa: E402
from kat_jax.data import procedural  # noqa: E402
from kat_jax.data import special_tokens as st  # noqa: E402
from kat_jax.data.chat import Message  # noqa: E402
from kat_jax.data.toolcall import ToolCall  # noqa: E402
from kat_jax.errors import ConfigError  # noqa: E402
from kat_jax.model import ModelConfig, Transformer, get_preset  # noqa: E402
from kat_jax.model import intervals_from_segment_ids  # noqa: E402
from kat_jax.rl import envs, rewards, rollout  # noqa: E402
from kat_jax.rl.envs import base  # noqa: E402
from kat_jax.sample import Episode, SampleOutput, Sampler, sampling_log_probs  # noqa: E402
from kat_jax.sandbox import Limits, SandboxPool  # noqa: E402
from kat_jax.tree import sampled as sampled_tags  # noqa: E402

ATOL = 1e-5
# Tight sandbox limits: the machine is shared (as in tests/rl/test_env_code.py).
LIMITS = Limits(wall_time_s=3.0, cpu_time_s=2, memory_bytes=256 << 20, max_processes=8,
                file_size_bytes=1 << 20, disk_bytes=4 << 20, disk_inodes=128, open_files=64,
                output_bytes=1 << 20, capture_bytes=4096)
ENV_CONFIG = {"tool_timeout_s": 0.5, "max_observation_chars": 800}


TOK = ByteTokenizer()   # decodes a random model's invalid UTF-8 with replacement characters
IM_END = TOK.token_id(st.IM_END)
NEWLINE = TOK.encode("\n")
_SPECIALS = re.compile("(" + "|".join(re.escape(s) for s in st.ALL) + ")")


def model_ids(text):
  """The ids a model writes for ``text``: special-token strings as their one id, as chat renders
  them, bytes otherwise."""
  ids = []
  for part in _SPECIALS.split(text):
    ids += [TOK.token_id(part)] if part in st.ALL else TOK.encode(part)
  return ids


def call(name, **arguments):
  return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


# -- a host-side sampler with a scripted policy, and a recorder of any sampler -----------------


class ScriptedSampler:
  """``Sampler``'s episode API on the host: row i's turn t is ``policy(i, t)`` as model ids, cut
  like the real sampler after a stop id ("stop_token"), at ``max_new_tokens`` ("length") or where
  the cache is full ("max_len"); its log-probs and entropies are seeded random numbers."""

  def __init__(self, policy, max_len, seed=0):
    self.policy, self.max_len = policy, max_len
    self.rng = np.random.default_rng(seed)

  def start_episode(self, prompts, rng):
    for i, p in enumerate(prompts):
      if not 1 <= len(p) < self.max_len:
        raise ValueError(f"prompt {i} has {len(p)} tokens; max_len={self.max_len}")
    return Episode(state=None, base_keys=rng, contexts=tuple(np.asarray(p, np.int32)
                                                             for p in prompts),
                   end_reasons=(None,) * len(prompts), turn=0)

  def generate_turn(self, episode, config, tokenizer=None):
    b, n = episode.num_rows, config.max_new_tokens
    tokens = np.zeros((b, n), np.int32)
    values = {k: np.zeros((b, n), np.float32) for k in ("lp", "ent", "lpp", "entp")}
    lengths, reasons, contexts, ends = np.zeros(b, np.int32), [], [], []
    for i, (context, end) in enumerate(zip(episode.contexts, episode.end_reasons)):
      if end is not None:
        reasons.append(end)
        contexts.append(context)
        ends.append(end)
        continue
      ids = model_ids(self.policy(i, episode.turn))
      stop = next((k for k, t in enumerate(ids) if t in config.stop_token_ids), None)
      reason = "stop_token" if stop is not None and stop < n else "length"
      ids = ids[:stop + 1] if reason == "stop_token" else ids[:n]
      room = self.max_len - len(context)
      if len(ids) >= room:
        ids, reason, end = ids[:room], "max_len", "max_len"
      k = len(ids)
      tokens[i, :k], lengths[i] = ids, k
      for name, draw in (("lpp", -self.rng.exponential(2.0, k)), ("entp", self.rng.random(k) * 3),
                         ("lp", -self.rng.exponential(1.0, k)), ("ent", self.rng.random(k))):
        values[name][i, :k] = draw
      reasons.append(reason)
      contexts.append(np.concatenate([context, tokens[i, :k]]))
      ends.append(end)
    out = SampleOutput(tokens=tokens, logprobs=values["lp"], entropies=values["ent"],
                       logprobs_policy=values["lpp"], entropies_policy=values["entp"],
                       lengths=lengths, finish_reason=reasons,
                       texts=[TOK.decode(tokens[i, :lengths[i]]) for i in range(b)])
    return dataclasses.replace(episode, contexts=tuple(contexts), end_reasons=tuple(ends),
                               turn=episode.turn + 1), out

  def extend(self, episode, new_tokens):
    assert len(new_tokens) == episode.num_rows
    contexts, ends = [], []
    for i, (tokens, context, end) in enumerate(zip(new_tokens, episode.contexts,
                                                   episode.end_reasons)):
      if tokens is None:
        end = end or "inactive"
      else:
        assert end != "inactive", f"tokens for row {i}, whose episode ended"
        if end is None and len(context) + len(tokens) > self.max_len - 1:
          end = "max_len"
        if end is None:
          context = np.concatenate([context, np.asarray(tokens, np.int32)])
      contexts.append(context)
      ends.append(end)
    return dataclasses.replace(episode, contexts=tuple(contexts), end_reasons=tuple(ends))


class Recording:
  """Wraps a sampler and records what the loop asked of it and what it answered."""

  def __init__(self, sampler):
    self.sampler, self.max_len = sampler, sampler.max_len
    self.prompts, self.turns, self.extends, self.contexts, self.configs = [], [], [], None, []

  def start_episode(self, prompts, rng):
    self.prompts = [np.asarray(p, np.int32) for p in prompts]
    episode = self.sampler.start_episode(prompts, rng)
    self.contexts = episode.contexts
    return episode

  def generate_turn(self, episode, config, tokenizer=None):
    episode, out = self.sampler.generate_turn(episode, config, tokenizer)
    self.turns.append(out)
    self.configs.append(config)
    self.contexts = episode.contexts
    return episode, out

  def extend(self, episode, new_tokens):
    self.extends.append([None if t is None else np.asarray(t, np.int32) for t in new_tokens])
    episode = self.sampler.extend(episode, new_tokens)
    self.contexts = episode.contexts
    return episode

  def segments(self, j):
    """Sampler row j as recorded: [(kind, turn, ids)], kind 'prompt' | 'sampled' | 'appended'."""
    out = [("prompt", -1, self.prompts[j])]
    for t, turn in enumerate(self.turns):
      n = int(turn.lengths[j])
      if n:
        out.append(("sampled", t, turn.tokens[j, :n]))
      if t < len(self.extends) and self.extends[t][j] is not None and len(self.extends[t][j]):
        out.append(("appended", t, self.extends[t][j]))
    return out


def check_aligned(traj):
  """Every per-token array has the trajectory's length and the documented dtype."""
  for name, dtype in (("sampled", np.bool_), ("logp_policy", np.float32),
                      ("logp_sampling", np.float32), ("entropy", np.float32),
                      ("event_tag", np.int8), ("turn", np.int16), ("policy_version", np.int32)):
    array = getattr(traj, name)
    assert array.shape == traj.tokens.shape and array.dtype == dtype, name
  assert traj.tokens.dtype == np.int32
  off = ~traj.sampled
  for name in ("logp_policy", "logp_sampling", "entropy", "policy_version"):
    assert not getattr(traj, name)[off].any(), f"{name} is set on tokens not sampled"
  assert math.isfinite(traj.reward) and all(math.isfinite(v) for v in traj.reward_terms.values())


def chat_suffix(messages):
  """What ``chat.render_prompt`` appends after an assistant turn for ``messages`` (token level,
  independently of rollout's own rendering): tokens and event tags."""
  head = (Message("system", "S"), Message("user", "U"), Message("assistant", "A"))
  before = chat.render(chat.Conversation(head), TOK).tokens
  after = chat.render_prompt(chat.Conversation(head + tuple(messages)), TOK)
  np.testing.assert_array_equal(after.tokens[:len(before)], before)
  return after.tokens[len(before):], after.event_tags[len(before):]


def rollout_config(**overrides):
  cfg = rollout.default_rollout_config()
  cfg.update(overrides)
  return cfg


# -- environments for the tests ---------------------------------------------------------------

GRADE = base.Grade(passed=False, compiled=True, tests_passed=1, tests_total=2)


class EchoEnv(base.Environment):
  """Scripted, no sandbox: turn 0 is answered by two tool results (one an error), turn 1 by a
  user nudge, turn 2 is graded (GRADE); the task "stop" is graded at once; "long" answers each
  turn with one tool result of 5,000 characters; "forever" never ends."""

  def reset(self, task):
    self.task, self.turn, self.results = task, 0, []
    return base.Observation((Message("system", "You are a test agent."),
                             Message("user", f"Task {task}.")))

  def step(self, action):
    turn, self.turn = self.turn, self.turn + 1
    if self.task == "long":
      text = "HEAD-" + "".join(chr(97 + i % 26) for i in range(4990)) + "-TAIL"
      result = base.StepResult(base.Observation((chat.tool_result(text, name="echo"),)), False,
                               base.OK)
    elif self.task == "forever":
      result = base.StepResult(base.Observation((Message("user", "Again."),)), False,
                               base.NO_ACTION)
    elif self.task == "stop" or turn == 2:
      result = base.StepResult(base.Observation((Message("user", "Graded."),)), True,
                               base.SUBMITTED, info={"grade": GRADE})
    elif turn == 0:
      result = base.StepResult(base.Observation((
          chat.tool_result(f"read {len(action)} characters", name="echo"),
          chat.tool_result("no such file", name="echo", is_error=True))), False, base.OK,
          info={"calls": ("echo", "echo")})
    else:
      result = base.StepResult(base.Observation((Message("user", "Keep going."),)), False,
                               base.NO_ACTION)
    self.results.append(result)
    return result


# -- (a), (b): a real model ---------------------------------------------------------------------


def _numpy_init(abstract, seed=0):
  """Random params like the model's initializers, drawn with numpy (compiling init costs more)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape) * a.shape[0] ** -0.5 if a.ndim > 1
                            else np.ones(a.shape), a.dtype), abstract)


MODEL_TASKS = ["a", "stop", "b", "c"]


@pytest.fixture(scope="module")
def model_run():
  """One rollout of a tiny random model (T = 0.7, top-p 0.9) on EchoEnv, recorded."""
  c = get_preset("tiny")
  c.update(dict(vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, mlp_dim=128))
  model = Transformer(ModelConfig.from_config(c))
  t = jnp.zeros((1, 8), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), t, t, intervals_from_segment_ids(jnp.ones((1, 8), jnp.int32)))["params"])
  params = _numpy_init(nn.unbox(abstract))
  sampler = Recording(Sampler(model, params, max_len=256, prefill_bucket=64, output_bucket=8,
                              extend_bucket=64))
  env_list = [EchoEnv() for _ in MODEL_TASKS]
  cfg = rollout_config(max_turns=3, max_new_tokens=8, temperature=0.7, top_p=0.9)
  trajs = rollout.rollout(sampler, env_list, MODEL_TASKS, jax.random.key(3), cfg, TOK,
                          policy_version=5)

  @jax.jit
  def forward(tokens_bt, lengths_b):
    seg = (jnp.arange(tokens_bt.shape[1])[None] < lengths_b[:, None]).astype(jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    return model.apply({"params": params}, tokens_bt, pos, intervals_from_segment_ids(seg)).logits

  return sampler, env_list, trajs, forward


def test_trajectories_are_the_prompt_sampled_ids_and_chats_observations_exactly(model_run):
  sampler, env_list, trajs, _ = model_run
  assert [t.task_id for t in trajs] == MODEL_TASKS
  for j, (traj, env) in enumerate(zip(trajs, env_list)):
    check_aligned(traj)
    np.testing.assert_array_equal(traj.tokens, sampler.contexts[j])    # the cache, as it is
    segments = sampler.segments(j)
    np.testing.assert_array_equal(traj.tokens, np.concatenate([ids for _, _, ids in segments]))
    prompt = chat.render_prompt(chat.Conversation(EchoEnv().reset(MODEL_TASKS[j]).messages),
                                TOK)
    np.testing.assert_array_equal(segments[0][2], prompt.tokens)
    assert traj.prompt_len == len(prompt.tokens)
    np.testing.assert_array_equal(traj.event_tag[:traj.prompt_len], prompt.event_tags)
    np.testing.assert_array_equal(traj.turn[:traj.prompt_len], -1)
    offset, turns = 0, 0
    for kind, turn, ids in segments:
      span = slice(offset, offset + len(ids))
      assert traj.sampled[span].all() == (kind == "sampled") and traj.sampled[span].any() == (
          kind == "sampled")
      np.testing.assert_array_equal(traj.turn[span], turn)
      if kind == "sampled":
        out = sampler.turns[turn]
        np.testing.assert_array_equal(traj.logp_policy[span], out.logprobs_policy[j, :len(ids)])
        np.testing.assert_array_equal(traj.logp_sampling[span], out.logprobs[j, :len(ids)])
        np.testing.assert_array_equal(traj.entropy[span], out.entropies_policy[j, :len(ids)])
        np.testing.assert_array_equal(traj.policy_version[span], 5)
        np.testing.assert_array_equal(traj.event_tag[span], sampled_tags.event_tags(
            ids, sampled_tags.event_span_ids(TOK)))
        last_sampled = ids
        turns += 1
      elif kind == "appended":
        # Closing tokens, then the observation exactly as chat renders it after a turn.
        close = NEWLINE if last_sampled[-1] == IM_END else [IM_END] + NEWLINE
        suffix, tags = chat_suffix(env.results[turn].observation.messages)
        np.testing.assert_array_equal(ids, np.concatenate([close, suffix]))
        np.testing.assert_array_equal(traj.event_tag[span][len(close):], tags)
      offset += len(ids)
    assert turns == traj.num_turns == len(traj.info["finish_reasons"])
    assert traj.sampled.sum() == sum(int(out.lengths[j]) for out in sampler.turns)
  stop = trajs[MODEL_TASKS.index("stop")]
  assert (stop.status, stop.num_turns, stop.info["statuses"]) == (base.SUBMITTED, 1,
                                                                 (base.SUBMITTED,))
  for traj in trajs:
    if traj is not stop:
      assert (traj.status, traj.num_turns) == (base.SUBMITTED, 3)
      assert traj.info["statuses"] == (base.OK, base.NO_ACTION, base.SUBMITTED)
      assert traj.info["env_infos"][0] == {"calls": ("echo", "echo")}
  for traj in trajs:
    assert traj.grade == GRADE
    assert traj.reward_terms == rewards.score(GRADE) and traj.reward == pytest.approx(0.65)
  # The row that ended first sampled nothing after its turn 0.
  assert all(out.lengths[1] == 0 and out.finish_reason[1] == "inactive"
             for out in sampler.turns[1:])
  assert sampler.configs[0].stop_token_ids == (IM_END, TOK.eos_id)
  assert sampler.configs[0].vocab_limit == TOK.vocab_size


def test_behaviour_logprobs_equal_a_full_forward_pass(model_run):
  sampler, _, trajs, forward = model_run
  config = sampler.configs[0]
  width = sampler.max_len
  tokens = np.zeros((len(trajs), width), np.int32)
  for i, t in enumerate(trajs):
    tokens[i, :len(t)] = t.tokens
  logits = np.asarray(forward(jnp.asarray(tokens), jnp.asarray([len(t) for t in trajs])))
  gaps = []
  for i, t in enumerate(trajs):
    at = np.flatnonzero(t.sampled)
    assert at.min() >= t.prompt_len
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[i, at - 1]), axis=-1))
    np.testing.assert_allclose(t.logp_policy[at], logp[np.arange(len(at)), t.tokens[at]],
                               atol=ATOL)
    np.testing.assert_allclose(t.entropy[at], -(np.exp(logp) * logp).sum(-1), atol=ATOL)
    pi = np.asarray(sampling_log_probs(jnp.asarray(logits[i, at - 1]), config))
    np.testing.assert_allclose(t.logp_sampling[at], pi[np.arange(len(at)), t.tokens[at]],
                               atol=ATOL)
    gaps.append(np.abs(t.logp_policy[at] - t.logp_sampling[at]).max())
  assert max(gaps) > 0.05        # T = 0.7 / top-p: two different quantities, both recorded


# -- (c): a scripted policy on the code environment ---------------------------------------------


@pytest.fixture(scope="module")
def pool():
  with SandboxPool(num_workers=2, limits=LIMITS) as sandbox_pool:
    yield sandbox_pool


@pytest.fixture(scope="module")
def tasks():
  return procedural.generate_tasks(seed=0, num_tasks=8, split="train", levels=(0,))


class RecordingEnv(base.Environment):
  """Keeps the opening observation and every step result of the environment it wraps."""

  def __init__(self, env):
    self.env, self.results = env, []

  def reset(self, task):
    self.results = []
    self.opening = self.env.reset(task)
    return self.opening

  def step(self, action):
    self.results.append(self.env.step(action))
    return self.results[-1]


def assistant(content, *calls):
  return Message("assistant", content, tuple(ToolCall(name, args) for name, args in calls))


def test_scripted_code_episodes_render_exactly_and_reach_submitted(pool, tasks):
  task = tasks[0]
  wrong = f"def {task.entry_point}(*args):\n  return None\n"
  scripts = [
      [assistant("Let me run both.", ("run_tests", {"code": wrong}),
                 ("run_tests", {"code": task.solution})),
       assistant("", ("submit", {"code": task.solution}))],        # parallel calls, then submit
      [assistant("Submitting.", ("submit", {"code": task.solution}))],
      [assistant("Thinking.")] * 3,                                 # no action until max_turns
  ]
  policy = lambda i, t: chat.render_assistant_body(scripts[i][t]) + st.IM_END
  sampler = Recording(ScriptedSampler(policy, max_len=4096))
  env_list = [RecordingEnv(envs.make("code", ENV_CONFIG, pool=pool)) for _ in scripts]
  cfg = rollout_config(max_turns=3, max_new_tokens=512)
  trajs = rollout.rollout(sampler, env_list, [task] * 3, jax.random.key(0), cfg, TOK,
                          policy_version=7)
  parallel, direct, idle = trajs
  assert (parallel.status, parallel.info["statuses"]) == (base.SUBMITTED,
                                                          (base.OK, base.SUBMITTED))
  assert parallel.info["env_infos"][0]["calls"] == ("run_tests", "run_tests")
  first, second = env_list[0].results[0].observation.messages
  assert first.content.startswith("2 of 2 visible tests failed.") or first.content.startswith(
      "1 of 2 visible tests failed.")
  assert second.content.startswith("All 2 visible tests passed.")
  assert (direct.status, direct.num_turns) == (base.SUBMITTED, 1)
  for traj in (parallel, direct):
    assert traj.grade.passed and traj.grade.compiled
    assert traj.reward_terms == rewards.score(traj.grade, cfg.reward)
    assert traj.reward_terms == {"reward": 1.0, "compile": 1.0, "test": 1.0, "complexity": 1.0}
  assert (idle.status, idle.num_turns, idle.grade) == (base.MAX_TURNS, 3, None)
  assert idle.info["statuses"] == (base.NO_ACTION,) * 3
  assert idle.reward_terms == {"reward": 0.0, "compile": 0.0, "test": 0.0, "complexity": 0.0}
  # Token for token, mask for mask, tag for tag: chat.render of the conversation (whose last
  # turn's trailing newline was never appended).
  for i, (traj, env) in enumerate(zip(trajs, env_list)):
    check_aligned(traj)
    messages = list(env.opening.messages)
    for t in range(traj.num_turns):
      messages.append(scripts[i][t])
      if t + 1 < traj.num_turns:
        messages += env.results[t].observation.messages
    rendered = chat.render(chat.Conversation(messages, tools=env.opening.tools), TOK)
    np.testing.assert_array_equal(traj.tokens, rendered.tokens[:-1])
    np.testing.assert_array_equal(traj.sampled, rendered.loss_mask[:-1])
    np.testing.assert_array_equal(traj.event_tag, rendered.event_tags[:-1])
    assert (traj.event_tag == chat.EventTag.TOOL_CALL).any() == (i < 2)
    assert (traj.event_tag == chat.EventTag.TOOL_RESULT).any() == (i == 0)
    np.testing.assert_array_equal(traj.policy_version[traj.sampled], 7)
    np.testing.assert_array_equal(traj.tokens, sampler.contexts[i])
    sampled_values = np.concatenate([out.logprobs_policy[i, :out.lengths[i]]
                                     for out in sampler.turns])
    np.testing.assert_array_equal(traj.logp_policy[traj.sampled], sampled_values)
  # One tree for the task's group: the realized prefix overlap is that of the token tries.
  tree, stats = rollout.trajectories_to_tree(trajs)
  prefixes = {tuple(t.tokens[:k + 1].tolist()) for t in trajs for k in range(len(t))}
  assert stats["n_tree"] == len(prefixes) and stats["n_flat"] == sum(len(t) for t in trajs)
  assert stats["por"] == pytest.approx(1 - len(prefixes) / stats["n_flat"]) == tree.por
  assert stats["por"] > 0.8 * min(t.prompt_len for t in trajs) * 2 / stats["n_flat"]
  for k, traj in enumerate(trajs):
    n = len(traj)
    np.testing.assert_array_equal(tree.trajectory_tokens(k), traj.tokens)
    np.testing.assert_array_equal(tree.tags[tree.row_map[k, :n]], traj.event_tag)
    np.testing.assert_array_equal(tree.fields["weight"][k, :n], traj.sampled)
    np.testing.assert_array_equal(tree.fields["logp_policy"][k, :n], traj.logp_policy)
    np.testing.assert_array_equal(tree.fields["entropy"][k, :n], traj.entropy)
    np.testing.assert_array_equal(tree.fields["turn"][k, :n], traj.turn)
  with pytest.raises(ValueError, match="one task"):
    rollout.trajectories_to_tree([trajs[0], dataclasses.replace(trajs[1], task_id="other")])


# -- (e): limits ----------------------------------------------------------------------------


def run_echo(tasks_, policy, *, max_len=1024, **overrides):
  sampler = Recording(ScriptedSampler(policy, max_len=max_len))
  env_list = [EchoEnv() for _ in tasks_]
  trajs = rollout.rollout(sampler, env_list, tasks_, jax.random.key(0),
                          rollout_config(**overrides), TOK)
  for traj in trajs:
    check_aligned(traj)
  return sampler, env_list, trajs


def prompt_len(task):
  return len(chat.render_prompt(chat.Conversation(EchoEnv().reset(task).messages), TOK).tokens)


def test_max_turns_ends_an_episode_that_never_submits():
  _, _, [traj] = run_echo(["forever"], lambda i, t: f"turn {t}<|im_end|>", max_turns=4)
  assert (traj.status, traj.num_turns, traj.grade) == (base.MAX_TURNS, 4, None)
  assert traj.info["statuses"] == (base.NO_ACTION,) * 4
  assert traj.info["finish_reasons"] == ("stop_token",) * 4
  assert traj.tokens[-1] == IM_END and traj.sampled[-1]       # ends with the last sampled turn
  assert traj.reward == 0.0


def test_context_exhausted_when_the_cache_fills_or_a_limit_is_reached():
  short, long_task = "forever", "forever-" + "x" * 100
  n = prompt_len(short)
  # The sampler's cache fills during turn 0: the env never sees the cut turn.
  _, _, [traj] = run_echo([short], lambda i, t: "y" * 50 + "<|im_end|>", max_len=n + 20)
  assert (traj.status, traj.info["statuses"], traj.info["finish_reasons"]) == (
      base.CONTEXT_EXHAUSTED, (), ("max_len",))
  assert len(traj) == n + 20 and traj.sampled.sum() == 20
  # A turn runs past max_context_tokens: cut at the limit, the env not stepped.
  _, _, [traj] = run_echo([short], lambda i, t: "y" * 30 + "<|im_end|>", max_context_tokens=n + 10)
  assert (traj.status, traj.info["statuses"], len(traj)) == (base.CONTEXT_EXHAUSTED, (), n + 10)
  assert traj.sampled.sum() == 10 and traj.num_turns == 1
  # The observation does not fit: the env was stepped, nothing was appended.
  sampler, _, [traj] = run_echo([short], lambda i, t: "ok<|im_end|>", max_context_tokens=n + 12)
  assert (traj.status, traj.info["statuses"]) == (base.CONTEXT_EXHAUSTED, (base.NO_ACTION,))
  assert len(traj) == n + 3 and traj.info["observation_tokens"] > 8
  assert sampler.extends == []
  # A prompt that leaves no room: no turn for it, while the other row of the batch runs.
  limit = prompt_len(long_task)
  sampler, _, (ok, full) = run_echo([short, long_task], lambda i, t: "ok<|im_end|>",
                                    max_context_tokens=limit, max_turns=2)
  assert len(sampler.prompts) == 1                             # only the short row was sampled
  assert (full.status, full.num_turns, full.info["prompt_tokens"]) == (
      base.CONTEXT_EXHAUSTED, 0, limit)
  assert len(full) == limit and not full.sampled.any()
  assert (ok.status, ok.num_turns) == (base.MAX_TURNS, 2)


def test_an_overlong_observation_is_cut_in_the_middle_with_a_marker():
  sampler, env_list, [traj] = run_echo(["long"], lambda i, t: "go<|im_end|>", max_turns=2,
                                       max_observation_tokens=300)
  assert traj.status == base.MAX_TURNS and traj.info["observation_cut"] == (0,)
  [chunk] = [ids for kind, _, ids in sampler.segments(0) if kind == "appended"]
  assert len(chunk) == 1 + 300                                  # "\n" closes, then 300 tokens
  text = TOK.decode(chunk)
  marker = rollout.OBSERVATION_CUT.format(total=5000, limit=300)
  assert text.startswith("\n<|im_start|>user\n<tool_response>\nHEAD-abc")
  assert text.endswith("uvwx-TAIL\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
  head, tail = text.split(marker)
  assert len(head) > len(tail) > 50
  # The cut observation is chat's rendering of the cut message.
  content = head.split("<tool_response>\n", 1)[1] + marker + tail.split("\n</tool_response>")[0]
  suffix, _ = chat_suffix([chat.tool_result(content, name="echo")])
  np.testing.assert_array_equal(chunk[1:], suffix)
  assert len(env_list[0].results[0].observation.messages[0].content) == 5000


def test_an_appended_closing_token_is_tagged_as_a_sampled_one_would_be():
  """A turn cut inside a tool call and closed by the loop shares its tokens with one that sampled
  the same <|im_end|>: their event tags agree, so both go into one tree."""
  turns = ["<tool_call>\n{\"name\": \"x\"", "done<|im_end|>"]
  n = len(model_ids(turns[0]))
  cut = run_echo(["forever"], lambda i, t: turns[t], max_turns=2, max_new_tokens=n)[2][0]
  whole = run_echo(["forever"], lambda i, t: turns[t] + ("<|im_end|>" if t == 0 else ""),
                   max_turns=2, max_new_tokens=n + 1)[2][0]
  np.testing.assert_array_equal(cut.tokens, whole.tokens)
  at = cut.prompt_len + n                                       # the <|im_end|> of turn 0
  assert cut.tokens[at] == IM_END and whole.sampled[at] and not cut.sampled[at]
  assert cut.info["finish_reasons"][0] == "length"
  assert whole.info["finish_reasons"][0] == "stop_token"
  np.testing.assert_array_equal(cut.event_tag, whole.event_tag)
  assert cut.event_tag[at] == chat.EventTag.TOOL_CALL
  tree, stats = rollout.trajectories_to_tree([cut, whole])
  assert stats["n_tree"] == len(cut) and stats["por"] == 0.5
  np.testing.assert_array_equal(tree.fields["weight"][:, at], [0.0, 1.0])


class FailingEnv(EchoEnv):
  def reset(self, task):
    if task == "broken":
      raise ConnectionError("no workspace")
    return super().reset(task)

  def step(self, action):
    if self.turn == 1:
      raise KeyError("boom")
    return super().step(action)


def _nan_reward(grade, cfg):
  return {"reward": float("nan"), "test": 0.0}


if "test_nan" not in rewards.names():
  rewards.register("test_nan", _nan_reward)


def test_environment_errors_and_bad_rewards_are_recorded_not_raised():
  sampler = ScriptedSampler(lambda i, t: "go<|im_end|>", max_len=1024)
  cfg = rollout_config(max_turns=3)
  trajs = rollout.rollout(sampler, [FailingEnv(), FailingEnv()], ["a", "broken"],
                          jax.random.key(0), cfg, TOK)
  step_failed, reset_failed = trajs
  assert (step_failed.status, step_failed.num_turns) == (base.ENV_ERROR, 2)
  assert step_failed.info["statuses"] == (base.OK,)
  assert step_failed.info["env_error"].startswith("step: KeyError: 'boom' (at ")
  assert step_failed.tokens[-1] == IM_END and step_failed.sampled[-1]
  assert (reset_failed.status, len(reset_failed), reset_failed.num_turns) == (base.ENV_ERROR, 0, 0)
  assert reset_failed.info["env_error"].startswith("reset: ConnectionError: no workspace")
  _, stats = rollout.trajectories_to_tree([step_failed,
                                           dataclasses.replace(reset_failed, task_id="a")])
  assert (stats["num_traj"], stats["dropped"]) == (1, 1)
  with pytest.raises(ValueError, match="empty"):
    rollout.trajectories_to_tree([reset_failed])
  # A NaN reward is refused by rewards.score: the episode scores 0, with the reason.
  cfg.reward.name = "test_nan"
  [traj] = rollout.rollout(ScriptedSampler(lambda i, t: "go<|im_end|>", max_len=1024),
                           [EchoEnv()], ["stop"], jax.random.key(0), cfg, TOK)
  assert traj.status == base.SUBMITTED and traj.grade == GRADE
  assert traj.reward_terms == {"reward": 0.0}
  assert "reward: ValueError: reward term 'reward' of task 'stop' is nan" in traj.info[
      "reward_error"]


def test_bad_arguments_and_config_fail_at_once():
  sampler = ScriptedSampler(lambda i, t: "go<|im_end|>", max_len=64)
  good = rollout_config()
  cases = [(dict(max_context_tokens=65), r"max_context_tokens=65 must be an int in \[0, 64\]"),
           (dict(max_turns=0), r"max_turns=0 must be an int in \[1, 32767\]"),
           (dict(top_p=0.0), r"top_p=0.0 must be a number in \(0, 1\]"),
           (dict(env_threads=0), r"env_threads=0 must be an int >= 1")]
  for overrides, message in cases:
    with pytest.raises(ConfigError, match=message):
      rollout.rollout(sampler, [EchoEnv()], ["a"], jax.random.key(0),
                      rollout_config(**overrides), TOK)
  bad_reward = rollout_config()
  bad_reward.reward.name = "no_such_reward"
  with pytest.raises(ConfigError, match="no_such_reward"):
    rollout.rollout(sampler, [EchoEnv()], ["a"], jax.random.key(0), bad_reward, TOK)
  with pytest.raises(ValueError, match="2 environments for 1 tasks"):
    rollout.rollout(sampler, [EchoEnv(), EchoEnv()], ["a"], jax.random.key(0), good, TOK)
  env = EchoEnv()
  with pytest.raises(ValueError, match="same environment object"):
    rollout.rollout(sampler, [env, env], ["a", "b"], jax.random.key(0), good, TOK)
  with pytest.raises(ValueError, match="task_ids="):
    rollout.rollout(sampler, [EchoEnv()], [object()], jax.random.key(0), good, TOK)
  del good.max_turns
  with pytest.raises(ConfigError, match="max_turns is missing"):
    rollout.rollout(sampler, [EchoEnv()], ["a"], jax.random.key(0), good, TOK)


# -- (d): the fault fuzz --------------------------------------------------------------------------


class Flaky(base.Environment):
  """Wraps an environment and misbehaves at random (seeded): raises in reset or step, returns what
  is not a StepResult, or an observation chat cannot render (a system message). ``log`` has what it
  did at each step of the episode, ``reset_error`` what reset raised."""
  ERRORS = ((RuntimeError, "env bug"), (KeyError, "missing key"),
            (ZeroDivisionError, "division by zero"), (AssertionError, "invariant broken"),
            (IndexError, "list index out of range"))

  def __init__(self, env, seed):
    self.env, self.rng, self.log, self.reset_error = env, random.Random(seed), [], None

  def reset(self, task):
    self.log, self.reset_error = [], None
    if self.rng.random() < 0.01:
      self.reset_error = "reset: ConnectionError: no workspace left"
      raise ConnectionError("no workspace left")
    return self.env.reset(task)

  def step(self, action):
    draw = self.rng.random()
    if draw < 0.04:
      kind, message = self.rng.choice(self.ERRORS)
      error = kind(message)
      self.log.append(("raised", f"step: {kind.__name__}: {error}"))
      raise error
    if draw < 0.05:
      self.log.append(("bogus", "step: returned dict, not a StepResult"))
      return {"status": "ok"}
    result = self.env.step(action)
    if draw < 0.06 and not result.done:
      self.log.append(("bad_observation", "observation: ValueError: system message at index 1"))
      return dataclasses.replace(result, observation=base.Observation((Message("system", "x"),)))
    self.log.append(("ok", result.status))
    return result


def fuzz_actions(task):
  """Turns a policy may write: kind -> (text, the step status it must get; None: any)."""
  f = task.entry_point
  crash = "raise SystemError('boom')\n"
  return {
      "invalid_json": ("<tool_call>\n{not json}\n</tool_call>", base.PARSE_ERROR),
      "unclosed_tag": ('<tool_call>\n{"name": "run_tests", "arguments": {}}', base.PARSE_ERROR),
      "unopened_tag": ("I am done.</tool_call>", base.PARSE_ERROR),
      "not_an_object": ("<tool_call>\n[1, 2, 3]\n</tool_call>", base.PARSE_ERROR),
      "missing_name": ('<tool_call>\n{"arguments": {"code": "x"}}\n</tool_call>', base.PARSE_ERROR),
      "bad_arguments": ('<tool_call>\n{"name": "submit", "arguments": [1]}\n</tool_call>',
                        base.PARSE_ERROR),
      "unknown_tool": (call("read_file", path="/etc/passwd"), base.UNKNOWN_TOOL),
      "missing_argument": (call("run_tests"), base.TOOL_ERROR),
      "wrong_type": (call("submit", code=7), base.TOOL_ERROR),
      "extra_argument": (call("run_tests", code="x = 1", path="a.py"), base.TOOL_ERROR),
      "too_much_code": (call("run_tests", code="#" * 30_000), None),      # cut by max_new_tokens
      "no_action": ("Let me think about this some more.", base.NO_ACTION),
      "empty": ("", base.NO_ACTION),
      "cut_by_length": (call("run_tests", code="#" * 400 + task.solution), base.PARSE_ERROR),
      # Fault kinds that need the sandbox (few: each is a job).
      "crash": (call("run_tests", code=crash), base.OK),
      "infinite_loop": (call("run_tests", code=f"def {f}(*args):\n  while True:\n    pass\n"),
                        base.TOOL_TIMEOUT),
      "huge_output": (call("run_tests", code="print('x' * 10**7)\n" + task.solution), base.OK),
      "parallel": (call("run_tests", code=crash) + "\n" + call("run_tests", code=task.solution),
                   base.OK),
      "bad_submit": (call("submit", code=f"def {f}(:\n"), base.SUBMITTED),
      "good_submit": (call("submit", code=task.solution), base.SUBMITTED),
  }


SANDBOX_BUDGET = {"crash": 4, "infinite_loop": 3, "huge_output": 3, "parallel": 2, "bad_submit": 4,
                  "good_submit": 5}
_GARBAGE = "abcxyz XYZ 0123 {}[]\":,.\\\n\t é漢字🙂"
_SOUP = (st.IM_START, st.TOOL_RESPONSE_OPEN, st.TOOL_RESPONSE_CLOSE, st.TOOL_CALL_OPEN,
         st.TOOL_CALL_CLOSE, st.MEMORY_OPEN, st.MEMORY_CLOSE, st.END_OF_TEXT, "{", '"name"', "x")


class FuzzPolicy:
  """Episode i's turn t: a random fault (or, within the budget, a sandbox job), recorded in
  ``kinds[i, t]``. Sampler rows skip the episodes whose reset failed."""

  def __init__(self, tasks, env_list, seed, budget):
    self.env_list, self.rng, self.budget, self.kinds = env_list, random.Random(seed), budget, {}
    self.actions = [fuzz_actions(t) for t in tasks]
    self.rows = None

  def __call__(self, row, t):
    if self.rows is None:            # called after every reset: sampler row -> episode
      self.rows = [i for i, env in enumerate(self.env_list) if env.reset_error is None]
    i = self.rows[row]
    left = [k for k, n in self.budget.items() if n > 0]
    if left and self.rng.random() < 0.03:
      kind = self.rng.choice(left)
      self.budget[kind] -= 1
    else:
      kind = self.rng.choice([k for k in self.actions[i] if k not in SANDBOX_BUDGET]
                             + ["garbage", "special_soup"])
    self.kinds[i, t] = kind
    if kind == "garbage":
      return "".join(self.rng.choice(_GARBAGE) for _ in range(self.rng.randrange(1, 300))) + (
          st.IM_END)
    if kind == "special_soup":
      return "".join(self.rng.choice(_SOUP) for _ in range(self.rng.randrange(1, 40))) + st.IM_END
    text = self.actions[i][kind][0]
    return text if kind in ("too_much_code", "cut_by_length") else text + st.IM_END


def _nan_unless_passed(grade, cfg):
  """kat_composite, but NaN for a graded submission that failed."""
  terms = rewards.kat_composite(grade, cfg)
  if grade is not None and not grade.passed:
    terms["reward"] = float("nan")
  return terms


if "fuzz_nan_unless_passed" not in rewards.names():
  rewards.register("fuzz_nan_unless_passed", _nan_unless_passed)


def expected_end(traj, env, max_turns):
  """(status, env_error) the loop must have recorded, from what the flaky env did."""
  if env.reset_error is not None:
    return base.ENV_ERROR, env.reset_error
  last = env.log[-1][0] if env.log else "ok"
  if last in ("raised", "bogus") or (last == "bad_observation" and len(env.log) < max_turns):
    return base.ENV_ERROR, env.log[-1][1]     # (after the last turn no observation is rendered)
  statuses = traj.info["statuses"]
  if statuses and statuses[-1] == base.SUBMITTED:
    return base.SUBMITTED, None
  if len(statuses) == max_turns:
    return base.MAX_TURNS, None
  return base.CONTEXT_EXHAUSTED, None


def test_fault_fuzz_never_crashes_the_loop_and_records_every_fault(pool, tasks):
  start = time.perf_counter()
  budget = dict(SANDBOX_BUDGET)
  cfg = rollout_config(max_turns=4, max_new_tokens=256, max_observation_tokens=300)
  cfg.reward.name = "fuzz_nan_unless_passed"
  seen_kinds, finals, counts = set(), {}, {"reward_error": 0, "cut": 0, "episodes": 0}
  for batch in range(8):
    batch_tasks = [tasks[(batch + r) % len(tasks)] for r in range(125)]
    env_list = [Flaky(envs.make("code", ENV_CONFIG, pool=pool), seed=1000 * batch + r)
                for r in range(len(batch_tasks))]
    policy = FuzzPolicy(batch_tasks, env_list, seed=batch, budget=budget)
    sampler = Recording(ScriptedSampler(policy, max_len=3000, seed=batch))
    trajs = rollout.rollout(sampler, env_list, batch_tasks, jax.random.key(batch), cfg, TOK)
    j = 0                                  # sampler row of the next trajectory with a prompt
    for i, (traj, env) in enumerate(zip(trajs, env_list)):
      counts["episodes"] += 1
      check_aligned(traj)
      status, env_error = expected_end(traj, env, cfg.max_turns)
      assert traj.status == status, (i, traj.status, status, traj.info)
      assert traj.info.get("env_error") is None if env_error is None else (
          traj.info["env_error"].startswith(env_error)), (traj.info, env_error)
      finals[status] = finals.get(status, 0) + 1
      if env.reset_error is not None:
        assert len(traj) == 0 and traj.num_turns == 0
        continue
      np.testing.assert_array_equal(traj.tokens, sampler.contexts[j])
      assert traj.sampled.sum() == sum(int(out.lengths[j]) for out in sampler.turns)
      j += 1
      for k, step_status in enumerate(traj.info["statuses"]):
        kind = policy.kinds[i, k]
        seen_kinds.add(kind)
        expected = fuzz_actions(batch_tasks[i]).get(kind, (None, None))[1]
        if kind in ("garbage",):
          expected = base.NO_ACTION
        assert expected is None or step_status == expected, (kind, step_status, traj.info)
        assert step_status == env.log[k][1] or env.log[k][0] == "bad_observation"
        if k + 1 < traj.num_turns:     # the observation appended after turn k fits its budget
          appended = (~traj.sampled) & (traj.turn == k)
          assert appended.sum() <= 2 + cfg.max_observation_tokens
      counts["cut"] += len(traj.info["observation_cut"])
      if traj.status == base.SUBMITTED:
        submitted_by = policy.kinds[i, traj.num_turns - 1]
        assert submitted_by in ("good_submit", "bad_submit")
        assert traj.grade.passed == (submitted_by == "good_submit")
      failed_grade = traj.grade is not None and not traj.grade.passed
      assert ("reward_error" in traj.info) == failed_grade, traj.info
      if failed_grade:
        counts["reward_error"] += 1
        assert traj.reward_terms == {"reward": 0.0, "compile": 0.0, "test": 0.0,
                                     "complexity": 0.0}
        assert "is nan, not a finite number" in traj.info["reward_error"]
      else:
        assert traj.reward == (1.0 if traj.grade is not None else 0.0)
  elapsed = time.perf_counter() - start
  assert counts["episodes"] >= 1000
  assert seen_kinds >= set(fuzz_actions(tasks[0])) | {"garbage", "special_soup"}, seen_kinds
  assert all(finals.get(s, 0) > 0 for s in (base.SUBMITTED, base.MAX_TURNS, base.ENV_ERROR,
                                            base.CONTEXT_EXHAUSTED)), finals
  assert counts["reward_error"] > 0 and counts["cut"] > 0, counts
  print(f"fuzz: {counts['episodes']} episodes in {elapsed:.1f} s, final statuses {finals}, "
        f"{counts}")
  # The sandbox pool survived all of it: a correct episode still passes.
  task = tasks[0]
  good = lambda i, t: call("submit", code=task.solution) + st.IM_END
  [traj] = rollout.rollout(ScriptedSampler(good, max_len=4096),
                           [envs.make("code", ENV_CONFIG, pool=pool)], [task], jax.random.key(0),
                           rollout_config(), TOK)
  assert traj.status == base.SUBMITTED and traj.grade.passed and traj.reward == 1.0
