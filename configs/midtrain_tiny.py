"""Mid-training of the tiny model on data available offline: a mixture of the installed Python
standard library's sources (half of them FIM-transformed, structured: a whole AST node as the middle)
and procedural function-writing tasks rendered as conversations (instruction data with
assistant-only loss), with a sentencepiece BPE model trained from the code on first use (cached in
the workdir). Add ``--config.data.mixture.commits=0.2 --config.data.commits.repo=PATH`` for git
history, or JSONL trajectories/instructions via ``data.trajectories.paths``/``data.instructions.paths``.

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
  c.data.mixture.code = 0.8
  c.data.mixture.procedural = 0.2
  c.data.procedural.num_train = 300     # built once into data_dir (~20 s), repeated every epoch
  c.data.procedural.num_eval = 50
  c.data.fim.rate = 0.5
  return c
