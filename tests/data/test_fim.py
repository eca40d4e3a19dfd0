"""FIM: every example reassembles to its document; structured middles are exactly whole AST nodes."""
import ast
import inspect
import json
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings, strategies as hst

from kat_jax.data import chat, fim, special_tokens as st
from kat_jax.data.fim import FimExample, FimStats
from byte_tokenizer import ByteTokenizer

CRAFTED = '''# path: pkg/mod.py
# language: Python
import os  # ünïcödé comment ✓
@decorator(arg=1)
def f(x, *args, **kw):
    """Doc ✓ string."""
    if x > 1: return x; pass
    elif x < 0:
        y = [i for i in range(x) if i % 2]
    else:
        z = (x +
             1)
    s = f"{x+1:>{w}} {y!r}" "tail ✓"
    for i in range(3):
        try:
            print(i, *args, sep="é")
        except ValueError as e:
            raise
        finally:
            del i
    else:
        return lambda q: q[1:2]
    while x: x -= 1
    with open(p) as fh, open(q) as gh:
        data = fh.read()  # ✓
    match x:
        case [1, 2]:
            pass
        case _:
            return {k: v for k, v in kw.items()}
class C(Base, metaclass=M):
    a: int = 0
    async def g(self):
        async for i in self:
            await i
        return (yield)
'''
DOCS = {
    "crafted": CRAFTED,
    "crlf": CRAFTED.replace("\n", "\r\n"),
    "tabs": CRAFTED.replace("    ", "\t"),
    "textwrap": inspect.getsource(textwrap),
    "json_encoder": inspect.getsource(json.encoder),
}


def test_layouts_are_exact():
  ex = FimExample("pre", "mid", "suf", "psm")
  assert ex.to_text() == "<|fim_prefix|>pre<|fim_suffix|>suf<|fim_middle|>mid"
  ex = FimExample("pre", "mid", "suf", "spm")
  assert ex.to_text() == "<|fim_prefix|><|fim_suffix|>suf<|fim_middle|>premid"
  assert [p.text for p in ex.prompt_pieces()] == [st.FIM_PREFIX, st.FIM_SUFFIX, "suf", st.FIM_MIDDLE, "pre"]
  tok = ByteTokenizer()
  ids, mask, _ = chat.encode_pieces(ex.pieces(), tok)
  assert ids[:2].tolist() == [tok.token_id(st.FIM_PREFIX), tok.token_id(st.FIM_SUFFIX)] and mask.all()
  assert tok.decode(ids) == ex.to_text()
  with pytest.raises(ValueError, match="unknown FIM mode 'pms'"):
    FimExample("a", "b", "c", "pms")


@settings(max_examples=200, deadline=None)
@given(hst.text(max_size=60), hst.integers(0, 2**32 - 1), hst.floats(0, 1))
def test_char_fim_reassembles(doc, seed, spm_rate):
  rng = np.random.default_rng(seed)
  ex = fim.char_fim(doc, rng, spm_rate=spm_rate)
  assert ex.document == doc and not ex.structured
  assert fim.reassemble(ex.pieces()) == doc
  pieces, stats = fim.apply_fim(doc, rng, fim_rate=1.0, spm_rate=spm_rate)
  assert fim.reassemble(pieces) == doc and stats.char == 1 and stats.psm + stats.spm == 1


@pytest.mark.parametrize("mode_rate", [0.0, 1.0])
def test_apply_fim_modes_and_plain(mode_rate):
  rng = np.random.default_rng(1)
  doc = "abcdefghij" * 3
  pieces, stats = fim.apply_fim(doc, rng, fim_rate=1.0, spm_rate=mode_rate)
  specials = [p.text for p in pieces if p.special]
  if mode_rate == 0.0:
    assert stats.psm == 1 and specials == [st.FIM_PREFIX, st.FIM_SUFFIX, st.FIM_MIDDLE]
  else:
    assert stats.spm == 1 and [p.text for p in pieces][:2] == [st.FIM_PREFIX, st.FIM_SUFFIX]
  assert fim.reassemble(pieces) == doc
  pieces, stats = fim.apply_fim(doc, rng, fim_rate=0.0)
  assert pieces == [chat.Piece(doc, False, True)] and stats.plain == 1


def _reference_candidates(doc):
  """{(kind, start, end, type): (first, last) nodes} for every complete node, with offsets computed
  from the standard library's own line splitting (what ast.get_source_segment uses)."""
  lines = ast._splitlines_no_ff(doc)
  starts = np.concatenate([[0], np.cumsum([len(l) for l in lines])])

  def offset(lineno, col):
    return int(starts[lineno - 1]) + len(lines[lineno - 1].encode()[:col].decode())

  tree = ast.parse(doc)
  inside_f = {id(c) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for c in ast.walk(n) if c is not n}
  ref = {}

  def add(kind, first, last):
    start, end = offset(first.lineno, first.col_offset), offset(last.end_lineno, last.end_col_offset)
    if doc.startswith("elif", start):
      return
    ref[(kind, start, end, type(first).__name__)] = (first, last)

  for node in ast.walk(tree):
    if isinstance(node, ast.stmt):
      add("statement", node, node)
    if isinstance(node, ast.expr) and id(node) not in inside_f and not isinstance(node, (ast.Starred, ast.Slice)):
      add("expression", node, node)
    for field in ("body", "orelse", "finalbody"):
      stmts = getattr(node, field, None)
      if isinstance(node, ast.Module) or not isinstance(stmts, list) or not stmts or not isinstance(stmts[0], ast.stmt):
        continue
      kind = "function_body" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and field == "body" else "block"
      add(kind, stmts[0], stmts[-1])
  return ref


@pytest.mark.parametrize("name", sorted(DOCS))
def test_structured_candidates_are_exactly_the_ast_nodes(name):
  doc = DOCS[name]
  cands = fim.structured_candidates(doc)
  ours = {(kind, s, e, t) for kind, spans in cands.items() for s, e, t in spans}
  assert ours == set(_reference_candidates(doc))
  assert all(cands[k] for k in fim.NODE_KINDS)


def _reparse(ex, doc):
  """Parses the middle on its own as its node kind; returns the parsed node (or statement list)."""
  line_start = doc.rfind("\n", 0, ex.span[0]) + 1
  line_start = max(line_start, doc.rfind("\r", 0, ex.span[0]) + 1)
  head = doc[line_start:ex.span[0]]
  indent = head[:len(head) - len(head.lstrip(" \t"))]
  lines = ex.middle.splitlines(keepends=True)
  text = lines[0] + "".join(l[len(indent):] if l.startswith(indent) else l for l in lines[1:])
  if ex.node_kind == "expression":
    return ast.parse("(\n" + text + "\n)", mode="eval").body
  return ast.parse(text).body


@pytest.mark.parametrize("name", sorted(DOCS))
def test_structured_fim_middles_are_whole_nodes(name):
  doc = DOCS[name]
  ref = _reference_candidates(doc)
  rng = np.random.default_rng(7)
  kinds = set()
  for _ in range(60):
    ex = fim.structured_fim(doc, rng, max_middle_chars=None)
    assert ex.document == doc and fim.reassemble(ex.pieces()) == doc
    assert doc[ex.span[0]:ex.span[1]] == ex.middle and ex.prefix == doc[:ex.span[0]]
    first, last = ref[(ex.node_kind, *ex.span, ex.node_type)]
    whole = ast.Pass(lineno=first.lineno, col_offset=first.col_offset, end_lineno=last.end_lineno,
                     end_col_offset=last.end_col_offset)
    assert ex.middle == ast.get_source_segment(doc, whole)
    parsed = _reparse(ex, doc)
    if ex.node_kind == "expression":
      assert type(parsed).__name__ == ex.node_type
    else:
      assert type(parsed[0]).__name__ == ex.node_type
      if ex.node_kind == "statement":
        assert len(parsed) == 1
    kinds.add(ex.node_kind)
  assert kinds == set(fim.NODE_KINDS)


def test_max_middle_chars_and_kind_weights():
  rng = np.random.default_rng(0)
  for _ in range(30):
    ex = fim.structured_fim(CRAFTED, rng, max_middle_chars=20, kind_weights={"block": 1.0})
    assert ex.node_kind == "block" and len(ex.middle) <= 20
  with pytest.raises(ValueError, match="unknown kinds"):
    fim.structured_fim(CRAFTED, rng, kind_weights={"blocks": 1.0})


def test_fallbacks_are_counted():
  rng = np.random.default_rng(0)
  total = FimStats()
  docs = ["def broken(:\n  pass\n", "x = 'unterminated\n", "# only a comment\n", "", CRAFTED]
  for doc in docs:
    pieces, stats = fim.apply_fim(doc, rng, fim_rate=1.0, structured_rate=1.0)
    assert fim.reassemble(pieces) == doc
    total = total + stats
  assert total.to_dict() == dict(documents=5, plain=0, char=4, structured=1, structured_fallback=4,
                                 parse_failures=2, psm=total.psm, spm=total.spm)
  _, stats = fim.apply_fim(CRAFTED, rng, fim_rate=1.0, structured_rate=1.0, language="rust")
  assert stats.structured_fallback == stats.parse_failures == stats.char == 1


def test_rates_and_determinism():
  docs = [CRAFTED, "plain text " * 5, "def broken(:"] * 400
  def run(seed):
    rng = np.random.default_rng(seed)
    results = [fim.apply_fim(d, rng, fim_rate=0.6, spm_rate=0.25, structured_rate=0.5) for d in docs]
    return [p for p, _ in results], sum((s for _, s in results), FimStats())
  pieces, stats = run(3)
  assert pieces == run(3)[0]
  assert all(fim.reassemble(p) == d for p, d in zip(pieces, docs))
  n = len(docs)
  assert stats.documents == n == stats.plain + stats.char + stats.structured
  fim_docs = stats.char + stats.structured
  assert abs(fim_docs / n - 0.6) < 0.05 and abs(stats.spm / fim_docs - 0.25) < 0.05
  assert abs((stats.structured + stats.structured_fallback) / fim_docs - 0.5) < 0.05
  # Two thirds of the documents do not parse as Python or have no statements -> fallbacks.
  assert stats.structured_fallback > stats.structured / 2
