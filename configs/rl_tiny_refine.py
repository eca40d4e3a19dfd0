"""RL on refinement (LeDex) for the tiny model: the RL stage in the ``refine`` environment with the
``refine`` reward, from the self-debugging SFT checkpoint (configs/sft_tiny_debug.py):

  python -m experiments.main --config=configs/rl_tiny_refine.py:grpo --workdir=/tmp/kat_rl_refine \
      --config.init_from=/tmp/kat_sft_debug \
      [--config.rl.env.records_path=$HOME/.cache/kat_jax/self_debug/records.jsonl]

Each episode starts from a program that fails its task's tests and the sandbox's report of that
failure — the model's own failing sample when ``rl.env.records_path`` (written by
``python -m experiments.make_self_debug_data``) has one for the drawn task, else an AST mutant of
the reference — and the model answers with an explanation and a fixed function
(``rl.env.mode = "explain_refine"``). Every answer is graded on all tests; a failing one sees its
new report and tries again, for ``rl.env.max_rounds = 2`` graded answers. The reward of the final
answer is ``0.8 · pass rate + 0.2 · CodeBLEU to the reference`` (``rl.rollout.reward.refine``;
``w_explanation`` > 0 adds the explanation's word F1 against the scripted oracle's explanation).
Otherwise as configs/rl_tiny.py (grpo by default; any preset of configs/rl_presets.py).
"""
from configs.rl_tiny import get_config as rl_tiny_config
from kat_jax.rl.envs.refine import default_refine_env_config, default_refine_reward_config


def get_config(preset: str = "grpo"):
  c = rl_tiny_config(preset or "grpo")
  c.rl.env_name = "refine"
  c.rl.env = default_refine_env_config()
  c.rl.env.with_system_prompt = False   # prompts laid out as in the self-debugging SFT data
  c.rl.env.mode = "explain_refine"
  c.rl.env.max_rounds = 2
  c.rl.rollout.max_turns = 2            # >= rl.env.max_rounds, or the last rounds never run
  c.rl.rollout.max_new_tokens = 128
  c.rl.rollout.max_observation_tokens = 384
  c.rl.rollout.reward.name = "refine"
  c.rl.rollout.reward.refine = default_refine_reward_config()
  c.tree.max_len = 768                  # prompt + two answers + one report, = sampler cache
  c.tree.max_tokens = 4096              # tree tokens per group (8 trajectories, shared prompt)
  c.tree.max_nodes = 48
  c.train.seq_len = 1024
  if preset == "drgrpo":                # its constant normalizer counts the new turn budget
    c.train.agg_constant = float(c.rl.rollout.max_new_tokens * c.rl.rollout.max_turns)
  if preset == "dapo":
    c.rl.filter.overlong_penalty_tokens = max(c.rl.rollout.max_new_tokens // 4, 1)
  return c
