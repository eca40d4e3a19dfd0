"""Grain pipelines from the configured corpora to packed, checkpointable LM batches.

Usage (the trainer's whole view of the data)::

  tokenizer = get_or_train_tokenizer(config.data, workdir)
  batches = make_lm_iterator(config.data, tokenizer, split="train", batch_size=8, seq_len=512,
                             seed=0, shard_index=jax.process_index(), shard_count=jax.process_count())
  batch = next(batches)          # dict of [batch_size, seq_len] arrays, see LMIterator
  state = batches.get_state()    # JSON-serializable; save with the checkpoint
  batches.set_state(state)       # later batches are identical to the uninterrupted run
  batches.metrics()              # realized per-stream token fractions, padding, FIM share, skips

Each mixture stream is a grain ``MapDataset``: corpus split (TFDS array_record source) → this process's
shard (``[shard_index::shard_count]``) → ``shuffle(seed)`` → ``repeat()`` (grain reshuffles every
epoch with a per-epoch seed) → ``map_with_index(to Document)`` (render, optional FIM, tokenize, EOS).
Because the stream is random-access, its position is one integer; the iterator's state is those
integers, each row's document in progress and its offset, and the mixture's token counts. Rows pack
independently (row-level mixing, see ``LMIterator``), so a batch's rows hold different documents.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import tempfile
import threading
import time
import zlib
from typing import Callable, Mapping, NamedTuple, Optional

from absl import logging
import grain
import ml_collections
import numpy as np

from kat_jax import workdir as workdir_lib
from kat_jax.data import chat
from kat_jax.data import corpora
from kat_jax.data import mixture as mixture_lib
from kat_jax.data import taxonomy
from kat_jax.data import tokenizer as tokenizer_lib
from kat_jax.data.config import split_list
from kat_jax.data.corpora import common
from kat_jax.data.corpora import git_commits
from kat_jax.data.corpora import jsonl
from kat_jax.data.corpora import source_code

SPLITS = common.SPLITS
_FIM_LOCK = threading.Lock()
_STATE_VERSION = 2


class Document(NamedTuple):
  """One tokenized document, ready to pack.

  ``ids`` int32 [L] ends with EOS. ``loss_mask`` float32 [L]: ``loss_mask[j]`` is the weight of
  predicting token ``j`` from its prefix (0 for prompt tokens of a conversation; ``loss_mask[0]`` is
  never used). ``fim``: whether the document was FIM-transformed.
  """
  ids: np.ndarray
  loss_mask: np.ndarray
  fim: bool = False
  fim_stats: Optional[dict] = None  # fim.FimStats.to_dict() of the FIM decision, if FIM is on


def plain_document(ids: list[int], eos_id: int, fim: bool = False) -> Document:
  """A document whose every token is a training target, with EOS appended."""
  ids_l = np.asarray(list(ids) + [eos_id], dtype=np.int32)
  return Document(ids_l, np.ones(ids_l.shape, np.float32), fim)


def masked_document(ids: np.ndarray, loss_mask: np.ndarray, eos_id: int, eos_weight: float,
                    fim: bool = False, fim_stats: Optional[dict] = None) -> Document:
  """A rendered document (per-token loss mask) with EOS appended, its target weight ``eos_weight``."""
  ids_l = np.concatenate([np.asarray(ids, np.int32), np.asarray([eos_id], np.int32)])
  mask_l = np.concatenate([np.asarray(loss_mask, np.float32), np.asarray([eos_weight], np.float32)])
  return Document(ids_l, mask_l, fim, fim_stats)


# ----------------------------------------------------------------------------------------- tokenizer


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def code_corpus_builder(data_config: ml_collections.ConfigDict):
  """The prepared (built once, cached) source-code corpus of ``data_config.code``."""
  code = data_config.code
  config = source_code.source_code_config(
      code.root, extensions=split_list(code.extensions), exclude_dirs=split_list(code.exclude_dirs),
      max_file_bytes=code.max_file_bytes, eval_fraction=data_config.eval_fraction)
  return corpora.prepare(source_code.SourceCode, config, data_config.data_dir)


def code_example_text(example: Mapping, language_headers: bool = True) -> str:
  content = _text(example["content"])
  if not language_headers:
    return content
  return source_code.document_text(_text(example["path"]), _text(example["language"]), content)


def _tokenizer_cache_key(data_config, builder) -> str:
  fields = dict(corpus=builder.builder_config.name, vocab_size=int(data_config.vocab_size),
                max_sentences=int(data_config.tokenizer_max_sentences),
                lines=int(data_config.tokenizer_lines_per_sentence),
                headers=bool(data_config.code.language_headers))
  return f"sentencepiece_{data_config.vocab_size}_{common.config_fingerprint(fields)}"


def get_or_train_tokenizer(data_config: ml_collections.ConfigDict, workdir: str
                           ) -> tokenizer_lib.Tokenizer:
  """``data_config.tokenizer_path`` if set; else the tokenizer trained once from the code corpus.

  A trained tokenizer is cached in ``data_config.tokenizer_cache_dir`` (default ``<workdir>/tokenizer``)
  under a name fingerprinting the corpus and tokenizer settings, and reused by later calls.
  """
  if data_config.tokenizer_path:
    return tokenizer_lib.load_tokenizer(data_config.tokenizer_path)
  builder = code_corpus_builder(data_config)
  cache_root = data_config.tokenizer_cache_dir or workdir_lib.tokenizer_dir(workdir)
  directory = os.path.join(cache_root, _tokenizer_cache_key(data_config, builder))
  cached = tokenizer_lib.maybe_tokenizer(directory)
  if cached is not None:
    return cached
  start = time.time()
  source = builder.as_data_source(split="train")
  headers = bool(data_config.code.language_headers)
  texts = [code_example_text(source[i], headers) for i in range(len(source))]
  tokenizer = tokenizer_lib.SentencePieceTokenizer.train(
      texts, vocab_size=int(data_config.vocab_size),
      max_sentences=int(data_config.tokenizer_max_sentences),
      lines_per_sentence=int(data_config.tokenizer_lines_per_sentence))
  # Write to a temporary directory and rename, so concurrent processes never see half a tokenizer.
  os.makedirs(cache_root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tokenizer_tmp_", dir=cache_root)
  tokenizer.save(tmp)
  try:
    os.rename(tmp, directory)
  except OSError:  # another process won the race; use its copy
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("trained tokenizer (vocab %d) on %d files in %.1fs -> %s", tokenizer.vocab_size,
               len(texts), time.time() - start, directory)
  return tokenizer_lib.load_tokenizer(directory)


# ------------------------------------------------------------------------------------------ streams


class Stream(NamedTuple):
  """An infinite random-access stream of Documents and the build statistics of its corpora."""
  documents: grain.MapDataset
  stats: dict


def _stream_seed(seed: int, name: str) -> int:
  return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def document_rng(seed: int, name: str, index: int) -> np.random.Generator:
  """The random generator for the ``index``-th document of stream ``name`` (FIM choices etc.)."""
  return np.random.default_rng([_stream_seed(seed, name), int(index)])


class EmptySplitError(ValueError):
  """A stream has no examples in the requested split (or in this process's shard of it)."""


def _sharded_shuffled(builder, name: str, split: str, seed: int, shard_index: int,
                      shard_count: int) -> grain.MapDataset:
  """The infinite shuffled stream of this shard of ``split`` of a prepared corpus."""
  dataset = _sharded(builder, name, split, shard_index, shard_count)
  return dataset.shuffle(seed=_stream_seed(seed, name)).repeat()


def _sharded(builder, name: str, split: str, shard_index: int, shard_count: int
             ) -> grain.MapDataset:
  """This shard of ``split`` of a prepared corpus, in corpus order."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is outside [0, shard_count={shard_count})")
  if not common.has_split(builder, split):
    raise EmptySplitError(
        f"stream {name!r}: corpus {builder.builder_config.name} has no {split!r} examples; use a "
        "larger corpus or another data.eval_fraction, or give the stream weight 0.")
  source = builder.as_data_source(split=split)
  dataset = grain.MapDataset.source(source)
  if shard_count > 1:
    dataset = dataset[shard_index::shard_count]
  if len(dataset) == 0:
    raise EmptySplitError(
        f"stream {name!r}: split {split!r} has no examples for shard {shard_index}/{shard_count} "
        f"({len(source)} examples before sharding); use a larger corpus or a larger eval_fraction, "
        "or give the stream weight 0.")
  return dataset


def example_label(example: Mapping):
  """The taxonomy label of a JSONL corpus example (its ``metadata`` JSON), or None."""
  return taxonomy.TaskLabel.from_dict(json.loads(_text(example["metadata"])).get("label"))


def taxonomy_balanced(dataset: grain.MapDataset, labels, *, seed: int, name: str,
                      unlabeled_mass: float) -> tuple[grain.MapDataset, dict]:
  """An infinite stream of ``dataset``'s examples drawn with replacement by
  ``taxonomy.balanced_sampling_weights(labels)``, and the mass each cell gets.

  Element ``i`` is example ``draws(i // n)[i % n]`` (n = len(dataset)), where ``draws(e)`` are the
  n indices epoch ``e`` samples with a generator seeded by (stream seed, e): random access, so the
  stream's position stays one integer, as for the shuffled streams."""
  n = len(dataset)
  if len(labels) != n:
    raise ValueError(f"stream {name!r}: {len(labels)} labels for {n} examples")
  weights = taxonomy.balanced_sampling_weights(labels, unlabeled_mass=unlabeled_mass)
  stream_seed = _stream_seed(seed, name)
  lock = threading.Lock()
  cache: dict[int, np.ndarray] = {}

  def draws(epoch: int) -> np.ndarray:
    with lock:
      if epoch not in cache:
        if len(cache) >= 4:
          cache.pop(min(cache))
        cache[epoch] = np.random.default_rng([stream_seed, epoch]).choice(n, size=n, p=weights)
      return cache[epoch]

  mass: dict[str, float] = {}
  for label, w in zip(labels, weights):
    key = "unlabeled" if label is None else f"{label.task_type}/{label.scenario}"
    mass[key] = mass.get(key, 0.0) + float(w)
  balanced = grain.MapDataset.range(n).repeat().map_with_index(
      lambda i, _: dataset[int(draws(i // n)[i % n])])
  return balanced, dict(sorted(mass.items()))


def _code_stream(data_config, tokenizer, *, split, seed, shard_index, shard_count) -> Stream:
  builder = code_corpus_builder(data_config)
  dataset = _sharded_shuffled(builder, "code", split, seed, shard_index,
                              shard_count)
  headers = bool(data_config.code.language_headers)
  fim_transform = make_fim_transform(data_config, tokenizer)
  eos_id = tokenizer.eos_id

  def to_document(index, example):
    if fim_transform is not None:
      return fim_transform(example, document_rng(seed, "code", index))
    return plain_document(tokenizer.encode(code_example_text(example, headers)), eos_id)

  return Stream(dataset.map_with_index(to_document), {"code": common.builder_stats(builder)})


def make_fim_transform(data_config, tokenizer) -> Optional[Callable[..., Document]]:
  """``fn(code_example, rng) -> Document`` applying ``fim.apply_fim`` (with probability
  ``data.fim.rate``) to the file content; the path/language header stays in front as plain text.

  Returns None when FIM is off (``data.fim.rate == 0``).
  """
  fim_config = data_config.fim
  if float(fim_config.rate) <= 0.0:
    return None
  from kat_jax.data import fim   # pylint: disable=g-import-not-at-top
  headers = bool(data_config.code.language_headers)
  eos_id = tokenizer.eos_id

  def transform(example, rng) -> Document:
    path, language = _text(example["path"]), _text(example["language"])
    # CPython 3.11's ast.parse is not thread-safe ("SystemError: AST constructor recursion depth
    # mismatch" under concurrent parses), so FIM decisions run one at a time; tokenization does not.
    with _FIM_LOCK:
      pieces, stats = fim.apply_fim(
          _text(example["content"]), rng, fim_rate=float(fim_config.rate),
          spm_rate=float(fim_config.spm_rate), structured_rate=float(fim_config.structured_rate),
          language=language, max_middle_chars=int(fim_config.max_middle_chars) or None)
    if headers:
      pieces = [chat.Piece(source_code.header_text(path, language), False, True)] + list(pieces)
    ids, mask, _ = chat.encode_pieces(pieces, tokenizer)
    return masked_document(ids, mask, eos_id, 1.0, fim=bool(stats.char or stats.structured),
                           fim_stats=stats.to_dict())

  return transform


def _conversation_document(conversation, tokenizer, loss_on: str) -> Document:
  rendered = chat.render(conversation, tokenizer, loss_on=loss_on)
  return masked_document(rendered.tokens, rendered.loss_mask, tokenizer.eos_id,
                         1.0 if loss_on == "all" else 0.0)


def commit_conversation(example: Mapping):
  """A commit as a PR-like conversation: the message is the request, the diff the answer."""
  request = f"Repository: {_text(example['repo'])}\n\n{_text(example['message'])}"
  return chat.Conversation((chat.Message("user", request),
                            chat.Message("assistant", _text(example["diff"]))),
                           meta={"sha": _text(example["sha"])})


def _commits_stream(data_config, tokenizer, *, split, seed, shard_index, shard_count) -> Stream:
  commits = data_config.commits
  if not commits.repo:
    raise ValueError("mixture.commits > 0 needs data.commits.repo (a local git repository path)")
  config = git_commits.git_commits_config(
      commits.repo, revision=commits.revision, max_commits=commits.max_commits,
      max_diff_bytes=commits.max_diff_bytes, eval_fraction=data_config.eval_fraction)
  builder = corpora.prepare(git_commits.GitCommits, config, data_config.data_dir)
  dataset = _sharded_shuffled(builder, "commits", split, seed,
                              shard_index, shard_count)
  loss_on = commits.loss_on
  dataset = dataset.map(lambda e: _conversation_document(commit_conversation(e), tokenizer, loss_on))
  return Stream(dataset, {"commits": common.builder_stats(builder)})


def _code_file_documents(data_config, tokenizer, name: str, seed: int) -> Callable[..., Document]:
  """Instruction records as aiXcoder-style code files (``evol_instruct.to_code_file``), FIM'd like
  code documents when ``data.fim.rate > 0``. Conversations without a solution stay conversations."""
  from kat_jax.data import evol_instruct  # pylint: disable=g-import-not-at-top
  fim_transform = make_fim_transform(data_config, tokenizer)
  loss_on = data_config[name].loss_on

  def to_document(index, example):
    obj = json.loads(_text(example["conversation"]))
    if not (isinstance(obj.get("instruction"), str) and isinstance(obj.get("solution"), str)):
      return _conversation_document(jsonl.conversation_from_record(obj), tokenizer, loss_on)
    path = f"{name}/{obj.get('id', index)}.py"
    try:
      text = evol_instruct.to_code_file(obj["instruction"], obj["solution"], path=path)
    except ValueError:  # a solution that does not parse: keep it as a conversation
      return _conversation_document(jsonl.conversation_from_record(obj), tokenizer, loss_on)
    header = source_code.header_text(path, "python")
    assert text.startswith(header), text[:200]
    code_example = {"path": path, "language": "python", "content": text[len(header):]}
    if fim_transform is not None:
      return fim_transform(code_example, document_rng(seed, name, index))
    return plain_document(tokenizer.encode(text), tokenizer.eos_id)

  return to_document


def _jsonl_stream_factory(name: str) -> Callable[..., Stream]:
  """A stream of the JSONL conversations listed in ``data.<name>.paths``."""

  def factory(data_config, tokenizer, *, split, seed, shard_index, shard_count) -> Stream:
    section = data_config[name]
    patterns = split_list(section.paths)
    if not patterns:
      raise ValueError(f"mixture.{name} > 0 needs data.{name}.paths (comma-separated JSONL files "
                       "or globs)")
    config = jsonl.jsonl_config(patterns, name_prefix=name, eval_fraction=data_config.eval_fraction)
    builder = corpora.prepare(jsonl.JsonlConversations, config, data_config.data_dir)
    stats = {name: common.builder_stats(builder)}
    if section.balance == "taxonomy":
      examples = _sharded(builder, name, split, shard_index, shard_count)
      labels = [example_label(examples[i]) for i in range(len(examples))]
      dataset, stats[name]["cell_mass"] = taxonomy_balanced(
          examples, labels, seed=seed, name=name, unlabeled_mass=float(section.unlabeled_mass))
    elif section.balance == "":
      dataset = _sharded_shuffled(builder, name, split, seed,
                                  shard_index, shard_count)
    else:
      raise ValueError(f"data.{name}.balance={section.balance!r}; use '' (every example once "
                       "per epoch) or 'taxonomy' (balanced over the taxonomy cells)")
    loss_on = section.loss_on
    render = section.render
    if render == "conversation":
      dataset = dataset.map(lambda e: _conversation_document(
          jsonl.conversation_from_record(json.loads(_text(e["conversation"]))), tokenizer, loss_on))
    elif render == "code_file":
      dataset = dataset.map_with_index(_code_file_documents(data_config, tokenizer, name, seed))
    else:
      raise ValueError(f"data.{name}.render={render!r}; use 'conversation' or 'code_file'")
    return Stream(dataset, stats)

  return factory


def _procedural_stream(data_config, tokenizer, *, split, seed, shard_index, shard_count) -> Stream:
  from kat_jax.data.corpora import procedural  # pylint: disable=g-import-not-at-top
  from kat_jax.data.procedural import generate  # pylint: disable=g-import-not-at-top
  from kat_jax.data.procedural import task as task_lib  # pylint: disable=g-import-not-at-top
  section = data_config.procedural
  config = procedural.procedural_config(
      families=split_list(section.families), levels=[int(v) for v in split_list(section.levels)],
      num_train=section.num_train, num_eval=section.num_eval, seed=section.seed,
      heldout_fraction=section.heldout_fraction)
  builder = corpora.prepare(procedural.ProceduralTasks, config, data_config.data_dir)
  dataset = _sharded_shuffled(builder, "procedural", split, seed, shard_index, shard_count)
  loss_on = section.loss_on
  dataset = dataset.map(lambda e: _conversation_document(
      generate.task_to_conversation(task_lib.Task.from_json(_text(e["task"]))), tokenizer, loss_on))
  return Stream(dataset, {"procedural": common.builder_stats(builder)})


def _generated_stream_factory(name: str) -> Callable[..., Stream]:
  """A stream of the conversations the SFT builders generate in place
  (``corpora.agentic``: ``tool_use``, ``multi_turn``, ``instruction_following``), built once into
  ``data.data_dir`` and rendered with ``data.<name>.loss_on``."""

  def factory(data_config, tokenizer, *, split, seed, shard_index, shard_count) -> Stream:
    from kat_jax.data.corpora import agentic  # pylint: disable=g-import-not-at-top (imports rl)
    config = agentic.stream_corpus_config(name, data_config)
    builder = corpora.prepare(agentic.AgenticConversations, config, data_config.data_dir)
    dataset = _sharded_shuffled(builder, name, split, seed, shard_index, shard_count)
    loss_on = data_config[name].loss_on
    dataset = dataset.map(lambda e: _conversation_document(
        chat.Conversation.from_json(_text(e["conversation"])), tokenizer, loss_on))
    return Stream(dataset, {name: common.builder_stats(builder)})

  return factory


StreamFactory = Callable[..., Stream]
STREAM_FACTORIES: dict[str, StreamFactory] = {
    "code": _code_stream,
    "commits": _commits_stream,
    "trajectories": _jsonl_stream_factory("trajectories"),
    "instructions": _jsonl_stream_factory("instructions"),
    "procedural": _procedural_stream,
    "tool_use": _generated_stream_factory("tool_use"),
    "multi_turn": _generated_stream_factory("multi_turn"),
    "instruction_following": _generated_stream_factory("instruction_following"),
}


def make_streams(data_config, tokenizer, *, split: str, seed: int, shard_index: int = 0,
                 shard_count: int = 1) -> dict[str, Stream]:
  """The streams with positive mixture weight, by name."""
  weights = mixture_lib.normalized_weights(dict(data_config.mixture))
  streams = {}
  for name in weights:
    if name not in STREAM_FACTORIES:
      raise ValueError(f"mixture stream {name!r} has no builder; known streams: "
                       f"{sorted(STREAM_FACTORIES)}")
    try:
      streams[name] = STREAM_FACTORIES[name](data_config, tokenizer, split=split, seed=seed,
                                             shard_index=shard_index, shard_count=shard_count)
    except EmptySplitError as e:
      if split == "train":
        raise
      # A small corpus may hold nothing out; evaluate on the streams that do.
      logging.warning("leaving stream %r out of the %r mixture: %s", name, split, e)
  if not streams:
    raise EmptySplitError(f"no mixture stream has {split!r} examples; raise data.eval_fraction")
  return streams


# ------------------------------------------------------------------------------------------ packing


class DocumentPiece(NamedTuple):
  """Where a run of packed tokens came from: tokens ``[start, start + length)`` of document
  ``index`` of stream ``stream``, placed at columns ``[column, column + length)`` of its row."""
  stream: str
  index: int
  start: int
  length: int
  column: int


class LMIterator:
  """Infinite iterator of packed LM batches over a token-weighted mixture of document streams.

  Each batch is a dict of [batch_size, seq_len] arrays:
    inputs      int32    token ids (``pad_id`` on padding)
    targets     int32    the next token of the same document (``pad_id`` where there is none)
    positions   int32    position within the packed piece of the document, restarting at 0
    segment_ids int32    1, 2, ... per document piece in the row; 0 on padding
    weights     float32  loss weight of ``targets``: the document's loss mask where the target is a
                         real next token, 0 at each document's last token and on padding

  Row-level mixing: every row is its own packing lane with a cursor (document, offset). A row fills
  its ``seq_len`` slots from its cursor's document; when that document ends the row draws the next
  document from the shared mixture (streams chosen by ``TokenMixture``, each stream read in its
  shuffled order). Rows draw in row order, so the rows of a batch hold different documents: a
  10k-token file occupies one row over many batches instead of a whole batch. A document cut at the
  row end continues at column 0 of the *same row of the next batch* (new segment, positions from 0:
  positions stay below ``seq_len``, the lengths the model is trained on; no attention crosses batches
  anyway). The last token before the cut still has its real next token as target.
  ``last_batch_pieces()`` says which document pieces the latest batch holds.
  """

  def __init__(self, streams: Mapping[str, Stream], weights: Mapping[str, float], *,
               batch_size: int, seq_len: int, pad_id: int, packing: str = "split",
               prefetch_documents: int = 32, num_threads: int = 2):
    if packing not in ("split", "pad"):
      raise ValueError(f"packing={packing!r}; use 'split' or 'pad'")
    if batch_size < 1 or seq_len < 2:
      raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
    self._streams = dict(streams)
    self._mixture = mixture_lib.TokenMixture(weights)
    missing = [name for name in self._mixture.names if name not in self._streams]
    if missing:
      raise ValueError(f"mixture streams {missing} have no Stream")
    self.batch_size, self.seq_len, self.pad_id, self.packing = batch_size, seq_len, pad_id, packing
    self._prefetch = max(0, int(prefetch_documents))
    self._executor = (concurrent.futures.ThreadPoolExecutor(max(1, num_threads))
                      if self._prefetch and num_threads > 0 else None)
    self._futures: dict[str, dict[int, concurrent.futures.Future]] = {n: {} for n in self._streams}
    self._reset_position()

  def _reset_position(self):
    self._next_index = {name: 0 for name in self._mixture.names}
    # Per row: (stream, index, offset) of the document it is packing, None when it needs a new one.
    self._rows: list[Optional[tuple[str, int, int]]] = [None] * self.batch_size
    self._row_documents: list[Optional[Document]] = [None] * self.batch_size
    # Documents in progress that a restored state had no row for (it had more rows); rows take these
    # before drawing new documents.
    self._pending: list[tuple[str, int, int]] = []
    self._last_pieces: tuple[tuple[DocumentPiece, ...], ...] = ()
    self._counters = {"batches": 0, "padding": 0, "loss_tokens": 0, "fim_tokens": 0,
                      "batch_documents": 0,
                      **{f"tokens/{n}": 0 for n in self._mixture.names},
                      **{f"documents/{n}": 0 for n in self._mixture.names}}

  # -- documents

  def _load(self, name: str, index: int) -> Document:
    dataset = self._streams[name].documents
    if self._executor is None:
      return dataset[index]
    futures = self._futures[name]
    for ahead in range(index, index + self._prefetch + 1):
      if ahead not in futures:
        futures[ahead] = self._executor.submit(dataset.__getitem__, ahead)
    for stale in [k for k in futures if k < index]:
      futures.pop(stale).cancel()
    return futures.pop(index).result()

  def _draw_document(self) -> tuple[tuple[str, int, int], Document]:
    """The cursor and document of the next document of the mixture (offset 0), or of a pending
    document in progress from a restored state."""
    if self._pending:
      cursor = self._pending.pop(0)
      return cursor, self._streams[cursor[0]].documents[cursor[1]]
    name = self._mixture.choose()
    index = self._next_index[name]
    self._next_index[name] = index + 1
    document = self._load(name, index)
    self._mixture.record(name, len(document.ids))
    self._counters[f"documents/{name}"] += 1
    for key, count in (document.fim_stats or {}).items():
      self._counters[f"fim/{key}"] = self._counters.get(f"fim/{key}", 0) + int(count)
    return (name, index, 0), document

  def _row_document(self, row: int) -> tuple[tuple[str, int, int], Document]:
    """The cursor and document of ``row``, drawing a new document when the row has none."""
    if self._rows[row] is None:
      self._rows[row], self._row_documents[row] = self._draw_document()
    elif self._row_documents[row] is None:  # restored from a state: rebuild the document
      name, index, _ = self._rows[row]
      # Directly, not through the prefetch queue, which runs ahead of the newest draw.
      self._row_documents[row] = self._streams[name].documents[index]
    return self._rows[row], self._row_documents[row]

  # -- batches

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    shape = (self.batch_size, self.seq_len)
    inputs = np.full(shape, self.pad_id, np.int32)
    targets = np.full(shape, self.pad_id, np.int32)
    positions = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    weights = np.zeros(shape, np.float32)
    pieces_by_row = []
    for row in range(self.batch_size):
      filled, segment, pieces = 0, 0, []
      while filled < self.seq_len:
        (name, index, offset), document = self._row_document(row)
        length = len(document.ids)
        remaining = length - offset
        space = self.seq_len - filled
        if self.packing == "pad" and filled > 0 and space < remaining <= self.seq_len:
          break  # pad the rest of this row; the document starts this row in the next batch
        n = min(remaining, space)
        segment += 1
        cols = slice(filled, filled + n)
        inputs[row, cols] = document.ids[offset:offset + n]
        positions[row, cols] = np.arange(n, dtype=np.int32)
        segment_ids[row, cols] = segment
        # Targets are the following tokens; the document's last token has none (weight 0).
        num_targets = min(n, length - 1 - offset)
        targets[row, filled:filled + num_targets] = document.ids[offset + 1:offset + 1 + num_targets]
        weights[row, filled:filled + num_targets] = document.loss_mask[
            offset + 1:offset + 1 + num_targets]
        pieces.append(DocumentPiece(name, index, offset, n, filled))
        self._counters[f"tokens/{name}"] += n
        if document.fim:
          self._counters["fim_tokens"] += n
        filled += n
        if offset + n == length:
          self._rows[row], self._row_documents[row] = None, None
        else:
          self._rows[row] = (name, index, offset + n)
      self._counters["padding"] += self.seq_len - filled
      pieces_by_row.append(tuple(pieces))
    self._last_pieces = tuple(pieces_by_row)
    self._counters["batches"] += 1
    self._counters["loss_tokens"] += int(np.count_nonzero(weights))
    self._counters["batch_documents"] += len({(p.stream, p.index) for row in pieces_by_row
                                              for p in row})
    return {"inputs": inputs, "targets": targets, "positions": positions,
            "segment_ids": segment_ids, "weights": weights}

  def last_batch_pieces(self) -> tuple[tuple[DocumentPiece, ...], ...]:
    """Per row of the latest batch, the document pieces it holds, left to right (debugging, tests)."""
    return self._last_pieces

  # -- checkpointing

  def get_state(self) -> dict:
    """JSON-serializable position: per-stream next index, each row's document in progress (and any
    pending ones), the mixture's token counts and the counters."""
    return {"version": _STATE_VERSION, "next_index": dict(self._next_index),
            "rows": [list(cursor) if cursor is not None else None for cursor in self._rows],
            "pending": [list(cursor) for cursor in self._pending],
            "mixture": self._mixture.get_state(), "counters": dict(self._counters),
            "shape": [self.batch_size, self.seq_len], "packing": self.packing}

  def set_state(self, state: Mapping) -> None:
    """Continues exactly where ``state`` (from ``get_state``) was taken.

    A version-1 state (sequential packing, one document in progress) resumes with that document in
    row 0. A state with another batch size keeps the document order: rows beyond this batch size
    hand their documents in progress to the first rows that need a new one.
    """
    version = state.get("version")
    if version not in (1, _STATE_VERSION):
      raise ValueError(f"data iterator state version {version!r} is not {_STATE_VERSION} (or 1); "
                       "it was written by an incompatible kat_jax version.")
    if sorted(state["next_index"]) != sorted(self._mixture.names):
      raise ValueError(f"data state has streams {sorted(state['next_index'])} but the config mixes "
                       f"{sorted(self._mixture.names)}; resume with the same data.mixture.")
    if list(state.get("shape", [])) != [self.batch_size, self.seq_len]:
      logging.warning("data state was saved with batch shape %s, resuming with %s; the document "
                      "order continues, the batch boundaries differ.", state.get("shape"),
                      [self.batch_size, self.seq_len])
    self._reset_position()
    for futures in self._futures.values():
      for future in futures.values():
        future.cancel()
      futures.clear()
    self._next_index = {name: int(i) for name, i in state["next_index"].items()}
    to_cursor = lambda c: (str(c[0]), int(c[1]), int(c[2])) if c is not None else None
    if version == 1:
      saved_rows, pending = [state["current"]], []
    else:
      saved_rows, pending = state["rows"], state["pending"]
    saved_rows = [to_cursor(c) for c in saved_rows]
    self._rows = (saved_rows + [None] * self.batch_size)[:self.batch_size]
    surplus = [c for c in saved_rows[self.batch_size:] if c is not None]
    self._pending = surplus + [to_cursor(c) for c in pending]
    self._row_documents = [None] * self.batch_size
    self._mixture.set_state(state["mixture"])
    self._counters.update({k: int(v) for k, v in state["counters"].items()})

  # -- metrics

  def stats(self) -> dict:
    """Build statistics of every corpus behind the streams (kept/skipped counts, problem reports)."""
    merged = {}
    for stream in self._streams.values():
      merged.update(stream.stats)
    return merged

  def metrics(self) -> dict[str, float]:
    """Realized mixture since the start of training (keys without a ``data/`` prefix; the trainer
    adds it): ``token_fraction/<stream>``, ``target_fraction/<stream>``, ``padding_fraction``,
    ``loss_token_fraction``, ``fim_token_fraction``, ``fim/<FimStats field>``, ``documents/<stream>``,
    ``documents_per_batch`` (mean number of distinct documents in a batch), ``tokens_seen``,
    ``skipped/<corpus>/<reason>``."""
    counters = self._counters
    placed = sum(counters[f"tokens/{n}"] for n in self._mixture.names)
    total = placed + counters["padding"]
    result = {f"token_fraction/{n}": counters[f"tokens/{n}"] / max(placed, 1)
              for n in self._mixture.names}
    result.update({f"target_fraction/{n}": w for n, w in self._mixture.weights.items()})
    result["padding_fraction"] = counters["padding"] / max(total, 1)
    result["loss_token_fraction"] = counters["loss_tokens"] / max(total, 1)
    result["fim_token_fraction"] = counters["fim_tokens"] / max(placed, 1)
    result["tokens_seen"] = float(total)
    result["documents_per_batch"] = counters["batch_documents"] / max(counters["batches"], 1)
    for n in self._mixture.names:
      result[f"documents/{n}"] = float(counters[f"documents/{n}"])
    for key, count in counters.items():
      if key.startswith("fim/"):
        result[key] = float(count)
    for corpus, stats in self.stats().items():
      for reason, count in stats.get("skipped", {}).items():
        result[f"skipped/{corpus}/{reason}"] = float(count)
    return result

  def close(self) -> None:
    if self._executor is not None:
      for futures in self._futures.values():
        for future in futures.values():
          future.cancel()
        futures.clear()
      self._executor.shutdown(wait=False, cancel_futures=True)
      self._executor = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  (interpreter shutdown)
      pass


def make_lm_iterator(data_config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer, *,
                     split: str, batch_size: int, seq_len: int, seed: int, shard_index: int = 0,
                     shard_count: int = 1) -> LMIterator:
  """Packed LM batches of the configured mixture for this process's shard of ``split``."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; use one of {SPLITS}")
  streams = make_streams(data_config, tokenizer, split=split, seed=seed, shard_index=shard_index,
                         shard_count=shard_count)
  weights = {name: w for name, w in dict(data_config.mixture).items() if name in streams}
  return LMIterator(streams, weights, batch_size=batch_size, seq_len=seq_len,
                    pad_id=tokenizer.pad_id, packing=data_config.packing,
                    prefetch_documents=data_config.prefetch_documents,
                    num_threads=data_config.num_threads)
