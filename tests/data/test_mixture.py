"""Mid-training mixture: token-weighted stream choice, realized proportions, resume, loss masks."""
import dataclasses
import json
import os
import subprocess

import numpy as np
import pytest

from kat_jax.data import chat
from kat_jax.data import config as config_lib
from kat_jax.data import mixture as mixture_lib
from kat_jax.data import pipeline
from kat_jax.data import special_tokens
from kat_jax.data import tokenizer as tokenizer_lib
from kat_jax.data.corpora import common


def test_token_mixture_tracks_weights_within_one_document():
  weights = {"a": 0.5, "b": 0.3, "c": 0.2}
  mixture = mixture_lib.TokenMixture(weights)
  rng = np.random.default_rng(0)
  max_length = 0
  for _ in range(3000):
    name = mixture.choose()
    length = int(rng.integers(1, 400))
    max_length = max(max_length, length)
    mixture.record(name, length)
    total = sum(mixture.tokens.values())
    for n, w in weights.items():
      assert abs(mixture.tokens[n] - w * total) <= max_length * len(weights)
  realized = mixture.realized_fractions()
  for n, w in weights.items():
    assert realized[n] == pytest.approx(w, abs=0.005)


def test_token_mixture_state_and_errors():
  mixture = mixture_lib.TokenMixture({"a": 2.0, "b": 0.0, "c": 1.0})
  assert mixture.names == ("a", "c") and mixture.weights == pytest.approx({"a": 2 / 3, "c": 1 / 3})
  for length in (5, 7, 11, 13):
    mixture.record(mixture.choose(), length)
  other = mixture_lib.TokenMixture({"a": 2.0, "c": 1.0})
  other.set_state(json.loads(json.dumps(mixture.get_state())))
  assert [other.choose() for _ in range(1)] == [mixture.choose()]
  with pytest.raises(ValueError, match="all mixture weights are zero"):
    mixture_lib.TokenMixture({"a": 0.0})
  with pytest.raises(ValueError, match=">= 0"):
    mixture_lib.TokenMixture({"a": -1.0})
  with pytest.raises(ValueError, match="resume with the data config"):
    mixture_lib.TokenMixture({"a": 1.0}).set_state(mixture.get_state())


# ----------------------------------------------------------------------------- end-to-end mixture


def _conversations(kind, count):
  result = []
  for i in range(count):
    if kind == "trajectories":
      call = chat.ToolCall("run", {"cmd": f"pytest -k case{i}"})
      messages = (chat.Message("system", "You are a coding agent."),
                  chat.Message("user", f"Fix failing test case{i} in module m{i % 7}."),
                  chat.Message("assistant", "Let me run the tests.", (call,)),
                  chat.Message("tool", f"FAILED case{i}: assert {i} == {i + 1}", name="run"),
                  chat.Message("assistant", f"The constant is off by one; use {i + 1}."))
      result.append(chat.Conversation(messages, tools=(chat.ToolSpec("run", "Run a shell command",
                                                                     {"type": "object"}),)))
    else:
      result.append(chat.Conversation((
          chat.Message("user", f"Write a function that returns {i} squared, with a docstring."),
          chat.Message("assistant", f"def square_{i}():\n    \"\"\"{i} squared.\"\"\"\n"
                                    f"    return {i} * {i}\n"))))
  return result


@pytest.fixture(scope="module")
def mixture_setup(tmp_path_factory):
  base = tmp_path_factory.mktemp("mix")
  code = base / "code"
  code.mkdir()
  for i in range(40):
    (code / f"mod{i}.py").write_text(
        f"\"\"\"Module {i}.\"\"\"\n\n\ndef value_{i}(x):\n    return x * {i} + {i % 5}\n")
  repo = base / "repo"
  repo.mkdir()
  env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
         "GIT_COMMITTER_EMAIL": "t@x", "HOME": str(base), "PATH": os.environ["PATH"],
         # Fixed dates: commit shas (hence each commit's train / eval split) must not depend on
         # when the test runs.
         "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z"}
  git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True,
                                  env=env)
  git("init", "-q", "-b", "main")
  for i in range(30):
    (repo / f"f{i % 6}.py").write_text(f"VALUE = {i}\n")
    git("add", ".")
    git("commit", "-q", "-m", f"Set VALUE to {i}")
  paths = {}
  for kind, count in (("trajectories", 40), ("instructions", 60)):
    paths[kind] = base / f"{kind}.jsonl"
    paths[kind].write_text(chat.conversations_to_jsonl(_conversations(kind, count)))
  config = config_lib.default_data_config()
  config.data_dir = str(base / "tfds")
  config.eval_fraction = 0.1
  config.code.root = str(code)
  config.commits.repo = str(repo)
  config.trajectories.paths = str(paths["trajectories"])
  config.trajectories.loss_on = "assistant"
  config.instructions.paths = str(paths["instructions"])
  config.mixture.code = 0.4
  config.mixture.commits = 0.2
  config.mixture.trajectories = 0.3
  config.mixture.instructions = 0.1
  texts = [p.read_text() for p in code.iterdir()] + [p.read_text() for p in paths.values()]
  tokenizer = tokenizer_lib.SentencePieceTokenizer.train(texts, vocab_size=600)
  return config, tokenizer


def _classify(text):
  if text.startswith("# path: "):
    return "code"
  if text.startswith("<|im_start|>user\nRepository: "):
    return "commits"
  if text.startswith("<|im_start|>system\n"):
    return "trajectories"
  assert text.startswith("<|im_start|>user\nWrite a function"), text[:80]
  return "instructions"


def _documents(batches, eos_id):
  """(token ids incl. EOS, weights) of each complete document in the packed stream: each row's real
  tokens over consecutive batches (a row continues its document in the same row of the next batch),
  cut at EOS."""
  documents = []
  for row in range(batches[0]["inputs"].shape[0]):
    real = [b["segment_ids"][row] > 0 for b in batches]
    tokens = np.concatenate([b["inputs"][row][m] for b, m in zip(batches, real)])
    weights = np.concatenate([b["weights"][row][m] for b, m in zip(batches, real)])
    ends = np.flatnonzero(tokens == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    documents += [(tokens[s:e + 1], weights[s:e + 1]) for s, e in zip(starts, ends)]
  return documents


def test_mixture_proportions_loss_masks_and_metrics(mixture_setup):
  config, tokenizer = mixture_setup
  iterator = pipeline.make_lm_iterator(config, tokenizer, split="train", batch_size=4,
                                       seq_len=128, seed=0)
  batches = [next(iterator) for _ in range(150)]
  documents = _documents(batches, tokenizer.eos_id)
  counted = {name: 0 for name in config_lib.STREAMS if config.mixture[name] > 0}
  rendered_by_text = {}
  for kind in ("trajectories", "instructions"):
    section = config[kind]
    for line in open(section.paths):
      conversation = chat.Conversation.from_json(line)
      rendered_by_text[chat.render_text(conversation)] = (conversation, section.loss_on)
  for ids, weights in documents:
    text = tokenizer.decode(ids[:-1])
    kind = _classify(text)
    counted[kind] += len(ids)
    # Weights: the document's loss mask shifted onto the predicting position, 0 at its end.
    if kind in ("trajectories", "instructions"):
      conversation, loss_on = rendered_by_text[text]
      rendered = chat.render(conversation, tokenizer, loss_on=loss_on)
      expected = np.concatenate([rendered.loss_mask[1:], [loss_on == "all"], [0]]).astype(np.float32)
    else:
      expected = np.concatenate([np.ones(len(ids) - 1), [0]]).astype(np.float32)
    np.testing.assert_array_equal(weights, expected)
  total = sum(counted.values())
  metrics = iterator.metrics()
  for name, count in counted.items():
    assert count / total == pytest.approx(config.mixture[name], abs=0.03), name
    # The iterator's own accounting agrees with the decoded stream (up to the partial documents).
    assert metrics[f"token_fraction/{name}"] == pytest.approx(count / total, abs=0.01)
  assert sum(metrics[f"token_fraction/{n}"] for n in counted) == pytest.approx(1.0)
  assert metrics["padding_fraction"] == 0.0
  assert metrics["loss_token_fraction"] == pytest.approx(
      sum(float(b["weights"].astype(bool).sum()) for b in batches) / (150 * 4 * 128))


def test_mixture_resume_is_exact(mixture_setup):
  config, tokenizer = mixture_setup
  make = lambda: pipeline.make_lm_iterator(config, tokenizer, split="train", batch_size=2,
                                           seq_len=96, seed=3)
  original = make()
  for _ in range(23):
    next(original)
  state = json.loads(json.dumps(original.get_state()))
  expected = [next(original) for _ in range(10)]
  resumed = make()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert resumed.metrics() == original.metrics()


def test_mixture_eval_split_uses_held_out_examples(mixture_setup):
  config, tokenizer = mixture_setup
  train = pipeline.make_lm_iterator(config, tokenizer, split="train", batch_size=2, seq_len=128,
                                    seed=0)
  held_out = pipeline.make_lm_iterator(config, tokenizer, split="eval", batch_size=2,
                                       seq_len=128, seed=0)
  train_texts = {tokenizer.decode(ids) for ids, _ in _documents([next(train) for _ in range(200)],
                                                               tokenizer.eos_id)}
  eval_texts = {tokenizer.decode(ids) for ids, _ in _documents([next(held_out) for _ in range(40)],
                                                              tokenizer.eos_id)}
  assert eval_texts and not train_texts & eval_texts
  assert {_classify(t) for t in eval_texts} == {"code", "commits", "trajectories", "instructions"}


def test_stream_without_source_is_a_clear_error(mixture_setup):
  config, tokenizer = mixture_setup
  config = config.copy_and_resolve_references()
  config.commits.repo = ""
  with pytest.raises(ValueError, match="data.commits.repo"):
    pipeline.make_lm_iterator(config, tokenizer, split="train", batch_size=1, seq_len=8, seed=0)


def test_commit_is_rendered_as_request_and_diff(mixture_setup):
  example = {"repo": b"r", "message": b"Fix the bug", "diff": b"--- a/x\n+++ b/x\n", "sha": b"ab"}
  text = chat.render_text(pipeline.commit_conversation(example))
  assert text == ("<|im_start|>user\nRepository: r\n\nFix the bug<|im_end|>\n"
                  "<|im_start|>assistant\n--- a/x\n+++ b/x\n<|im_end|>\n")
  assert special_tokens.IM_START in text


def test_stream_missing_from_a_split(mixture_setup, tmp_path):
  """A stream with no held-out examples is left out of the eval mixture, but is an error in train."""
  config, tokenizer = mixture_setup
  config = config.copy_and_resolve_references()
  task_for = {split: next(f"task{i}" for i in range(1000)
                          if common.split_of(f"task:task{i}", config.eval_fraction) == split)
              for split in ("train", "eval")}
  for split, task in task_for.items():  # every line of the file lands in `split`
    path = tmp_path / f"{split}_only.jsonl"
    conversations = [dataclasses.replace(c, meta={"task_id": task})
                     for c in _conversations("instructions", 5)]
    path.write_text(chat.conversations_to_jsonl(conversations))
  config.instructions.paths = str(tmp_path / "train_only.jsonl")
  held_out = pipeline.make_lm_iterator(config, tokenizer, split="eval", batch_size=1, seq_len=64,
                                       seed=0)
  metrics = held_out.metrics()
  assert "token_fraction/instructions" not in metrics
  assert metrics["target_fraction/code"] == pytest.approx(0.4 / 0.9)
  config.instructions.paths = str(tmp_path / "eval_only.jsonl")
  with pytest.raises(pipeline.EmptySplitError, match="'instructions'.*no 'train' examples"):
    pipeline.make_lm_iterator(config, tokenizer, split="train", batch_size=1, seq_len=64, seed=0)


@pytest.mark.parametrize("render", ["conversation", "code_file"])
def test_evol_instruct_records_as_instruction_stream(mixture_setup, tmp_path, render):
  from kat_jax.data import evol_instruct
  config, tokenizer = mixture_setup
  config = config.copy_and_resolve_references()
  records = [evol_instruct.EvolRecord(id=f"r{i}", instruction=f"Return {i} plus x.",
                                      solution=f"def plus_{i}(x):\n    return x + {i}\n", round=1)
             for i in range(30)]
  path = tmp_path / "evol.jsonl"
  evol_instruct.write_jsonl(records, str(path))
  config.instructions.paths = str(path)
  config.instructions.render = render
  config.fim.rate = 1.0 if render == "code_file" else 0.0
  config.fim.structured_rate = 1.0
  for name in config_lib.STREAMS:
    config.mixture[name] = 1.0 if name == "instructions" else 0.0
  iterator = pipeline.make_lm_iterator(config, tokenizer, split="train", batch_size=2,
                                       seq_len=128, seed=0)
  documents = _documents([next(iterator) for _ in range(20)], tokenizer.eos_id)
  assert len(documents) >= 10
  by_id = {r.id: r for r in records}
  for ids, weights in documents:
    text = tokenizer.decode(ids[:-1])
    if render == "conversation":
      record = next(r for r in records if f"user\n{r.instruction}<|im_end|>" in text)
      assert text == chat.render_text(chat.Conversation((
          chat.Message("user", record.instruction), chat.Message("assistant", record.solution))))
    else:
      record_id = text.split("\n", 1)[0].removeprefix("# path: instructions/").removesuffix(".py")
      record = by_id[record_id]
      expected = evol_instruct.to_code_file(record.instruction, record.solution,
                                            path=f"instructions/{record.id}.py")
      header = expected[:expected.index("\n", expected.index("\n") + 1) + 1]
      assert text.startswith(header + "<|fim_prefix|>")
      body = text[len(header):]
      if body.startswith("<|fim_prefix|><|fim_suffix|>"):  # SPM
        suffix, prefix_middle = body[len("<|fim_prefix|><|fim_suffix|>"):].split("<|fim_middle|>")
        assert header + prefix_middle + suffix == expected
      else:
        prefix, rest = body[len("<|fim_prefix|>"):].split("<|fim_suffix|>")
        suffix, middle = rest.split("<|fim_middle|>")
        assert header + prefix + middle + suffix == expected
  assert iterator.metrics()["fim_token_fraction"] == (1.0 if render == "code_file" else 0.0)


def test_procedural_stream_renders_tasks_with_assistant_loss(mixture_setup):
  from kat_jax.data import procedural as procedural_tasks
  config, tokenizer = mixture_setup
  config = config.copy_and_resolve_references()
  for name in config_lib.STREAMS:
    config.mixture[name] = 1.0 if name == "procedural" else 0.0
  config.procedural.num_train, config.procedural.num_eval = 40, 10
  iterator = pipeline.make_lm_iterator(config, tokenizer, split="train", batch_size=2,
                                       seq_len=128, seed=0)
  documents = _documents([next(iterator) for _ in range(10)], tokenizer.eos_id)
  tasks = procedural_tasks.generate_tasks(config.procedural.seed, 40, split="train")
  conversations = {chat.render_text(procedural_tasks.task_to_conversation(t)):
                   procedural_tasks.task_to_conversation(t) for t in tasks}
  assert len(documents) >= 5
  for ids, weights in documents:
    conversation = conversations[tokenizer.decode(ids[:-1])]
    rendered = chat.render(conversation, tokenizer, loss_on="assistant")
    np.testing.assert_array_equal(
        weights, np.concatenate([rendered.loss_mask[1:], [0, 0]]).astype(np.float32))
    assert 0 < weights.sum() < len(weights) - 1  # the spec is context, the solution the target


@pytest.mark.slow
def test_default_procedural_stream_builds(mixture_setup, tmp_path):
  """The default data.procedural section builds its corpus (both splits, exactly the requested
  numbers of distinct tasks) and streams it; only the mixture weights and the cache directory are
  changed. Slow: generating the default corpus takes over a minute on 2 cores."""
  from kat_jax.data import corpora
  from kat_jax.data.corpora import procedural as procedural_corpus
  _, tokenizer = mixture_setup
  config = config_lib.default_data_config()
  config.data_dir = str(tmp_path / "tfds")
  for name in config_lib.STREAMS:
    config.mixture[name] = 1.0 if name == "procedural" else 0.0
  section = config.procedural
  for split in ("train", "eval"):
    iterator = pipeline.make_lm_iterator(config, tokenizer, split=split, batch_size=2, seq_len=128,
                                         seed=0)
    assert iterator.stats()["procedural"]["kept"] == {"train": section.num_train,
                                                       "eval": section.num_eval}
    batch = next(iterator)
    assert (batch["segment_ids"] > 0).all() and batch["weights"].sum() > 0
  builder = corpora.prepare(procedural_corpus.ProceduralTasks, procedural_corpus.procedural_config(
      families=config_lib.split_list(section.families),
      levels=[int(v) for v in config_lib.split_list(section.levels)], num_train=section.num_train,
      num_eval=section.num_eval, seed=section.seed, heldout_fraction=section.heldout_fraction),
      config.data_dir)
  for split, count in (("train", section.num_train), ("eval", section.num_eval)):
    source = builder.as_data_source(split=split)
    assert len({source[i]["task_id"] for i in range(len(source))}) == count
