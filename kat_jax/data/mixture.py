"""Deterministic token-weighted mixing of document streams (the mid-training mixture).

Each time the packer needs a new document it asks ``TokenMixture.choose()`` for a stream: the stream
whose token count is furthest below its target share (``weight * total``) — deficit round robin in
tokens. No random numbers are involved, so the choice sequence is a pure function of the documents'
lengths, the realized token proportions converge to the weights (off by at most one document per
stream at any time), and the state is a few integers::

  mixture = TokenMixture({"code": 0.7, "commits": 0.3})
  name = mixture.choose(); ...; mixture.record(name, num_tokens)
  mixture.realized_fractions()     # {"code": 0.70.., "commits": 0.29..}
"""
from __future__ import annotations

from typing import Mapping


def normalized_weights(weights: Mapping[str, float]) -> dict[str, float]:
  """Drops zero weights and normalizes the rest to sum 1; clear errors for bad weights."""
  bad = {name: w for name, w in weights.items() if not w >= 0.0}
  if bad:
    raise ValueError(f"mixture weights must be >= 0, got {bad}")
  kept = {name: float(w) for name, w in weights.items() if w > 0.0}
  if not kept:
    raise ValueError(f"all mixture weights are zero ({dict(weights)}); give at least one stream a "
                     "positive weight, e.g. --config.data.mixture.code=1.0")
  total = sum(kept.values())
  return {name: w / total for name, w in kept.items()}


class TokenMixture:
  """Chooses the next stream so that per-stream token counts track the target weights."""

  def __init__(self, weights: Mapping[str, float]):
    self.weights = normalized_weights(weights)
    self.names = tuple(self.weights)
    self.tokens = {name: 0 for name in self.names}

  def choose(self) -> str:
    total = sum(self.tokens.values())
    # Largest deficit first; ties go to the larger weight, then to the earlier stream.
    return max(self.names, key=lambda name: (self.weights[name] * total - self.tokens[name],
                                             self.weights[name], -self.names.index(name)))

  def record(self, name: str, num_tokens: int) -> None:
    self.tokens[name] += int(num_tokens)

  def realized_fractions(self) -> dict[str, float]:
    total = sum(self.tokens.values())
    return {name: (self.tokens[name] / total if total else 0.0) for name in self.names}

  def get_state(self) -> dict:
    return {"tokens": dict(self.tokens)}

  def set_state(self, state: Mapping) -> None:
    tokens = dict(state["tokens"])
    if set(tokens) != set(self.names):
      raise ValueError(f"mixture state has streams {sorted(tokens)} but this mixture has "
                       f"{sorted(self.names)}; resume with the data config the state was saved with.")
    self.tokens = {name: int(tokens[name]) for name in self.names}
