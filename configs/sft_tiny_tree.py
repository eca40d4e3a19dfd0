"""Tree-mode SFT of the tiny model: per procedural task, the direct solution and self-debugging
trajectories (same prompt, forking at the first assistant token) trained as one prefix tree per row,
under the same sharded jitted step as flat batches (loss ``tree``: exact per-trajectory token mean).

  python -m experiments.main --config=configs/sft_tiny_tree.py --workdir=/tmp/kat_sft_tree
"""
from configs.base import get_base_config
from kat_jax.tree.sft_data import default_tree_config


def get_config():
  c = get_base_config("tiny")
  c.stage = "sft_tree"
  c.tree = default_tree_config()
  c.train.objective = "nll"
  c.train.steps = 300
  c.train.batch_size = 4
  c.train.seq_len = c.tree.max_tokens      # tokens per row, for throughput/MFU accounting
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 20
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.data.vocab_size = c.model.vocab_size
  return c
