"""Mid-training of the tiny model on data available offline: a mixture of the installed Python
standard library's sources (half of them FIM-transformed, structured: a whole AST node as the middle),
procedural function-writing tasks rendered as conversations, and the recipe's agentic mid-training
sources, built by the same code as the SFT data (kat_jax.data.agentic): ``tool_use`` (scripted
experts solving function and math tasks through the real environments: run_tests, read the
sandbox's report, fix, submit), ``multi_turn`` (repository episodes: search, read_file,
str_replace, run_tests, submit) and ``instruction_following`` (requests with constraints from 37
categories, each checked by code). The conversation streams train on the assistant turns only
(``loss_on='assistant'``), and every tool result in them is a real execution. A sentencepiece BPE
model is trained from the code on first use (cached in the workdir); the procedural and agentic
corpora are built once into data_dir (about 20 s and 10 s). Add
``--config.data.mixture.commits=0.2 --config.data.commits.repo=PATH`` for git history, or JSONL
trajectories/instructions via ``data.trajectories.paths``/``data.instructions.paths``.

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
  c.data.mixture.code = 0.6
  c.data.mixture.procedural = 0.2
  c.data.mixture.tool_use = 0.08              # expert episodes: function tasks and math
  c.data.mixture.multi_turn = 0.06            # expert episodes in repositories
  c.data.mixture.instruction_following = 0.06  # requests with code-checked constraints
  c.data.procedural.num_train = 300     # built once into data_dir (~20 s), repeated every epoch
  c.data.procedural.num_eval = 50
  # The agentic streams, built once into data_dir (~10 s together): 600 steps draw about 120
  # tool-use episodes, 25 repository episodes and 530 instruction examples (1.4 epochs).
  c.data.tool_use.num_train = 240
  c.data.multi_turn.num_train = 60
  c.data.instruction_following.num_train = 400
  c.data.fim.rate = 0.5
  return c
