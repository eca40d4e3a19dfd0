"""Train-step throughput against the machine's matmul roofline, measured in the same run.

  python -m experiments.bench_train --preset=tiny --preset=small [--batch_size=8 --seq_len=512]

Prints one JSON object per preset: tokens_per_s, step_flops (matmul FLOPs per step, MaxText's count:
6·params·tokens + causal attention), achieved_flops_per_s, peak_matmul_flops_per_s (best of a large
jitted float32 matmul on the same device, interleaved with the step timings), roofline_fraction.
"""
import json
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  flags.DEFINE_multi_string("preset", ["tiny", "small"], "Model presets to measure.")
  flags.DEFINE_integer("batch_size", 4, "Sequences per step.")
  flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
  flags.DEFINE_integer("steps", 3, "Timed steps per round.")
  flags.DEFINE_integer("rounds", 2, "Rounds of (matmul peak, steps); the best of each is kept.")
  flags.DEFINE_string("attention_impl", "xla", "config.model.attention_impl")
  flags.DEFINE_string("remat", "none", "config.model.remat")


def measure(preset: str, *, batch_size: int, seq_len: int, steps: int = 3, rounds: int = 2,
            attention_impl: str = "xla", remat: str = "none") -> dict:
  """Best-of-``rounds`` train-step timing of ``preset`` on one device, beside the matmul peak."""
  import jax
  import ml_collections
  from configs.base import get_base_config
  from kat_jax import sharding
  from kat_jax.data.synthetic import SyntheticCopyIterator
  from kat_jax.model import ModelConfig, Transformer
  from kat_jax.train import losses, metrics, optimizer, state as state_lib, step as step_lib

  c = get_base_config(preset)
  c.model.attention_impl = attention_impl
  c.model.remat = remat
  c.train.update(dict(batch_size=batch_size, seq_len=seq_len, steps=1000, warmup_steps=10))
  cfg = ModelConfig.from_config(c.model)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                            jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  model = Transformer(cfg, mesh=mesh, rules=rules)
  tx, schedule = optimizer.make_optimizer(c.train)
  data = SyntheticCopyIterator(vocab_size=cfg.vocab_size, batch_size=batch_size,
                               seq_len=seq_len, seed=0, doc_len=seq_len)
  example = {"inputs": jax.ShapeDtypeStruct((batch_size, seq_len), "int32")}
  state, shardings = state_lib.create_sharded_state(model, tx, example, mesh, rules,
                                                    jax.random.key(0))
  step = step_lib.make_train_step(model.apply, losses.get_loss("lm"), tx, schedule, c.train,
                                  shardings, mesh, rules)
  batches = [sharding.host_to_global(next(data), mesh, rules) for _ in range(2)]
  rng = jax.random.key(1)
  for b in batches:  # compile + warm up
    state, m = step(state, b, rng)
  jax.block_until_ready(m)
  best_step, best_peak = float("inf"), 0.0
  for _ in range(rounds):
    best_peak = max(best_peak, metrics.measure_peak_matmul_flops(n=2048, repeats=3))
    t0 = time.perf_counter()
    for i in range(steps):
      state, m = step(state, batches[i % 2], rng)
    jax.block_until_ready(m)
    best_step = min(best_step, (time.perf_counter() - t0) / steps)
  tokens = batch_size * seq_len
  step_flops = cfg.matmul_flops_per_token(seq_len) * tokens
  achieved = step_flops / best_step
  return dict(preset=preset, batch_size=batch_size, seq_len=seq_len,
              params=cfg.num_params(), attention_impl=attention_impl, remat=remat,
              step_s=best_step, tokens_per_s=tokens / best_step, step_flops=step_flops,
              achieved_flops_per_s=achieved, peak_matmul_flops_per_s=best_peak,
              roofline_fraction=achieved / best_peak, device=str(jax.devices()[0].device_kind))


def main(argv):
  del argv
  for preset in FLAGS.preset:
    print(json.dumps(measure(preset, batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
                             steps=FLAGS.steps, rounds=FLAGS.rounds,
                             attention_impl=FLAGS.attention_impl, remat=FLAGS.remat)), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
