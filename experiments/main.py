"""Trains one stage (or, once chains land, a chain of stages) from an ml_collections config.

  python -m experiments.main --config=configs/midtrain_tiny.py --workdir=/tmp/run \
      [--config.train.steps=200 --config.mesh.tensor=2 ...]

Restarting with the same --workdir resumes from its latest checkpoint. On a multi-host TPU pod or a
multi-GPU cluster pass --multihost so every process joins ``jax.distributed.initialize()`` first
(docs/LAUNCH.md). The console shows a progress bar, one line per ``config.train.log_every`` steps
and a summary at the end; library INFO logs (Orbax, TFDS) appear with ``--verbosity=0``.

A failed run ends with the traceback and one last line ``error: <root cause>`` (``errors.run_main``);
Orbax / TensorStore log records appear only with ``--verbosity``. An override of an undeclared field
is refused with the closest declared names (``config.parse_flags``).
"""
from absl import app, flags, logging
from ml_collections import config_flags

from kat_jax import config as config_lib
from kat_jax import errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries, tokenizer.")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
  flags.mark_flags_as_required(["config", "workdir"])


def quiet_library_logs() -> None:
  """Library INFO chatter (and Orbax / TensorStore records) off unless --verbosity was given
  (absl's default is INFO)."""
  verbose = bool(flags.FLAGS["verbosity"].present)
  if not verbose:
    logging.set_verbosity(logging.WARNING)
  errors.quiet_library_noise(verbose)


def main(argv):
  del argv
  quiet_library_logs()
  import jax
  if FLAGS.multihost:
    jax.distributed.initialize()
  from kat_jax.train import metrics, stages
  logging.info("devices: %s", jax.devices())
  result = stages.run(FLAGS.config, FLAGS.workdir)
  result.pop("state", None)
  result.pop("history", None)
  logging.info("done: %s", result)
  metrics.console(metrics.run_summary(result))


if __name__ == "__main__":
  define_flags()
  app.run(errors.run_main(main), flags_parser=config_lib.parse_flags)
