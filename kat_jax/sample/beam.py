"""Beam search on the KV-cache decode core: the best ``beam_width`` continuations of each prompt by
length-normalized log-probability.

    out = sampler.beam_search(prompts, beam_width=4, max_new_tokens=64, length_penalty=1.0,
                              stop_token_ids=(eos,))     # = beam.beam_search(sampler, prompts, ...)
    out.tokens[i, j, :out.lengths[i, j]]   # prompt i's j-th best hypothesis (j = 0: the best)
    out.scores[i, j], out.sum_logprobs[i, j], out.logprobs[i, j], out.finish_reason[i][j]

**What is shared.** Each prompt is prefilled once, by the sampler's own prefill program and prompt
bucketing (``Sampler._prefill_prompts``); its cache row is then copied into ``beam_width`` (W)
rows by index (``decode.gather_rows``): row ``p * W + w`` is beam w of prompt p. At every step the
rows are reordered by their chosen parents with the same gather, so a beam carries on from its
parent's cache and no prefix is ever recomputed. Prefix expansion, the step loop and the finished
pool are one jitted ``lax.while_loop`` (``beam_search_state``), compiled once per (prompt rows,
prompt bucket, output bucket, W, ``vocab_limit``); stop ids, ``max_new_tokens`` (within its
bucket), ``length_penalty`` and ``early_stopping`` are traced. With the sampler's mesh the
``prompts x W`` rows are sharded over data×fsdp (the prompt rows padded to a multiple of that with
inactive prompts, as in ``generate``); without one everything runs on the default device.

**Scores.** ``logprobs`` are the model's own log-probs at temperature 1 over the whole vocabulary,
``log_softmax(logits)`` (the sampler's ``logprobs_policy``); ``sum_logprobs`` is their sum over the
generated tokens, stop token included, and the score follows the Hugging Face convention::

    score = sum_logprobs / length ** length_penalty     # length = generated tokens, stop included

``length_penalty = 0`` ranks by the plain sum, ``> 0`` favours longer hypotheses (the sums are
negative), ``< 0`` shorter ones. ``vocab_limit > 0`` only removes the ids >= it from the
candidates (a tokenizer smaller than the embedding table); log-probs stay those of every id.

**A step** (HF's algorithm). Every live beam w of a prompt, of sum s_w, proposes each token v with
s_w + log p(v | beam w); the prompt's top ``2W`` of its ``W * V`` candidates are taken in order. A
candidate ending in a stop token and ranked among the first W is a finished hypothesis, offered to
the pool; the first W candidates that do not stop become the next live beams (fewer when fewer
candidates are finite: the other rows are dead and their sums -inf). At step 0 only beam 0 of a
prompt is live (its W rows hold the same prefix), so no hypothesis is found twice. A prompt that
reaches its limit — ``max_new_tokens`` generated, or its ``max_len`` cache slots full — offers its
live beams to the pool with reason "length" / "max_len" and stops. The pool keeps the W best
finished hypotheses of each prompt by score (fewer only when fewer exist: ``num_beams``), best
first.

**Early stopping** is exact. A prompt stops once its pool holds W hypotheses and no live beam can
score above the worst of them: log-probs are <= 0, so a live beam of sum s after t + 1 tokens can
end with at most ``s / L ** alpha`` for a final length L in [t + 2, limit], largest at L = limit
for alpha > 0 and at L = t + 2 for alpha < 0 (HF's ``early_stopping="never"`` bound; HF's
``early_stopping=True`` would stop at W finished hypotheses even when a live beam could still beat
them). So the result is the same as without early stopping (up to ties of equal scores), reached
in fewer steps (``steps``). ``early_stopping=False`` runs every prompt to its limit. A prompt with
no live beam left (every candidate -inf) stops too.

``beam_width=1`` is greedy decoding when ``length_penalty=0`` or there are no stop tokens (with a
stop token and alpha > 0 a longer hypothesis may outscore the greedy one that stopped). Beam
search draws nothing at random.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kat_jax import sharding as sharding_lib
from kat_jax.model.attention import AttentionMask
from kat_jax.sample import decode, distribution

_NEG_INF = -jnp.inf


@flax.struct.dataclass
class BeamResult:
  """The finished pool of each prompt row (device), best first; what ``beam_search_state``
  returns. Empty slots have score -inf."""
  tokens_pwn: jax.Array     # int32 [P, W, N]
  logprobs_pwn: jax.Array   # float32 [P, W, N]: log p(token), T = 1, whole vocabulary
  lengths_pw: jax.Array     # int32 [P, W]: generated tokens, stop token included
  sums_pw: jax.Array        # float32 [P, W]: sum of the log-probs
  scores_pw: jax.Array      # float32 [P, W]: sums / lengths ** length_penalty (-inf: empty)
  finish_pw: jax.Array      # int32 [P, W]: decode.STOP_TOKEN | LENGTH | MAX_LEN
  steps_p: jax.Array        # int32 [P]: steps the prompt ran before it stopped


@flax.struct.dataclass
class _Carry:
  state: decode.DecodeState   # [P * W] rows: the live beams' caches and next-token logits
  sums_pw: jax.Array          # float32 [P, W]: live beams' sums (-inf: dead row)
  tokens_pwn: jax.Array       # int32 [P, W, N]: live beams' tokens so far
  logprobs_pwn: jax.Array     # float32 [P, W, N]
  pool: BeamResult
  limit_p: jax.Array          # int32 [P]: tokens the prompt may generate
  done_p: jax.Array           # bool [P]
  step: jax.Array             # int32 []


def _constrain_rows(x: jax.Array, mesh, rules) -> jax.Array:
  """Prompt rows (axis 0) over data×fsdp, like the decode batch."""
  return sharding_lib.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1), mesh, rules)


def beam_search_state(model: nn.Module, params: Any, state: decode.DecodeState,
                      stop_token_ids: jax.Array, max_new: jax.Array, length_penalty: jax.Array,
                      early_stopping: jax.Array, *, beam_width: int, max_new_tokens: int,
                      max_len: int, vocab_limit: int = 0) -> BeamResult:
  """Beam search from a prefill ``state`` of P prompt rows (``decode.prefill``; rows that start
  finished, e.g. INACTIVE padding, are skipped); see the module docstring.

  ``stop_token_ids`` int32 [K] (pad with -1), ``max_new`` (<= ``max_new_tokens``, the static
  width of the outputs), ``length_penalty`` (float) and ``early_stopping`` (bool) are traced.
  """
  mesh, rules = model.mesh, model.rules
  w, n = int(beam_width), int(max_new_tokens)
  p = state.lengths_b.shape[0]
  vocab = state.next_logits_bv.shape[-1]
  stop_ids_k = jnp.asarray(stop_token_ids, jnp.int32).reshape(-1)
  max_new = jnp.minimum(jnp.asarray(max_new, jnp.int32), n)
  alpha = jnp.asarray(length_penalty, jnp.float32)
  early_stopping = jnp.asarray(early_stopping, jnp.bool_)
  allowed_v = (jnp.arange(vocab) < vocab_limit if 0 < vocab_limit < vocab
               else jnp.ones((vocab,), jnp.bool_))
  num_candidates = min(2 * w, w * vocab)
  rank_k = jnp.arange(num_candidates, dtype=jnp.int32)
  col_n = jnp.arange(n, dtype=jnp.int32)

  def rows(x):
    return _constrain_rows(x, mesh, rules)

  # Every prompt row copied into W beam rows: the cache is gathered by index, never recomputed.
  beams = decode.gather_rows(model, state, jnp.repeat(jnp.arange(p, dtype=jnp.int32), w))
  empty_pw = jnp.full((p, w), _NEG_INF, jnp.float32)
  pool = BeamResult(
      tokens_pwn=jnp.zeros((p, w, n), jnp.int32), logprobs_pwn=jnp.zeros((p, w, n), jnp.float32),
      lengths_pw=jnp.zeros((p, w), jnp.int32), sums_pw=empty_pw, scores_pw=empty_pw,
      finish_pw=jnp.zeros((p, w), jnp.int32), steps_p=jnp.zeros((p,), jnp.int32))
  carry = _Carry(
      state=beams,
      sums_pw=jnp.where(jnp.arange(w)[None, :] == 0, 0.0, empty_pw),
      tokens_pwn=jnp.zeros((p, w, n), jnp.int32), logprobs_pwn=jnp.zeros((p, w, n), jnp.float32),
      pool=pool, limit_p=jnp.minimum(max_new, max_len - state.prompt_lengths_b).astype(jnp.int32),
      done_p=state.done_b, step=jnp.zeros((), jnp.int32))

  def cond(c: _Carry):
    return (c.step < n) & ~jnp.all(c.done_p)

  def body(c: _Carry) -> _Carry:
    t = c.step
    running_p = ~c.done_p
    logp_pwv = distribution.policy_log_probs(c.state.next_logits_bv).reshape(p, w, vocab)
    cand_pwv = c.sums_pw[:, :, None] + jnp.where(allowed_v, logp_pwv, _NEG_INF)
    cand_pk, index_pk = jax.lax.top_k(cand_pwv.reshape(p, w * vocab), num_candidates)
    parent_pk, token_pk = index_pk // vocab, index_pk % vocab
    token_logp_pk = jnp.take_along_axis(logp_pwv.reshape(p, w * vocab), index_pk, axis=1)
    valid_pk = cand_pk > _NEG_INF
    stop_pk = jnp.any(token_pk[:, :, None] == stop_ids_k[None, None, :], axis=-1)
    finished_pk = running_p[:, None] & valid_pk & stop_pk & (rank_k < w)[None, :]
    # The next live beams: the first W finite candidates that do not stop, in rank order.
    live_key_pk = jnp.where(valid_pk & ~stop_pk, rank_k[None, :], num_candidates)
    neg_key_pw, pick_pw = jax.lax.top_k(-live_key_pk, w)
    alive_pw = -neg_key_pw < num_candidates

    def pick(x_pk):
      return jnp.take_along_axis(x_pk, pick_pw, axis=1)

    def grow(buffer_pwn, value_pk):
      """Each candidate's sequence: its parent's, with ``value`` at column t."""
      seq_pkn = jnp.take_along_axis(buffer_pwn, parent_pk[:, :, None], axis=1)
      return jnp.where(col_n == t, value_pk[:, :, None].astype(buffer_pwn.dtype), seq_pkn)

    cand_tokens_pkn = grow(c.tokens_pwn, token_pk)
    cand_logps_pkn = grow(c.logprobs_pwn, token_logp_pk)
    live_tokens_pwn = jnp.take_along_axis(cand_tokens_pkn, pick_pw[:, :, None], axis=1)
    live_logps_pwn = jnp.take_along_axis(cand_logps_pkn, pick_pw[:, :, None], axis=1)
    live_sums_pw = jnp.where(alive_pw, pick(cand_pk), _NEG_INF)

    # The pool: the W best of (kept, newly stopped, and at the limit the live beams).
    length = t + 1
    denom = jnp.power(length.astype(jnp.float32), alpha)
    last_p = running_p & (length >= c.limit_p)
    offer_live_pw = last_p[:, None] & alive_pw
    length_reason = jnp.where(length >= max_new, decode.LENGTH, decode.MAX_LEN)
    k = num_candidates
    scores_px = jnp.concatenate([
        c.pool.scores_pw, jnp.where(finished_pk, cand_pk / denom, _NEG_INF),
        jnp.where(offer_live_pw, live_sums_pw / denom, _NEG_INF)], axis=1)
    top_scores_pw, keep_pw = jax.lax.top_k(scores_px, w)

    def merge(kept, stopped, live):
      x = jnp.concatenate([kept, stopped, live], axis=1)
      index = keep_pw.reshape(keep_pw.shape + (1,) * (x.ndim - 2))
      return jnp.take_along_axis(x, index, axis=1)

    new_pool = BeamResult(
        tokens_pwn=merge(c.pool.tokens_pwn, cand_tokens_pkn, live_tokens_pwn),
        logprobs_pwn=merge(c.pool.logprobs_pwn, cand_logps_pkn, live_logps_pwn),
        lengths_pw=merge(c.pool.lengths_pw, jnp.full((p, k), length, jnp.int32),
                         jnp.full((p, w), length, jnp.int32)),
        sums_pw=merge(c.pool.sums_pw, cand_pk, live_sums_pw),
        scores_pw=top_scores_pw,
        finish_pw=merge(c.pool.finish_pw, jnp.full((p, k), decode.STOP_TOKEN, jnp.int32),
                        jnp.full((p, w), length_reason, jnp.int32)),
        steps_p=jnp.where(running_p, length, c.pool.steps_p))

    # Stop a prompt at its limit, with no live beam, or when no live beam can enter its pool.
    future_length_p = jnp.where(alpha > 0, c.limit_p, length + 1).astype(jnp.float32)
    bound_pw = live_sums_pw / jnp.power(future_length_p, alpha)[:, None]
    pool_full_p = jnp.all(top_scores_pw > _NEG_INF, axis=1)
    hopeless_p = pool_full_p & ~jnp.any(bound_pw > top_scores_pw[:, w - 1:w], axis=1)
    done_p = c.done_p | (running_p & (last_p | ~jnp.any(alive_pw, axis=1)
                                      | (early_stopping & hopeless_p)))
    go_on_p = ~done_p

    # Reorder the cache rows by parent (done prompts keep theirs), then feed the chosen tokens.
    parent_pw = jnp.where(go_on_p[:, None], pick(parent_pk), jnp.arange(w)[None, :])
    rows_b = (jnp.arange(p, dtype=jnp.int32)[:, None] * w + parent_pw).reshape(p * w)
    beams = decode.gather_rows(model, c.state, rows_b)
    write_b = (go_on_p[:, None] & alive_pw).reshape(p * w)
    token_b1 = jnp.where(write_b, pick(token_pk).reshape(p * w), 0)[:, None]
    # A continuing beam has generated t + 1 < limit tokens, so its slot is < max_len - 1; other
    # rows write at a slot nobody sees (empty interval).
    slot_b1 = jnp.minimum(beams.lengths_b, max_len - 1)[:, None]
    tout_b1 = jnp.where(write_b[:, None], jnp.int32(max_len), slot_b1)
    out = model.apply({"params": params}, token_b1, slot_b1,
                      AttentionMask(tin=slot_b1, tout=tout_b1), kv_cache=beams.cache)
    beams = beams.replace(
        cache=out.kv_cache,
        next_logits_bv=jnp.where(write_b[:, None], out.logits[:, 0], beams.next_logits_bv),
        lengths_b=beams.lengths_b + write_b.astype(jnp.int32))
    beams = decode._constrain_state(beams, mesh, rules)  # pylint: disable=protected-access
    go_on_pw = go_on_p[:, None]
    return _Carry(
        state=beams, sums_pw=rows(jnp.where(go_on_pw, live_sums_pw, _NEG_INF)),
        tokens_pwn=rows(jnp.where(go_on_pw[:, :, None], live_tokens_pwn, c.tokens_pwn)),
        logprobs_pwn=rows(jnp.where(go_on_pw[:, :, None], live_logps_pwn, c.logprobs_pwn)),
        pool=jax.tree.map(rows, new_pool), limit_p=c.limit_p, done_p=done_p, step=t + 1)

  return jax.lax.while_loop(cond, body, carry).pool


@dataclasses.dataclass(frozen=True)
class BeamOutput:
  """Per prompt i, its kept hypotheses j < ``num_beams[i]`` sorted by score, best first. Slots
  past ``num_beams[i]`` (fewer hypotheses than ``beam_width`` exist) have length 0, score -inf;
  entries past a hypothesis' length are 0."""
  tokens: np.ndarray          # int32 [B, W, N]
  logprobs: np.ndarray        # float32 [B, W, N]: log p(token), p = softmax(logits) at T = 1
  lengths: np.ndarray         # int32 [B, W]: generated tokens, stop token included
  sum_logprobs: np.ndarray    # float32 [B, W]
  scores: np.ndarray          # float32 [B, W]: sum_logprobs / lengths ** length_penalty
  finish_reason: list         # [B][num_beams[i]]: stop_token | length | max_len
  num_beams: np.ndarray       # int32 [B]
  steps: np.ndarray           # int32 [B]: decode steps run (fewer than the limit: early stop)
  texts: Optional[list] = None  # [B][num_beams[i]]: decoded hypotheses when a tokenizer was given

  def beams(self, i: int) -> list[list[int]]:
    """Prompt i's hypotheses as token lists, best first."""
    return [self.tokens[i, j, :self.lengths[i, j]].tolist() for j in range(self.num_beams[i])]

  def best(self) -> list[list[int]]:
    """The best hypothesis of every prompt."""
    return [self.tokens[i, 0, :self.lengths[i, 0]].tolist() for i in range(len(self.num_beams))]


def beam_search(sampler, prompts: Sequence[Sequence[int]], *, beam_width: int,
                max_new_tokens: int, length_penalty: float = 1.0,
                stop_token_ids: Sequence[int] = (), early_stopping: bool = True,
                vocab_limit: int = 0, tokenizer=None) -> BeamOutput:
  """The ``beam_width`` best continuations of every prompt (lists of token ids) under
  ``sampler``'s model and params; see the module docstring. ``tokenizer`` (optional) fills
  ``texts``."""
  if not prompts:
    raise ValueError("beam_search() needs at least one prompt")
  if isinstance(beam_width, bool) or int(beam_width) != beam_width or beam_width < 1:
    raise ValueError(f"beam_width={beam_width!r} must be an integer >= 1")
  if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or \
      max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
  if not math.isfinite(float(length_penalty)):
    raise ValueError(f"length_penalty={length_penalty!r} must be a finite number "
                     "(0: rank by the plain sum of log-probs)")
  vocab = sampler.model.cfg.vocab_size
  if not 0 <= vocab_limit <= vocab:
    raise ValueError(f"vocab_limit={vocab_limit} must lie in [0, {vocab}] (0 = every id)")
  stop_ids = [int(s) for s in stop_token_ids]
  bad = [s for s in stop_ids if not 0 <= s < vocab]
  if bad:
    raise ValueError(f"stop_token_ids {bad} lie outside the model's vocabulary [0, {vocab})")
  for i, prompt in enumerate(prompts):
    ids = np.asarray(prompt).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
      raise ValueError(f"prompt {i} holds ids outside [0, {vocab}) (the model's vocabulary): "
                       f"{ids[(ids < 0) | (ids >= vocab)][:5].tolist()}")
  beam_width, max_new_tokens = int(beam_width), int(max_new_tokens)
  batch = len(prompts)
  padded = sampler._padded(batch)                           # pylint: disable=protected-access
  # The sampler's prefill (its bucketing and checks); the keys are unused: nothing is drawn.
  keys = sampler._row_keys(jax.random.key(0), batch, padded)  # pylint: disable=protected-access
  state = sampler._prefill_prompts(                          # pylint: disable=protected-access
      prompts, keys, sampler.output_bucket, sampler.output_bucket)
  buffer = math.ceil(max_new_tokens / sampler.output_bucket) * sampler.output_bucket
  stop_ids = np.asarray(stop_ids + [-1] * (8 * max(1, math.ceil(len(stop_ids) / 8))
                                           - len(stop_ids)), np.int32)
  result = sampler._beam(                                    # pylint: disable=protected-access
      sampler.params, state, stop_ids, np.int32(max_new_tokens), np.float32(length_penalty),
      np.bool_(early_stopping), beam_width=beam_width, max_new_tokens=buffer,
      max_len=sampler.max_len, vocab_limit=int(vocab_limit))
  host = jax.device_get(result)
  n = max_new_tokens
  tokens = np.array(host.tokens_pwn[:batch, :, :n])
  logprobs = np.array(host.logprobs_pwn[:batch, :, :n])
  scores = np.array(host.scores_pw[:batch], np.float32)
  kept = scores > -np.inf
  lengths = np.where(kept, host.lengths_pw[:batch], 0).astype(np.int32)
  sums = np.where(kept, host.sums_pw[:batch], -np.inf).astype(np.float32)
  beyond = np.arange(n)[None, None, :] >= lengths[:, :, None]
  tokens[beyond] = 0
  logprobs[beyond] = 0.0
  num_beams = kept.sum(axis=1).astype(np.int32)   # sorted: kept slots come first
  reasons = [[decode.FINISH_NAMES[int(code)] for code in host.finish_pw[i, :num_beams[i]]]
             for i in range(batch)]
  texts = None
  if tokenizer is not None:
    texts = [[tokenizer.decode(tokens[i, j, :lengths[i, j]].tolist())
              for j in range(num_beams[i])] for i in range(batch)]
  return BeamOutput(tokens=tokens, logprobs=logprobs, lengths=lengths, sum_logprobs=sums,
                    scores=scores, finish_reason=reasons, num_beams=num_beams,
                    steps=np.array(host.steps_p[:batch], np.int32), texts=texts)
