"""A Hugging Face ``tokenizer.json`` behind the kat_jax ``Tokenizer`` protocol (Qwen, Llama 3, ...).

``HFTokenizer.load(directory)`` reads ``tokenizer.json`` (the ``tokenizers`` library, no
``transformers`` needed) and, when present, ``tokenizer_config.json``. It maps every kat_jax special
token (``special_tokens.ALL``) to an *added token* of the HF tokenizer:

1. an explicit alias (``special_token_aliases={"<|endoftext|>": "<|end_of_text|>"}`` for Llama 3),
2. the token with the same string (Qwen2.5 / Qwen3 tokenizers have ``<|endoftext|>``, ``<|im_start|>``,
   ``<|im_end|>``, ``<tool_call>``, ``</tool_call>``, the FIM and repo tokens; Qwen3 also
   ``<tool_response>``),
3. for ``<|pad|>`` the config's ``pad_token``, else the end-of-text token (Qwen pads with
   ``<|endoftext|>``); for ``<|endoftext|>`` the config's ``eos_token``.

A token that still has no match (Qwen has no ``<memory>`` / ``</memory>``) raises a ``KeyError`` naming
it and the fix when asked for — so chat rendering fails clearly on a conversation that needs it — unless
``add_missing_special_tokens=True``, which appends it to the vocabulary (its id is then
``>= `` the original vocabulary size: the model's embedding must have a row for it; Qwen checkpoints
reserve a few hundred).

As with our SentencePiece tokenizer, ``encode`` never produces a control token's id from ordinary
text: a literal ``"<|im_end|>"`` in a source file is cut after its first character and encoded as plain
text (HF tokenizers would turn it into the special id). Control tokens are the added tokens that are
special, mapped to a kat_jax special, or markup-shaped ``<...>`` (Qwen's non-special ``<tool_call>``,
``<think>``); other added tokens (whitespace runs some code tokenizers add) stay ordinary vocabulary
and match as in HF. Renderers splice specials with ``token_id``.
``decode(encode(x)) == x`` holds for the byte-level BPE tokenizers of Qwen and Llama 3 on text in Unicode
normal form C (Qwen's tokenizer NFC-normalizes).

Usage::

  tok = HFTokenizer.load("/ckpt/Qwen2.5-Coder-7B")        # the checkpoint folder
  example = chat.render(conversation, tok)                # Qwen-style tool calls, exact loss mask
  tok.save(os.path.join(workdir, "tokenizer"))
"""
from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Sequence

from kat_jax.data import special_tokens as st

if TYPE_CHECKING:
  import tokenizers

TOKENIZER_FILENAME = "tokenizer.json"
CONFIG_FILENAME = "tokenizer_config.json"
INFO_FILENAME = "kat_tokenizer.json"
# Qwen2 / Qwen2.5 / Qwen3 pre-tokenizer split pattern (from their tokenizer.json).
QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                      r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _tokenizers():
  """The ``tokenizers`` package (extra ``hf``), imported on first use so that this module — and
  ``is_hf_tokenizer_dir`` — load without it."""
  try:
    import tokenizers
  except ImportError as e:
    raise ImportError("HFTokenizer needs the 'tokenizers' package: pip install -e '.[hf]'") from e
  return tokenizers


def _token_content(value) -> Optional[str]:
  """tokenizer_config.json stores tokens as strings or as {"content": ...} dicts."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def is_hf_tokenizer_dir(directory: str) -> bool:
  """True when ``directory`` holds an HF tokenizer (ours saved, or a checkpoint's), not the small
  ``tokenizer.json`` description that ``SentencePieceTokenizer.save`` writes beside its model."""
  if os.path.exists(os.path.join(directory, INFO_FILENAME)):
    return True
  path = os.path.join(directory, TOKENIZER_FILENAME)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    data = json.load(f)
  return "model" in data and "kind" not in data


class HFTokenizer:
  """The kat_jax ``Tokenizer`` protocol over a ``tokenizers.Tokenizer``."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *,
               tokenizer_config: Optional[Mapping] = None,
               special_token_aliases: Optional[Mapping[str, str]] = None,
               add_missing_special_tokens: bool = False):
    self._tok = tokenizer
    self._config = dict(tokenizer_config or {})
    self._aliases = dict(special_token_aliases or {})
    bad = sorted(set(self._aliases) - set(st.ALL))
    if bad:
      raise ValueError(f"special_token_aliases keys {bad} are not kat_jax special tokens; use names "
                       f"from special_tokens.ALL: {list(st.ALL)}")
    added = self._added_tokens()
    for name, target in self._aliases.items():
      if target not in added:
        raise ValueError(f"special_token_aliases maps {name!r} to {target!r}, which is not an added "
                         f"token of this tokenizer (added tokens: {sorted(added)[:20]} ...)")

    self._special_ids: dict[str, int] = {}
    self.missing_special_tokens: tuple[str, ...] = ()
    missing = []
    for special in st.ALL:
      token = self._resolve(special, added)
      if token is None:
        missing.append(special)
      else:
        self._special_ids[special] = added[token]
    if missing and add_missing_special_tokens:
      added_token = _tokenizers().AddedToken
      self._tok.add_special_tokens([added_token(s, special=True, normalized=False)
                                    for s in missing])
      added = self._added_tokens()
      for special in missing:
        self._special_ids[special] = added[special]
      missing = []
    self.missing_special_tokens = tuple(missing)
    if st.END_OF_TEXT not in self._special_ids:
      raise ValueError(
          f"the tokenizer has no end-of-text token: neither {st.END_OF_TEXT!r} nor the config's "
          f"eos_token ({self._config.get('eos_token')!r}) is an added token; pass "
          f"special_token_aliases={{{st.END_OF_TEXT!r}: '<its end-of-text token>'}}")
    self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
    self.eos_id: int = self._special_ids[st.END_OF_TEXT]
    self.pad_id: int = self._special_ids[st.PAD]
    mapped = {self.id_to_piece(i) for i in self._special_ids.values()}
    protected = sorted((t.content for t in self._tok.get_added_tokens_decoder().values()
                        if t.special or t.content in mapped
                        or (t.content.startswith("<") and t.content.endswith(">"))),
                       key=len, reverse=True)
    self._protected_pattern = (re.compile("|".join(re.escape(s) for s in protected))
                               if protected else None)

  def _added_tokens(self) -> dict[str, int]:
    return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}

  def _resolve(self, special: str, added: Mapping[str, int]) -> Optional[str]:
    if special in self._aliases:
      return self._aliases[special]
    if special in added:
      return special
    fallback = None
    if special == st.PAD:
      fallback = _token_content(self._config.get("pad_token"))
      if fallback not in added:
        fallback = self._resolve(st.END_OF_TEXT, added)
    elif special == st.END_OF_TEXT:
      fallback = _token_content(self._config.get("eos_token"))
    return fallback if fallback in added else None

  # --- construction ------------------------------------------------------------------------------

  @classmethod
  def load(cls, directory: str, **kwargs) -> "HFTokenizer":
    """From a folder with ``tokenizer.json`` (an HF checkpoint or one ``save`` wrote); ``kwargs`` as
    in ``__init__`` (aliases saved by ``save`` are reused unless given)."""
    path = os.path.join(directory, TOKENIZER_FILENAME)
    if not is_hf_tokenizer_dir(directory):
      raise FileNotFoundError(f"no Hugging Face tokenizer.json in {directory!r}; point at a "
                              "checkpoint folder that has one (slow-only tokenizers need "
                              "transformers' PreTrainedTokenizerFast(...).save_pretrained first)")
    tokenizer_config = None
    config_path = os.path.join(directory, CONFIG_FILENAME)
    if os.path.exists(config_path):
      with open(config_path) as f:
        tokenizer_config = json.load(f)
    info_path = os.path.join(directory, INFO_FILENAME)
    if os.path.exists(info_path) and "special_token_aliases" not in kwargs:
      with open(info_path) as f:
        kwargs["special_token_aliases"] = json.load(f).get("special_token_aliases") or None
    return cls(_tokenizers().Tokenizer.from_file(path), tokenizer_config=tokenizer_config, **kwargs)

  @classmethod
  def train(cls, texts: Iterable[str], *, vocab_size: int = 2048,
            special_tokens: Sequence[str] = st.ALL, plain_added_tokens: Sequence[str] = (),
            tokenizer_config: Optional[Mapping] = None, **kwargs) -> "HFTokenizer":
    """A Qwen-style tokenizer (NFC, Qwen split pattern, byte-level BPE) trained on ``texts``, with
    ``special_tokens`` added as special and ``plain_added_tokens`` as non-special added tokens (as
    Qwen adds ``<tool_call>``); seconds on a few MB."""
    tokenizers = _tokenizers()
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in plain_added_tokens])
    return cls(tok, tokenizer_config=tokenizer_config, **kwargs)

  def save(self, directory: str) -> None:
    """Writes ``tokenizer.json`` (loadable by ``tokenizers`` / ``transformers``), the
    ``tokenizer_config.json`` it came with, and ``kat_tokenizer.json`` (special-token mapping)."""
    os.makedirs(directory, exist_ok=True)
    self._tok.save(os.path.join(directory, TOKENIZER_FILENAME))
    if self._config:
      with open(os.path.join(directory, CONFIG_FILENAME), "w") as f:
        json.dump(self._config, f, indent=1)
    info = {"kind": "hf", "vocab_size": self.vocab_size, "eos_id": self.eos_id,
            "pad_id": self.pad_id, "special_ids": self._special_ids,
            "special_token_aliases": self._aliases,
            "missing_special_tokens": list(self.missing_special_tokens)}
    with open(os.path.join(directory, INFO_FILENAME), "w") as f:
      json.dump(info, f, indent=1)

  # --- the Tokenizer protocol --------------------------------------------------------------------

  def _encode_plain(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids if text else []

  def encode(self, text: str) -> list[int]:
    """Ids of ``text`` with no BOS/EOS; control-token strings inside it are encoded as plain text."""
    if self._protected_pattern is None:
      return self._encode_plain(text)
    ids: list[int] = []
    start = 0
    # Cut each control-token string after its first character so the tokenizer cannot match it.
    while (match := self._protected_pattern.search(text, start)) is not None:
      ids.extend(self._encode_plain(text[start:match.start() + 1]))
      start = match.start() + 1
    ids.extend(self._encode_plain(text[start:]))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_id(self, special: str) -> int:
    if special in self._special_ids:
      return self._special_ids[special]
    if special in self.missing_special_tokens:
      raise KeyError(
          f"this Hugging Face tokenizer has no token for kat_jax special {special!r} (nor an alias): "
          f"pass special_token_aliases={{{special!r}: '<an added token>'}}, or "
          "add_missing_special_tokens=True to append it (the model's embedding must cover the new id)")
    raise KeyError(f"{special!r} is not a special token; known: {list(st.ALL)} "
                   "(kat_jax/data/special_tokens.py)")

  # --- extras --------------------------------------------------------------------------------------

  def id_to_piece(self, token_id: int) -> Optional[str]:
    return self._tok.id_to_token(int(token_id))

  @property
  def special_ids(self) -> dict[str, int]:
    return dict(self._special_ids)

  @property
  def hf_tokenizer(self) -> tokenizers.Tokenizer:
    return self._tok
