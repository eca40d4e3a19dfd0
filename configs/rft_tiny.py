"""RFT of the tiny model in the multi-turn ``code`` environment (run_tests / submit tools), guided
by teacher trajectories of the scripted experts, from an SFT checkpoint (configs/sft_tiny.py,
whose trajectories come from the same experts and environment)::

  python -m experiments.main --config=configs/rft_tiny.py --workdir=/tmp/kat_rft \
      --config.init_from=/tmp/kat_sft

Each iteration rolls out rl.group_size episodes of rl.tasks_per_iteration level-0 tasks at T=1
under the deviation monitor (turn-level signature similarity to the teachers ``code_direct``,
``code_fix`` and the reference submit); a rollout that deviates is stopped after its turn and gets
a corrected branch continuing from the teacher's turn (at most 2 per group); every trajectory is
rewarded by its relative reward (hidden-test pass fraction + 0.5 × similarity to the closest
teacher); GRPO advantages over each group's rollouts and branches, one tree per group. Greedy
pass@1 on held-out tasks (plain rollouts, the environment's grade) every rl.eval_every
iterations. docs/RFT.md has the design and the measurements.
"""
from configs.base import get_base_config
from configs.rl_presets import apply_preset


def get_config(preset: str = "grpo"):
  c = get_base_config("tiny")
  c.stage = "rft"
  c.rl.env_name = "code"
  c.rl.iterations = 30
  c.rl.tasks_per_iteration = 8
  c.rl.group_size = 4
  c.rl.ppo_epochs = 1
  c.rl.eval_every = 10
  c.rl.eval_tasks = 32
  c.rl.checkpoint_every = 10
  c.rl.rollout.max_turns = 3
  c.rl.rollout.max_new_tokens = 160
  c.rl.rollout.temperature = 1.0
  c.rl.rollout.max_observation_tokens = 256
  c.rl.rollout.env_threads = 4
  c.rl.rft.teachers = "code_direct,code_fix,reference"
  c.rl.rft.monitor.measure = "action"
  c.rl.rft.monitor.threshold = 0.7
  c.rl.rft.correction.max_per_group = 2
  c.train.loss = "tree"
  c.train.batch_size = 8            # trees (groups + their branches) per optimizer step
  c.train.steps = 30                # = iterations × ppo_epochs × tasks_per_iteration / batch_size
  c.train.learning_rate = 1e-4
  c.train.warmup_steps = 2
  c.train.weight_decay = 0.0
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 10
  c.train.seq_len = 1536
  c.tree.max_len = 1536             # tokens per trajectory, = sampler cache
  c.tree.max_tokens = 4096          # tree tokens per group (the prompt is shared)
  c.tree.max_nodes = 64
  c.tree.max_traj = 6               # group_size + correction.max_per_group
  c.data.vocab_size = c.model.vocab_size
  return apply_preset(c, preset or "grpo")
