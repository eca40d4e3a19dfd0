"""Full fine-tuning vs LoRA: optimizer-state bytes and train-step time, same model, same data.

  python -m experiments.bench_lora --preset=small --rank=16 [--quantize_base=int8]

Builds the preset's full fine-tuning step (AdamW over every param) and its LoRA step (AdamW over the
adapters only, the base passed frozen beside the state; kat_jax.model.lora), both on one device,
and times them in alternating rounds (full, lora, full, lora, ...; the best round of each is kept, so
a slow moment of the machine hits both alike). Prints one JSON line per case: optimizer-state bytes,
trainable params, step time, and the ratios to full fine-tuning (``opt_state_ratio`` — the goal is
≤ 0.10 — and ``step_time_ratio``).
"""
import json
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  flags.DEFINE_string("preset", "small", "Model preset.")
  flags.DEFINE_integer("rank", 16, "LoRA rank.")
  flags.DEFINE_string("targets", "q,k,v,o,mlp", "config.model.lora.targets")
  flags.DEFINE_string("quantize_base", "", "config.model.lora.quantize_base: '' | int8 | nf4")
  flags.DEFINE_integer("batch_size", 4, "Sequences per step.")
  flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
  flags.DEFINE_integer("steps", 3, "Timed steps per round and case.")
  flags.DEFINE_integer("rounds", 3, "Alternating rounds; the best of each case is kept.")


def _tree_bytes(tree) -> int:
  import jax
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def _case(name: str, c, *, batch_size: int, seq_len: int):
  """(name, step fn taking (state, batch), state, facts) of one fine-tuning setup."""
  import jax
  import ml_collections
  from kat_jax import sharding
  from kat_jax.model import ModelConfig, Transformer, lora
  from kat_jax.train import losses, optimizer, state as state_lib, step as step_lib
  cfg = ModelConfig.from_config(c.model)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                            jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  model = Transformer(cfg, mesh=mesh, rules=rules)
  tx, schedule = optimizer.make_optimizer(c.train)
  example = {"inputs": jax.ShapeDtypeStruct((batch_size, seq_len), "int32")}
  is_lora = lora.enabled(cfg)
  state, shardings = state_lib.create_sharded_state(
      model, tx, example, mesh, rules, jax.random.key(0),
      trainable=lora.adapters_of if is_lora else None)
  frozen, extra = (), {}
  if is_lora:
    base = lora.initial_base(cfg, mesh, rules, seed=0)
    frozen = (base,)
    extra = dict(frozen_shardings=jax.tree.map(lambda a: a.sharding, base),
                 combine=lora.combine)
  step = step_lib.make_train_step(model.apply, losses.get_loss("lm"), tx, schedule, c.train,
                                  shardings, mesh, rules, **extra)
  facts = dict(case=name, preset=c.model.name, rank=cfg.lora.rank, targets=cfg.lora.targets,
               quantize_base=cfg.lora.quantize_base,
               trainable_params=sum(x.size for x in jax.tree.leaves(state.params)),
               opt_state_bytes=_tree_bytes(state.opt_state),
               frozen_bytes=_tree_bytes(frozen), trained_param_bytes=_tree_bytes(state.params))
  return step, state, frozen, facts, mesh, rules


def measure(preset: str = "small", *, rank: int = 16, targets: str = "q,k,v,o,mlp",
            quantize_base: str = "", batch_size: int = 4, seq_len: int = 256, steps: int = 3,
            rounds: int = 3) -> list[dict]:
  """One dict per case (full, lora): state sizes and the best-round step time, with ratios."""
  import jax
  from configs.base import get_base_config
  from kat_jax import sharding
  from kat_jax.data.synthetic import SyntheticCopyIterator

  def config(lora_rank: int, quantize: str):
    c = get_base_config(preset)
    c.model.lora.update(dict(rank=lora_rank, targets=targets, quantize_base=quantize))
    c.train.update(dict(batch_size=batch_size, seq_len=seq_len, steps=1000, warmup_steps=10))
    return c

  cases = {}
  for name, c in (("full", config(0, "")), ("lora", config(rank, quantize_base))):
    step, state, frozen, facts, mesh, rules = _case(name, c, batch_size=batch_size,
                                                    seq_len=seq_len)
    data = SyntheticCopyIterator(vocab_size=c.model.vocab_size, batch_size=batch_size,
                                 seq_len=seq_len, seed=0, doc_len=seq_len)
    batches = [sharding.host_to_global(next(data), mesh, rules) for _ in range(2)]
    cases[name] = dict(step=step, state=state, frozen=frozen, facts=facts, batches=batches,
                       best=float("inf"))
  rng = jax.random.key(1)
  for case in cases.values():            # compile + warm up
    for b in case["batches"]:
      case["state"], m = case["step"](case["state"], b, rng, *case["frozen"])
    jax.block_until_ready(m)
  for _ in range(rounds):
    for case in cases.values():          # alternating: full, lora, full, lora, ...
      t0 = time.perf_counter()
      for i in range(steps):
        case["state"], m = case["step"](case["state"], case["batches"][i % 2], rng,
                                        *case["frozen"])
      jax.block_until_ready(m)
      case["best"] = min(case["best"], (time.perf_counter() - t0) / steps)
  full = cases["full"]
  out = []
  for case in cases.values():
    facts = dict(case["facts"])
    facts.update(step_s=case["best"], tokens_per_s=batch_size * seq_len / case["best"],
                 opt_state_ratio=facts["opt_state_bytes"] / full["facts"]["opt_state_bytes"],
                 step_time_ratio=case["best"] / full["best"], batch_size=batch_size,
                 seq_len=seq_len, rounds=rounds, steps=steps,
                 device=str(jax.devices()[0].device_kind))
    out.append(facts)
  return out


def main(argv):
  del argv
  for line in measure(FLAGS.preset, rank=FLAGS.rank, targets=FLAGS.targets,
                      quantize_base=FLAGS.quantize_base, batch_size=FLAGS.batch_size,
                      seq_len=FLAGS.seq_len, steps=FLAGS.steps, rounds=FLAGS.rounds):
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
