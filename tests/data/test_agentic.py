"""Teacher trajectories from real tool executions: every expert resolves its tasks in the real
environments (sandbox), its conversations hold the environments' real outputs (the failure report
of a mistaken attempt, the search hits, the failing reproduction test) and render with loss on the
assistant turns only; the dataset round-trips through its TFDS corpus; taxonomy-balanced streams
give every cell equal mass; the ``sft`` stage yields batches with assistant-only weights."""
import json
import os
import re

import numpy as np
import pytest

from configs import sft_tiny
from kat_jax import workdir as workdir_lib
from kat_jax.data import agentic, chat, pipeline, procedural, special_tokens, toolcall
from kat_jax.data import tokenizer as tokenizer_lib
from kat_jax.data.procedural import math_tasks
from kat_jax.data.procedural.task import evaluate_call
from kat_jax.data.taxonomy import TaskLabel
from kat_jax.errors import ConfigError
from kat_jax.rl import envs, experts
from kat_jax.rl.envs import base
from kat_jax.sandbox import Limits, SandboxPool
from kat_jax.train import stages
from tests.data.byte_tokenizer import ByteTokenizer

# Tight limits: the machine is shared (see tests/sandbox/sandbox_helpers.py).
LIMITS = Limits(wall_time_s=5.0, cpu_time_s=3, memory_bytes=256 << 20, max_processes=8,
                file_size_bytes=1 << 20, disk_bytes=4 << 20, disk_inodes=128, open_files=64,
                output_bytes=1 << 20, capture_bytes=16 << 10)
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def pool():
  with SandboxPool(num_workers=2, limits=LIMITS) as sandbox_pool:
    yield sandbox_pool


def small_config(**overrides):
  c = agentic.default_agentic_config()
  c.update({**dict(code_episodes=4, repo_episodes=3, math_episodes=2, instructions=20),
            **overrides})
  return c


@pytest.fixture(scope="module")
def tasks():
  return {"code": procedural.generate_tasks(seed=1, num_tasks=3, split="train", levels=(0,)),
          "repo": [procedural.make_repo_task(s) for s in (0, 1)],
          "math": math_tasks.generate_problems(seed=0, num_problems=2, split="train",
                                               levels=(0, 1))}


def run(pool, expert, task, **env_overrides):
  name = experts.EXPERTS[expert].env
  config = agentic.env_config(name, agentic.default_agentic_config())
  if env_overrides:
    config = {**(config or {}), **env_overrides}
  return experts.run_expert(envs.make(name, config, pool=pool), expert, task)


def replay(pool, episode, task, env_config=None):
  """The messages of the episode with each assistant turn answered by a fresh environment."""
  env = envs.make(episode.conversation.meta["env"], env_config, pool=pool)
  messages = list(env.reset(task).messages)
  for message in episode.conversation.messages[len(messages):]:
    if message.role == "assistant":
      result = env.step(chat.render_assistant_body(message))
      messages.append(message)
      if not result.done:
        messages += result.observation.messages
  return messages


def trained_text(conversation) -> str:
  """What the assistant-only loss should cover: each trained assistant turn's body and im_end."""
  return "".join(chat.render_assistant_body(m) + special_tokens.IM_END
                 for m in conversation.messages if m.role == "assistant" and m.train is not False)


@pytest.mark.parametrize("expert", sorted(experts.EXPERTS))
def test_expert_resolves_its_tasks_with_real_tool_outputs(pool, tasks, expert):
  spec = experts.EXPERTS[expert]
  for task in tasks[spec.env]:
    episode = run(pool, expert, task)
    conversation = episode.conversation
    assert episode.done and episode.passed and episode.grade.tests_passed == \
        episode.grade.tests_total > 0
    assert episode.statuses[-1] == base.SUBMITTED
    assert set(episode.statuses[:-1]) <= {base.OK}
    assert conversation.label == spec.label and conversation.meta["expert"] == expert
    assert conversation.meta["grade"]["passed"] is True
    roles = [m.role for m in conversation.messages]
    assert roles[:2] == ["system", "user"] and roles[-1] == "assistant"
    assert roles.count("assistant") == len(episode.statuses)
    # Every turn is what a model would emit: it parses back into its own tool calls.
    for m in conversation.messages:
      if m.role == "assistant":
        parsed = toolcall.parse_assistant_output(chat.render_assistant_body(m), conversation.tools)
        assert parsed == toolcall.ParsedOutput(m.content, m.tool_calls)
    # The observations are the environment's own: a fresh environment answers the same turns
    # with the same messages.
    env_config = agentic.env_config(spec.env, agentic.default_agentic_config())
    assert tuple(replay(pool, episode, task, env_config)) == conversation.messages
    # Loss on the trained assistant turns only: exactly their text is masked in.
    rendered = chat.render(conversation, TOK)
    assert TOK.decode(rendered.tokens[rendered.loss_mask]) == trained_text(conversation)
    assert rendered.labels == spec.label


def test_code_fix_reads_the_real_failure_report(pool, tasks):
  for task in tasks["code"]:
    episode = run(pool, "code_fix", task)
    first, report = episode.conversation.messages[2:4]
    assert first.train is False and first.tool_calls[0].name == "run_tests"
    attempt = first.tool_calls[0].arguments["code"]
    assert attempt != task.solution
    assert report.role == "tool" and report.name == "run_tests"
    # The report states what the mistaken code really does on the failing visible test.
    failed = re.search(r"^FAILED test_(\d+): (.+)$", report.content, re.MULTILINE)
    assert failed, report.content
    test = task.tests[int(failed.group(1))]
    assert failed.group(2) == test.call_source(task.entry_point)
    ok, value = evaluate_call(attempt, task.entry_point, test.args)
    assert (f"returned {value!r}" if ok else value.split(":")[0]) in report.content
    # The next turn quotes it, names the faulty line, and is trained on.
    fix = episode.conversation.messages[4]
    assert fix.train is None and failed.group(2) in fix.content
    old, new = experts.changed_lines(attempt, task.solution)
    assert f"`{old[0]}`" in fix.content and f"`{new[0]}`" in fix.content
    rendered = chat.render(episode.conversation, TOK)
    assert chat.render_assistant_body(first) not in TOK.decode(rendered.tokens[rendered.loss_mask])


def test_repo_experts_act_on_what_the_tools_returned(pool, tasks):
  for task in tasks["repo"]:
    fix = run(pool, "repo_fix", task).conversation.messages
    line = next(i for i, text in enumerate(task.files[task.bug_file].splitlines(), 1)
                if text.startswith(f"def {task.entry_point}("))
    assert f"{task.bug_file}:{line}: def {task.entry_point}(" in fix[3].content   # search hit
    assert fix[4].tool_calls[0].arguments == {"path": task.bug_file}               # read it
    [edit] = [c for m in fix if m.role == "assistant" for c in m.tool_calls
              if c.name == "str_replace"]
    removed = [l[1:] for l in task.gold_patch.splitlines() if l[:1] == "-" and l[:3] != "---"]
    assert all(r in edit.arguments["old_str"] for r in removed)
    assert f"Ran {len(task.pass_to_pass)} tests: {len(task.pass_to_pass)} passed, 0 failed" in \
        fix[-2].content
    reproduce = run(pool, "repo_reproduce", task).conversation.messages
    created = next(c for m in reproduce if m.role == "assistant" for c in m.tool_calls
                   if c.name == "create_file")
    failing = next(m for m in reproduce if m.role == "tool" and "0 passed, 1 failed" in m.content)
    call = re.search(r"Calling `(.+?)` returns `(.+?)`", task.issue)
    assert call.group(1) in created.arguments["content"]
    # The failing run shows the buggy function's real value, as the issue reported it.
    assert f"assert {call.group(2)} ==" in failing.content, failing.content


def test_math_expert_answers_in_both_variants(pool, tasks):
  for problem in tasks["math"]:
    boxed = run(pool, "math_answer", problem, submit_tool=False)
    assert boxed.passed and not boxed.conversation.messages[-1].tool_calls
    assert f"\\boxed{{{problem.answer}}}" in boxed.conversation.messages[-1].content
    tool = run(pool, "math_answer", problem)
    assert tool.passed and tool.conversation.messages[-1].tool_calls[0].arguments == {
        "answer": problem.answer}


def test_gold_edits_are_unique_and_reproduce_the_gold_patch():
  for seed in range(6):
    task = procedural.make_repo_task(seed)
    files = dict(task.files)
    for path, old, new in experts.gold_edits(task):
      assert files[path].count(old) == 1
      files[path] = files[path].replace(old, new)
    assert files == procedural.apply_patch(task.files, task.gold_patch)


def test_experts_refuse_tasks_they_cannot_script(pool, tasks):
  with pytest.raises(TypeError, match="expert 'repo_fix' scripts RepoTask tasks, got Task"):
    experts.run_expert(envs.make("code", None, pool=pool), "repo_fix", tasks["code"][0])
  with pytest.raises(ValueError, match="unknown expert 'nope'"):
    experts.get_expert("nope")
  with pytest.raises(ConfigError, match=r"agentic.code_experts: 'repo_fix' is not an expert of"):
    agentic.episode_plan(small_config(code_experts="repo_fix"))


def test_plan_is_deterministic_and_splits_share_no_task():
  config = small_config(code_episodes=12)
  plan = agentic.episode_plan(config)
  assert [(e, experts.task_id_of(t)) for e, t in plan] == [
      (e, experts.task_id_of(t)) for e, t in agentic.episode_plan(config)]
  code = [e for e, t in plan if experts.EXPERTS[e].env == "code"]
  assert code == ["code_direct", "code_fix"] * 6
  heldout = agentic.episode_plan(small_config(code_episodes=12, split="heldout"))
  pairs = lambda p: {(t.template, json.dumps(list(t.params))) for _, t in p
                     if isinstance(t, procedural.Task)}
  assert pairs(plan) and pairs(heldout) and not pairs(plan) & pairs(heldout)


@pytest.fixture(scope="module")
def dataset(pool, tmp_path_factory):
  """The small config's trajectories and instructions, written as JSONL."""
  root = tmp_path_factory.mktemp("agentic")
  config = small_config()
  conversations, report = agentic.teacher_trajectories(config, pool)
  paths = {"trajectories": agentic.write_jsonl(conversations, str(root / "trajectories.jsonl")),
           "instructions": agentic.write_jsonl(agentic.instruction_conversations(config),
                                               str(root / "instructions.jsonl"))}
  return conversations, report, paths, str(root)


def test_dataset_builds_and_reads_back_equal(dataset):
  conversations, report, paths, root = dataset
  plan = agentic.episode_plan(small_config())
  assert len(conversations) == len(plan)             # every episode passed and was kept
  assert sum(r["kept"] for r in report.values()) == len(plan)
  assert all(r["dropped"] == {} for r in report.values())
  assert set(report) == set(experts.EXPERTS)
  builder = agentic.dataset_builder([paths["trajectories"]], os.path.join(root, "tfds"),
                                    eval_fraction=0.3)
  back = [c for split in builder.info.splits for c in agentic.read_conversations(builder, split)]
  key = lambda c: c.to_json()
  assert sorted(back, key=key) == sorted(conversations, key=key)
  for split in builder.info.splits:   # the split is by task: a task's trajectories stay together
    ids = {c.meta["task_id"] for c in agentic.read_conversations(builder, split)}
    others = {c.meta["task_id"] for s in builder.info.splits if s != split
              for c in agentic.read_conversations(builder, s)}
    assert not ids & others


def test_taxonomy_balanced_stream_gives_each_cell_equal_mass():
  import grain
  labels = ([TaskLabel("bug_fixing", "application_development")] * 12
            + [TaskLabel("code_understanding", "application_development")] * 3
            + [TaskLabel("feature_implementation", "database_systems")] * 1 + [None] * 4)
  dataset = grain.MapDataset.source(list(range(len(labels))))
  stream, mass = pipeline.taxonomy_balanced(dataset, labels, seed=0, name="t",
                                            unlabeled_mass=0.25)
  assert mass == pytest.approx({"bug_fixing/application_development": 0.25,
                                "code_understanding/application_development": 0.25,
                                "feature_implementation/database_systems": 0.25,
                                "unlabeled": 0.25})
  draws = [stream[i] for i in range(20_000)]
  cells = np.array([0 if d < 12 else 1 if d < 15 else 2 if d < 16 else 3 for d in draws])
  np.testing.assert_allclose(np.bincount(cells) / len(cells), 0.25, atol=0.015)
  again, _ = pipeline.taxonomy_balanced(dataset, labels, seed=0, name="t", unlabeled_mass=0.25)
  assert [again[i] for i in (0, 7, 19_999, 40_001)] == [stream[i] for i in (0, 7, 19_999, 40_001)]
  other, _ = pipeline.taxonomy_balanced(dataset, labels, seed=1, name="t", unlabeled_mass=0.25)
  assert [other[i] for i in range(50)] != draws[:50]


def _sft_config(paths, root, **data):
  c = sft_tiny.get_config()
  c.data.data_dir = os.path.join(root, "tfds")
  c.data.trajectories.paths = paths["trajectories"]
  c.data.instructions.paths = paths["instructions"]
  c.data.eval_fraction = 0.0       # every task in train: each expert's cell is present
  c.train.seq_len = 512
  for key, value in data.items():
    section, field = key.split(".")
    c.data[section][field] = value
  return c


@pytest.fixture(scope="module")
def init_workdir(dataset):
  """A workdir whose saved tokenizer (trained on the data) the sft stage must pick up."""
  conversations, _, _, root = dataset
  texts = [chat.render_text(c) for c in conversations]
  tokenizer = tokenizer_lib.SentencePieceTokenizer.train(texts, vocab_size=600,
                                                         max_sentences=4000)
  workdir = os.path.join(root, "midtrain")
  tokenizer.save(workdir_lib.tokenizer_dir(workdir))
  return workdir


def test_sft_stage_batches_have_assistant_only_weights(dataset, init_workdir, tmp_path):
  conversations, _, paths, root = dataset
  c = _sft_config(paths, root)
  c.init_from = init_workdir
  stage = stages.get_stage("sft")
  assert stage.loss == "lm"
  it, tokenizer = stage.make_data(c, str(tmp_path), split="train", batch_size=4, seed=0,
                                  shard_index=0, shard_count=1)
  saved = tokenizer_lib.load_tokenizer(workdir_lib.tokenizer_dir(init_workdir))
  text = chat.render_text(conversations[0])
  assert tokenizer.encode(text) == saved.encode(text) and tokenizer.vocab_size == 600
  instruction_convs = [chat.Conversation.from_json(l) for l in open(paths["instructions"])]
  expected = {trained_text(conv) for conv in conversations + instruction_convs}
  streams = pipeline.make_streams(c.data, tokenizer, split="train", seed=0)
  checked = 0
  for _ in range(6):
    batch = next(it)
    for row, pieces in enumerate(it.last_batch_pieces()):
      for piece in pieces:
        document = streams[piece.stream].documents[piece.index]
        # weights[col] is the loss mask of the target (the next document token).
        targets = min(piece.length, len(document.ids) - 1 - piece.start)
        cols = slice(piece.column, piece.column + targets)
        want = document.loss_mask[piece.start + 1:piece.start + 1 + targets]
        np.testing.assert_array_equal(batch["weights"][row, cols], want)
        np.testing.assert_array_equal(batch["targets"][row, cols],
                                      document.ids[piece.start + 1:piece.start + 1 + targets])
        # A document's weighted tokens are exactly one conversation's trained assistant turns.
        assert tokenizer.decode(document.ids[document.loss_mask > 0]) in expected
        checked += 1
  assert checked >= 8 and batch["weights"].sum() > 0
  assert set(np.unique(batch["weights"])) <= {0.0, 1.0}
  cell_mass = it.stats()["trajectories"]["cell_mass"]
  assert len(cell_mass) == len({e.label for e in experts.EXPERTS.values()})
  assert set(np.round(list(cell_mass.values()), 9)) == {round(1 / len(cell_mass), 9)}
  metrics = it.metrics()
  assert metrics["documents/trajectories"] > 0 and metrics["documents/instructions"] > 0
  it.close()


@pytest.mark.parametrize("override,match", [
    ({"trajectories.loss_on": "all"}, r"set data.trajectories.loss_on='assistant'"),
    ({"mixture.code": 0.5}, r"data.mixture.code=0.5 mixes in documents trained on every token"),
    ({"mixture.trajectories": 0.0}, r"set data.mixture.trajectories > 0"),
    ({"instructions.render": "code_file"}, r"set data.instructions.render='conversation'"),
])
def test_sft_stage_refuses_data_it_cannot_train_on(dataset, tmp_path, override, match):
  _, _, paths, root = dataset
  c = _sft_config(paths, root, **override)
  with pytest.raises(ConfigError, match=match):
    stages.get_stage("sft").make_data(c, str(tmp_path), split="train", batch_size=4, seed=0,
                                      shard_index=0, shard_count=1)


def test_bad_balance_is_named(dataset, init_workdir, tmp_path):
  _, _, paths, root = dataset
  c = _sft_config(paths, root, **{"trajectories.balance": "cells"})
  c.init_from = init_workdir
  with pytest.raises(ValueError, match=r"data.trajectories.balance='cells'; use ''"):
    stages.get_stage("sft").make_data(c, str(tmp_path), split="train", batch_size=4, seed=0,
                                      shard_index=0, shard_count=1)


def test_tool_call_measure_counts_expert_turns_valid_and_broken_ones_not(pool, tasks):
  """The learning measurement (experiments/bench_sft_toolcalls.py) on turns whose verdict is
  known: an expert's are valid tool calls; the same with a brace dropped or a tag missing are not."""
  from types import SimpleNamespace
  from kat_jax.eval.agentic import classify_turns
  episode = run(pool, "code_direct", tasks["code"][0])
  tools = episode.conversation.tools
  bodies = [chat.render_assistant_body(m) + special_tokens.IM_END
            for m in episode.conversation.messages if m.role == "assistant"]
  broken = [bodies[0].replace('"}}', '"}'), bodies[1].replace(special_tokens.TOOL_CALL_OPEN, ""),
            "I will submit now." + special_tokens.IM_END]

  def trajectory(turn_texts):
    ids = [np.asarray(TOK.encode(t.replace(special_tokens.IM_END, "")) +
                      [TOK.token_id(special_tokens.IM_END)], np.int32) for t in turn_texts]
    gap = np.asarray(TOK.encode("\n<observation>\n"), np.int32)
    tokens = np.concatenate([x for i in ids for x in (i, gap)])
    sampled = np.concatenate([x for i in ids for x in (np.ones(len(i), bool),
                                                       np.zeros(len(gap), bool))])
    turn = np.concatenate([np.full(len(i) + len(gap), k) for k, i in enumerate(ids)])
    return SimpleNamespace(tokens=tokens, sampled=sampled, turn=turn, num_turns=len(ids))

  assert [(v["valid"], v["schema"], v["error"]) for v in classify_turns(
      trajectory(bodies), TOK, tools)] == [(True, True, None)] * 2
  verdicts = classify_turns(trajectory(broken), TOK, tools)
  assert [(v["valid"], v["attempted"], v["error"]) for v in verdicts] == [
      (False, True, "invalid_json"), (False, False, "unopened_tag"), (False, False, None)]
