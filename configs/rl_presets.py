"""Named RL algorithm presets over one loop: each sets the advantage estimator, the policy
objective, its clipping / KL / value settings, the loss aggregation and the filters.

  python -m experiments.main --config=configs/rl_tiny.py:dapo --workdir=... --config.init_from=...

| preset | advantage | objective | notes |
|---|---|---|---|
| ppo    | gae (critic: value head, gamma 1, lambda 0.95) | clipped PPO | the seed article's actor-critic: value loss, gradient clipping, running reward normalization |
| grpo   | grpo (group mean / std) | clipped PPO | k3 KL to the reference (beta 0.04), sequence-mean-token-mean |
| dapo   | grpo | clip-higher (0.2 / 0.28) | token-mean over the batch, dynamic sampling, soft overlong penalty, no KL |
| drgrpo | drgrpo (no std) | clipped PPO | constant normalizer (no 1/|o|), no KL |
| gspo   | grpo | gspo (sequence ratio, clip 3e-4 / 4e-4) | sequence-mean-token-mean |
| rloo   | rloo (leave-one-out) | clipped PPO | token-mean |
"""
import ml_collections

PRESETS = ("ppo", "grpo", "dapo", "drgrpo", "gspo", "rloo")


def apply_preset(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Sets ``c.rl`` / ``c.train`` / ``c.model`` fields of the preset ``name`` (in place)."""
  if name not in PRESETS:
    raise ValueError(f"unknown RL preset {name!r}: choose one of {list(PRESETS)}")
  t, rl = c.train, c.rl
  t.objective, t.kl_coef, t.use_reference, t.value_coef = "ppo", 0.0, False, 0.0
  t.clip_eps, t.clip_eps_high, t.loss_agg = 0.2, -1.0, "token_mean"
  rl.filter.dynamic_sampling, rl.filter.overlong_penalty_tokens = False, 0
  rl.advantage.name = {"ppo": "gae", "drgrpo": "drgrpo", "rloo": "rloo"}.get(name, "grpo")
  if name == "ppo":
    c.model.value_head = True
    t.value_coef, t.grad_clip = 0.5, 1.0
    rl.advantage.gamma, rl.advantage.lam = 1.0, 0.95
    rl.rollout.reward.normalize.mode = "welford"
  elif name == "grpo":
    t.kl_coef, t.use_reference, t.loss_agg = 0.04, True, "seq_mean_token_mean"
  elif name == "dapo":
    t.clip_eps, t.clip_eps_high = 0.2, 0.28
    rl.filter.dynamic_sampling = True
    rl.filter.overlong_penalty_tokens = max(rl.rollout.max_new_tokens // 4, 1)
  elif name == "drgrpo":
    t.loss_agg = "constant"
    t.agg_constant = float(rl.rollout.max_new_tokens * rl.rollout.max_turns)
  elif name == "gspo":
    t.objective, t.loss_agg = "gspo", "seq_mean_token_mean"
  return c
