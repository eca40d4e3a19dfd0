"""The sampling distribution of one decode step: temperature, top-k, top-p (nucleus) and greedy.

Pure jittable functions of ``logits_bv`` (the model's float32 logits for the next token of each
row) and a static ``SamplingConfig``::

    logprobs_bv = sampling_log_probs(logits_bv, config)   # log pi(v); -inf outside the allowed set
    token_b = sample_tokens(keys_b, logits_bv, logprobs_bv, config)
    entropy_b = entropy(logprobs_bv)
    policy_bv = policy_log_probs(logits_bv)               # log p(v): the model itself, T = 1

**Which distribution.** ``pi`` is the distribution tokens are actually drawn from:
``softmax(logits / temperature)`` restricted to the allowed set and renormalized, where the allowed
set is (0) the ids below ``vocab_limit`` (if set), (1) of those the top-k tokens by logit (ties
with the k-th largest logit are kept, so the set may exceed k), then (2) among those, the
smallest prefix by descending probability whose mass is ``>= top_p`` (computed on the tempered,
top-k-renormalized probabilities; again ties at the cut-off are kept; the most probable token is
always kept). Log-probs and entropies reported by the sampler are those of ``pi``. Greedy
decoding (``temperature == 0``) takes the argmax of the raw logits (below ``vocab_limit``); its
point mass would carry no information, so for greedy the reported log-probs and entropies are
those of ``pi`` at temperature 1 (with the same top-k/top-p filtering) — with no filtering that is
the model's own ``log_softmax(logits)``.

**Which policy.** ``p = softmax(logits)`` over the whole vocabulary — no temperature, top-k, top-p
or ``vocab_limit`` — is the model's own distribution, the one a trainer's forward pass scores
(``log_softmax`` of the same logits, as in ``kat_jax.train.losses``). The sampler records
``log p(token)`` beside ``log pi(token)``: ``p`` is the PPO / importance-ratio ``old_logp`` of the
behaviour policy whatever ``pi`` the tokens were drawn from; ``pi`` is what the draw actually
followed (``pi == p`` only at temperature 1 with no filtering).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample (static under jit: one compiled program per distinct config).

  ``stop_token_ids``: generation of a row ends after it produced one of them (the stop token is
  kept in the output). ``stop_strings``: it ends after the first token whose decoded prefix contains
  one of them (checked on the host every ``stop_check_every`` tokens; needs a tokenizer).
  """
  temperature: float = 1.0          # 0: greedy (argmax)
  top_k: int = 0                    # 0: no top-k filtering
  top_p: float = 1.0                # 1: no nucleus filtering
  max_new_tokens: int = 256
  stop_token_ids: tuple[int, ...] = ()
  stop_strings: tuple[str, ...] = ()
  stop_check_every: int = 32        # decode tokens between host stop-string checks
  vocab_limit: int = 0              # > 0: only ids < vocab_limit (a tokenizer smaller than the
                                    # model's embedding table); 0: every id

  def __post_init__(self):
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
    object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
    if not self.temperature >= 0.0:
      raise ValueError(f"SamplingConfig.temperature={self.temperature} must be >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k={self.top_k} must be >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p={self.top_p} must lie in (0, 1] (1 = off)")
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.vocab_limit < 0:
      raise ValueError(f"SamplingConfig.vocab_limit={self.vocab_limit} must be >= 0 (0 = off)")
    if self.stop_check_every < 1:
      raise ValueError(f"SamplingConfig.stop_check_every={self.stop_check_every} must be >= 1")
    empty = [s for s in self.stop_strings if not isinstance(s, str) or not s]
    if empty:
      raise ValueError(f"SamplingConfig.stop_strings must be non-empty strings, got {empty!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def restrict_vocab(logits_bv: jax.Array, config: SamplingConfig) -> jax.Array:
  """float32 logits with ids >= ``config.vocab_limit`` at -inf (unchanged when the limit is 0)."""
  logits_bv = logits_bv.astype(jnp.float32)
  if 0 < config.vocab_limit < logits_bv.shape[-1]:
    ids_v = jnp.arange(logits_bv.shape[-1])
    logits_bv = jnp.where(ids_v < config.vocab_limit, logits_bv, -jnp.inf)
  return logits_bv


def filtered_logits(logits_bv: jax.Array, config: SamplingConfig) -> jax.Array:
  """Tempered logits with every token outside the allowed set at -inf (see the module docstring)."""
  logits_bv = restrict_vocab(logits_bv, config)
  if not config.greedy and config.temperature != 1.0:
    logits_bv = logits_bv / jnp.float32(config.temperature)
  vocab = logits_bv.shape[-1]
  if 0 < config.top_k < vocab:
    kth_b1 = jax.lax.top_k(logits_bv, config.top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv >= kth_b1, logits_bv, -jnp.inf)
  if config.top_p < 1.0:
    sorted_bv = -jnp.sort(-logits_bv, axis=-1)                        # descending
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    keep_bv = mass_before_bv < jnp.float32(config.top_p)              # index 0 is always kept
    num_kept_b1 = jnp.sum(keep_bv, axis=-1, keepdims=True)
    cutoff_b1 = jnp.take_along_axis(sorted_bv, num_kept_b1 - 1, axis=-1)
    logits_bv = jnp.where(logits_bv >= cutoff_b1, logits_bv, -jnp.inf)
  return logits_bv


def sampling_log_probs(logits_bv: jax.Array, config: SamplingConfig) -> jax.Array:
  """log pi(v) for every token v: [B, V] float32, -inf outside the allowed set."""
  return jax.nn.log_softmax(filtered_logits(logits_bv, config), axis=-1)


def policy_log_probs(logits_bv: jax.Array) -> jax.Array:
  """log p(v) of the model's own distribution at temperature 1 over every id: [B, V] float32."""
  return jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)


def entropy(logprobs_bv: jax.Array) -> jax.Array:
  """Entropy in nats of each row's distribution ([B]); -inf log-probs contribute 0."""
  probs_bv = jnp.exp(logprobs_bv)
  return -jnp.sum(jnp.where(probs_bv > 0, probs_bv * logprobs_bv, 0.0), axis=-1)


def first_argmax(x_bv: jax.Array) -> jax.Array:
  """``jnp.argmax(x_bv, axis=-1)`` (the first maximal index; x without NaN) as two plain reductions:
  XLA:CPU runs argmax's variadic (value, index) reduce element by element, these vectorize."""
  vocab = x_bv.shape[-1]
  max_b1 = jnp.max(x_bv, axis=-1, keepdims=True)
  ids_v = jnp.arange(vocab, dtype=jnp.int32)
  return jnp.min(jnp.where(x_bv == max_b1, ids_v, vocab), axis=-1)


def sample_tokens(keys_b: jax.Array, logits_bv: jax.Array, logprobs_bv: jax.Array,
                  config: SamplingConfig) -> jax.Array:
  """One token per row: the argmax of the raw logits (greedy), else a draw from pi (row's key).

  The draw is ``jax.random.categorical``'s Gumbel-max — the same Gumbel noise of the row's key,
  the same first maximal index — so the tokens equal ``vmap(jax.random.categorical)``'s."""
  if config.greedy:
    return first_argmax(restrict_vocab(logits_bv, config))
  gumbel_bv = jax.vmap(lambda key: jax.random.gumbel(key, logprobs_bv.shape[-1:],
                                                     logprobs_bv.dtype))(keys_b)
  return first_argmax(gumbel_bv + logprobs_bv)
