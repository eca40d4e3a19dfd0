"""The mid-training mixture's generated streams (``tool_use``, ``multi_turn``,
``instruction_following``, kat_jax.data.corpora.agentic): built once into data_dir from the SFT
builders and reused; mixed at the configured token rates with assistant-only loss masks; every
tool result of an episode is what a fresh environment's real tool returns for the recorded call;
every instruction example satisfies its constraints by code (and each category's verifier rejects
a violation); held-out examples never repeat training ones; configs/midtrain_tiny.py mixes all
three with small weights."""
import numpy as np
import pytest

from configs import midtrain_tiny
from kat_jax.data import agentic, chat, pipeline
from kat_jax.data import config as config_lib
from kat_jax.data import corpora
from kat_jax.data import instructions as ins
from kat_jax.data.corpora import agentic as agentic_corpus
from kat_jax.errors import ConfigError
from kat_jax.rl import envs, experts
from kat_jax.rl.envs import base
from kat_jax.sandbox import SandboxPool
from tests.data.byte_tokenizer import ByteTokenizer
from tests.data.test_mixture import _documents

TOK = ByteTokenizer()
GENERATED = agentic_corpus.STREAMS
WEIGHTS = {"code": 0.4, "tool_use": 0.25, "multi_turn": 0.2, "instruction_following": 0.15}


def _data_config(root):
  code = root / "code"
  code.mkdir(exist_ok=True)
  for i in range(30):   # files of about 1 KB: documents of the same order as the generated ones
    (code / f"mod{i}.py").write_text(f'"""Module {i}."""\n' + "".join(
        f"\n\ndef value_{i}_{j}(x):\n    return x * {i} + {j % 5}\n" for j in range(20)))
  config = config_lib.default_data_config()
  config.data_dir = str(root / "tfds")
  config.code.root = str(code)
  config.tool_use.update(dict(num_train=9, num_eval=3))
  config.multi_turn.update(dict(num_train=6, num_eval=3))
  config.instruction_following.update(dict(num_train=2 * len(ins.CATEGORIES), num_eval=12))
  for name in config_lib.STREAMS:
    config.mixture[name] = WEIGHTS.get(name, 0.0)
  return config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The data config and, per generated stream, its prepared builder and conversations by split."""
  config = _data_config(tmp_path_factory.mktemp("agentic_mix"))
  out = {}
  for name in GENERATED:
    builder = corpora.prepare(agentic_corpus.AgenticConversations,
                              agentic_corpus.stream_corpus_config(name, config), config.data_dir)
    out[name] = (builder, {split: agentic.read_conversations(builder, split)
                           for split in ("train", "eval")})
  return config, out


def test_streams_build_once_then_come_from_the_cache(built, monkeypatch):
  config, out = built
  for name, (builder, conversations) in out.items():
    kept = builder.info.metadata["kept"]
    assert kept["train"] == len(conversations["train"]) > 0 and kept["eval"] > 0, name
  # The expert streams kept every episode they ran (the environment graded each passed).
  assert out["tool_use"][0].info.metadata["kept"] == {"train": 9, "eval": 3}
  assert out["multi_turn"][0].info.metadata["kept"] == {"train": 6, "eval": 3}
  # A second prepare reads the cache: nothing is generated (no sandbox, no expert runs).
  def refuse(*args, **kwargs):
    raise AssertionError("a cached stream was generated again")
  monkeypatch.setattr(agentic, "teacher_trajectories", refuse)
  monkeypatch.setattr(agentic, "instruction_conversations", refuse)
  iterator = pipeline.make_lm_iterator(config, TOK, split="train", batch_size=2, seq_len=64,
                                       seed=0)
  next(iterator)
  for name in GENERATED:
    assert iterator.stats()[name]["kept"] == out[name][0].info.metadata["kept"]
  # Every field of a section that changes the examples gives another corpus; workers does not.
  names = set()
  for name, field, value in (("tool_use", "num_train", 10), ("tool_use", "seed", 1),
                             ("tool_use", "experts", "code_direct"), ("multi_turn", "repo_level", 2),
                             ("instruction_following", "max_constraints", 1)):
    changed = config.copy_and_resolve_references()
    changed[name][field] = value
    names.add(agentic_corpus.stream_corpus_config(name, changed).name)
  assert len(names) == 5 and not names & {b.builder_config.name for b, _ in out.values()}
  changed = config.copy_and_resolve_references()
  changed.tool_use.workers = 1
  assert (agentic_corpus.stream_corpus_config("tool_use", changed).name
          == out["tool_use"][0].builder_config.name)


def test_mixture_rates_and_assistant_only_masks(built):
  config, out = built
  rendered = {}
  for name, (_, conversations) in out.items():
    for conversation in conversations["train"]:
      rendered[chat.render_text(conversation)] = (name, conversation)
  iterator = pipeline.make_lm_iterator(config, TOK, split="train", batch_size=4, seq_len=512,
                                       seed=0)
  batches = [next(iterator) for _ in range(500)]
  counted = {name: 0 for name in WEIGHTS}
  documents = {name: 0 for name in WEIGHTS}
  longest = 0
  for ids, weights in _documents(batches, TOK.eos_id):
    text = TOK.decode(ids[:-1])
    longest = max(longest, len(ids))
    if text.startswith("# path: "):
      name = "code"
      np.testing.assert_array_equal(weights[:-1], 1.0)
    else:
      name, conversation = rendered[text]   # exactly one of the stream's conversations
      # Assistant-only loss, as the procedural stream: the mask shifted onto the predicting
      # position, nothing on the prompt, the tool results or the EOS.
      mask = chat.render(conversation, TOK, loss_on="assistant").loss_mask
      np.testing.assert_array_equal(
          weights, np.concatenate([mask[1:], [0, 0]]).astype(np.float32))
      assert 0 < weights.sum() < 0.9 * len(weights)
    counted[name] += len(ids)
    documents[name] += 1
  total = sum(counted.values())
  metrics = iterator.metrics()
  # Token-weighted deficit round robin: each stream's count is off its share by at most about one
  # document per stream, and the documents still in progress (one per row) are not counted here.
  tolerance = (len(WEIGHTS) + 4) * longest / total
  assert tolerance < 0.07, (longest, total)   # well below every weight: a meaningful check
  for name, weight in WEIGHTS.items():
    assert documents[name] >= 10, documents
    assert counted[name] / total == pytest.approx(weight, abs=tolerance), (name, counted)
    assert metrics[f"token_fraction/{name}"] == pytest.approx(weight, abs=tolerance)
    assert metrics[f"target_fraction/{name}"] == pytest.approx(weight)


@pytest.fixture(scope="module")
def pool():
  with SandboxPool(num_workers=2) as sandbox_pool:
    yield sandbox_pool


def _replay(pool, conversation, task):
  """The conversation's messages with every assistant turn answered by a fresh environment."""
  name = conversation.meta["env"]
  env = envs.make(name, agentic.env_config(name, agentic.default_agentic_config()), pool=pool)
  try:
    messages = list(env.reset(task).messages)
    for message in conversation.messages[len(messages):]:
      if message.role == "assistant":
        result = env.step(chat.render_assistant_body(message))
        messages.append(message)
        if not result.done:
          messages += result.observation.messages
    return tuple(messages)
  finally:
    env.close()


@pytest.mark.parametrize("name", agentic_corpus.EPISODE_STREAMS)
def test_episode_tool_results_are_the_real_tool_outputs(built, pool, name):
  _, out = built
  builder, conversations = out[name]
  for split in ("train", "eval"):
    plan = {experts.task_id_of(task): (expert, task) for expert, task in agentic.episode_plan(
        agentic_corpus.generation_config(builder.builder_config, split))}
    assert len(conversations[split]) == len(plan)
    for conversation in conversations[split]:
      expert, task = plan[conversation.meta["task_id"]]
      assert conversation.meta["expert"] == expert and conversation.meta["grade"]["passed"]
      assert conversation.meta["statuses"][-1] == base.SUBMITTED
      assert conversation.label == experts.EXPERTS[expert].label
      assert any(m.tool_calls for m in conversation.messages if m.role == "assistant")
      tool_messages = [m for m in conversation.messages if m.role == "tool"]
      # (a math answer is one submit call, whose result ends the episode and is not shown)
      assert all(m.content for m in tool_messages) and (tool_messages or expert == "math_answer")
      # A fresh environment answers every recorded call with exactly the recorded result.
      assert _replay(pool, conversation, task) == conversation.messages


def test_recorded_failing_test_run_is_the_sandbox_report(built, pool):
  """One recorded call re-run on its own: code_fix's mistaken first attempt, whose run_tests
  result is the sandbox's real failure report (not a template), and a changed call changes it."""
  _, out = built
  builder, conversations = out["tool_use"]
  plan = {experts.task_id_of(t): t for _, t in agentic.episode_plan(
      agentic_corpus.generation_config(builder.builder_config, "train"))}
  conversation = next(c for c in conversations["train"] if c.meta["expert"] == "code_fix")
  first = next(i for i, m in enumerate(conversation.messages) if m.role == "assistant")
  call_turn, recorded = conversation.messages[first], conversation.messages[first + 1]
  assert call_turn.train is False and call_turn.tool_calls[0].name == "run_tests"
  env = envs.make("code", None, pool=pool)
  try:
    env.reset(plan[conversation.meta["task_id"]])
    again = env.step(chat.render_assistant_body(call_turn)).observation.messages
    assert again == (recorded,)
    assert "FAILED" in recorded.content
    fixed = chat.Message("assistant", "", (chat.ToolCall(
        "run_tests", {"code": plan[conversation.meta["task_id"]].solution}),))
    passed = env.step(chat.render_assistant_body(fixed)).observation.messages
    assert passed[0].content != recorded.content and "FAILED" not in passed[0].content
  finally:
    env.close()


def test_instruction_following_examples_satisfy_their_constraints(built):
  _, out = built
  _, conversations = out["instruction_following"]
  assert len(ins.CATEGORIES) >= 30
  seen = set()
  for split in ("train", "eval"):
    for conversation in conversations[split]:
      user, answer = conversation.messages
      assert user.role == "user" and answer.role == "assistant"
      constraints = [(c["category"], c["params"]) for c in conversation.meta["constraints"]]
      # The stated instructions are in the request; the answer meets every one, by code.
      for name, params in constraints:
        assert ins.CATEGORIES[name].describe(params) in user.content
      assert all(ins.verify(answer.content, constraints).values()), (constraints, answer)
      if split == "train":
        seen.update(name for name, _ in constraints)
      # Each category's verifier rejects a violation of its constraint in this very answer.
      for name, params in constraints:
        broken = ins.CATEGORIES[name].violate(answer.content, params)
        assert not ins.check(broken, name, params), (name, params, broken)
  assert seen == set(ins.CATEGORIES)   # the training split covers every category
  train_ids = {c.meta["task_id"] for c in conversations["train"]}
  assert not train_ids & {c.meta["task_id"] for c in conversations["eval"]}


def test_held_out_episodes_come_from_held_out_tasks(built):
  config, out = built
  # The eval mixture draws the streams' held-out conversations, never training ones.
  held_out = {chat.render_text(c): name for name, (_, split) in out.items() for c in split["eval"]}
  iterator = pipeline.make_lm_iterator(config, TOK, split="eval", batch_size=4, seq_len=512,
                                       seed=0)
  texts = [TOK.decode(ids[:-1]) for ids, _ in _documents([next(iterator) for _ in range(60)],
                                                         TOK.eos_id)]
  drawn = {held_out[t] for t in texts if not t.startswith("# path: ")}
  assert drawn == set(GENERATED)
  for name in agentic_corpus.EPISODE_STREAMS:
    builder, conversations = out[name]
    ids = {split: {c.meta["task_id"] for c in conversations[split]} for split in ("train", "eval")}
    assert ids["train"] and ids["eval"] and not ids["train"] & ids["eval"]
    generation = agentic_corpus.generation_config(builder.builder_config, "eval")
    assert generation.split == "heldout"
    assert generation.heldout_fraction == built[0].procedural.heldout_fraction
    assert agentic_corpus.generation_config(builder.builder_config, "train").split == "train"


def test_episodes_are_shared_out_evenly_and_bad_experts_are_named():
  c = agentic.episodes_config("code_direct,code_fix,math_answer", 7, split="train", seed=0,
                              heldout_fraction=0.1, field="data.tool_use")
  assert (c.code_episodes, c.math_episodes, c.repo_episodes) == (5, 2, 0)
  assert (c.code_experts, c.math_experts, c.repo_experts) == ("code_direct,code_fix",
                                                                 "math_answer", "")
  plan = agentic.episode_plan(c)
  assert [expert for expert, _ in plan].count("code_direct") == 3
  config = config_lib.default_data_config()
  config.tool_use.experts = "code_direct,nobody"
  with pytest.raises(ConfigError, match=r"data.tool_use.experts: 'nobody' is not an expert"):
    agentic_corpus.stream_corpus_config("tool_use", config)
  config.tool_use.experts = "repo_fix"
  config.tool_use.repo_level = 3
  with pytest.raises(ConfigError, match=r"data.tool_use.repo_level=3"):
    agentic_corpus.stream_corpus_config("tool_use", config)


def test_midtrain_tiny_mixes_the_generated_streams_with_small_weights():
  c = midtrain_tiny.get_config()
  weights = dict(c.data.mixture)
  assert sum(weights.values()) == pytest.approx(1.0)
  for name in GENERATED:
    assert 0.05 <= weights[name] <= 0.1, (name, weights)
    # Trained as the procedural conversations are: on the assistant turns only.
    assert c.data[name].loss_on == c.data.procedural.loss_on == "assistant"
  assert weights["procedural"] == 0.2 and weights["code"] == pytest.approx(
      1.0 - 0.2 - sum(weights[n] for n in GENERATED))
  assert set(config_lib.default_data_config().mixture) == set(config_lib.STREAMS)
