"""CodeBLEU components against the `codebleu` package; our total and degenerate cases."""
import math
import subprocess
import sys
import time

import pytest
from codebleu import calc_codebleu

from kat_jax.data import procedural
from kat_jax.rl import codebleu as cb

HANDWRITTEN = [
    # (prediction, reference): renamed variables, comments and docstrings, other algorithms.
    ("def total(values):\n    s = 0\n    for v in values:\n        s += v\n    return s\n",
     "def total(xs):\n    acc = 0\n    for x in xs:\n        acc += x\n    return acc\n"),
    ("def total(xs):\n    # add them up\n    return sum(xs)\n",
     "def total(xs):\n    acc = 0\n    for x in xs:\n        acc += x\n    return acc\n"),
    ('def f(a, b):\n    """Larger of two."""\n    return a if a > b else b\n',
     "def f(a, b):\n    if a > b:\n        return a\n    return b\n"),
    ("def rev(s):\n    out = ''\n    for ch in s:\n        out = ch + out\n    return out\n",
     "def rev(s):\n    return s[::-1]\n"),
    ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
     "        self.items.append(x)\n",
     "class Stack:\n    def __init__(self):\n        self.data = []\n\n    def push(self, item):\n"
     "        self.data.append(item)\n"),
    ("import math\n\ndef norm(v):\n    return math.sqrt(sum(x * x for x in v))\n",
     "def norm(v):\n    total = 0.0\n    for x in v:\n        total += x ** 2\n"
     "    return total ** 0.5\n"),
    ("x = 1\n", "def f(a):\n    b = a + 1\n    return b\n"),
]


def _package_components(prediction, reference):
  r = calc_codebleu([reference], [prediction], "python")
  return (r["ngram_match_score"], r["weighted_ngram_match_score"], r["syntax_match_score"],
          r["dataflow_match_score"])


def _pairs():
  pairs = []
  for task in procedural.generate_tasks(seed=0, num_tasks=18, split="train", levels=(0, 1, 2)):
    pairs.append((task.solution, task.solution))
    for _, mutant in list(procedural.mutants(task.solution, list(task.arg_names)))[:3]:
      pairs.append((mutant, task.solution))
  return pairs + HANDWRITTEN


def test_components_equal_the_package_on_many_pairs():
  pairs = _pairs()
  assert len(pairs) >= 50
  distinct_totals = set()
  for prediction, reference in pairs:
    ours = cb.components(prediction, reference).as_tuple()
    theirs = _package_components(prediction, reference)
    assert ours == pytest.approx(theirs, abs=1e-6), (prediction, reference)
    distinct_totals.add(round(cb.combine(cb.components(prediction, reference)), 6))
  assert len(distinct_totals) > 20   # the pairs really differ


def test_identical_code_scores_one_on_every_component():
  task = procedural.generate_tasks(seed=1, num_tasks=1, split="train", levels=(1,))[0]
  c = cb.components(task.solution, task.solution)
  assert c.as_tuple() == pytest.approx((1.0, 1.0, 1.0, 1.0))
  assert cb.codebleu(task.solution, task.solution) == pytest.approx(1.0)


@pytest.mark.parametrize("prediction", ["", "   \n\t\n"])
def test_empty_prediction_scores_zero(prediction):
  reference = "def f(a):\n    b = a + 1\n    return b\n"
  assert cb.components(prediction, reference) == cb.ZERO
  assert cb.codebleu(prediction, reference) == 0.0


def test_unparsable_prediction_scores_zero_where_the_package_gives_credit():
  reference = "def f(a):\n    b = a + 1\n    return b\n"
  prediction = reference.replace("(a):", "(a:")     # one character from the reference
  assert min(_package_components(prediction, reference)[:2]) > 0.3
  assert cb.components(prediction, reference) == cb.ZERO
  assert cb.codebleu(prediction, reference) == 0.0


def test_tree_work_is_the_sum_of_node_depths():
  # module(1) > expression_statement(2) > identifier(3): 1 + 2 + 3.
  assert cb.tree_work("a") == 6
  # module > expression_statement > boolean_operator > (identifier, "or", identifier): 1+2+3+3*4.
  assert cb.tree_work("a or b") == 18
  # `x = a or ... or a` (n operands): module, statement, assignment, then a left-nested chain of
  # n - 1 boolean_operators at depths 4.. each with "or" and an identifier one deeper.
  def chain(n):
    return "x = " + " or ".join(["a"] * n)

  def chain_work(n):
    return 1 + 2 + 3 + 4 + 4 + sum(4 + k + 2 * (5 + k) for k in range(n - 1)) + (n + 3)

  for n in (2, 3, 10, 3000):
    assert cb.tree_work(chain(n), limit=10 ** 12) == chain_work(n)
  capped = cb.tree_work(chain(3000), limit=10 ** 5)           # stops at the first node past it
  assert 10 ** 5 < capped <= 10 ** 5 + 3003


def test_pathologically_deep_prediction_scores_zero_quickly():
  reference = "def f(a):\n    b = a or 1\n    return b\n"
  deep = "def f(a):\n    b = " + " or ".join(["a"] * 3000) + "\n    return b\n"
  assert cb.tree_work(deep, limit=10 ** 9) > cb.MAX_TREE_WORK   # ~13.5M: seconds in the package
  start = time.perf_counter()
  assert cb.components(deep, reference) == cb.ZERO
  assert time.perf_counter() - start < 1.0
  # The bound is what zeroes it: a shallow prediction is scored as the package scores it, and
  # zeroed only by a bound below its own work.
  shallow = "def f(a):\n    b = " + " or ".join(["a"] * 30) + "\n    return b\n"
  assert cb.tree_work(shallow) < cb.MAX_TREE_WORK
  assert cb.components(shallow, reference, max_tree_work=cb.tree_work(shallow) - 1) == cb.ZERO
  assert cb.components(shallow, reference).as_tuple() == pytest.approx(
      _package_components(shallow, reference), abs=1e-6)
  assert cb.components(shallow, reference).ngram > 0


def test_zero_dataflow_counts_zero_not_one():
  prediction, reference = "def g():\n    return 7\n", "def f(a):\n    b = a + 1\n    return b\n"
  c = cb.components(prediction, reference)
  assert c.dataflow == 0.0
  weights = (0.1, 0.2, 0.3, 0.4)
  expected = 0.1 * c.ngram + 0.2 * c.weighted_ngram + 0.3 * c.syntax
  assert cb.combine(c, weights) == pytest.approx(expected, abs=1e-12)
  package_total = calc_codebleu([reference], [prediction], "python", weights=weights)["codebleu"]
  assert package_total == pytest.approx(expected + 0.4)   # the package substitutes 1


def test_combine_is_the_weighted_sum():
  prediction, reference = HANDWRITTEN[0]
  c = cb.components(prediction, reference)
  weights = (0.5, 0.0, 2.0, 1.0)
  assert cb.combine(c, weights) == pytest.approx(
      0.5 * c.ngram + 2.0 * c.syntax + 1.0 * c.dataflow, abs=1e-12)
  # With every component defined and nonzero, the package's total is the same sum.
  assert min(c.as_tuple()) > 0
  assert cb.combine(c, weights) == pytest.approx(
      calc_codebleu([reference], [prediction], "python", weights=weights)["codebleu"], abs=1e-6)


@pytest.mark.parametrize("weights", [(0.25, 0.25, 0.25), (0.25, -0.1, 0.5, 0.35),
                                     (0.25, math.nan, 0.25, 0.25)])
def test_bad_weights_are_rejected(weights):
  with pytest.raises(ValueError, match="finite non-negative"):
    cb.combine(cb.ZERO, weights)


def test_bad_reference_or_language_is_an_error():
  with pytest.raises(ValueError, match="empty"):
    cb.components("def f():\n    return 1\n", "  \n")
  with pytest.raises(ValueError, match="not parsable"):
    cb.components("def f():\n    return 1\n", "def f(:\n")
  with pytest.raises(ValueError, match="'java' is not supported"):
    cb.components("x = 1\n", "x = 1\n", lang="java")


def test_package_is_imported_lazily():
  code = ("import sys, kat_jax.rl.rewards, kat_jax.rl.codebleu; "
          "print(sorted(m for m in ('codebleu', 'tree_sitter', 'radon') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
