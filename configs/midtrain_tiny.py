"""Mid-training of the tiny model on a real code corpus available offline: the installed Python
standard library, with a sentencepiece BPE model trained from it on first use (cached in the workdir).

  python -m experiments.main --config=configs/midtrain_tiny.py --workdir=/tmp/kat_midtrain
"""
from configs.base import get_base_config


def get_config():
  c = get_base_config("tiny")
  c.stage = "midtrain"
  c.train.steps = 600
  c.train.batch_size = 8
  c.train.seq_len = 256
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 30
  c.train.log_every = 20
  c.train.eval_every = 200
  c.train.eval_steps = 8
  c.train.checkpoint_every = 200
  c.data.vocab_size = c.model.vocab_size
  return c
