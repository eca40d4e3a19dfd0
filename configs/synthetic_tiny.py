"""Tiny model on the synthetic copy stream: the loop, sharding and checkpoints with no corpus."""
from configs.base import get_base_config


def get_config():
  c = get_base_config("tiny")
  c.stage = "synthetic"
  c.train.steps = 100
  c.train.seq_len = 128
  c.train.batch_size = 8
  c.train.eval_every = 50
  c.train.checkpoint_every = 25
  return c
