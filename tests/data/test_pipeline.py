"""Packed LM iterator: packing invariants, exact resume, splits, shards, tokenizer caching."""
import json
import os
import shutil
import sysconfig

import numpy as np
import pytest

from kat_jax.data import config as config_lib
from kat_jax.data import pipeline
from kat_jax.data import tokenizer as tokenizer_lib
from kat_jax.data.corpora import source_code

STDLIB = sysconfig.get_paths()["stdlib"]


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
  """A small code tree: 24 short stdlib modules (in subdirectories, to exercise relative paths)."""
  root = tmp_path_factory.mktemp("code")
  files = [rel for rel in source_code.list_source_files(STDLIB, (".py",), ("test", "tests",
                                                                            "site-packages"))
           if 300 < os.path.getsize(os.path.join(STDLIB, rel)) < 2500][:24]
  assert len(files) == 24
  for i, rel in enumerate(files):
    target = root / f"pkg{i % 3}" / rel.replace("/", "_")
    target.parent.mkdir(exist_ok=True)
    shutil.copy(os.path.join(STDLIB, rel), target)
  return str(root)


@pytest.fixture(scope="module")
def data_config(corpus_root, tmp_path_factory):
  config = config_lib.default_data_config()
  config.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.code.root = corpus_root
  config.eval_fraction = 0.25
  config.vocab_size = 512
  config.tokenizer_cache_dir = str(tmp_path_factory.mktemp("tokenizers"))
  return config


@pytest.fixture(scope="module")
def tokenizer(data_config):
  return pipeline.get_or_train_tokenizer(data_config, workdir="/nonexistent-unused")


def corpus_documents(data_config, split):
  builder = pipeline.code_corpus_builder(data_config)
  source = builder.as_data_source(split=split)
  return [pipeline.code_example_text(source[i]) for i in range(len(source))]


def assert_packing_invariants(batch, eos_id, pad_id):
  inputs, targets, positions = batch["inputs"], batch["targets"], batch["positions"]
  segment_ids, weights = batch["segment_ids"], batch["weights"]
  for name, dtype in [("inputs", np.int32), ("targets", np.int32), ("positions", np.int32),
                      ("segment_ids", np.int32), ("weights", np.float32)]:
    assert batch[name].dtype == dtype and batch[name].shape == inputs.shape, name
  for row in range(inputs.shape[0]):
    seg = segment_ids[row]
    real = seg > 0
    # Padding only after the last segment; segments numbered 1, 2, ... in contiguous runs.
    num_real = int(real.sum())
    assert real[:num_real].all() and not real[num_real:].any()
    runs = [seg[0]] + [seg[i] for i in range(1, num_real) if seg[i] != seg[i - 1]]
    assert runs == list(range(1, len(runs) + 1)) if num_real else runs == [0]
    for s in range(1, len(runs) + 1 if num_real else 1):
      cols = np.flatnonzero(seg == s)
      assert (positions[row, cols] == np.arange(len(cols))).all()
      # Targets are the next inputs inside a segment.
      assert (targets[row, cols[:-1]] == inputs[row, cols[1:]]).all()
      # EOS only ends a segment.
      assert not (inputs[row, cols[:-1]] == eos_id).any()
    # Weight 0 exactly on padding and on each document's last token (EOS).
    is_document_end = real & (inputs[row] == eos_id)
    assert ((weights[row] == 0) == (~real | is_document_end)).all()
    assert (weights[row][real & ~is_document_end] == 1).all()
    assert (inputs[row][~real] == pad_id).all() and (positions[row][~real] == 0).all()


def document_stream(batches, eos_id):
  """Concatenates the real tokens of consecutive batches and cuts them at EOS."""
  tokens = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
  ends = np.flatnonzero(tokens == eos_id)
  return [tokens[start + 1 if i else 0:end] for i, (start, end) in
          enumerate(zip(np.concatenate([[0], ends[:-1]]), ends))]


@pytest.mark.parametrize("packing", ["split", "pad"])
def test_packing_invariants_and_documents_intact(data_config, tokenizer, packing):
  config = data_config.copy_and_resolve_references()
  config.packing = packing
  iterator = pipeline.make_lm_iterator(config, tokenizer, split="train", batch_size=3,
                                       seq_len=256, seed=1)
  batches = [next(iterator) for _ in range(80)]
  for batch in batches:
    assert_packing_invariants(batch, tokenizer.eos_id, tokenizer.pad_id)
  # A cut document continues in the next row: the target before the cut is the next row's first
  # input.
  flat = [(b, r) for b in batches for r in range(b["inputs"].shape[0])]
  for (batch, row), (next_batch, next_row) in zip(flat, flat[1:]):
    real = batch["segment_ids"][row] > 0
    last = np.flatnonzero(real)[-1]
    if batch["inputs"][row, last] != tokenizer.eos_id:
      assert packing == "split" or last == batch["inputs"].shape[1] - 1
      assert batch["weights"][row, last] == 1
      assert batch["targets"][row, last] == next_batch["inputs"][next_row, 0]
  # Decoding the packed stream gives back whole corpus files, in a shuffled order.
  texts = set(corpus_documents(config, "train"))
  decoded = [tokenizer.decode(doc) for doc in document_stream(batches, tokenizer.eos_id)]
  assert len(decoded) > len(texts)  # more than an epoch
  assert all(text in texts for text in decoded)
  assert set(decoded[:len(texts)]) == texts  # first epoch: each file exactly once
  assert decoded[:len(texts)] != decoded[len(texts):2 * len(texts)]  # reshuffled next epoch
  metrics = iterator.metrics()
  assert metrics["token_fraction/code"] == 1.0
  if packing == "split":
    assert metrics["padding_fraction"] == 0.0
  else:
    padding = sum(int((b["segment_ids"] == 0).sum()) for b in batches) / (80 * 3 * 256)
    assert padding > 0
    assert metrics["padding_fraction"] == pytest.approx(padding)


@pytest.mark.parametrize("packing", ["split", "pad"])
def test_resume_mid_epoch_gives_identical_batches(data_config, tokenizer, packing):
  config = data_config.copy_and_resolve_references()
  config.packing = packing
  make = lambda: pipeline.make_lm_iterator(config, tokenizer, split="train", batch_size=2,
                                           seq_len=64, seed=7)
  original = make()
  states, batches = [], []
  for _ in range(30):
    states.append(json.loads(json.dumps(original.get_state())))
    batches.append(next(original))
  for resume_at in (0, 5, 17, 29):
    resumed = make()
    resumed.set_state(states[resume_at])
    for expected in batches[resume_at:resume_at + 6]:
      got = next(resumed)
      for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{key} @ {resume_at}")
    resumed.close()
  # Metrics resume too.
  resumed = make()
  resumed.set_state(states[12])
  for _ in range(12, 30):
    next(resumed)
  assert resumed.metrics() == original.metrics()


def test_seed_changes_order(data_config, tokenizer):
  batch = lambda seed: next(pipeline.make_lm_iterator(data_config, tokenizer, split="train",
                                                      batch_size=2, seq_len=64, seed=seed))
  assert not np.array_equal(batch(0)["inputs"], batch(1)["inputs"])
  np.testing.assert_array_equal(batch(3)["inputs"], batch(3)["inputs"])


def test_splits_are_disjoint_and_cover_the_corpus(data_config, corpus_root):
  builder = pipeline.code_corpus_builder(data_config)
  paths = {split: {builder.as_data_source(split=split)[i]["path"].decode()
                   for i in range(len(builder.as_data_source(split=split)))}
           for split in ("train", "eval")}
  assert paths["train"] and paths["eval"]
  assert not paths["train"] & paths["eval"]
  assert paths["train"] | paths["eval"] == set(
      source_code.list_source_files(corpus_root, (".py",), ()))


def test_eval_iterator_reads_only_eval_documents(data_config, tokenizer):
  iterator = pipeline.make_lm_iterator(data_config, tokenizer, split="eval", batch_size=2,
                                       seq_len=64, seed=0)
  batches = [next(iterator) for _ in range(10)]
  eval_texts = set(corpus_documents(data_config, "eval"))
  decoded = {tokenizer.decode(d) for d in document_stream(batches, tokenizer.eos_id)}
  assert decoded and decoded <= eval_texts


def test_shards_are_disjoint(data_config, tokenizer):
  seen = []
  for shard in range(2):
    iterator = pipeline.make_lm_iterator(data_config, tokenizer, split="train", batch_size=2,
                                         seq_len=64, seed=0, shard_index=shard, shard_count=2)
    batches = [next(iterator) for _ in range(15)]
    seen.append({tokenizer.decode(d) for d in document_stream(batches, tokenizer.eos_id)})
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  with pytest.raises(ValueError, match="shard_index=2"):
    pipeline.make_lm_iterator(data_config, tokenizer, split="train", batch_size=2, seq_len=64,
                              seed=0, shard_index=2, shard_count=2)


def test_tokenizer_is_trained_once_and_cached(data_config, tokenizer, monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("retrained although a cached tokenizer exists")
  monkeypatch.setattr(tokenizer_lib.SentencePieceTokenizer, "train", fail)
  again = pipeline.get_or_train_tokenizer(data_config, workdir="/nonexistent-unused")
  assert again.model_proto == tokenizer.model_proto
  # An explicit tokenizer_path wins.
  config = data_config.copy_and_resolve_references()
  cache = os.path.join(config.tokenizer_cache_dir, os.listdir(config.tokenizer_cache_dir)[0])
  config.tokenizer_path = cache
  assert pipeline.get_or_train_tokenizer(config, "/x").model_proto == tokenizer.model_proto


def test_bad_config_errors_are_clear(data_config, tokenizer):
  config = data_config.copy_and_resolve_references()
  config.mixture.code = 0.0
  with pytest.raises(ValueError, match="all mixture weights are zero"):
    pipeline.make_lm_iterator(config, tokenizer, split="train", batch_size=1, seq_len=8, seed=0)
  with pytest.raises(ValueError, match="split='test'"):
    pipeline.make_lm_iterator(data_config, tokenizer, split="test", batch_size=1, seq_len=8, seed=0)


def _unfim(text):
  """The original text of a decoded FIM document (header kept in front), or None if not FIM."""
  prefix, suffix, middle = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
  if prefix not in text:
    return None
  header, body = text.split(prefix, 1)
  if body.startswith(suffix):  # SPM: suffix first, then prefix+middle as one text
    suffix_text, prefix_middle = body[len(suffix):].split(middle, 1)
    return header + prefix_middle + suffix_text
  prefix_text, rest = body.split(suffix, 1)
  suffix_text, middle_text = rest.split(middle, 1)
  return header + prefix_text + middle_text + suffix_text


def test_fim_documents_reassemble_and_resume(data_config, tokenizer):
  config = data_config.copy_and_resolve_references()
  config.fim.rate = 0.5
  config.fim.spm_rate = 0.5
  config.fim.structured_rate = 0.5
  make = lambda: pipeline.make_lm_iterator(config, tokenizer, split="train", batch_size=2,
                                           seq_len=256, seed=5)
  iterator = make()
  states, batches = [], []
  for _ in range(60):
    states.append(iterator.get_state())
    batches.append(next(iterator))
  for batch in batches:  # every FIM piece is a target: the plain-document invariants hold
    assert_packing_invariants(batch, tokenizer.eos_id, tokenizer.pad_id)
  texts = set(corpus_documents(config, "train"))
  sentinels = {tokenizer.token_id(s) for s in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")}
  fim_documents = fim_tokens = total_tokens = 0
  for ids in document_stream(batches, tokenizer.eos_id):
    text = tokenizer.decode(ids)
    original = _unfim(text)
    if original is None:
      assert text in texts
    else:
      assert original in texts and text.startswith("# path: ")
      assert len(sentinels.intersection(ids.tolist())) == 3
      fim_documents += 1
      fim_tokens += len(ids) + 1
    total_tokens += len(ids) + 1
  assert fim_documents >= 5
  metrics = iterator.metrics()
  fim_counts = {k: v for k, v in metrics.items() if k.startswith("fim/")}
  assert fim_counts["fim/documents"] == metrics["documents/code"]
  assert fim_counts["fim/char"] + fim_counts["fim/structured"] >= fim_documents
  assert fim_counts["fim/structured"] > 0 and fim_counts["fim/psm"] > 0
  assert fim_counts["fim/spm"] > 0
  assert metrics["fim_token_fraction"] == pytest.approx(fim_tokens / total_tokens, abs=0.1)
  resumed = make()
  resumed.set_state(states[31])
  for expected in batches[31:40]:
    got = next(resumed)
    np.testing.assert_array_equal(got["inputs"], expected["inputs"])
    np.testing.assert_array_equal(got["weights"], expected["weights"])
