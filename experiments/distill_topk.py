"""Runs a distillation teacher once over a stage's batches and stores each row's top-k ids and
logits (``config.train.distill.topk_data``), so that training reads them instead of running the
teacher::

  python -m experiments.distill_topk --config=configs/distill_tiny.py --workdir=/tmp/kat_distill \\
      --config.init_from=/tmp/kat_midtrain --config.train.distill.teacher=/tmp/kat_teacher \\
      --config.train.distill.top_k=16 --config.train.distill.topk_data=/tmp/kat_teacher_topk
  python -m experiments.main ... (the same flags)      # trains on the stored top-k

The batches are the ones the training run will draw (the same stage, data config, seed, batch size
and ``--workdir``, whose tokenizer the stage reuses): ``--num_batches`` of the train split (default
``config.train.steps``) and ``--eval_batches`` of the held-out split (default
``config.train.eval_steps`` when ``config.train.eval_every`` > 0), for each of ``--shard_count``
processes. Rows are keyed by their tokens, positions and attention (``distill.row_keys``), so
training finds them in any order and after a restart; a row that was not precomputed stops the
run naming this command. The dataset (TFDS, array_record) records the teacher, k, its vocabulary
and its tokenizer's fingerprint, which training checks against its own. Logits are stored raw, so
one dataset serves every temperature and every ``top_k`` up to the stored k (docs/DISTILL.md).
"""
import copy
import json
import time

from absl import app, flags

from kat_jax import config as config_lib
from kat_jax import errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "The student's experiment config.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The training run's workdir (its tokenizer is reused).")
  flags.DEFINE_integer("num_batches", -1, "Train batches per shard; -1 = config.train.steps.")
  flags.DEFINE_integer("eval_batches", -1, "Held-out batches per shard; -1 = config.train."
                       "eval_steps when config.train.eval_every > 0, else 0.")
  flags.DEFINE_integer("shard_count", 1, "Processes the training run will use.")
  flags.mark_flags_as_required(["config", "workdir"])


def precompute(config, workdir: str, *, num_batches: int = -1, eval_batches: int = -1,
               shard_count: int = 1) -> dict:
  """Writes the teacher's top-k of the stage's batches to ``config.train.distill.topk_data``;
  returns {"path", "rows": {split: count}, "seconds"}."""
  import jax
  import numpy as np

  from kat_jax import sharding as sharding_lib
  from kat_jax.errors import ConfigError
  from kat_jax.train import distill, stages

  start = time.perf_counter()
  config_lib.validate(config, jax.device_count())
  dcfg = config.train.distill
  for field, fix in (("teacher", "the teacher to run"), ("topk_data", "where to write"),
                     ("top_k", "k > 0")):
    if not dcfg[field]:
      raise ConfigError(f"experiments.distill_topk needs config.train.distill.{field} ({fix})")
  batch_size = config.train.batch_size
  if batch_size % shard_count:
    raise ConfigError(f"config.train.batch_size={batch_size} is not divisible by "
                      f"--shard_count={shard_count}")
  num_batches = config.train.steps if num_batches < 0 else num_batches
  if eval_batches < 0:
    eval_batches = config.train.eval_steps if config.train.eval_every else 0
  mesh = sharding_lib.make_mesh(config.mesh)
  teacher = distill.load_teacher(config, mesh, sharding_lib.rules_from_config(config))
  top_k, chunk = int(dcfg.top_k), int(config.train.logits_chunk)
  topk_fn = jax.jit(lambda p, b: distill.teacher_topk(teacher.in_step(p), b, top_k, chunk))

  data_cfg = copy.deepcopy(config)
  data_cfg.train.distill.topk_data = ""      # the stage's own batches (teacher tokenizer checked)
  stage = stages.get_stage(config.stage)
  counts = {"train": num_batches, "eval": eval_batches}
  iterators, tokenizer = {}, None
  for split, n in counts.items():
    if n > 0:
      iterators[split] = []
      for shard in range(shard_count):
        it, tokenizer = stage.make_data(data_cfg, workdir, split=split,
                                        batch_size=batch_size // shard_count, seed=config.seed,
                                        shard_index=shard, shard_count=shard_count)
        iterators[split].append(it)
  rows = {split: 0 for split in iterators}

  def generate(split):
    seen = set()
    for it in iterators[split]:
      for _ in range(counts[split]):
        batch = next(it)
        keys = distill.row_keys(batch)
        ids, logits = jax.device_get(topk_fn(teacher.params, batch))
        for i, key in enumerate(keys):
          if key not in seen:
            seen.add(key)
            rows[split] += 1
            yield key, np.asarray(ids[i]), np.asarray(logits[i])
      if hasattr(it, "close"):
        it.close()

  metadata = distill.topk_metadata(config, teacher, tokenizer, seq_len=int(config.train.seq_len),
                                   batches=json.dumps(counts), shard_count=int(shard_count))
  path = distill.write_topk(dcfg.topk_data, {s: generate(s) for s in iterators}, metadata)
  return {"path": path, "rows": rows, "seconds": time.perf_counter() - start}


def main(argv):
  del argv
  from kat_jax.train import metrics
  result = precompute(FLAGS.config, FLAGS.workdir, num_batches=FLAGS.num_batches,
                      eval_batches=FLAGS.eval_batches, shard_count=FLAGS.shard_count)
  metrics.console(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(errors.run_main(main), flags_parser=config_lib.parse_flags)
