"""Trains one stage (or, once chains land, a chain of stages) from an ml_collections config.

  python -m experiments.main --config=configs/midtrain_tiny.py --workdir=/tmp/run \
      [--config.train.steps=200 --config.mesh.tensor=2 ...]

Restarting with the same --workdir resumes from its latest checkpoint. On a multi-host TPU pod pass
--multihost so every process joins ``jax.distributed.initialize()`` first.
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries, tokenizer.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax
  if _MULTIHOST.value:
    jax.distributed.initialize()
  from kat_jax.train import loop
  logging.info("devices: %s", jax.devices())
  result = loop.train(_CONFIG.value, _WORKDIR.value)
  result.pop("state", None)
  logging.info("done: %s", result)
  print({k: v for k, v in result.items()})


if __name__ == "__main__":
  app.run(main)
