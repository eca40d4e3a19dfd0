"""Agentic RL of the tiny model on single-turn procedural code tasks, from an SFT or
mid-training checkpoint, with a named algorithm preset (configs/rl_presets.py: ppo, grpo, dapo,
drgrpo, gspo, rloo; default grpo):

  python -m experiments.main --config=configs/rl_tiny.py:grpo --workdir=/tmp/kat_rl \
      --config.init_from=/tmp/kat_midtrain

Each iteration rolls out rl.group_size samples of rl.tasks_per_iteration level-0 tasks at T=1,
rewards them with kat_composite (0.4 compile + 0.5 test + 0.1 complexity), trains on one trajectory
tree per task, and evaluates greedy pass@1 on held-out tasks every rl.eval_every iterations.
"""
from configs.base import get_base_config
from configs.rl_presets import apply_preset


def get_config(preset: str = "grpo"):
  c = get_base_config("tiny")
  c.stage = "rl"
  c.rl.env_name = "code_single"
  c.rl.env.show_visible_tests = False
  c.rl.env.with_system_prompt = False   # prompts laid out as in mid-training's procedural data
  c.rl.iterations = 40
  c.rl.tasks_per_iteration = 8
  c.rl.group_size = 8
  c.rl.ppo_epochs = 1
  c.rl.eval_every = 10
  c.rl.eval_tasks = 32
  c.rl.checkpoint_every = 10
  c.rl.rollout.max_turns = 1
  c.rl.rollout.max_new_tokens = 96
  c.rl.rollout.temperature = 1.0
  c.rl.rollout.max_observation_tokens = 0
  c.rl.rollout.env_threads = 4
  c.train.loss = "tree"
  c.train.batch_size = 8            # trees (groups) per optimizer step
  c.train.steps = 40                # = iterations × ppo_epochs × tasks_per_iteration / batch_size
  c.train.learning_rate = 1e-4
  c.train.warmup_steps = 2
  c.train.weight_decay = 0.0
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 10
  c.train.seq_len = 512
  c.tree.max_len = 384              # tokens per trajectory (prompt + answer), = sampler cache
  c.tree.max_tokens = 1024          # tree tokens per group
  c.tree.max_nodes = 32
  c.tree.max_traj = 8
  c.data.vocab_size = c.model.vocab_size
  return apply_preset(c, preset or "grpo")
