"""Flat SFT of the tiny model on teacher trajectories from real tool executions (scripted experts
through the code, repo and math environments, drawn balanced over the taxonomy cells) and on
instruction following with checkable constraints; loss on the assistant turns only::

  python -m experiments.make_agentic_data          # writes ~/.cache/kat_jax/agentic/*.jsonl
  python -m experiments.main --config=configs/sft_tiny.py --workdir=/tmp/kat_sft \\
      --config.init_from=/tmp/kat_midtrain         # a configs/midtrain_tiny.py workdir

With ``init_from`` set, its tokenizer is used (the params' ids); empty, the model starts from
scratch with the tokenizer trained from the code corpus (as mid-training does).
``experiments/bench_sft_toolcalls.py`` measures the share of sampled turns that parse as valid
tool calls before and after this stage.
"""
import os

from configs.base import get_base_config
from kat_jax.data import agentic


def get_config():
  c = get_base_config("tiny")
  c.stage = "sft"
  c.init_from = ""                      # a mid-training workdir (configs/midtrain_tiny.py)
  c.train.steps = 300
  c.train.batch_size = 8
  c.train.seq_len = 1024                # code trajectories fit; repository ones continue in the row
  c.train.learning_rate = 3e-3          # as mid-training; the tiny model learns the format with it
  c.train.warmup_steps = 20
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_steps = 4
  c.train.checkpoint_every = 100
  c.data.vocab_size = c.model.vocab_size
  c.data.packing = "pad"                # a conversation that fits a row starts at its column 0
  c.data.mixture.code = 0.0
  c.data.mixture.trajectories = 0.8
  c.data.mixture.instructions = 0.2
  c.data.trajectories.paths = os.path.join(agentic.DEFAULT_OUT_DIR,
                                           agentic.TRAJECTORIES_FILE.format(split="train"))
  c.data.trajectories.loss_on = "assistant"
  c.data.trajectories.balance = "taxonomy"
  c.data.instructions.paths = os.path.join(agentic.DEFAULT_OUT_DIR,
                                           agentic.INSTRUCTIONS_FILE.format(split="train"))
  c.data.instructions.loss_on = "assistant"
  return c
