"""Unbiased pass@k (Chen et al., 2021): the chance that at least one of k samples drawn without
replacement from n generated samples, c of which are correct, is correct.

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

The product form is the numerically stable one (no huge binomials). ``pass_at_k(n, c, k)`` is one
problem; ``mean_pass_at_k(ns, cs, ks)`` averages over problems and reports only the k every problem
supports (k <= n), as the HumanEval protocol does.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one problem with ``n`` samples of which ``c`` are correct."""
  if not 0 <= c <= n:
    raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
  if not 1 <= k <= n:
    raise ValueError(f"pass@{k} needs 1 <= k <= n samples, got n={n}; draw more samples or "
                     f"lower k")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int],
                   ks: Iterable[int] = (1, 10, 100)) -> dict[str, float]:
  """``{"pass@k": mean over problems}`` for each k in ``ks`` with k <= min(num_samples)."""
  if len(num_samples) != len(num_correct):
    raise ValueError(f"{len(num_samples)} sample counts but {len(num_correct)} correct counts")
  if not num_samples:
    raise ValueError("no problems to average over")
  smallest = min(num_samples)
  return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k)
                                      for n, c in zip(num_samples, num_correct)]))
          for k in ks if k <= smallest}
