"""CodeBLEU of a Python prediction against its reference: the package's four components, our total.

CodeBLEU mixes token n-gram BLEU, keyword-weighted n-gram BLEU, AST subtree
match and data-flow match. The components come from the ``codebleu`` package (0.7.0), applied to
one (prediction, reference) pair exactly as its ``calc_codebleu`` prepares them (both stripped,
whitespace tokens, the package's keyword list weighting keywords 1 and other tokens 0.2); the
total and the degenerate cases are ours::

    c = codebleu.components(prediction, reference)   # Components(ngram, weighted_ngram, syntax,
                                                     #            dataflow), each in [0, 1]
    codebleu.combine(c, (0.25, 0.25, 0.25, 0.25))    # the weighted sum

- An empty (blank) or unparsable (``ast.parse`` fails) prediction scores 0 on every component;
  the package would still credit its tokens and its partial syntax tree.
- So does a prediction whose syntax tree is pathologically deep (``tree_work``, the sum of its
  node depths, over ``max_tree_work``; e.g. ``a or a or ...`` thousands of times): the package's
  subtree match prints every subtree, in time quadratic in the depth (minutes for 20k operands),
  which a degenerate sample must not be able to cost the trainer. Ordinary code is far below the
  bound (procedural solutions: < 1k; 12k lines of straight-line code: ~0.4M).
- The total is the plain weighted sum. A data-flow score of 0 counts as 0, where the package's
  total counts it as 1 (full data-flow credit to a prediction whose data flow matches nothing).
- A reference without any data flow (no variables, e.g. ``return 1``) gives data flow 0 to every
  prediction, as the package's component does: a ceiling of 1 - w_dataflow that is the same for
  all samples of the task, so it does not change how they rank.

The package is imported on first use (it loads the tree-sitter grammar).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

from kat_jax.rl.complexity import parse_python

LANGUAGES = ("python",)   # languages whose prediction we can check for parsability
MAX_TREE_WORK = 1_000_000   # default bound on tree_work (about a second of subtree matching)


@dataclasses.dataclass(frozen=True)
class Components:
  """The four CodeBLEU components, each in [0, 1]."""
  ngram: float             # BLEU-4 of whitespace tokens
  weighted_ngram: float    # BLEU-4 with keyword tokens weighted 1, others 0.2
  syntax: float            # fraction of the reference's AST subtrees found in the prediction
  dataflow: float          # fraction of the reference's (normalized) data-flow edges matched

  def as_tuple(self) -> tuple[float, float, float, float]:
    return (self.ngram, self.weighted_ngram, self.syntax, self.dataflow)


NAMES = tuple(f.name for f in dataclasses.fields(Components))
ZERO = Components(0.0, 0.0, 0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class _Package:
  bleu: Any
  weighted_ngram_match: Any
  syntax_match: Any
  dataflow_match: Any
  language: Any           # tree_sitter.Language
  keywords: frozenset


@functools.cache
def _package(lang: str) -> _Package:
  from codebleu import bleu, dataflow_match, syntax_match, weighted_ngram_match
  from codebleu.codebleu import PACKAGE_DIR
  from codebleu.utils import get_tree_sitter_language
  lines = (PACKAGE_DIR / "keywords" / f"{lang}.txt").read_text(encoding="utf-8").splitlines()
  return _Package(bleu, weighted_ngram_match, syntax_match, dataflow_match,
                  get_tree_sitter_language(lang), frozenset(x.strip() for x in lines))


def _check_lang(lang: str) -> None:
  if lang not in LANGUAGES:
    raise ValueError(f"codebleu language {lang!r} is not supported: use one of {list(LANGUAGES)} "
                     f"(config.rl.reward.codebleu.lang)")


def tree_work(code: str, lang: str = "python", limit: int = MAX_TREE_WORK) -> int:
  """The sum over the tree-sitter syntax tree's nodes of their depth (root 1), the size of all
  the subtrees the syntax match prints; counting stops once it passes ``limit``. Linear time."""
  from tree_sitter import Parser
  parser = Parser()
  parser.language = _package(lang).language
  cursor = parser.parse(code.encode("utf-8", "surrogatepass")).walk()
  depth, total = 1, 0
  while True:
    total += depth
    if total > limit:
      return total
    if cursor.goto_first_child():
      depth += 1
      continue
    while not cursor.goto_next_sibling():
      if not cursor.goto_parent():
        return total
      depth -= 1


def components(prediction: str, reference: str, lang: str = "python",
               max_tree_work: int = MAX_TREE_WORK) -> Components:
  """The four components of ``prediction`` against ``reference``; ``ZERO`` when the prediction is
  blank, does not parse or its ``tree_work`` exceeds ``max_tree_work``. Raises ValueError when
  the reference is blank or does not parse (the environment must give the reference source)."""
  _check_lang(lang)
  if not reference.strip() or parse_python(reference) is None:
    raise ValueError(f"codebleu needs the reference solution as {lang} source in Grade.reference; "
                     f"got {reference[:80]!r}{'...' if len(reference) > 80 else ''}, which is "
                     f"{'empty' if not reference.strip() else 'not parsable'}")
  pred, ref = prediction.strip(), reference.strip()
  if (not pred or parse_python(prediction) is None
      or tree_work(pred, lang, max_tree_work) > max_tree_work):
    return ZERO
  pkg = _package(lang)
  pred_tokens, ref_tokens = pred.split(), ref.split()
  token_weights = {t: 1 if t in pkg.keywords else 0.2 for t in ref_tokens}
  return Components(
      ngram=float(pkg.bleu.corpus_bleu([[ref_tokens]], [pred_tokens])),
      weighted_ngram=float(pkg.weighted_ngram_match.corpus_bleu([[[ref_tokens, token_weights]]],
                                                                [pred_tokens])),
      syntax=float(pkg.syntax_match.corpus_syntax_match([[ref]], [pred], lang,
                                                        tree_sitter_language=pkg.language)),
      dataflow=float(pkg.dataflow_match.corpus_dataflow_match([[ref]], [pred], lang,
                                                              tree_sitter_language=pkg.language)))


def check_weights(weights: Sequence[float], where: str = "codebleu weights") -> tuple:
  """``weights`` as a 4-tuple of finite non-negative floats, or a ValueError naming them."""
  weights = tuple(float(w) for w in weights)
  if len(weights) != len(NAMES) or not all(math.isfinite(w) and w >= 0 for w in weights):
    raise ValueError(f"{where}={weights} must be {len(NAMES)} finite non-negative numbers, the "
                     f"weights of {list(NAMES)}")
  return weights


def combine(c: Components, weights: Sequence[float] = (0.25, 0.25, 0.25, 0.25)) -> float:
  """The weighted sum of the components (no substitution for a zero data-flow score)."""
  return math.fsum(w * x for w, x in zip(check_weights(weights), c.as_tuple()))


def codebleu(prediction: str, reference: str,
             weights: Sequence[float] = (0.25, 0.25, 0.25, 0.25), lang: str = "python",
             max_tree_work: int = MAX_TREE_WORK) -> float:
  """``combine(components(prediction, reference, lang, max_tree_work), weights)``."""
  return combine(components(prediction, reference, lang, max_tree_work), weights)
