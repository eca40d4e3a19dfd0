"""Batched autoregressive sampling with a KV cache, from host-side prompts to host-side results.

    sampler = Sampler(model, params, max_len=1024)        # model: Transformer (its mesh/rules used)
    out = sampler.generate([[1, 2, 3], [4, 5]], jax.random.key(0),
                           SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=128,
                                          stop_token_ids=(im_end,), stop_strings=("</tool_call>",)),
                           tokenizer=tok)
    out.tokens[i, :out.lengths[i]], out.logprobs, out.entropies, out.finish_reason[i], out.texts[i]

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
from kat_jax.sample import decode
from kat_jax.sample.distribution import SamplingConfig


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """Generated continuations, one row per prompt (entries past ``lengths[i]`` are 0)."""
  tokens: np.ndarray          # int32 [B, N]
  logprobs: np.ndarray        # float32 [B, N]: log pi(token), pi = the sampling distribution
  entropies: np.ndarray       # float32 [B, N]: entropy of pi (nats)
  lengths: np.ndarray         # int32 [B]: generated tokens, stop token included
  finish_reason: list        # per row: stop_token | stop_string | length | max_len
  texts: Optional[list] = None  # decoded tokens[:lengths] when a tokenizer was given

  def token_lists(self) -> list[list[int]]:
    return [self.tokens[i, :n].tolist() for i, n in enumerate(self.lengths)]


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


def _batch_shards(mesh, rules) -> int:
  spec = sharding_lib.batch_sharding(mesh, rules).spec
  axes = spec[0] if len(spec) else None
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return int(np.prod([mesh.shape[a] for a in axes]))


class Sampler:
  """Holds a model, its params and the compiled prefill/decode programs (see the module docstring).

  ``max_len`` is the number of KV-cache slots: prompt plus generated tokens of a row never exceed
  it (a row that fills it finishes with reason ``max_len``). Prompt buffers are padded to a
  multiple of ``prefill_bucket`` and output buffers to a multiple of ``output_bucket`` tokens, and
  stop ids and ``max_new_tokens`` are traced, so varied prompts and limits share compiled
  programs: one decode program per (batch, prompt bucket, output bucket, temperature/top-k/top-p).
  """

  def __init__(self, model, params: Any, *, max_len: int, mesh=None, rules=None,
               prefill_bucket: int = 64, output_bucket: int = 64):
    if max_len < 2:
      raise ValueError(f"max_len={max_len}: need at least 2 cache slots (a prompt token and one "
                       "generated token)")
    mesh = mesh if mesh is not None else model.mesh
    rules = rules if rules is not None else model.rules
    if mesh is not model.mesh or tuple(rules) != tuple(model.rules):
      model = model.clone(mesh=mesh, rules=tuple(rules))
    self.model, self.params, self.max_len = model, params, int(max_len)
    self.mesh, self.rules = mesh, rules
    self.prefill_bucket = int(prefill_bucket)
    self.output_bucket = int(output_bucket)
    self._prefill = jax.jit(functools.partial(decode.prefill, model),
                            static_argnames=("max_len", "max_new_tokens"))
    self._decode = jax.jit(functools.partial(decode.decode_steps, model),
                           static_argnames=("config", "max_len"), donate_argnames=("state",))

  def _put(self, x: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, sharding_lib.batch_sharding(self.mesh, self.rules, x.ndim))

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

  def start(self, prompts: Sequence[Sequence[int]], rng: jax.Array, config: SamplingConfig
            ) -> decode.DecodeState:
    """Validates and pads the prompts and runs the prefill; returns the device decode state."""
    if not prompts:
      raise ValueError("generate() needs at least one prompt")
    lengths = [len(p) for p in prompts]
    for i, n in enumerate(lengths):
      if not 1 <= n < self.max_len:
        raise ValueError(f"prompt {i} has {n} tokens: need 1 <= length < max_len={self.max_len} "
                         "(raise Sampler max_len or shorten the prompt)")
    batch = len(prompts)
    shards = 1 if self.mesh is None else _batch_shards(self.mesh, self.rules)
    padded = math.ceil(batch / shards) * shards
    width = min(math.ceil(max(lengths) / self.prefill_bucket) * self.prefill_bucket, self.max_len)
    tokens = np.zeros((padded, width), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    prompt_lengths = np.ones((padded,), np.int32)
    prompt_lengths[:batch] = lengths
    active = np.arange(padded) < batch
    buffer = math.ceil(config.max_new_tokens / self.output_bucket) * self.output_bucket
    return self._prefill(self.params, self._put(tokens), self._put(prompt_lengths),
                         self._row_keys(rng, batch, padded), self._put(active),
                         max_len=self.max_len, max_new_tokens=buffer,
                         max_new=config.max_new_tokens)

  def generate(self, prompts: Sequence[Sequence[int]], rng: jax.Array, config: SamplingConfig,
               tokenizer=None) -> SampleOutput:
    """Samples a continuation of every prompt (lists of token ids); see the module docstring."""
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
    batch = len(prompts)
    state = self.start(prompts, rng, config)
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
    tokens, logprobs, entropies, generated, finish = jax.device_get(
        (state.tokens_bn, state.logprobs_bn, state.entropies_bn, state.num_generated_b,
         state.finish_b))
    n = config.max_new_tokens
    tokens, logprobs, entropies = (np.array(a[:batch, :n]) for a in (tokens, logprobs, entropies))
    lengths = np.array(generated[:batch], np.int32)
    reasons = [decode.FINISH_NAMES[int(c)] for c in finish[:batch]]
    for row, k in cut.items():
      # The stop token wins when the same token both is a stop token and completes a stop string.
      if not (k == lengths[row] and reasons[row] == "stop_token"):
        reasons[row] = "stop_string"
      lengths[row] = k
    columns = np.arange(tokens.shape[1])[None, :]
    beyond = columns >= lengths[:, None]
    tokens[beyond], logprobs[beyond], entropies[beyond] = 0, 0.0, 0.0
    texts = None
    if tokenizer is not None:
      texts = [tokenizer.decode(tokens[i, :lengths[i]].tolist()) for i in range(batch)]
    return SampleOutput(tokens=tokens, logprobs=logprobs, entropies=entropies, lengths=lengths,
                        finish_reason=reasons, texts=texts)
