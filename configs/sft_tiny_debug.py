"""Self-debugging SFT of the tiny model (LeDex) on the passing refinements of
``experiments/make_self_debug_data.py``, in one of two formats:

  python -m experiments.make_self_debug_data --config=configs/midtrain_tiny.py \\
      --workdir=/tmp/kat_midtrain
  python -m experiments.main --config=configs/sft_tiny_debug.py:explain_refine \\
      --workdir=/tmp/kat_sft_debug --config.init_from=/tmp/kat_midtrain
  python -m experiments.main --config=configs/sft_tiny_debug.py:refine_only ...

* ``explain_refine``: user = spec, failing program, its sandbox report, "first explain the bug,
  then fix it"; assistant = the explanation, then the fixed function (one turn).
* ``refine_only``: the same prompt asking for the fix alone; assistant = the fixed function.

Both read ``sft_<format>.jsonl`` (``data.self_debug.write_sft_jsonl``) through the ``trajectories``
stream of the ``sft`` stage (loss on the assistant turn only), the flat SFT stage of
configs/sft_tiny.py. Refinements of one failing program share their prompt; they are trained as
separate rows here (the ``sft_tree`` stage builds its trees from procedural mutants only).
"""
import os

from configs.base import get_base_config
from kat_jax.data import self_debug

FORMATS = self_debug.SFT_FORMATS


def get_config(format: str = "explain_refine"):  # noqa: A002 - the config_flags argument name
  fmt = format or "explain_refine"
  if fmt not in FORMATS:
    raise ValueError(f"configs/sft_tiny_debug.py:{fmt}: the format is one of {list(FORMATS)}")
  c = get_base_config("tiny")
  c.stage = "sft"
  c.init_from = ""                      # a mid-training workdir (configs/midtrain_tiny.py)
  c.train.steps = 300
  c.train.batch_size = 8
  c.train.seq_len = 1024
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 20
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_steps = 4
  c.train.checkpoint_every = 100
  c.data.vocab_size = c.model.vocab_size
  c.data.packing = "pad"                # a conversation that fits a row starts at its column 0
  c.data.mixture.code = 0.0
  c.data.mixture.trajectories = 1.0
  c.data.mixture.instructions = 0.0
  c.data.trajectories.paths = os.path.join(self_debug.DEFAULT_OUT_DIR,
                                           self_debug.SFT_FILE.format(format=fmt))
  c.data.trajectories.loss_on = "assistant"
  c.data.trajectories.balance = ""
  return c
