"""Decode throughput of the KV-cache sampler against the strongest full recompute: every step a
forward pass over that step's actual prefix, bucketed to a power of two.

  python -m experiments.bench_sample [--preset=small --batch_size=2 --prompt_len=32
                                      --new_tokens=256 --new_tokens=1024 --recompute_steps=4
                                      --rounds=3]

Both sides run the same model and parameters (random init), greedy, on one device:

* ``kv_cache``: ``kat_jax.sample.Sampler.generate`` — prefill, then one compiled while loop that
  feeds one token per row through the model against the cache (``max_len = prompt + new``).
  Timed after a warm-up call that compiles the same programs.
* ``recompute``: a jitted step that runs the full forward over the first ``bucket(L)`` tokens of
  the buffer, where L is the prefix length of that step (prompt + tokens so far) and
  ``bucket(L)`` the smallest power of two >= L, capped at ``prompt + new`` (padding beyond L
  masked out), takes the logits
  at the last token only (``logits_at``), and writes the argmax into the buffer. One program per
  bucket; all steps of a bucket have the same shapes and cost, so ``--recompute_steps`` steps are
  timed at the first length of every bucket and the time for ``new`` tokens is
  ``sum over buckets of (steps in the bucket) × (its step time)``. Running over the real prefix
  instead of the whole ``prompt + new`` buffer halves the recompute's work on average (a step
  over L tokens is padded to at most 2L, ``recompute_mean_bucket_over_prefix`` says how much).
  The recomputed tokens are compared with the cache's at every timed step (``tokens_agree``).

Rounds alternate the order of the two sides (kv first, then recompute first, ...); the speedup
is the median of the per-round ratios, times are medians. Prints one JSON object per
``--new_tokens`` value.
"""
import json
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  flags.DEFINE_string("preset", "small", "Model preset (random init).")
  flags.DEFINE_integer("batch_size", 2, "Prompts decoded together.")
  flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
  flags.DEFINE_multi_integer("new_tokens", [256, 1024], "Generated tokens per row.")
  flags.DEFINE_integer("recompute_steps", 4, "Timed recompute steps per prefix bucket.")
  flags.DEFINE_integer("rounds", 3, "Timing rounds of both sides (medians reported).")


def prefix_bucket(length: int, total: int) -> int:
  """The recompute's sequence length for a prefix of ``length`` tokens: the next power of two,
  capped at the buffer length ``total``."""
  return min(1 << max(int(length) - 1, 0).bit_length(), total)


def bucket_steps(prompt_len: int, new_tokens: int) -> dict:
  """{bucket: number of decode steps whose prefix falls in it}; step i has prefix prompt + i."""
  counts, total = {}, prompt_len + new_tokens
  for length in range(prompt_len, total):
    bucket = prefix_bucket(length, total)
    counts[bucket] = counts.get(bucket, 0) + 1
  return counts


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
  out = sampler.generate(prompts.tolist(), jax.random.key(0), config)
  assert out.lengths.tolist() == [new_tokens] * batch_size, out.finish_reason

  def time_kv():
    """(whole generation, its prefill alone) in seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(sampler.start(prompts.tolist(), jax.random.key(0), config).step)
    t1 = time.perf_counter()
    jax.block_until_ready(sampler.generate(prompts.tolist(), jax.random.key(0), config).tokens)
    return time.perf_counter() - t1, t1 - t0

  # Recompute over each step's prefix, one program per power-of-two bucket.
  rows = jnp.arange(batch_size)

  def make_step(bucket: int):
    positions = jnp.broadcast_to(jnp.arange(bucket, dtype=jnp.int32), (batch_size, bucket))

    def step(p, buffer_bt, lengths_b):
      seg = (positions < lengths_b[:, None]).astype(jnp.int32)
      last = model.apply({"params": p}, buffer_bt[:, :bucket], positions,
                         intervals_from_segment_ids(seg),
                         logits_at=(lengths_b - 1)[:, None]).logits[:, 0]
      token_b = jnp.argmax(last, -1).astype(jnp.int32)
      return buffer_bt.at[rows, lengths_b].set(token_b), lengths_b + 1, token_b

    return jax.jit(step, donate_argnums=(1,))

  counts = bucket_steps(prompt_len, new_tokens)
  steps = {bucket: make_step(bucket) for bucket in counts}

  def run_steps(bucket: int, k: int):
    """(seconds per step, tokens [B, k]) of k steps from the bucket's first prefix length."""
    start_len = min(length for length in range(prompt_len, total)
                    if prefix_bucket(length, total) == bucket)
    buffer = np.zeros((batch_size, total), np.int32)
    buffer[:, :prompt_len] = prompts
    buffer[:, prompt_len:start_len] = out.tokens[:, :start_len - prompt_len]
    buffer, lengths = jnp.asarray(buffer), jnp.full((batch_size,), start_len, jnp.int32)
    tokens = []
    t0 = time.perf_counter()
    for _ in range(k):
      buffer, lengths, token = steps[bucket](params, buffer, lengths)
      tokens.append(token)
    jax.block_until_ready(buffer)
    seconds = (time.perf_counter() - t0) / k
    expected = out.tokens[:, start_len - prompt_len:start_len - prompt_len + k]
    return seconds, bool(np.array_equal(np.stack(tokens, 1), expected))

  for bucket in counts:
    run_steps(bucket, 1)                                         # compile
  agree = True

  def time_recompute():
    nonlocal agree
    by_bucket = {}
    for bucket, count in counts.items():
      seconds, same = run_steps(bucket, min(recompute_steps, count))
      by_bucket[bucket] = seconds
      agree = agree and same
    return sum(counts[b] * by_bucket[b] for b in counts), by_bucket

  kv_times, prefill_times, recompute_times, per_bucket, ratios = [], [], [], [], []
  for round_index in range(rounds):
    if round_index % 2 == 0:
      kv_s, prefill_s = time_kv()
      recompute_s, by_bucket = time_recompute()
    else:
      recompute_s, by_bucket = time_recompute()
      kv_s, prefill_s = time_kv()
    kv_times.append(kv_s)
    prefill_times.append(prefill_s)
    recompute_times.append(recompute_s)
    per_bucket.append(by_bucket)
    ratios.append(recompute_s / kv_s)
  kv_s, recompute_s = statistics.median(kv_times), statistics.median(recompute_times)
  prefill_s = statistics.median(prefill_times)
  decode_s = kv_s - prefill_s
  mean_padding = statistics.fmean(prefix_bucket(length, total) / length
                                  for length in range(prompt_len, total))
  return dict(
      preset=preset, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens,
      params=cfg.num_params(), device=str(jax.devices()[0].device_kind), rounds=rounds,
      kv_cache_total_s=kv_s, kv_cache_prefill_s=prefill_s,
      kv_cache_decode_tokens_per_s=batch_size * new_tokens / decode_s,
      kv_cache_tokens_per_s=batch_size * new_tokens / kv_s,
      kv_cache_total_s_by_round=kv_times,
      recompute_steps_by_bucket={str(b): counts[b] for b in counts},
      recompute_step_s_by_bucket={str(b): statistics.median(r[b] for r in per_bucket)
                                  for b in counts},
      recompute_steps_timed_per_bucket={str(b): min(recompute_steps, counts[b]) for b in counts},
      recompute_mean_bucket_over_prefix=mean_padding,
      recompute_total_s=recompute_s, recompute_total_s_by_round=recompute_times,
      recompute_tokens_per_s=batch_size * new_tokens / recompute_s,
      speedup=statistics.median(ratios), speedup_by_round=ratios, tokens_agree=agree)


def main(argv):
  del argv
  for new_tokens in FLAGS.new_tokens:
    print(json.dumps(measure(FLAGS.preset, batch_size=FLAGS.batch_size, prompt_len=FLAGS.prompt_len,
                             new_tokens=new_tokens, recompute_steps=FLAGS.recompute_steps,
                             rounds=FLAGS.rounds)), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
