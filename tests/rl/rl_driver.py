"""The RL stage on a tiny random model in a subprocess, for the kill -9 / resume test.

  python tests/rl/rl_driver.py WORKDIR ITERATIONS

Runs ``kat_jax.rl.loop.train`` (code_single environment, byte tokenizer, a checkpoint every
iteration) and, when it finishes, writes ``WORKDIR/final.npz``: every param leaf and the loop's
state, so two runs can be compared bitwise.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "data"))

from byte_tokenizer import ByteTokenizer  # noqa: E402

from configs.base import get_base_config  # noqa: E402

TOKENIZER = ByteTokenizer()


def config(iterations: int):
  c = get_base_config("tiny")
  c.stage = "rl"
  c.model.update(dict(vocab_size=TOKENIZER.vocab_size, d_model=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64))
  c.rl.update(dict(env_name="code_single", iterations=iterations, tasks_per_iteration=8,
                   group_size=4, eval_every=0, sandbox_workers=1, checkpoint_every=1))
  c.rl.env.update(dict(show_visible_tests=False, tool_timeout_s=2.0))
  c.rl.rollout.update(dict(max_turns=1, max_new_tokens=6, max_observation_tokens=0,
                           env_threads=2))
  c.rl.rollout.reward.normalize.mode = "welford"    # loop state that must survive the kill
  c.train.update(dict(loss="tree", objective="ppo", batch_size=8, steps=iterations,
                      warmup_steps=0, learning_rate=1e-2, weight_decay=0.0, progress_bar=False,
                      log_every=1, eval_every=0, async_checkpoint=True))
  c.tree.update(dict(max_len=512, max_tokens=560, max_nodes=16, max_traj=4))
  return c


def main(workdir: str, iterations: int) -> None:
  import jax
  import numpy as np
  from kat_jax.rl import loop
  result = loop.train(config(iterations), workdir, tokenizer=TOKENIZER)
  leaves = jax.tree.leaves(jax.device_get(result["state"].params))
  with open(os.path.join(workdir, "final.json"), "w") as f:
    json.dump({"start_iteration": result["start_iteration"], "iteration": result["iteration"],
               "rewards": [h["reward"] for h in result["history"]],
               "loop_state": result["loop_state"]}, f)
  np.savez(os.path.join(workdir, "final.npz"), *[np.asarray(x) for x in leaves])


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
