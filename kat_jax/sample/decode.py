"""The pure, jittable core of KV-cache generation: ``prefill``, then turns of ``decode_steps``.

RL rollouts and the ``Sampler`` both call these; nothing here touches the host::

    state = prefill(model, params, prompt_tokens_bp, prompt_lengths_b, row_keys_b, active_b,
                    max_len=S, max_new_tokens=N)
    state = decode_steps(model, params, state, num_steps, stop_now_b, config=sampling_config,
                         max_len=S)           # call again to continue; one compiled program
    state.tokens_bn, state.logprobs_bn, state.logprobs_policy_bn, state.finish_b, state.lengths_b
    # Multi-turn: append each row's observation, start the next turn, decode it.
    state = extend(model, params, state, tokens_bc, num_tokens_b, end_b, max_len=S)
    state = begin_turn(model, state, base_keys_b, turn, max_new, max_new_tokens=N)
    state = decode_steps(...)
    state = truncate_turn(model, params, state, keep_b, max_len=S)   # host stop-string cuts
    child = gather_rows(model, state, rows_b, real_b)               # fork rows (tree rollouts)

**Cache layout.** Prompts are left-aligned in a ``[B, P]`` buffer (P >= the longest prompt, padded
with anything). Token i of a row lives at cache slot i with position i; the KV cache has ``S =
max_len`` slots, and a slot holding a real token has the interval ``(tin, tout) = (i, S)`` so
every later query (``tin`` = its own slot) sees it, while padding slots keep ``tout == tin`` and
are seen by nobody (``Transformer``'s interval rule: key s visible to query q iff
``tin[s] <= tin[q] < tout[s]``). Decoding writes each row's next token at slot = its current
length, overwriting the padding there, so rows of different lengths decode in lockstep with no
recompilation and each row's logits equal those of a full forward pass over that row alone.
Slots at or past a row's length may hold stale keys (tokens cut at a stop string, dummy writes of
finished rows): a query at slot q sees only slots <= q, and a row's slots are written in order,
so each is rewritten before any query could see it.

**Loop.** Every iteration samples one token per row from ``next_logits_bv`` (see
``distribution``), records token, log-prob and entropy of the sampling distribution and of the
policy at temperature 1 at column ``step``, decides whether the row finished (stop token,
``max_new`` reached, or the cache is full), then runs the model on the new tokens (one query per
row) to get the next logits. Finished rows keep computing (the batch is dense) but write to a slot
nobody sees, and their outputs, counters and ``next_logits_bv`` no longer change. Row r at step t
draws with ``fold_in(row_keys_b[r], t)``, so a row's samples depend on its own key only — not on
the batch it was generated in.

**Turns.** ``next_logits_bv`` always holds the logits after a row's last cached token, so a turn
can follow another. ``extend`` appends a chunk of tokens per row (``num_tokens_b[r]`` of them,
0 allowed) in one forward pass at per-row offsets — the history is never recomputed — and takes
the logits at each row's last appended token. ``begin_turn`` resets the per-turn buffers; turn t
draws with the keys of ``turn_keys``. ``episode_end_b`` says whether a row's episode goes on
(``RUNNING``) or why it ended: ``MAX_LEN`` once its cache is full or an appended chunk (plus one
generated token) would not fit — the chunk is then not written — and ``INACTIVE`` for padding
rows and rows ended by the caller (``end_b``). Ended rows finish every later turn at once with that
code and no tokens.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from kat_jax import sharding as sharding_lib
from kat_jax.model.attention import AttentionMask
from kat_jax.model.transformer import KVCache
from kat_jax.sample import distribution

# finish_b / episode_end_b codes.
RUNNING = 0
STOP_TOKEN = 1
LENGTH = 2        # max_new_tokens reached
MAX_LEN = 3       # the KV cache (max_len slots) is full, or an appended chunk would not fit
STOP_STRING = 4   # set by the host (stop_now_b / truncate_turn)
INACTIVE = 5      # a padding row (batch rounded up to the mesh) or a row whose episode was ended
FINISH_NAMES = {RUNNING: "running", STOP_TOKEN: "stop_token", LENGTH: "length",
                MAX_LEN: "max_len", STOP_STRING: "stop_string", INACTIVE: "inactive"}

# Turn t >= 1 draws with fold_in(base_key, _TURN_SALT + t): steps (< max_len) never reach it.
_TURN_SALT = 2 ** 31


@flax.struct.dataclass
class DecodeState:
  """Everything the decode loop carries (all on device)."""
  cache: KVCache
  next_logits_bv: jax.Array     # float32 [B, V]: model logits for the token after the last cached
  prompt_lengths_b: jax.Array   # int32 [B]: context length when this turn began (turn 0: prompt)
  lengths_b: jax.Array          # int32 [B]: tokens in the row's cache (prompt + turns so far)
  done_b: jax.Array             # bool [B]: the row finished this turn
  finish_b: jax.Array           # int32 [B]: one of the codes above (this turn)
  episode_end_b: jax.Array      # int32 [B]: RUNNING while the row's episode goes on, else MAX_LEN
                                # or INACTIVE (see the module docstring)
  tokens_bn: jax.Array          # int32 [B, N]: tokens generated this turn (0 where none)
  logprobs_bn: jax.Array        # float32 [B, N]: log pi(token) of the sampling distribution
  entropies_bn: jax.Array       # float32 [B, N]: entropy of pi at that step
  logprobs_policy_bn: jax.Array   # float32 [B, N]: log p(token), p = softmax(logits) (T = 1)
  entropies_policy_bn: jax.Array  # float32 [B, N]: entropy of p at that step
  row_keys_b: jax.Array         # PRNG key array [B]: this turn's keys
  step: jax.Array               # int32 []: tokens generated by every row still running
  max_new: jax.Array            # int32 []: rows finish with LENGTH after this many tokens (<= N)

  @property
  def num_generated_b(self) -> jax.Array:
    return self.lengths_b - self.prompt_lengths_b


# Fields with one entry per row along axis 0 (besides the cache and the keys).
_ROW_FIELDS = ("next_logits_bv", "prompt_lengths_b", "lengths_b", "done_b", "finish_b",
               "episode_end_b", "tokens_bn", "logprobs_bn", "entropies_bn", "logprobs_policy_bn",
               "entropies_policy_bn")
_TURN_BUFFERS = ("tokens_bn", "logprobs_bn", "entropies_bn", "logprobs_policy_bn",
                 "entropies_policy_bn")
_KV_NAMES = (None, "act_batch", "act_kv_heads", None, None)


def _constrain_state(state: DecodeState, mesh, rules) -> DecodeState:
  """Batch over data×fsdp everywhere; the cache's kv heads over tensor."""
  if mesh is None:
    return state

  def per_row(x):
    return sharding_lib.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1), mesh, rules)

  cache = state.cache.replace(
      k=sharding_lib.constrain(state.cache.k, _KV_NAMES, mesh, rules),
      v=sharding_lib.constrain(state.cache.v, _KV_NAMES, mesh, rules),
      tin=per_row(state.cache.tin), tout=per_row(state.cache.tout))
  fields = {f: per_row(getattr(state, f)) for f in _ROW_FIELDS}
  return state.replace(cache=cache, **fields)


def _turn_buffers(batch: int, max_new_tokens: int) -> dict:
  zeros_bn = jnp.zeros((batch, max_new_tokens), jnp.float32)
  buffers = {name: zeros_bn for name in _TURN_BUFFERS}
  buffers["tokens_bn"] = jnp.zeros((batch, max_new_tokens), jnp.int32)
  return buffers


def prefill(model: nn.Module, params: Any, prompt_tokens_bp: jax.Array,
            prompt_lengths_b: jax.Array, row_keys_b: jax.Array, active_b: jax.Array, *,
            max_len: int, max_new_tokens: int,
            max_new: Optional[jax.Array] = None) -> DecodeState:
  """Runs the prompts through the model once and returns the state before the first sample.

  ``prompt_tokens_bp`` int32 [B, P] left-aligned (P <= max_len); ``prompt_lengths_b`` in
  [1, max_len - 1]; ``active_b`` False for padding rows (they start finished, code INACTIVE).
  ``max_new_tokens`` (static) sizes the output buffers; ``max_new`` (traced, default
  ``max_new_tokens``) is where rows stop, so one program serves every limit up to the buffer size.
  """
  b, p = prompt_tokens_bp.shape
  if p > max_len:
    raise ValueError(f"prompt buffer of {p} tokens does not fit max_len={max_len} cache slots")
  mesh, rules = model.mesh, model.rules
  positions_bp = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  real_bp = positions_bp < prompt_lengths_b[:, None]
  mask = AttentionMask(tin=positions_bp,
                       tout=jnp.where(real_bp, jnp.int32(max_len), positions_bp))
  cache = KVCache.empty(model.cfg, b, max_len)
  if mesh is not None:
    cache = cache.replace(k=sharding_lib.constrain(cache.k, _KV_NAMES, mesh, rules),
                          v=sharding_lib.constrain(cache.v, _KV_NAMES, mesh, rules))
  last_b = jnp.clip(prompt_lengths_b - 1, 0, p - 1)
  # The output head runs at each prompt's last position only ([B, 1, V], not [B, P, V]).
  out = model.apply({"params": params}, prompt_tokens_bp.astype(jnp.int32), positions_bp, mask,
                    kv_cache=cache, logits_at=last_b[:, None])
  next_logits_bv = out.logits[:, 0]
  start_b = jnp.where(active_b, RUNNING, INACTIVE).astype(jnp.int32)
  state = DecodeState(
      cache=out.kv_cache, next_logits_bv=next_logits_bv,
      prompt_lengths_b=prompt_lengths_b.astype(jnp.int32),
      lengths_b=prompt_lengths_b.astype(jnp.int32), done_b=~active_b, finish_b=start_b,
      episode_end_b=start_b, row_keys_b=row_keys_b, step=jnp.zeros((), jnp.int32),
      max_new=jnp.minimum(jnp.asarray(max_new_tokens if max_new is None else max_new, jnp.int32),
                          max_new_tokens),
      **_turn_buffers(b, max_new_tokens))
  return _constrain_state(state, mesh, rules)


def decode_steps(model: nn.Module, params: Any, state: DecodeState, num_steps: jax.Array,
                 stop_token_ids: Optional[jax.Array] = None, stop_now_b: Optional[jax.Array] = None,
                 *, config: distribution.SamplingConfig, max_len: int) -> DecodeState:
  """Generates up to ``num_steps`` more tokens per running row (fewer once every row finished).

  Only the distribution fields of ``config`` (temperature, top_k, top_p) are read; the stop ids
  come from ``stop_token_ids`` (int32 [K], traced; pad with -1) or else from ``config``.
  ``stop_now_b`` (bool [B], optional) finishes rows before the first step with code STOP_STRING:
  the host's verdict on stop strings. ``num_steps`` is traced: any chunk length reuses the program.
  """
  mesh, rules = model.mesh, model.rules
  if stop_now_b is not None:
    hit_b = stop_now_b & ~state.done_b
    state = state.replace(done_b=state.done_b | hit_b,
                          finish_b=jnp.where(hit_b, STOP_STRING, state.finish_b))
  limit = jnp.minimum(state.step + jnp.asarray(num_steps, jnp.int32), state.max_new)
  if stop_token_ids is None:
    stop_token_ids = config.stop_token_ids or (-1,)
  stop_ids = jnp.asarray(stop_token_ids, jnp.int32).reshape(-1)

  def cond(s: DecodeState):
    return (s.step < limit) & ~jnp.all(s.done_b)

  def body(s: DecodeState) -> DecodeState:
    keys_b = jax.vmap(jax.random.fold_in, in_axes=(0, None))(s.row_keys_b, s.step)
    logprobs_bv = distribution.sampling_log_probs(s.next_logits_bv, config)
    token_b = distribution.sample_tokens(keys_b, s.next_logits_bv, logprobs_bv, config)
    policy_bv = distribution.policy_log_probs(s.next_logits_bv)

    def chosen(logp_bv):
      return jnp.take_along_axis(logp_bv, token_b[:, None], axis=-1)[:, 0]

    running_b = ~s.done_b

    def record(buffer_bn, value_b):
      column_b1 = jnp.where(running_b, value_b, jnp.zeros_like(value_b))[:, None]
      return jax.lax.dynamic_update_slice(buffer_bn, column_b1.astype(buffer_bn.dtype),
                                          (0, s.step))

    is_stop_b = jnp.any(token_b[:, None] == stop_ids[None, :], axis=-1)
    fills_cache_b = s.lengths_b + 1 >= max_len
    finish_now_b = jnp.where(
        is_stop_b, STOP_TOKEN,
        jnp.where(s.step + 1 >= s.max_new, LENGTH,
                  jnp.where(fills_cache_b, MAX_LEN, RUNNING))).astype(jnp.int32)
    finish_b = jnp.where(running_b, finish_now_b, s.finish_b)
    done_b = s.done_b | (running_b & (finish_now_b != RUNNING))
    # A row whose token takes the last slot cannot take another turn, whatever ended this one.
    episode_end_b = jnp.where(running_b & fills_cache_b, MAX_LEN, s.episode_end_b)
    # A running row's token goes to slot = length; its logits predict the following token. A
    # finished row writes its dummy token at that (free, or for a full cache the last) slot with
    # an empty interval, so nobody sees it, and keeps its logits.
    slot_b1 = jnp.minimum(s.lengths_b, max_len - 1)[:, None]
    tout_b1 = jnp.where(running_b[:, None], jnp.int32(max_len), slot_b1)
    out = model.apply({"params": params}, token_b[:, None], slot_b1,
                      AttentionMask(tin=slot_b1, tout=tout_b1), kv_cache=s.cache)
    new = s.replace(
        cache=out.kv_cache,
        next_logits_bv=jnp.where(running_b[:, None], out.logits[:, 0], s.next_logits_bv),
        lengths_b=s.lengths_b + running_b.astype(jnp.int32), done_b=done_b, finish_b=finish_b,
        episode_end_b=episode_end_b, tokens_bn=record(s.tokens_bn, token_b),
        logprobs_bn=record(s.logprobs_bn, chosen(logprobs_bv)),
        entropies_bn=record(s.entropies_bn, distribution.entropy(logprobs_bv)),
        logprobs_policy_bn=record(s.logprobs_policy_bn, chosen(policy_bv)),
        entropies_policy_bn=record(s.entropies_policy_bn, distribution.entropy(policy_bv)),
        step=s.step + 1)
    return _constrain_state(new, mesh, rules)

  return jax.lax.while_loop(cond, body, state)


def generate_ids(model: nn.Module, params: Any, prompt_tokens_bp: jax.Array,
                 prompt_lengths_b: jax.Array, row_keys_b: jax.Array, *,
                 config: distribution.SamplingConfig, max_len: int) -> DecodeState:
  """Prefill and the whole decode loop in one traceable function (stop tokens only, no stop
  strings): what a jitted RL rollout step calls."""
  active_b = jnp.ones(prompt_lengths_b.shape, jnp.bool_)
  state = prefill(model, params, prompt_tokens_bp, prompt_lengths_b, row_keys_b, active_b,
                  max_len=max_len, max_new_tokens=config.max_new_tokens)
  return decode_steps(model, params, state, config.max_new_tokens, config=config,
                      max_len=max_len)


def _write_chunk(model: nn.Module, params: Any, state: DecodeState, tokens_bc: jax.Array,
                 start_b: jax.Array, num_b: jax.Array, *, max_len: int
                 ) -> tuple[KVCache, jax.Array]:
  """Writes ``tokens_bc[r, :num_b[r]]`` at slots (= positions) ``start_b[r], start_b[r] + 1, ...``
  in one forward pass that attends to the cached history; returns the cache and the next logits
  (those at each row's last written token; unchanged where ``num_b`` is 0).

  The caller guarantees ``start_b + num_b <= max_len - 1`` where ``num_b > 0``, so the padding
  columns (slots past the real ones, clamped to the last slot) never land on a real token of this
  call; they are written with empty intervals, seen by nobody.
  """
  c = tokens_bc.shape[1]
  col_c = jnp.arange(c, dtype=jnp.int32)
  slot_bc = jnp.minimum(start_b[:, None] + col_c[None, :], max_len - 1)
  real_bc = col_c[None, :] < num_b[:, None]
  mask = AttentionMask(tin=slot_bc, tout=jnp.where(real_bc, jnp.int32(max_len), slot_bc))
  last_b1 = jnp.clip(num_b - 1, 0, c - 1)[:, None]
  out = model.apply({"params": params}, tokens_bc.astype(jnp.int32), slot_bc, mask,
                    kv_cache=state.cache, logits_at=last_b1)
  next_logits_bv = jnp.where((num_b > 0)[:, None], out.logits[:, 0], state.next_logits_bv)
  return out.kv_cache, next_logits_bv


def extend(model: nn.Module, params: Any, state: DecodeState, tokens_bc: jax.Array,
           num_tokens_b: jax.Array, end_b: Optional[jax.Array] = None, *,
           max_len: int) -> DecodeState:
  """Appends ``tokens_bc[r, :num_tokens_b[r]]`` to each running row's cache (0 tokens allowed).

  One forward pass over the ``[B, C]`` chunk at per-row offsets (``C`` static: pad the chunk to a
  bucket so any observation length up to it reuses the program; ``0 <= num_tokens_b <= C``).
  ``end_b`` (int32 [B], optional): RUNNING (0) keeps a row going, a finish code (INACTIVE,
  MAX_LEN) ends its episode with that code. A running row whose chunk plus one generated token
  would not fit in ``max_len`` slots is not written and ends with code MAX_LEN; rows that had
  ended already are left alone (their tokens are ignored).
  """
  c = tokens_bc.shape[1]
  running_b = state.episode_end_b == RUNNING
  num_b = jnp.clip(num_tokens_b.astype(jnp.int32), 0, c)
  if end_b is None:
    end_b = jnp.full(running_b.shape, RUNNING, jnp.int32)
  fits_b = state.lengths_b + num_b <= max_len - 1
  episode_end_b = jnp.where(running_b & (end_b != RUNNING), end_b,
                            jnp.where(running_b & ~fits_b, MAX_LEN, state.episode_end_b))
  num_b = jnp.where(episode_end_b == RUNNING, num_b, 0)
  cache, next_logits_bv = _write_chunk(model, params, state, tokens_bc, state.lengths_b, num_b,
                                       max_len=max_len)
  new = state.replace(cache=cache, next_logits_bv=next_logits_bv,
                      lengths_b=state.lengths_b + num_b, episode_end_b=episode_end_b,
                      done_b=state.done_b | (episode_end_b != RUNNING))
  return _constrain_state(new, model.mesh, model.rules)


def turn_keys(base_keys_b: jax.Array, turn: jax.Array) -> jax.Array:
  """Row keys of turn ``turn``: the base keys in turn 0 (so a first turn draws as a single-turn
  generation does), ``fold_in(base, 2**31 + turn)`` after — never a key a step draws with."""
  turn = jnp.asarray(turn, jnp.uint32)
  later_b = jax.vmap(jax.random.fold_in, in_axes=(0, None))(base_keys_b,
                                                              jnp.uint32(_TURN_SALT) + turn)
  return jnp.where(turn == 0, base_keys_b, later_b)


def begin_turn(model: nn.Module, state: DecodeState, base_keys_b: jax.Array, turn: jax.Array,
               max_new: jax.Array, *, max_new_tokens: int) -> DecodeState:
  """The state at the start of turn ``turn``: fresh output buffers of ``max_new_tokens``
  (static) columns, rows stopping after ``max_new`` (traced) tokens, the turn's keys; rows whose
  episode ended are finished with its code."""
  batch = state.lengths_b.shape[0]
  new = state.replace(
      prompt_lengths_b=state.lengths_b, done_b=state.episode_end_b != RUNNING,
      finish_b=state.episode_end_b, row_keys_b=turn_keys(base_keys_b, turn),
      step=jnp.zeros((), jnp.int32),
      max_new=jnp.minimum(jnp.asarray(max_new, jnp.int32), max_new_tokens),
      **_turn_buffers(batch, max_new_tokens))
  return _constrain_state(new, model.mesh, model.rules)


def truncate_turn(model: nn.Module, params: Any, state: DecodeState, keep_b: jax.Array, *,
                  max_len: int) -> DecodeState:
  """Cuts this turn of each row with ``1 <= keep_b < generated`` to its first ``keep_b`` tokens
  (finish code STOP_STRING): what a host stop-string check decided after the loop ran past it.

  The cut rows' last kept token is fed again at its slot to restore their next logits; the tokens
  past it stay in the cache as stale slots (see the module docstring). Other rows are unchanged.
  """
  generated_b = state.num_generated_b
  cut_b = (keep_b >= 1) & (keep_b < generated_b)
  keep_b = jnp.where(cut_b, keep_b, generated_b).astype(jnp.int32)
  new_lengths_b = state.prompt_lengths_b + keep_b
  last_b1 = jnp.take_along_axis(state.tokens_bn, jnp.maximum(keep_b - 1, 0)[:, None], axis=1)
  start_b = jnp.where(cut_b, new_lengths_b - 1, state.lengths_b)
  cache, next_logits_bv = _write_chunk(model, params, state, last_b1, start_b,
                                       cut_b.astype(jnp.int32), max_len=max_len)
  beyond_bn = jnp.arange(state.tokens_bn.shape[1])[None, :] >= keep_b[:, None]
  buffers = {name: jnp.where(beyond_bn, jnp.zeros_like(getattr(state, name)), getattr(state, name))
             for name in _TURN_BUFFERS}
  new = state.replace(
      cache=cache, next_logits_bv=next_logits_bv, lengths_b=new_lengths_b,
      finish_b=jnp.where(cut_b, STOP_STRING, state.finish_b),
      episode_end_b=jnp.where(cut_b, RUNNING, state.episode_end_b), **buffers)
  return _constrain_state(new, model.mesh, model.rules)


def gather_rows(model: nn.Module, state: DecodeState, rows_b: jax.Array,
                real_b: Optional[jax.Array] = None) -> DecodeState:
  """A state whose row i is a copy of ``state``'s row ``rows_b[i]`` — cache, logits, lengths,
  this turn's outputs and keys — so it decodes exactly as that row would (fork ``k`` children of
  a shared prefix without recomputing it). ``real_b`` False marks padding rows (INACTIVE)."""
  rows_b = rows_b.astype(jnp.int32)

  def take(x, axis=0):
    return jnp.take(x, rows_b, axis=axis)

  cache = state.cache.replace(k=take(state.cache.k, 1), v=take(state.cache.v, 1),
                              tin=take(state.cache.tin), tout=take(state.cache.tout))
  new = state.replace(cache=cache, row_keys_b=take(state.row_keys_b),
                      **{f: take(getattr(state, f)) for f in _ROW_FIELDS})
  if real_b is not None:
    new = new.replace(done_b=new.done_b | ~real_b,
                      finish_b=jnp.where(real_b, new.finish_b, INACTIVE),
                      episode_end_b=jnp.where(real_b, new.episode_end_b, INACTIVE))
  return _constrain_state(new, model.mesh, model.rules)
