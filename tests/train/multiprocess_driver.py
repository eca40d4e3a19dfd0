"""One process of a two-process CPU run (``tests/train/test_multiprocess.py``).

  python tests/train/multiprocess_driver.py PROCESS_ID PORT WORKDIR MAX_STEPS

Joins ``jax.distributed`` through a coordinator on localhost (gloo CPU collectives, 4 simulated
devices per process), trains ``configs/synthetic_tiny.py`` (the test's overrides) through
``loop.train`` up to MAX_STEPS (resuming from WORKDIR's checkpoints), then restores the saved state
in a fresh ``Trainer`` and prints a JSON line with the restored step and a params checksum.
"""
import json
import os
import sys

if __name__ == "__main__":   # before JAX starts; importing this module (the test does) sets nothing
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402

STEPS = 6
OVERRIDES = dict(steps=STEPS, checkpoint_every=3, eval_every=0, progress_bar=False, seq_len=32,
                 log_every=1, warmup_steps=1, batch_size=8)


def config():
  from configs import synthetic_tiny
  c = synthetic_tiny.get_config()
  c.train.update(OVERRIDES)
  return c


def main(process_id: int, port: int, workdir: str, max_steps: int) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=process_id)
  import numpy as np
  from jax.experimental import multihost_utils
  from kat_jax.train import loop
  from kat_jax.train.trainer import Trainer
  assert jax.process_count() == 2 and jax.device_count() == 8
  loop.train(config(), workdir, max_steps=max_steps)
  trainer = Trainer(config(), workdir)
  trainer.close()
  params = multihost_utils.process_allgather(trainer.params, tiled=True)
  checksum = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(params)))
  print(json.dumps({"process": process_id, "restored_step": trainer.restored_step,
                    "checksum": checksum}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
