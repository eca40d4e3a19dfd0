"""A loop driven through ``Trainer`` with its own extra state, for the kill -9 / resume tests.

  python tests/train/trainer_driver.py WORKDIR [--config.train.steps=N ...]

Trains ``configs/synthetic_tiny.py`` (with the given overrides) step by step through ``Trainer``,
saving every checkpoint with an extra state that depends on the step: an RNG key advanced once per
step, a curriculum dict, a float32 history array and the data iterator's position. A restart
resumes all of it from ``trainer.extra_state``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

def initial_extra() -> dict:
  return {"rng": jax.random.key(7), "curriculum": {"level": 0, "history": []},
          "returns": np.zeros(0, np.float32)}


def advance(extra: dict, step: int) -> dict:
  """The loop's own state after ``step`` (a deterministic function of the previous one)."""
  rng, sub = jax.random.split(extra["rng"])
  value = np.float32(jax.random.uniform(sub))
  level = extra["curriculum"]["level"] + (1 if value > 0.5 else 0)
  return {"rng": rng, "curriculum": {"level": level,
                                     "history": list(extra["curriculum"]["history"]) + [step]},
          "returns": np.concatenate([extra["returns"], [value]]).astype(np.float32)}


def run(config, workdir: str) -> "Trainer":  # noqa: F821
  from kat_jax.train import stages
  from kat_jax.train.trainer import Trainer
  trainer = Trainer(config, workdir)
  it, _ = stages.get_stage(config.stage).make_data(
      config, workdir, split="train", batch_size=config.train.batch_size, seed=config.seed,
      shard_index=0, shard_count=1)
  extra = trainer.extra_state or {"loop": initial_extra()}
  if "train" in extra:
    it.set_state(extra["train"])
  loop_state = extra["loop"]
  try:
    while trainer.step_count < config.train.steps:
      trainer.step(next(it))
      loop_state = advance(loop_state, trainer.step_count)
      trainer.save({"train": it.get_state(), "loop": loop_state},
                   force=trainer.step_count == config.train.steps)
  finally:
    trainer.close()
  return trainer


if __name__ == "__main__":   # flags only when run as a program (the test imports this module)
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic_tiny.py", "config",
                                            lock_config=True)
  app.run(lambda argv: run(_CONFIG.value, argv[1]) and None)
