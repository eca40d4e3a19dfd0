"""Self-debugging SFT of the tiny model (LeDex) on the passing refinements of
``experiments/make_self_debug_data.py``, in one of two formats, flat or in tree mode:

  python -m experiments.make_self_debug_data --config=configs/midtrain_tiny.py \\
      --workdir=/tmp/kat_midtrain
  python -m experiments.main --config=configs/sft_tiny_debug.py:explain_refine \\
      --workdir=/tmp/kat_sft_debug --config.init_from=/tmp/kat_midtrain
  python -m experiments.main --config=configs/sft_tiny_debug.py:refine_only ...
  python -m experiments.main --config=configs/sft_tiny_debug.py:explain_refine_tree ...
  python -m experiments.main --config=configs/sft_tiny_debug.py:refine_only_tree ...

* ``explain_refine``: user = spec, failing program, its sandbox report, "first explain the bug,
  then fix it"; assistant = the explanation, then the fixed function (one turn).
* ``refine_only``: the same prompt asking for the fix alone; assistant = the fixed function.

The flat variants read ``sft_<format>.jsonl`` (``data.self_debug.write_sft_jsonl``) through the
``trajectories`` stream of the ``sft`` stage (loss on the assistant turn only), the flat SFT stage
of configs/sft_tiny.py: every refinement is a row of its own. The ``<format>_tree`` variants train
the same conversations with the ``sft_tree`` stage from ``records.jsonl`` (``config.tree.source=
'self_debug'``, ``kat_jax.tree.sft_data.SelfDebugGroups``): the refinements and explanations of one
failing program share their prompt and are one prefix tree per row, the prompt stored once (loss
``tree``: the per-trajectory token mean of the flat rows). Trees share only where the synthesis
asked for several explanations or refinements per program
(``--self_debug.explanations_per_program`` / ``refinements_per_explanation`` > 1).
"""
import os

from configs.base import get_base_config
from kat_jax.data import self_debug
from kat_jax.tree.sft_data import default_tree_config

FORMATS = self_debug.SFT_FORMATS
TREE_SUFFIX = "_tree"
VARIANTS = FORMATS + tuple(f + TREE_SUFFIX for f in FORMATS)


def get_config(format: str = "explain_refine"):  # noqa: A002 - the config_flags argument name
  variant = format or "explain_refine"
  if variant not in VARIANTS:
    raise ValueError(f"configs/sft_tiny_debug.py:{variant}: the format is one of {list(FORMATS)}, "
                     f"or <format>{TREE_SUFFIX} for tree mode ({list(VARIANTS)})")
  tree = variant.endswith(TREE_SUFFIX)
  fmt = variant[:-len(TREE_SUFFIX)] if tree else variant
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
  if tree:
    c.stage = "sft_tree"
    c.tree = default_tree_config()
    c.tree.update(dict(source="self_debug", format=fmt,
                       records_path=os.path.join(self_debug.DEFAULT_OUT_DIR,
                                                 self_debug.RECORDS_FILE),
                       max_len=1024, max_tokens=2048, max_traj=4, max_nodes=64))
    c.train.batch_size = 4              # trees per step (up to 4 refinements each)
    c.train.seq_len = c.tree.max_tokens   # tokens per row, for throughput/MFU accounting
  return c
