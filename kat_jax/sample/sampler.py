"""Batched autoregressive sampling with a KV cache, from host-side prompts to host-side results.

    sampler = Sampler(model, params, max_len=1024)        # model: Transformer (its mesh/rules used)
    out = sampler.generate([[1, 2, 3], [4, 5]], jax.random.key(0),
                           SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=128,
                                          stop_token_ids=(im_end,), stop_strings=("</tool_call>",)),
                           tokenizer=tok)
    out.tokens[i, :out.lengths[i]], out.logprobs, out.logprobs_policy, out.finish_reason[i], ...

Prompts of different lengths go in one batch (left-aligned, see ``decode``). With a mesh the batch
is sharded over data×fsdp (padded with inactive rows to a multiple of that) and the parameters
stay as they are sharded; without one everything runs on the default device.

**Randomness.** ``rng`` is one key (row i then uses ``fold_in(rng, i)``) or an array of one key
per prompt; each row's draws depend only on its own key and step, so a prompt sampled alone with
``fold_in(rng, i)`` gets the same tokens as at index i of a batch (up to float rounding of the
batched matmuls, which could only matter at a near-tie).

**Stop strings** are checked exactly, on text, on the host: the decode loop runs in chunks of
``stop_check_every`` tokens (the same compiled program each time); after each chunk every running
row's generated tokens are decoded, and a row whose text contains a stop string is cut after the
first token whose decoded prefix contains it, then finished on device before the next chunk.
Text-level checking is exact however the model spelled the string (one special token, or plain
pieces); the cost is up to ``stop_check_every - 1`` wasted decode steps per row and one
host round trip per chunk. Without stop strings the whole loop is one device call. The stop token
or the token completing a stop string is kept in the output (RL trains on it); ``texts`` are cut
after that token, so they end with the stop string plus whatever else that last token decodes to.

**Multi-turn** (an agent loop): every row's cache is kept between turns, each row's observation is
appended to it in one chunked forward pass, and the history is never prefilled twice::

    episode = sampler.start_episode(prompts, rng)                # prefill
    episode, out = sampler.generate_turn(episode, config, tok)   # turn 0: SampleOutput
    episode = sampler.extend(episode, [obs_ids_0, None, []])     # None: row 1's episode is over
    episode, out = sampler.generate_turn(episode, config, tok)   # turn 1, continuing each row
    children = sampler.fork(episode, [0, 0, 0, 2], rng)          # copies of rows' caches
    episode = sampler.recompute(episode)   # after sampler.params = new: caches rebuilt
    episode.contexts[i]                                          # every token id in row i's cache

Each call but ``fork`` consumes the ``Episode`` it is given (its device buffers are donated):
keep only the returned one. Rows finish independently: a row whose episode ended (``None`` in
``extend``, or a full cache) finishes every later turn at once with ``finish_reason`` "inactive" or
"max_len" and no tokens. It stays in the dense batch, masked out (it writes nowhere visible and
its outputs stop changing) — it still costs its share of each decode step; ``fork`` with the
running rows compacts the batch (a new batch size compiles new programs). An observation that
would not fit — the row's context plus it plus one generated token over ``max_len`` — is not
appended; the row ends with "max_len" (never an error). ``extend`` pads the chunk to the next
power of two >= ``extend_bucket`` tokens, so observation lengths within a bucket share one
program. Turn 0 of an episode draws exactly as ``generate`` with the same ``rng``; turn t >= 1
uses keys of ``decode.turn_keys``.

**Beam search** (``Sampler.beam_search``, ``kat_jax.sample.beam``) reuses the prefill and
prompt buckets: each prompt is prefilled once and its cache copied into its beams' rows.

**Log-probs.** ``logprobs`` / ``entropies`` are those of the sampling distribution ``pi``
(temperature, top-k, top-p); ``logprobs_policy`` / ``entropies_policy`` those of the model's own
distribution at temperature 1 over the whole vocabulary — the PPO ``old_logp`` of the behaviour
policy whatever ``pi`` was (see ``distribution``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax import sharding as sharding_lib
from kat_jax.sample import beam as beam_lib
from kat_jax.sample import decode
from kat_jax.sample.distribution import SamplingConfig


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """Generated continuations, one row per prompt (entries past ``lengths[i]`` are 0)."""
  tokens: np.ndarray          # int32 [B, N]
  logprobs: np.ndarray        # float32 [B, N]: log pi(token), pi = the sampling distribution
  entropies: np.ndarray       # float32 [B, N]: entropy of pi (nats)
  logprobs_policy: np.ndarray   # float32 [B, N]: log p(token), p = softmax(logits) at T = 1
  entropies_policy: np.ndarray  # float32 [B, N]: entropy of p (nats)
  lengths: np.ndarray         # int32 [B]: generated tokens, stop token included
  finish_reason: list        # per row: stop_token | stop_string | length | max_len | inactive
  texts: Optional[list] = None  # decoded tokens[:lengths] when a tokenizer was given

  def token_lists(self) -> list[list[int]]:
    return [self.tokens[i, :n].tolist() for i, n in enumerate(self.lengths)]


@dataclasses.dataclass(frozen=True)
class Episode:
  """A multi-turn generation in progress (``Sampler.start_episode``): the device decode state and
  the host's record of each row. Every ``Sampler`` call but ``fork`` consumes ``state`` (donated):
  keep only the returned ``Episode``."""
  state: decode.DecodeState   # device; padded rows past num_rows are INACTIVE
  base_keys: jax.Array        # PRNG keys [padded rows]: turn t draws with turn_keys(base, t)
  contexts: tuple             # per row: int32 numpy array of every token id in its cache, in order
  end_reasons: tuple          # per row: None while its episode runs, else "inactive" | "max_len"
  turn: int                   # turns generated so far

  @property
  def num_rows(self) -> int:
    return len(self.contexts)

  @property
  def context_lengths(self) -> np.ndarray:
    return np.array([len(c) for c in self.contexts], np.int64)

  @property
  def running(self) -> np.ndarray:
    """bool [num_rows]: rows whose episode goes on."""
    return np.array([r is None for r in self.end_reasons], np.bool_)


def cut_at_stop_string(text: str, stop_strings: Sequence[str], keep: bool = False) -> str:
  """``text`` up to its earliest stop string (inclusive if ``keep``); unchanged if none occurs."""
  best = None
  for stop in stop_strings:
    index = text.find(stop)
    if index >= 0:
      end = index + len(stop) if keep else index
      if best is None or index < best[0]:
        best = (index, end)
  return text if best is None else text[:best[1]]


def _first_stop_index(tokens: np.ndarray, start: int, end: int, stop_strings: Sequence[str],
                      tokenizer) -> Optional[int]:
  """Smallest k in (start, end] such that decode(tokens[:k]) contains a stop string, if any."""
  if not any(s in tokenizer.decode(tokens[:end]) for s in stop_strings):
    return None
  for k in range(start + 1, end + 1):
    if any(s in tokenizer.decode(tokens[:k]) for s in stop_strings):
      return k
  return end  # contained only once later bytes completed a character: cut at the end


class Sampler:
  """Holds a model, its params and the compiled prefill/decode programs (see the module docstring).

  ``max_len`` is the number of KV-cache slots: prompt plus generated tokens of a row never exceed
  it (a row that fills it finishes with reason ``max_len``). Prompt buffers are padded to a
  multiple of ``prefill_bucket`` and output buffers to a multiple of ``output_bucket`` tokens, and
  stop ids and ``max_new_tokens`` are traced, so varied prompts and limits share compiled
  programs: one decode program per (batch, prompt bucket, output bucket, temperature/top-k/top-p).
  Appended chunks (``extend``) are padded to the next power of two >= ``extend_bucket`` tokens.
  """

  def __init__(self, model, params: Any, *, max_len: int, mesh=None, rules=None,
               prefill_bucket: int = 64, output_bucket: int = 64, extend_bucket: int = 32):
    if max_len < 2:
      raise ValueError(f"max_len={max_len}: need at least 2 cache slots (a prompt token and one "
                       "generated token)")
    if extend_bucket < 1:
      raise ValueError(f"extend_bucket={extend_bucket} must be >= 1 (the smallest chunk width)")
    mesh = mesh if mesh is not None else model.mesh
    rules = rules if rules is not None else model.rules
    if mesh is not model.mesh or tuple(rules) != tuple(model.rules):
      model = model.clone(mesh=mesh, rules=tuple(rules))
    self.model, self.params, self.max_len = model, params, int(max_len)
    self.mesh, self.rules = mesh, rules
    self.prefill_bucket = int(prefill_bucket)
    self.output_bucket = int(output_bucket)
    self.extend_bucket = int(extend_bucket)
    self._prefill = jax.jit(functools.partial(decode.prefill, model),
                            static_argnames=("max_len", "max_new_tokens"))
    self._decode = jax.jit(functools.partial(decode.decode_steps, model),
                           static_argnames=("config", "max_len"), donate_argnames=("state",))
    self._begin_turn = jax.jit(functools.partial(decode.begin_turn, model),
                               static_argnames=("max_new_tokens",), donate_argnames=("state",))
    self._extend = jax.jit(functools.partial(decode.extend, model),
                           static_argnames=("max_len",), donate_argnames=("state",))
    self._truncate = jax.jit(functools.partial(decode.truncate_turn, model),
                             static_argnames=("max_len",), donate_argnames=("state",))
    self._gather = jax.jit(functools.partial(decode.gather_rows, model))
    self._beam = jax.jit(functools.partial(beam_lib.beam_search_state, model),
                         static_argnames=("beam_width", "max_new_tokens", "max_len",
                                          "vocab_limit"))

  def _put(self, x: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, sharding_lib.batch_sharding(self.mesh, self.rules, x.ndim))

  def _padded(self, batch: int) -> int:
    shards = 1 if self.mesh is None else sharding_lib.batch_shards(self.mesh, self.rules)
    return math.ceil(batch / shards) * shards

  def _row_keys(self, rng: jax.Array, batch: int, padded: int) -> jax.Array:
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng) if rng.ndim >= 1 and rng.shape[-1] == 2 else rng
    if rng.ndim == 0:
      keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(padded))
    elif rng.shape == (batch,):
      extra = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng[0], jnp.arange(padded - batch))
      keys = jnp.concatenate([rng, extra]) if padded > batch else rng
    else:
      raise ValueError(f"rng has shape {rng.shape}: pass one key, or one key per prompt "
                       f"(shape ({batch},))")
    if self.mesh is not None:
      keys = jax.device_put(keys, sharding_lib.batch_sharding(self.mesh, self.rules, 1))
    return keys

  def _output_buffer(self, config: SamplingConfig) -> int:
    return math.ceil(config.max_new_tokens / self.output_bucket) * self.output_bucket

  def start(self, prompts: Sequence[Sequence[int]], rng: jax.Array, config: SamplingConfig
            ) -> decode.DecodeState:
    """Validates and pads the prompts and runs the prefill; returns the device decode state."""
    if not prompts:
      raise ValueError("generate() needs at least one prompt")
    return self._prefill_prompts(prompts, self._row_keys(rng, len(prompts),
                                                         self._padded(len(prompts))),
                                 self._output_buffer(config), config.max_new_tokens)

  def _prefill_prompts(self, prompts, row_keys: jax.Array, buffer: int, max_new: int
                       ) -> decode.DecodeState:
    lengths = [len(p) for p in prompts]
    for i, n in enumerate(lengths):
      if not 1 <= n < self.max_len:
        raise ValueError(f"prompt {i} has {n} tokens: need 1 <= length < max_len={self.max_len} "
                         "(raise Sampler max_len or shorten the prompt)")
    batch = len(prompts)
    padded = self._padded(batch)
    width = min(math.ceil(max(lengths) / self.prefill_bucket) * self.prefill_bucket, self.max_len)
    tokens = np.zeros((padded, width), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    prompt_lengths = np.ones((padded,), np.int32)
    prompt_lengths[:batch] = lengths
    active = np.arange(padded) < batch
    return self._prefill(self.params, self._put(tokens), self._put(prompt_lengths), row_keys,
                         self._put(active), max_len=self.max_len, max_new_tokens=buffer,
                         max_new=max_new)

  def _check_tokenizer(self, config: SamplingConfig, tokenizer) -> None:
    if config.stop_strings and tokenizer is None:
      raise ValueError(f"stop_strings={config.stop_strings!r} need a tokenizer to decode the "
                       "generated tokens: pass tokenizer=")
    tok_vocab = getattr(tokenizer, "vocab_size", None)
    if tok_vocab is not None and tok_vocab < self.model.cfg.vocab_size and not (
        0 < config.vocab_limit <= tok_vocab):
      raise ValueError(
          f"the tokenizer has {tok_vocab} ids but the model samples from "
          f"{self.model.cfg.vocab_size}: ids >= {tok_vocab} could not be decoded; set "
          f"SamplingConfig(vocab_limit={tok_vocab})")

  def generate(self, prompts: Sequence[Sequence[int]], rng: jax.Array, config: SamplingConfig,
               tokenizer=None) -> SampleOutput:
    """Samples a continuation of every prompt (lists of token ids); see the module docstring."""
    self._check_tokenizer(config, tokenizer)
    state = self.start(prompts, rng, config)
    _, out, _ = self._decode_turn(state, len(prompts), config, tokenizer)
    return out

  def beam_search(self, prompts: Sequence[Sequence[int]], **options) -> beam_lib.BeamOutput:
    """The ``beam_width`` best continuations of every prompt: ``beam.beam_search(self, prompts,
    beam_width=..., max_new_tokens=..., length_penalty=1.0, stop_token_ids=(),
    early_stopping=True, vocab_limit=0, tokenizer=None)`` (see ``kat_jax.sample.beam``)."""
    return beam_lib.beam_search(self, prompts, **options)

  def _decode_turn(self, state: decode.DecodeState, batch: int, config: SamplingConfig,
                   tokenizer) -> tuple[decode.DecodeState, SampleOutput, dict]:
    """Runs the decode loop of one turn to its end (stop strings checked on the host); returns
    the state, the first ``batch`` rows' outputs, and {row: tokens kept} for stop-string cuts."""
    stop_now = self._put(np.zeros(state.done_b.shape, np.bool_))
    # Traced stop ids, padded with -1 to a multiple of 8 (few distinct shapes); the static part of
    # the config is the distribution alone.
    stop_ids = list(config.stop_token_ids)
    stop_ids = np.asarray(stop_ids + [-1] * (8 * max(1, math.ceil(len(stop_ids) / 8))
                                             - len(stop_ids)), np.int32)
    dist = SamplingConfig(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                          vocab_limit=config.vocab_limit)
    decode_chunk = functools.partial(self._decode, self.params, config=dist,
                                     max_len=self.max_len)
    cut = {}                                        # row -> generated tokens kept (stop string)
    if not config.stop_strings:
      state = decode_chunk(state, config.max_new_tokens, stop_ids, stop_now)
    else:
      checked = np.zeros(batch, np.int64)
      while True:
        state = decode_chunk(state, config.stop_check_every, stop_ids, stop_now)
        done, generated, tokens = jax.device_get(
            (state.done_b, state.num_generated_b, state.tokens_bn))
        hit = np.zeros(state.done_b.shape, np.bool_)
        for row in range(batch):
          if row in cut or generated[row] <= checked[row]:
            continue
          k = _first_stop_index(tokens[row], int(checked[row]), int(generated[row]),
                                config.stop_strings, tokenizer)
          checked[row] = generated[row]
          if k is not None:
            cut[row] = k
            hit[row] = True
        if np.all(done[:batch] | hit[:batch]):
          break
        stop_now = self._put(hit)
    fields = ("tokens_bn", "logprobs_bn", "entropies_bn", "logprobs_policy_bn",
              "entropies_policy_bn")
    arrays, generated, finish = jax.device_get(
        ([getattr(state, f) for f in fields], state.num_generated_b, state.finish_b))
    n = config.max_new_tokens
    arrays = [np.array(a[:batch, :n]) for a in arrays]
    lengths = np.array(generated[:batch], np.int32)
    reasons = [decode.FINISH_NAMES[int(c)] for c in finish[:batch]]
    for row, k in cut.items():
      # The stop token wins when the same token both is a stop token and completes a stop string.
      if not (k == lengths[row] and reasons[row] == "stop_token"):
        reasons[row] = "stop_string"
      lengths[row] = k
    beyond = np.arange(arrays[0].shape[1])[None, :] >= lengths[:, None]
    for a in arrays:
      a[beyond] = 0
    tokens, logprobs, entropies, logprobs_policy, entropies_policy = arrays
    texts = None
    if tokenizer is not None:
      texts = [tokenizer.decode(tokens[i, :lengths[i]].tolist()) for i in range(batch)]
    out = SampleOutput(tokens=tokens, logprobs=logprobs, entropies=entropies,
                       logprobs_policy=logprobs_policy, entropies_policy=entropies_policy,
                       lengths=lengths, finish_reason=reasons, texts=texts)
    return state, out, {row: k for row, k in cut.items() if k < generated[row]}

  # ---- Multi-turn episodes (see the module docstring).

  def start_episode(self, prompts: Sequence[Sequence[int]], rng: jax.Array) -> Episode:
    """Prefills every prompt (lists of token ids); ``rng`` is one key (row i: ``fold_in(rng, i)``)
    or one key per prompt, as in ``generate``."""
    if not prompts:
      raise ValueError("start_episode() needs at least one prompt")
    batch = len(prompts)
    padded = self._padded(batch)
    # Two equal arrays: the state's copy is donated by the first turn, the base keys never are.
    state = self._prefill_prompts(prompts, self._row_keys(rng, batch, padded),
                                  self.output_bucket, self.output_bucket)
    contexts = tuple(np.asarray(p, np.int32).reshape(-1) for p in prompts)
    return Episode(state=state, base_keys=self._row_keys(rng, batch, padded), contexts=contexts,
                   end_reasons=(None,) * batch, turn=0)

  def generate_turn(self, episode: Episode, config: SamplingConfig, tokenizer=None
                    ) -> tuple[Episode, SampleOutput]:
    """Generates the next turn of every running row, continuing its cache; returns the episode
    after it and the turn's ``SampleOutput`` (rows whose episode ended: no tokens, finish reason
    "inactive" or "max_len"). Stop strings work as in ``generate``; a row cut at one continues
    after its last kept token."""
    self._check_tokenizer(config, tokenizer)
    state = self._begin_turn(episode.state, episode.base_keys, episode.turn,
                             config.max_new_tokens,
                             max_new_tokens=self._output_buffer(config))
    state, out, cut = self._decode_turn(state, episode.num_rows, config, tokenizer)
    if cut:
      keep = np.zeros(state.lengths_b.shape, np.int32)
      for row, k in cut.items():
        keep[row] = k
      state = self._truncate(self.params, state, self._put(keep), max_len=self.max_len)
    contexts, reasons = [], []
    for i, (context, reason) in enumerate(zip(episode.contexts, episode.end_reasons)):
      context = np.concatenate([context, out.tokens[i, :out.lengths[i]].astype(np.int32)])
      if reason is None and len(context) >= self.max_len:
        reason = "max_len"
      contexts.append(context)
      reasons.append(reason)
    return dataclasses.replace(episode, state=state, contexts=tuple(contexts),
                               end_reasons=tuple(reasons), turn=episode.turn + 1), out

  def _chunk_width(self, longest: int) -> int:
    width = max(self.extend_bucket, 1 << max(longest - 1, 0).bit_length())
    return min(width, self.max_len)

  def extend(self, episode: Episode, new_tokens: Sequence[Optional[Sequence[int]]]) -> Episode:
    """Appends ``new_tokens[i]`` (token ids, e.g. a rendered tool result; may be empty) to row
    i's cache, in one forward pass over a chunk padded to a power-of-two bucket; ``None`` ends
    row i's episode. A row whose context plus its tokens plus one generated token would exceed
    ``max_len`` is not extended and ends with "max_len". Rows that ended before take ``None`` or
    nothing (tokens for a row ended by ``None`` are an error; for a full row they are dropped)."""
    if len(new_tokens) != episode.num_rows:
      raise ValueError(f"extend() got {len(new_tokens)} token lists for an episode of "
                       f"{episode.num_rows} rows: pass one per row (None ends a row's episode)")
    vocab = self.model.cfg.vocab_size
    contexts, reasons, chunks, ends = [], [], [], []
    for i, (tokens, context, reason) in enumerate(
        zip(new_tokens, episode.contexts, episode.end_reasons)):
      chunk = np.zeros((0,), np.int32)
      if tokens is None:
        if reason is None:
          reason = "inactive"
          ends.append(i)
      else:
        chunk = np.asarray(tokens)
        if chunk.size == 0:
          chunk = np.zeros((0,), np.int32)
        elif chunk.ndim != 1 or not np.issubdtype(chunk.dtype, np.integer):
          raise ValueError(f"new_tokens[{i}] must be a flat sequence of token ids, got an array "
                           f"of shape {chunk.shape} and dtype {chunk.dtype}")
        elif chunk.min() < 0 or chunk.max() >= vocab:
          raise ValueError(f"new_tokens[{i}] holds ids outside [0, {vocab}) (the model's "
                           f"vocabulary): {chunk[(chunk < 0) | (chunk >= vocab)][:5].tolist()}")
        if reason == "inactive" and len(chunk):
          raise ValueError(f"row {i}'s episode was ended (None in an earlier extend()): pass None "
                           f"for it, not {len(chunk)} tokens")
        if reason is None and len(context) + len(chunk) > self.max_len - 1:
          reason = "max_len"         # does not fit with one generated token: not appended
        if reason is not None:
          chunk = np.zeros((0,), np.int32)
      contexts.append(np.concatenate([context, chunk.astype(np.int32)]))
      reasons.append(reason)
      chunks.append(chunk)
    padded = episode.state.lengths_b.shape[0]
    width = self._chunk_width(max(len(c) for c in chunks))
    tokens_bc = np.zeros((padded, width), np.int32)
    num_b = np.zeros((padded,), np.int32)
    end_b = np.full((padded,), decode.RUNNING, np.int32)
    for i, chunk in enumerate(chunks):
      tokens_bc[i, :len(chunk)] = chunk
      num_b[i] = len(chunk)
      if reasons[i] is not None and episode.end_reasons[i] is None:
        end_b[i] = decode.INACTIVE if i in ends else decode.MAX_LEN
    state = self._extend(self.params, episode.state, self._put(tokens_bc), self._put(num_b),
                         self._put(end_b), max_len=self.max_len)
    return dataclasses.replace(episode, state=state, contexts=tuple(contexts),
                               end_reasons=tuple(reasons))

  def recompute(self, episode: Episode) -> Episode:
    """The same episode with every running row's cache rebuilt from its context by one prefill
    under the *current* ``self.params`` — after a weight swap mid-episode (partial rollout), so
    the next turn attends to keys and values of the new policy instead of those of the params
    that wrote them. Contexts, keys, turn count and ended rows are kept (an ended row keeps its
    end reason and never decodes again); the next ``generate_turn`` continues as after
    ``extend``. Consumes ``episode`` (keep only the returned one)."""
    running = [reason is None for reason in episode.end_reasons]
    prompts = [c if run else c[:1] if len(c) else np.zeros((1,), np.int32)
               for c, run in zip(episode.contexts, running)]
    padded = episode.state.lengths_b.shape[0]
    state = self._prefill_prompts(prompts, episode.base_keys, self.output_bucket,
                                  self.output_bucket)
    codes = np.full((padded,), decode.INACTIVE, np.int32)   # padding rows
    for i, reason in enumerate(episode.end_reasons):
      codes[i] = decode.RUNNING if reason is None else (
          decode.MAX_LEN if reason == "max_len" else decode.INACTIVE)
    end_b = self._put(codes)
    state = state.replace(episode_end_b=end_b, finish_b=end_b,
                          done_b=self._put(codes != decode.RUNNING))
    return dataclasses.replace(episode, state=state)

  def fork(self, episode: Episode, rows: Sequence[int], rng: Optional[jax.Array] = None
           ) -> Episode:
    """A new episode whose row j copies ``episode``'s row ``rows[j]`` (repeats allowed): its
    cache, next-token logits, context and turn count, gathered on device — a shared prefix is
    never recomputed. Without ``rng`` a copy keeps its source's keys and decodes exactly as the
    source would; with ``rng`` (one key: copy j gets ``fold_in(rng, j)``, or one key per copy)
    the copies draw from their own keys from the next turn on. ``episode`` stays usable."""
    rows = [int(r) for r in rows]
    if not rows or min(rows) < 0 or max(rows) >= episode.num_rows:
      raise ValueError(f"fork() rows {rows[:8]}{'...' if len(rows) > 8 else ''} must be a "
                       f"non-empty list of row indices in [0, {episode.num_rows})")
    n = len(rows)
    padded = self._padded(n)
    index = np.zeros((padded,), np.int32)
    index[:n] = rows
    state = self._gather(episode.state, self._put(index), self._put(np.arange(padded) < n))
    if rng is None:
      base_keys = jnp.take(episode.base_keys, jnp.asarray(index), axis=0)
      if self.mesh is not None:
        base_keys = jax.device_put(base_keys,
                                   sharding_lib.batch_sharding(self.mesh, self.rules, 1))
    else:
      base_keys = self._row_keys(rng, n, padded)
    return Episode(state=state, base_keys=base_keys,
                   contexts=tuple(episode.contexts[r] for r in rows),
                   end_reasons=tuple(episode.end_reasons[r] for r in rows), turn=episode.turn)
