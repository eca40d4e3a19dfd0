"""The ``config.rl`` section of an experiment: environment, rollout, reward, advantage estimator,
filters, curriculum and the iteration schedule of the RL stage (``kat_jax.rl.loop``).

``configs/base.py`` puts ``rl_defaults()`` at ``config.rl`` so that every field can be set from
the command line (``--config.rl.group_size=8 --config.rl.advantage.name=gae``).
"""
from __future__ import annotations

import ml_collections

from kat_jax.rl import rewards
from kat_jax.rl.advantages import default_advantage_config
from kat_jax.rl.envs.code import default_code_env_config
from kat_jax.rl.executor import default_ray_config
from kat_jax.rl.placement import default_placement_config
from kat_jax.tree.prune import default_prune_config


def rl_defaults() -> ml_collections.ConfigDict:
  from kat_jax.rl.rft import default_rft_config
  from kat_jax.rl.rollout import default_rollout_config
  c = ml_collections.ConfigDict()
  c.env_name = "code_single"       # registered environment (kat_jax.rl.envs.names())
  c.env = default_code_env_config()   # the environment's section (fields of that environment)
  c.rollout = default_rollout_config()   # limits and sampling of the agent loop
  c.rollout.reward = rewards.default_reward_config()   # how a final grade becomes a reward
  c.advantage = default_advantage_config()   # the advantage estimator (kat_jax.rl.advantages)
  c.iterations = 50                # RL iterations (rollout -> score -> ppo_epochs of updates)
  c.tasks_per_iteration = 8        # tasks (groups) per iteration; a multiple of train.batch_size
  c.group_size = 8                 # rollouts per task (G): one trajectory tree per group
  c.ppo_epochs = 1                 # passes over the iteration's trees
  c.tree_mode = True               # True: a group is one tree; False: one tree per trajectory
  c.sandbox_workers = 2            # sandbox processes grading rollouts
  c.task_levels = "0"              # procedural difficulty levels the curriculum moves within
  c.task_families = ""             # procedural families ('' = all)
  c.curriculum = ml_collections.ConfigDict(dict(
      enabled=False,               # move the level with the recent pass rate
      ema=0.8,                     # weight of the old pass-rate estimate per iteration
      up=0.6,                      # recent pass rate above this: next level
      down=0.1,                    # recent pass rate below this: previous level
  ))
  c.filter = ml_collections.ConfigDict(dict(
      dynamic_sampling=False,      # DAPO: drop groups whose rewards are all equal, draw more
      max_sampling_rounds=3,       # rollout rounds per iteration at most (dynamic sampling)
      mask_limit_statuses=False,   # trajectories that ended on a limit get no loss
      overlong_penalty_tokens=0,   # > 0: soft penalty over the last this-many tokens of budget
      overlong_penalty=1.0,        # the penalty at the budget (linear ramp over the window)
  ))
  # Entropy-budget pruning of the iteration's trees on the host, before scoring: pruned subtrees
  # are removed (kat_jax.tree.compact), so score and train pay only for the kept tokens. Fields
  # as config.train.prune (docs/PRUNING.md); config.train.prune (in-step masking) stays off.
  c.prune = default_prune_config()
  # The trajectory manager (kat_jax.rl.manager): rollout decoupled from training, bounded staleness.
  c.manager = ml_collections.ConfigDict(dict(
      enabled=False,               # run through the manager (also on when eta > 0 or executor='ray')
      eta=0,                       # staleness bound: admit while admitted <= (eta + version + 1)·B
      rollout_workers=1,           # episode-driver threads, each rolling one lockstep batch at a time
      batch_groups=0,              # groups per lockstep rollout batch (0 = tasks_per_iteration)
      partial_rollout=True,        # in-flight episodes take new params at turn boundaries
      kv_on_resume="keep",         # after a weight swap: 'keep' the KV cache or 'recompute' it
  ))
  c.executor = "inprocess"         # environments + sandbox graders: 'inprocess' or 'ray' (actors)
  c.ray = default_ray_config()     # the Ray executor (kat_jax.rl.executor)
  c.placement = default_placement_config()   # roles -> device groups / host, by tag
  c.rft = default_rft_config()     # the RFT stage (kat_jax.rl.rft): teachers, monitor, reward
  c.checkpoint_every = 5           # iterations between checkpoints (the last is always saved)
  c.eval_every = 10                # iterations between held-out evaluations (0 = never)
  c.eval_tasks = 32                # held-out procedural tasks per evaluation (greedy, pass@1)
  return c
