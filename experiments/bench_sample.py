"""Decode throughput of the KV-cache sampler against recomputing the whole prefix every step.

  python -m experiments.bench_sample [--preset=small --batch_size=2 --prompt_len=32
                                      --new_tokens=256 --new_tokens=1024 --recompute_steps=4]

Both sides run the same model and parameters (random init), greedy, on one device:

* ``kv_cache``: ``kat_jax.sample.Sampler.generate`` — prefill, then one compiled while loop that
  feeds one token per row through the model against the cache (``max_len = prompt + new``).
  Timed after a warm-up call that compiles the same programs; best of ``--rounds``.
* ``recompute``: a jitted step that runs the full forward over a fixed ``[batch, prompt + new]``
  buffer (padding masked out), takes the argmax at each row's last token and writes it into the
  buffer. Every step does the same work whatever the current length (fixed shapes, dense
  attention over the whole buffer), so ``--recompute_steps`` steps are timed near the start
  (lengths prompt .. prompt+k) and as many near the end (lengths prompt+new-k .. prompt+new), and
  the time for ``new`` tokens is extrapolated as ``new × mean step time``; both step times are
  printed so the constancy can be checked. The first recompute tokens are compared with the
  cache's (``tokens_agree``).

Prints one JSON object per ``--new_tokens`` value.
"""
import json
import time

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "small", "Model preset (random init).")
_BATCH = flags.DEFINE_integer("batch_size", 2, "Prompts decoded together.")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
_NEW = flags.DEFINE_multi_integer("new_tokens", [256, 1024], "Generated tokens per row.")
_RECOMPUTE_STEPS = flags.DEFINE_integer("recompute_steps", 4,
                                        "Timed recompute steps at the start and at the end.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "KV-cache timing rounds (best kept).")


def _numpy_params(model, seed: int = 0):
  """Random params like the model's initializers (normal, std fan_in^-1/2; norm scales 1)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from kat_jax.model import intervals_from_segment_ids
  t = jnp.zeros((1, 8), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), t, t, intervals_from_segment_ids(jnp.ones((1, 8), jnp.int32)))["params"]))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(
      rng.normal(size=a.shape) * a.shape[0] ** -0.5 if a.ndim > 1 else np.ones(a.shape),
      a.dtype), abstract)


def measure(preset: str, *, batch_size: int, prompt_len: int, new_tokens: int,
            recompute_steps: int, rounds: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
  from kat_jax.sample import Sampler, SamplingConfig

  cfg = ModelConfig.from_config(get_preset(preset))
  model = Transformer(cfg)
  params = _numpy_params(model)
  rng = np.random.default_rng(1)
  prompts = rng.integers(0, cfg.vocab_size, (batch_size, prompt_len)).astype(np.int32)
  total = prompt_len + new_tokens

  # KV cache.
  sampler = Sampler(model, params, max_len=total, prefill_bucket=prompt_len,
                    output_bucket=new_tokens)
  config = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)
  warm = SamplingConfig(temperature=0.0, max_new_tokens=2)       # same compiled programs
  sampler.generate(prompts.tolist(), jax.random.key(0), warm)
  t0 = time.perf_counter()
  jax.block_until_ready(sampler.start(prompts.tolist(), jax.random.key(0), config).step)
  prefill_s = time.perf_counter() - t0
  kv_s = float("inf")
  for _ in range(rounds):
    t0 = time.perf_counter()
    out = sampler.generate(prompts.tolist(), jax.random.key(0), config)
    kv_s = min(kv_s, time.perf_counter() - t0)
  assert out.lengths.tolist() == [new_tokens] * batch_size, out.finish_reason

  # Full recompute over a fixed-size buffer.
  positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (batch_size, total))

  def step(p, buffer_bt, lengths_b):
    seg = (positions < lengths_b[:, None]).astype(jnp.int32)
    logits = model.apply({"params": p}, buffer_bt, positions,
                         intervals_from_segment_ids(seg)).logits
    last = jnp.take_along_axis(logits, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
    token_b = jnp.argmax(last, -1).astype(jnp.int32)
    rows = jnp.arange(batch_size)
    return buffer_bt.at[rows, lengths_b].set(token_b), lengths_b + 1, token_b

  step = jax.jit(step, donate_argnums=(1,))

  def run_steps(start_len: int, k: int, timed: bool):
    buffer = np.zeros((batch_size, total), np.int32)
    buffer[:, :prompt_len] = prompts
    buffer[:, prompt_len:start_len] = out.tokens[:, :start_len - prompt_len]
    buffer, lengths = jnp.asarray(buffer), jnp.full((batch_size,), start_len, jnp.int32)
    tokens = []
    t0 = time.perf_counter()
    for _ in range(k):
      buffer, lengths, token = step(params, buffer, lengths)
      tokens.append(token)
    jax.block_until_ready(buffer)
    return (time.perf_counter() - t0) / k if timed else None, np.stack(tokens, 1)

  run_steps(prompt_len, 1, timed=False)                          # compile
  k = min(recompute_steps, new_tokens)
  start_s, first = run_steps(prompt_len, k, timed=True)
  end_s, last = run_steps(total - k, k, timed=True)
  step_s = (start_s + end_s) / 2
  recompute_total_s = step_s * new_tokens
  agree = bool(np.array_equal(first, out.tokens[:, :k]) and
               np.array_equal(last, out.tokens[:, new_tokens - k:]))
  decode_s = kv_s - prefill_s
  return dict(
      preset=preset, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens,
      params=cfg.num_params(), device=str(jax.devices()[0].device_kind),
      kv_cache_total_s=kv_s, kv_cache_prefill_s=prefill_s,
      kv_cache_decode_tokens_per_s=batch_size * new_tokens / decode_s,
      kv_cache_tokens_per_s=batch_size * new_tokens / kv_s,
      recompute_step_s_start=start_s, recompute_step_s_end=end_s,
      recompute_steps_measured=2 * k, recompute_total_s_extrapolated=recompute_total_s,
      recompute_tokens_per_s=batch_size / step_s,
      speedup=recompute_total_s / kv_s, tokens_agree=agree)


def main(argv):
  del argv
  for new_tokens in _NEW.value:
    print(json.dumps(measure(_PRESET.value, batch_size=_BATCH.value, prompt_len=_PROMPT.value,
                             new_tokens=new_tokens, recompute_steps=_RECOMPUTE_STEPS.value,
                             rounds=_ROUNDS.value)), flush=True)


if __name__ == "__main__":
  app.run(main)
