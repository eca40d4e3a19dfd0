"""Fill-in-the-middle: character-level random FIM (Bavarian et al. 2022) and structured FIM (aiXcoder).

A document is cut into prefix / middle / suffix and rearranged so a left-to-right model learns to
write the middle given both sides (sentinels from ``special_tokens``)::

    PSM:  <|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>middle
    SPM:  <|fim_prefix|><|fim_suffix|>suffix<|fim_middle|>prefix middle

(in SPM, prefix and middle are one contiguous text, encoded together). Character-level FIM cuts at
two uniform random character positions. Structured FIM parses Python with ``ast`` and takes one
complete syntax node as the middle — a statement, an expression, a block (the statement list of a
compound statement), or a function body — cut exactly with the node's (end_)lineno/(end_)col_offset.
Files that do not parse, or have no suitable node, fall back to character-level FIM and are counted.

The pipeline calls, per document, before packing::

    pieces, stats = apply_fim(doc, rng, fim_rate=0.5, spm_rate=0.5, structured_rate=1.0)
    tokens, loss_mask, _ = chat.encode_pieces(pieces, tokenizer)   # sentinels are special ids

    apply_fim(doc: str, rng: np.random.Generator, *, fim_rate: float = 0.5, spm_rate: float = 0.5,
              structured_rate: float = 0.0, language: str = "python",
              max_middle_chars: int = 2048) -> tuple[list[chat.Piece], FimStats]

``pieces`` is ``[Piece(doc)]`` when the document is left as is; every piece is a training target.
``FimStats`` add up (``total = sum(stats_list, FimStats())``). The rng is the only randomness, so a
per-document Generator makes the transform reproducible. ``structured_fim`` / ``char_fim`` return a
``FimExample`` (prefix, middle, suffix, mode, and for structured FIM the node kind, type and span).
"""
from __future__ import annotations

import ast
import dataclasses
import warnings
from typing import Optional, Sequence

import numpy as np

from kat_jax.data import special_tokens as st
from kat_jax.data.chat import Piece

MODES = ("psm", "spm")
NODE_KINDS = ("statement", "expression", "block", "function_body")
DEFAULT_KIND_WEIGHTS = {"statement": 0.4, "expression": 0.3, "block": 0.2, "function_body": 0.1}


@dataclasses.dataclass(frozen=True)
class FimExample:
  """A document cut in three: ``prefix + middle + suffix`` is the original text.

  For structured FIM, ``node_kind`` is one of ``NODE_KINDS``, ``node_type`` the ast class name of
  the node (of the first statement for a block) and ``span`` the (start, end) character offsets of
  the middle in the document.
  """
  prefix: str
  middle: str
  suffix: str
  mode: str = "psm"
  node_kind: Optional[str] = None
  node_type: Optional[str] = None
  span: Optional[tuple[int, int]] = None

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"unknown FIM mode {self.mode!r}: use one of {list(MODES)}")

  @property
  def structured(self) -> bool:
    return self.node_kind is not None

  @property
  def document(self) -> str:
    return self.prefix + self.middle + self.suffix

  def pieces(self) -> list[Piece]:
    """Sentinels as special pieces, text as plain pieces; all trained (standard FIM training)."""
    if self.mode == "psm":
      parts = [(st.FIM_PREFIX, True), (self.prefix, False), (st.FIM_SUFFIX, True),
               (self.suffix, False), (st.FIM_MIDDLE, True), (self.middle, False)]
    else:
      parts = [(st.FIM_PREFIX, True), (st.FIM_SUFFIX, True), (self.suffix, False),
               (st.FIM_MIDDLE, True), (self.prefix + self.middle, False)]
    return [Piece(text, special, True) for text, special in parts if text]

  def to_text(self) -> str:
    """Sentinels written out as strings (for inspection or a tokenizer that parses specials)."""
    return "".join(p.text for p in self.pieces())

  def prompt_pieces(self) -> list[Piece]:
    """The pieces up to and including ``<|fim_middle|>`` (plus the prefix in SPM): an infilling prompt."""
    pieces = self.pieces()
    cut = next(i for i, p in enumerate(pieces) if p.text == st.FIM_MIDDLE) + 1
    prompt = pieces[:cut]
    if self.mode == "spm" and self.prefix:
      prompt.append(Piece(self.prefix, False, True))
    return prompt


def reassemble(pieces: Sequence[Piece]) -> str:
  """The original document from ``apply_fim`` / ``FimExample.pieces`` output (the inverse)."""
  texts = [p.text for p in pieces]
  specials = [p.text for p in pieces if p.special]
  if not specials:
    return "".join(texts)
  order = [p.text if p.special else None for p in pieces]

  def after(sentinel):  # the plain text that follows a sentinel ('' when none)
    i = order.index(sentinel)
    return texts[i + 1] if i + 1 < len(texts) and order[i + 1] is None else ""

  if order[:2] == [st.FIM_PREFIX, st.FIM_SUFFIX]:  # SPM
    return after(st.FIM_MIDDLE) + after(st.FIM_SUFFIX)
  return after(st.FIM_PREFIX) + after(st.FIM_MIDDLE) + after(st.FIM_SUFFIX)


@dataclasses.dataclass
class FimStats:
  """Counts over documents; add them up with ``+``.

  ``structured_fallback`` counts documents where structured FIM was drawn but character FIM was
  used: ``parse_failures`` of them did not parse (or were not Python), the rest had no candidate node.
  """
  documents: int = 0
  plain: int = 0
  char: int = 0
  structured: int = 0
  structured_fallback: int = 0
  parse_failures: int = 0
  psm: int = 0
  spm: int = 0

  def __add__(self, other: "FimStats") -> "FimStats":
    return FimStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _mode(rng: np.random.Generator, spm_rate: float) -> str:
  return "spm" if rng.random() < spm_rate else "psm"


def char_fim(doc: str, rng: np.random.Generator, *, spm_rate: float = 0.5) -> FimExample:
  """Bavarian et al.: two uniform cut points in [0, len(doc)] (sorted) give prefix/middle/suffix."""
  lo, hi = sorted(int(i) for i in rng.integers(0, len(doc) + 1, size=2))
  return FimExample(doc[:lo], doc[lo:hi], doc[hi:], _mode(rng, spm_rate))


# ------------------------------------------------------------------------------- structured FIM


def _split_source_lines(source: str) -> list[str]:
  """Lines as the Python tokenizer (and ``ast.get_source_segment``) sees them: split on \\r\\n,
  \\n and \\r only, line endings kept."""
  lines, start, i, n = [], 0, 0, len(source)
  while i < n:
    c = source[i]
    if c == "\r" or c == "\n":
      end = i + 2 if c == "\r" and i + 1 < n and source[i + 1] == "\n" else i + 1
      lines.append(source[start:end])
      start = i = end
    else:
      i += 1
  if start < n:
    lines.append(source[start:])
  return lines


class _Offsets:
  """(lineno, col_offset in UTF-8 bytes) -> character offset in the source."""

  def __init__(self, source: str):
    self.lines = _split_source_lines(source)
    self.starts = np.concatenate([[0], np.cumsum([len(line) for line in self.lines])]).astype(int)
    self.ascii = [line.isascii() for line in self.lines]

  def __call__(self, lineno: int, col: int) -> int:
    if lineno - 1 >= len(self.lines):  # a position just past the last line
      return int(self.starts[-1])
    line = self.lines[lineno - 1]
    if self.ascii[lineno - 1]:
      return int(self.starts[lineno - 1]) + col
    return int(self.starts[lineno - 1]) + len(line.encode("utf-8")[:col].decode("utf-8", "replace"))


def _inside_fstring_ids(tree: ast.AST) -> set[int]:
  """ids of nodes nested in f-strings (their positions are unreliable before Python 3.12)."""
  inside: set[int] = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.JoinedStr):
      for child in ast.walk(node):
        if child is not node:
          inside.add(id(child))
  return inside


_STATEMENT_LISTS = ("body", "orelse", "finalbody")


def structured_candidates(source: str, tree: Optional[ast.AST] = None,
                          max_middle_chars: Optional[int] = None
                          ) -> dict[str, list[tuple[int, int, str]]]:
  """Candidate middles by kind: lists of (start, end, ast class name) character spans of complete nodes.

  Statements: every statement (``elif`` branches excluded: their span starts at ``elif``).
  Expressions: every expression outside f-strings, except ``Starred`` and ``Slice`` (not
  expressions on their own). Blocks: the statement lists of compound statements other than function
  bodies (which are ``function_body``); a module's top-level list is not a block.
  """
  if tree is None:
    tree = ast.parse(source)
  offset = _Offsets(source)
  in_fstring = _inside_fstring_ids(tree)
  out: dict[str, list[tuple[int, int, str]]] = {k: [] for k in NODE_KINDS}

  def span(first, last) -> tuple[int, int]:
    return offset(first.lineno, first.col_offset), offset(last.end_lineno, last.end_col_offset)

  def is_elif(stmt) -> bool:
    return isinstance(stmt, ast.If) and source.startswith("elif", offset(stmt.lineno, stmt.col_offset))

  def add(kind, start, end, type_name):
    if end > start and (max_middle_chars is None or end - start <= max_middle_chars):
      out[kind].append((start, end, type_name))

  for node in ast.walk(tree):
    if isinstance(node, ast.stmt) and not is_elif(node):
      add("statement", *span(node, node), type(node).__name__)
    elif isinstance(node, ast.expr) and id(node) not in in_fstring and not isinstance(
        node, (ast.Starred, ast.Slice)):
      add("expression", *span(node, node), type(node).__name__)
    if isinstance(node, ast.Module):
      continue
    for field in _STATEMENT_LISTS:
      stmts = getattr(node, field, None)
      if not isinstance(stmts, list) or not stmts or not isinstance(stmts[0], ast.stmt):
        continue
      if is_elif(stmts[0]):
        continue
      is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and field == "body"
      add("function_body" if is_function else "block", *span(stmts[0], stmts[-1]),
          type(stmts[0]).__name__)
  return out


def structured_fim(doc: str, rng: np.random.Generator, *, spm_rate: float = 0.5,
                   kind_weights: Optional[dict[str, float]] = None,
                   max_middle_chars: Optional[int] = 2048) -> Optional[FimExample]:
  """A complete AST node of ``doc`` (Python) as the middle, or None when ``doc`` does not parse or
  has no candidate. The kind is drawn by ``kind_weights`` among kinds that have candidates, then a
  node uniformly within the kind."""
  return _structured_fim(doc, rng, spm_rate, kind_weights, max_middle_chars)[0]


def _parse_quietly(doc: str) -> Optional[ast.Module]:
  """``ast.parse`` or None; SyntaxWarnings (invalid escapes in old code) are silenced."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return ast.parse(doc)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None


def _structured_fim(doc, rng, spm_rate, kind_weights, max_middle_chars
                    ) -> tuple[Optional[FimExample], bool]:
  """(example or None, whether doc parsed)."""
  tree = _parse_quietly(doc)
  if tree is None:
    return None, False
  candidates = structured_candidates(doc, tree, max_middle_chars)
  weights = dict(DEFAULT_KIND_WEIGHTS if kind_weights is None else kind_weights)
  unknown = set(weights) - set(NODE_KINDS)
  if unknown:
    raise ValueError(f"kind_weights has unknown kinds {sorted(unknown)}; use {list(NODE_KINDS)}")
  kinds = [k for k in NODE_KINDS if candidates[k] and weights.get(k, 0.0) > 0]
  if not kinds:
    return None, True
  p = np.array([weights[k] for k in kinds], np.float64)
  kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
  start, end, type_name = candidates[kind][int(rng.integers(len(candidates[kind])))]
  return FimExample(doc[:start], doc[start:end], doc[end:], _mode(rng, spm_rate), kind, type_name,
                    (start, end)), True


def apply_fim(doc: str, rng: np.random.Generator, *, fim_rate: float = 0.5, spm_rate: float = 0.5,
              structured_rate: float = 0.0, language: str = "python",
              max_middle_chars: Optional[int] = 2048,
              kind_weights: Optional[dict[str, float]] = None) -> tuple[list[Piece], FimStats]:
  """Per-document FIM for the pipeline (see the module docstring). ``structured_rate`` is the
  fraction of FIM documents that try structured FIM (only for ``language == "python"``)."""
  for name, rate in (("fim_rate", fim_rate), ("spm_rate", spm_rate),
                     ("structured_rate", structured_rate)):
    if not 0.0 <= rate <= 1.0:
      raise ValueError(f"{name}={rate} must lie in [0, 1]")
  stats = FimStats(documents=1)
  if rng.random() >= fim_rate:
    stats.plain = 1
    return [Piece(doc, False, True)] if doc else [], stats
  example = None
  if rng.random() < structured_rate:
    parsed = False
    if language.lower() == "python":
      example, parsed = _structured_fim(doc, rng, spm_rate, kind_weights, max_middle_chars)
    if example is None:
      stats.structured_fallback = 1
      stats.parse_failures = int(not parsed)
  if example is None:
    example = char_fim(doc, rng, spm_rate=spm_rate)
    stats.char = 1
  else:
    stats.structured = 1
  stats.psm, stats.spm = int(example.mode == "psm"), int(example.mode == "spm")
  return example.pieces(), stats

