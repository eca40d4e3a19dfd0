"""Tokenizers: the protocol every kat_jax stage uses, and our SentencePiece BPE implementation.

A tokenizer maps text to int ids and back *exactly* (``decode(encode(x)) == x`` for any Python
source, whitespace and all), reserves the special tokens of ``special_tokens.ALL`` as single ids, and
never produces those ids from ordinary text: a literal ``"<|im_end|>"`` inside a source file is encoded
as plain characters, so data cannot forge conversation structure. Renderers that need a special token
ask for its id with ``token_id(special)`` and splice it in.

Usage::

  tok = SentencePieceTokenizer.train(texts, vocab_size=2048)   # seconds on a few MB of code
  tok.save(directory)                                           # beside the checkpoints
  tok = SentencePieceTokenizer.load(directory)
  ids = tok.encode("def f(x):\\n    return x\\n")
  tok.decode(ids + [tok.eos_id])                                # "...<|endoftext|>"

SentencePiece settings that make the round trip exact (the defaults do not): identity normalization
(no NFKC), no whitespace collapsing, no dummy prefix, byte fallback for every character outside the
vocabulary. Two inputs still need care at encode time and are handled here: special-token strings
(SentencePiece would match user-defined symbols inside text; we cut the text so no match is possible)
and the meta-space character U+2581 "▁" itself (SentencePiece would decode it as a space; we emit its
UTF-8 bytes as byte-fallback pieces instead).
"""
from __future__ import annotations

import io
import json
import os
import random
import re
from typing import Iterable, Optional, Protocol, Sequence, runtime_checkable

import sentencepiece as spm

from kat_jax.data import special_tokens

_META_SPACE = "\u2581"
_MODEL_FILENAME = "tokenizer.model"
_INFO_FILENAME = "tokenizer.json"
# Longest first, so that the earliest match is also the longest at its position.
_SPECIAL_PATTERN = re.compile(
    "|".join(re.escape(s) for s in sorted(special_tokens.ALL, key=len, reverse=True)))


@runtime_checkable
class Tokenizer(Protocol):
  """What every stage needs from a tokenizer (ours, or a Hugging Face one behind an adapter)."""

  vocab_size: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    """Ids of ``text``; no BOS/EOS added; special-token strings in text are plain characters."""
    ...

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ``ids``; special ids decode to their strings."""
    ...

  def token_id(self, special: str) -> int:
    """Id of a special token from ``special_tokens.ALL``."""
    ...

  def save(self, directory: str) -> None:
    ...


def training_sentences(texts: Iterable[str], *, lines_per_sentence: int = 4,
                       max_sentences: int = 100_000, seed: int = 0) -> list[str]:
  """Cuts documents into chunks of a few lines (newlines kept) and samples at most ``max_sentences``.

  SentencePiece learns pieces within a "sentence"; chunks of several lines let it learn pieces such as
  ``"):\\n"`` and indentation runs, while the sample bound keeps training to seconds.
  """
  chunks = []
  for text in texts:
    lines = text.splitlines(keepends=True)
    for start in range(0, len(lines), lines_per_sentence):
      chunk = "".join(lines[start:start + lines_per_sentence])
      if chunk:
        chunks.append(chunk)
  rng = random.Random(seed)
  if len(chunks) > max_sentences:
    chunks = rng.sample(chunks, max_sentences)
  else:
    rng.shuffle(chunks)
  return chunks


class SentencePieceTokenizer:
  """Byte-fallback BPE over SentencePiece with the kat_jax special tokens as user-defined symbols."""

  def __init__(self, model_proto: bytes):
    self._model_proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
    self.vocab_size: int = self._sp.get_piece_size()
    self._special_ids = {}
    for special in special_tokens.ALL:
      piece_id = self._sp.piece_to_id(special)
      if self._sp.id_to_piece(piece_id) != special:
        raise ValueError(
            f"SentencePiece model has no piece for special token {special!r}; it was not trained with "
            "user_defined_symbols=special_tokens.ALL — retrain with SentencePieceTokenizer.train.")
      self._special_ids[special] = piece_id
    self._meta_space_byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>")
                                 for b in _META_SPACE.encode("utf-8")]
    if any(self._sp.is_unknown(i) for i in self._meta_space_byte_ids):
      raise ValueError("SentencePiece model lacks byte-fallback pieces; retrain with byte_fallback=True.")
    self.eos_id: int = self._special_ids[special_tokens.END_OF_TEXT]
    self.pad_id: int = self._special_ids[special_tokens.PAD]

  @classmethod
  def train(cls, texts: Iterable[str], *, vocab_size: int = 2048, lines_per_sentence: int = 4,
            max_sentences: int = 100_000, seed: int = 0, num_threads: int = 2,
            max_piece_length: int = 16) -> "SentencePieceTokenizer":
    """Trains a BPE model on (a sample of) ``texts``; ~1 s per 30k sentences on one core.

    Deterministic for fixed arguments; the result depends on ``num_threads`` too, so it is a fixed
    argument (not the machine's core count) and every host of a job trains the same model.
    """
    sentences = training_sentences(texts, lines_per_sentence=lines_per_sentence,
                                   max_sentences=max_sentences, seed=seed)
    if not sentences:
      raise ValueError("cannot train a tokenizer on an empty corpus (no non-empty texts given)")
    # 256 byte pieces + specials + <unk> are always in the vocabulary.
    minimum = 256 + len(special_tokens.ALL) + 1 + 8
    if vocab_size < minimum:
      raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback and special tokens alone "
                       f"take {minimum - 8}; use at least {minimum}.")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
          model_type="bpe", byte_fallback=True, user_defined_symbols=list(special_tokens.ALL),
          normalization_rule_name="identity", remove_extra_whitespaces=False,
          add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
          split_by_whitespace=True, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
          character_coverage=0.9995, max_sentence_length=1 << 16,
          max_sentencepiece_length=max_piece_length, num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
      raise ValueError(f"SentencePiece training with vocab_size={vocab_size} failed: {e} "
                       "(the vocabulary must hold 256 bytes, the special tokens and every frequent "
                       "character of the corpus; raise vocab_size)") from e
    return cls(model.getvalue())

  @classmethod
  def load(cls, directory: str) -> "SentencePieceTokenizer":
    path = os.path.join(directory, _MODEL_FILENAME)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no tokenizer at {path!r}; train one with SentencePieceTokenizer.train "
                              "and save it there, or point data.tokenizer_path at a saved one.")
    with open(path, "rb") as f:
      return cls(f.read())

  def save(self, directory: str) -> None:
    """Writes ``tokenizer.model`` (the SentencePiece proto) and a small JSON description."""
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, _MODEL_FILENAME + ".tmp")
    with open(tmp, "wb") as f:
      f.write(self._model_proto)
    os.replace(tmp, os.path.join(directory, _MODEL_FILENAME))
    info = {"kind": "sentencepiece", "vocab_size": self.vocab_size, "eos_id": self.eos_id,
            "pad_id": self.pad_id, "special_ids": self._special_ids}
    with open(os.path.join(directory, _INFO_FILENAME), "w") as f:
      json.dump(info, f, indent=1)

  def _encode_plain(self, text: str) -> list[int]:
    """Encodes text that contains no complete special-token string."""
    if _META_SPACE not in text:
      return self._sp.encode(text) if text else []
    ids = []
    for i, part in enumerate(text.split(_META_SPACE)):
      if i:
        ids.extend(self._meta_space_byte_ids)
      if part:
        ids.extend(self._sp.encode(part))
    return ids

  def encode(self, text: str) -> list[int]:
    ids = []
    start = 0
    # Cut each special-token string after its first character so SentencePiece cannot match it.
    while (match := _SPECIAL_PATTERN.search(text, start)) is not None:
      ids.extend(self._encode_plain(text[start:match.start() + 1]))
      start = match.start() + 1
    ids.extend(self._encode_plain(text[start:]))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def token_id(self, special: str) -> int:
    try:
      return self._special_ids[special]
    except KeyError:
      raise KeyError(f"{special!r} is not a special token; known: {list(special_tokens.ALL)} "
                     "(kat_jax/data/special_tokens.py)") from None

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  @property
  def model_proto(self) -> bytes:
    return self._model_proto


def load_tokenizer(directory: str) -> Tokenizer:
  """Loads whichever tokenizer kind was saved in ``directory`` (ours, or a Hugging Face
  ``tokenizer.json`` + ``tokenizer_config.json`` directory such as a Qwen checkpoint's)."""
  from kat_jax.data import hf_tokenizer
  if hf_tokenizer.is_hf_tokenizer_dir(directory):
    return hf_tokenizer.HFTokenizer.load(directory)
  info_path = os.path.join(directory, _INFO_FILENAME)
  kind = "sentencepiece"
  if os.path.exists(info_path):
    with open(info_path) as f:
      kind = json.load(f).get("kind", kind)
  if kind != "sentencepiece":
    raise ValueError(f"tokenizer kind {kind!r} in {info_path} is not supported by load_tokenizer; "
                     "supported: 'sentencepiece'.")
  return SentencePieceTokenizer.load(directory)


def _is_hf_dir(directory: str) -> bool:
  from kat_jax.data import hf_tokenizer
  return hf_tokenizer.is_hf_tokenizer_dir(directory)


def maybe_tokenizer(directory: Optional[str]) -> Optional[Tokenizer]:
  """The tokenizer saved in ``directory`` if there is one, else None."""
  if directory and (os.path.exists(os.path.join(directory, _MODEL_FILENAME))
                    or _is_hf_dir(directory)):
    return load_tokenizer(directory)
  return None
