"""The sampling distribution against a numpy reference: allowed sets of top-k / top-p, log-probs
normalized on them, entropies, greedy = argmax, and draws never leaving the allowed set."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.sample import distribution
from kat_jax.sample.distribution import SamplingConfig


def _reference_allowed(logits_v: np.ndarray, temperature: float, top_k: int, top_p: float,
                       vocab_limit: int = 0):
  """Allowed set and normalized probabilities, written the obvious way (python loops)."""
  scaled = logits_v.astype(np.float64) / temperature
  order = sorted(range(vocab_limit or len(scaled)), key=lambda v: -scaled[v])
  allowed = set(order if top_k == 0 else order[:top_k])
  if top_p < 1.0:
    kept = [v for v in order if v in allowed]
    z = np.exp(scaled[kept] - scaled[kept].max())
    p = z / z.sum()
    nucleus, mass = [], 0.0
    for v, pv in zip(kept, p):
      if mass >= top_p:
        break
      nucleus.append(v)
      mass += pv
    allowed = set(nucleus)
  idx = np.array(sorted(allowed))
  z = np.exp(scaled[idx] - scaled[idx].max())
  probs = np.zeros_like(scaled)
  probs[idx] = z / z.sum()
  return allowed, probs


@pytest.mark.parametrize("temperature,top_k,top_p,vocab_limit", [
    (1.0, 0, 1.0, 0), (0.7, 5, 1.0, 0), (1.3, 0, 0.6, 0), (0.5, 20, 0.9, 0), (1.0, 1, 1.0, 0),
    (2.0, 0, 0.05, 0), (1.0, 4, 0.8, 30)])
def test_filtered_distribution_matches_reference(temperature, top_k, top_p, vocab_limit):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
  config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                          vocab_limit=vocab_limit)
  logprobs = np.asarray(distribution.sampling_log_probs(jnp.asarray(logits), config))
  ent = np.asarray(distribution.entropy(jnp.asarray(logprobs)))
  for row in range(logits.shape[0]):
    allowed, probs = _reference_allowed(logits[row], temperature, top_k, top_p, vocab_limit)
    finite = set(np.flatnonzero(np.isfinite(logprobs[row])).tolist())
    assert finite == allowed
    np.testing.assert_allclose(np.exp(logprobs[row]), probs, atol=1e-6)
    ref_ent = -sum(probs[v] * np.log(probs[v]) for v in allowed)
    np.testing.assert_allclose(ent[row], ref_ent, atol=1e-5)
  # Draws: thousands of samples, none outside the allowed set, frequencies close to probs.
  keys = jax.random.split(jax.random.key(1), 4000)
  draws = np.asarray(jax.vmap(lambda k: distribution.sample_tokens(
      jax.random.split(k, logits.shape[0]), jnp.asarray(logits), jnp.asarray(logprobs),
      config))(keys))                                                   # [4000, 6]
  for row in range(logits.shape[0]):
    allowed, probs = _reference_allowed(logits[row], temperature, top_k, top_p, vocab_limit)
    assert set(draws[:, row].tolist()) <= allowed
    freq = np.bincount(draws[:, row], minlength=logits.shape[1]) / draws.shape[0]
    np.testing.assert_allclose(freq, probs, atol=0.04)


def test_greedy_is_argmax_and_reports_the_untempered_distribution():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(4, 30)), jnp.float32)
  config = SamplingConfig(temperature=0.0)
  logprobs = distribution.sampling_log_probs(logits, config)
  np.testing.assert_allclose(logprobs, jax.nn.log_softmax(logits), atol=1e-6)
  keys = jax.random.split(jax.random.key(0), 4)
  tokens = distribution.sample_tokens(keys, logits, logprobs, config)
  np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), -1))
  limited = SamplingConfig(temperature=0.0, vocab_limit=10)
  tokens = distribution.sample_tokens(keys, logits, logprobs, limited)
  np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits)[:, :10], -1))


def test_config_errors_name_the_value():
  with pytest.raises(ValueError, match="top_p=0"):
    SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="temperature=-1"):
    SamplingConfig(temperature=-1.0)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    SamplingConfig(max_new_tokens=0)


def test_first_argmax_and_draws_equal_jax_argmax_and_categorical():
  # Ties (integer-valued logits over few values) and -inf entries (filtered tokens) included.
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 3, (64, 37)).astype(np.float32)
  x[rng.random(x.shape) < 0.3] = -np.inf
  x[:, 5] = 2.0                                     # every row has a finite maximum
  np.testing.assert_array_equal(distribution.first_argmax(jnp.asarray(x)),
                                np.argmax(x, axis=-1))
  config = SamplingConfig(temperature=0.7, top_k=20, max_new_tokens=1)
  logits = jnp.asarray(rng.normal(size=(64, 37)) * 3, jnp.float32)
  logprobs = distribution.sampling_log_probs(logits, config)
  keys = jax.random.split(jax.random.key(3), 64)
  np.testing.assert_array_equal(distribution.sample_tokens(keys, logits, logprobs, config),
                                jax.vmap(jax.random.categorical)(keys, logprobs))
