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
  """Each row's real tokens concatenated over consecutive batches (a row continues its document in
  the same row of the next batch), cut at EOS: the complete documents, without their EOS."""
  documents = []
  for row in range(batches[0]["inputs"].shape[0]):
    tokens = np.concatenate([b["inputs"][row][b["segment_ids"][row] > 0] for b in batches])
    ends = np.flatnonzero(tokens == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    documents += [tokens[start:end] for start, end in zip(starts, ends)]
  return documents


def next_batches(iterator, count):
  """``count`` batches and, for each, ``iterator.last_batch_pieces()``."""
  batches, pieces = [], []
  for _ in range(count):
    batches.append(next(iterator))
    pieces.append(iterator.last_batch_pieces())
  return batches, pieces


def assemble_documents(batches, pieces, seq_len):
  """{(stream, index): token ids} from the reported pieces, checking where each piece lies: pieces
  tile each row left to right, and a document's next piece is at column 0 of the same row of the
  next batch, continuing at the token where the previous piece stopped."""
  documents, last_seen = {}, {}
  for b, (batch, batch_pieces) in enumerate(zip(batches, pieces)):
    for row, row_pieces in enumerate(batch_pieces):
      column = 0
      for piece in row_pieces:
        assert piece.column == column and piece.length > 0
        key = (piece.stream, piece.index)
        ids = batch["inputs"][row, piece.column:piece.column + piece.length]
        if piece.start == 0:
          assert key not in documents
          documents[key] = ids
        else:
          assert last_seen[key] == (b - 1, row) and piece.column == 0, (key, piece)
          assert len(documents[key]) == piece.start
          documents[key] = np.concatenate([documents[key], ids])
        last_seen[key] = (b, row)
        column += piece.length
      assert column == int((batch["segment_ids"][row] > 0).sum()) <= seq_len
  return documents


@pytest.mark.parametrize("packing", ["split", "pad"])
def test_packing_invariants_and_documents_intact(data_config, tokenizer, packing):
  config = data_config.copy_and_resolve_references()
  config.packing = packing
  iterator = pipeline.make_lm_iterator(config, tokenizer, split="train", batch_size=3,
                                       seq_len=256, seed=1)
  batches, pieces = next_batches(iterator, 80)
  for batch in batches:
    assert_packing_invariants(batch, tokenizer.eos_id, tokenizer.pad_id)
  # A cut document continues in the same row of the next batch: the target before the cut is that
  # row's first input.
  for batch, next_batch in zip(batches, batches[1:]):
    for row in range(batch["inputs"].shape[0]):
      last = np.flatnonzero(batch["segment_ids"][row] > 0)[-1]
      if batch["inputs"][row, last] != tokenizer.eos_id:
        assert packing == "split" or last == batch["inputs"].shape[1] - 1
        assert batch["weights"][row, last] == 1
        assert batch["targets"][row, last] == next_batch["inputs"][row, 0]
  # The pieces reassemble into whole corpus files; drawn in a shuffled order, each file once per
  # epoch.
  texts = set(corpus_documents(config, "train"))
  documents = assemble_documents(batches, pieces, 256)
  complete = {key: ids for key, ids in documents.items() if ids[-1] == tokenizer.eos_id}
  assert len(documents) - len(complete) <= 3  # at most one unfinished document per row
  decoded = [tokenizer.decode(complete[key][:-1]) for key in sorted(complete)]
  assert sorted(complete)[:2 * len(texts)] == [("code", i) for i in range(2 * len(texts))]
  assert all(text in texts for text in decoded)
  assert set(decoded[:len(texts)]) == texts  # first epoch: each file exactly once
  assert decoded[:len(texts)] != decoded[len(texts):2 * len(texts)]  # reshuffled next epoch
  # The rows' own token streams hold the same documents.
  row_decoded = [tokenizer.decode(ids) for ids in document_stream(batches, tokenizer.eos_id)]
  assert sorted(row_decoded) == sorted(decoded)
  metrics = iterator.metrics()
  assert metrics["token_fraction/code"] == 1.0
  assert metrics["documents_per_batch"] == pytest.approx(
      np.mean([len({(p.stream, p.index) for row in bp for p in row}) for bp in pieces]))
  if packing == "split":
    assert metrics["padding_fraction"] == 0.0
  else:
    padding = sum(int((b["segment_ids"] == 0).sum()) for b in batches) / (80 * 3 * 256)
    assert padding > 0
    assert metrics["padding_fraction"] == pytest.approx(padding)


@pytest.mark.parametrize("packing", ["split", "pad"])
def test_rows_of_a_batch_hold_different_long_documents(data_config, tokenizer, packing):
  """Documents much longer than a row: each row continues its own document over many batches, so
  every batch holds batch_size different documents (sequential packing would fill a whole batch
  from one or two files)."""
  config = data_config.copy_and_resolve_references()
  config.packing = packing
  batch_size, seq_len = 4, 16
  iterator = pipeline.make_lm_iterator(config, tokenizer, split="train", batch_size=batch_size,
                                       seq_len=seq_len, seed=2)
  batches, pieces = next_batches(iterator, 60)
  num_files = len(corpus_documents(config, "train"))
  for batch_pieces in pieces:
    assert len({(p.stream, p.index) for row in batch_pieces for p in row}) >= min(batch_size,
                                                                               num_files)
  assert iterator.metrics()["documents_per_batch"] >= batch_size
  # Row r's content over consecutive batches is its documents, one after the other: the first
  # batch starts batch_size different files, seen in their path headers.
  documents = assemble_documents(batches, pieces, seq_len)
  first = [tokenizer.decode(documents[(p.stream, p.index)]) for p in
           (row[0] for row in pieces[0])]
  paths = [text.split("\n", 1)[0] for text in first]
  assert all(path.startswith("# path: pkg") for path in paths) and len(set(paths)) == batch_size
  for row in range(batch_size):
    row_tokens = np.concatenate([b["inputs"][row][b["segment_ids"][row] > 0] for b in batches])
    row_keys = list(dict.fromkeys((p.stream, p.index) for bp in pieces for p in bp[row]))
    np.testing.assert_array_equal(row_tokens, np.concatenate([documents[k] for k in row_keys]))
    assert all(documents[k][-1] == tokenizer.eos_id for k in row_keys[:-1])
    assert row_keys == sorted(row_keys)  # rows draw from the shared stream in order


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


def test_resume_with_another_batch_size_continues_every_document(data_config, tokenizer):
  make = lambda batch_size: pipeline.make_lm_iterator(data_config, tokenizer, split="train",
                                                      batch_size=batch_size, seq_len=48, seed=4)
  original = make(3)
  for _ in range(7):
    next(original)
  state = json.loads(json.dumps(original.get_state()))
  in_progress = [tuple(cursor) for cursor in state["rows"] if cursor is not None]
  assert len(in_progress) >= 2
  resumed = make(1)  # one row: the other rows' documents wait as pending, then follow in order
  resumed.set_state(state)
  _, pieces = next_batches(resumed, 40)
  first_pieces = {}  # (stream, index) -> the offset the document resumed or started at
  for p in (p for bp in pieces for p in bp[0]):
    first_pieces.setdefault((p.stream, p.index), p.start)
  starts = [(stream, index, start) for (stream, index), start in first_pieces.items()]
  assert starts[:len(in_progress)] == in_progress
  next_index = state["next_index"]["code"]
  assert starts[len(in_progress):] == [("code", i, 0) for i in range(
      next_index, next_index + len(starts) - len(in_progress))]


def test_version_1_state_resumes_its_document_in_row_0(data_config, tokenizer):
  """With one row, row-level packing is the old sequential packing, so a version-1 state made from
  a one-row state continues identically."""
  make = lambda: pipeline.make_lm_iterator(data_config, tokenizer, split="train", batch_size=1,
                                           seq_len=40, seed=6)
  original = make()
  for _ in range(9):
    next(original)
  state = original.get_state()
  assert state["rows"][0] is not None and not state["pending"]
  old_state = {"version": 1, "next_index": state["next_index"], "current": state["rows"][0],
               "mixture": state["mixture"], "counters": state["counters"],
               "shape": state["shape"], "packing": state["packing"]}
  resumed = make()
  resumed.set_state(json.loads(json.dumps(old_state)))
  for _ in range(8):
    np.testing.assert_array_equal(next(resumed)["inputs"], next(original)["inputs"])
  with pytest.raises(ValueError, match="state version 0"):
    resumed.set_state(dict(state, version=0))


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
                                       seq_len=256, seed=0)
  batches = [next(iterator) for _ in range(10)]
  eval_texts = set(corpus_documents(data_config, "eval"))
  decoded = {tokenizer.decode(d) for d in document_stream(batches, tokenizer.eos_id)}
  assert decoded and decoded <= eval_texts


def test_shards_are_disjoint(data_config, tokenizer):
  seen = []
  for shard in range(2):
    iterator = pipeline.make_lm_iterator(data_config, tokenizer, split="train", batch_size=2,
                                         seq_len=256, seed=0, shard_index=shard, shard_count=2)
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
