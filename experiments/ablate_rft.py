"""RFT vs RL from the same SFT checkpoint: sample efficiency at equal rollout-token budgets.

  python -m experiments.ablate_rft --init_from=SFT_WORKDIR --workdir=DIR \
      [--iterations=20 --eval_every=5 --eval_tasks=32 --arms=rft,rl]

Both arms are configs/rft_tiny.py (the multi-turn ``code`` environment with run_tests / submit,
level-0 procedural tasks, the same group sizes, GRPO, the same seed, so both draw the same tasks
in the same order): arm ``rft`` is the RFT stage (teacher-guided, watched rollouts, corrected
branches, relative reward), arm ``rl`` the RL stage on the environment's own reward
(kat_composite). Each iteration's ``rollout_tokens`` (tokens the policy sampled, branches
included) are summed; every ``--eval_every`` iterations (and before the first) both arms are
evaluated the same way — greedy episodes on ``--eval_tasks`` held-out tasks, the environment's
grade (``RLStage.evaluate``). Prints one JSON object per evaluation point (arm, iteration,
cumulative rollout tokens, held-out pass@1, and for RFT the stop rate, branches and turns not
sampled) and writes ``DIR/rft_vs_rl.json``, ``DIR/rft_vs_rl.md`` (table) and
``DIR/rft_vs_rl.png`` (pass@1 against rollout tokens). Results and command: docs/RFT.md.
"""
from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line (defined only when run as a script)."""
  flags.DEFINE_string("init_from", None, "The SFT workdir both arms start from.")
  flags.DEFINE_string("workdir", None, "Where the arms run and the report goes.")
  flags.DEFINE_integer("iterations", 20, "Iterations per arm.")
  flags.DEFINE_integer("eval_every", 5, "Iterations between held-out evaluations.")
  flags.DEFINE_integer("eval_tasks", 32, "Held-out tasks per evaluation.")
  flags.DEFINE_list("arms", ["rft", "rl"], "Arms to run, in order.")
  flags.DEFINE_float("learning_rate", 1e-4, "Peak learning rate of both arms.")
  flags.mark_flags_as_required(["init_from", "workdir"])


def arm_config(arm: str, *, init_from: str, iterations: int, eval_tasks: int,
               learning_rate: float):
  from configs import rft_tiny
  c = rft_tiny.get_config()
  c.stage = arm
  c.init_from = init_from
  c.rl.iterations = iterations
  c.rl.eval_every = 0                      # evaluated here, the same way for both arms
  c.rl.eval_tasks = eval_tasks
  c.rl.checkpoint_every = iterations
  c.train.steps = iterations * c.rl.ppo_epochs * (c.rl.tasks_per_iteration // c.train.batch_size)
  c.train.learning_rate = learning_rate
  c.train.progress_bar = False
  return c


def run_arm(arm: str, workdir: str, *, init_from: str, iterations: int, eval_every: int,
            eval_tasks: int, learning_rate: float):
  """Yields one record per evaluation point of ``arm``."""
  from kat_jax.rl import loop as rl_loop
  from kat_jax.rl import rft_loop
  config = arm_config(arm, init_from=init_from, iterations=iterations, eval_tasks=eval_tasks,
                      learning_rate=learning_rate)
  stage = (rft_loop.RFTStage if arm == "rft" else rl_loop.RLStage)(config, workdir)
  tokens, start, window = 0.0, time.perf_counter(), []
  try:
    for it in range(iterations + 1):
      if it % eval_every == 0 or it == iterations:
        ev = stage.evaluate()
        record = {"arm": arm, "iteration": it, "rollout_tokens": tokens,
                  "pass_at_1": ev["pass_at_1"], "eval_reward": ev["reward"],
                  "wall_s": time.perf_counter() - start}
        if window:
          for key in ("reward", "pass_rate", "turns", "rft/stopped_fraction", "rft/branches",
                      "rft/turns_saved", "rft/branch_pass_rate", "rft/rollout_pass_rate"):
            values = [m[key] for m in window if key in m]
            if values:
              record[f"train_{key}"] = sum(values) / len(values)
        window = []
        yield record
      if it == iterations:
        break
      metrics = stage.iterate()
      tokens += metrics["rollout_tokens"]
      window.append(metrics)
  finally:
    stage.close()


def write_report(records, workdir: str) -> None:
  with open(os.path.join(workdir, "rft_vs_rl.json"), "w") as f:
    json.dump(records, f, indent=1)
  lines = ["| arm | iteration | rollout tokens | held-out pass@1 | train pass rate | stopped | "
           "branches / it | turns not sampled / it |", "|---|---|---|---|---|---|---|---|"]
  for r in records:
    def cell(key, fmt="{:.3f}"):
      return fmt.format(r[key]) if key in r else "–"
    lines.append(f"| {r['arm']} | {r['iteration']} | {r['rollout_tokens']:.0f} | "
                 f"{r['pass_at_1']:.3f} | {cell('train_pass_rate')} | "
                 f"{cell('train_rft/stopped_fraction')} | {cell('train_rft/branches', '{:.1f}')} | "
                 f"{cell('train_rft/turns_saved', '{:.1f}')} |")
  with open(os.path.join(workdir, "rft_vs_rl.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for arm in sorted({r["arm"] for r in records}):
    points = [r for r in records if r["arm"] == arm]
    ax.plot([r["rollout_tokens"] for r in points], [r["pass_at_1"] for r in points], "o-",
            label=arm)
  ax.set_xlabel("rollout tokens (sampled by the policy)")
  ax.set_ylabel("held-out greedy pass@1")
  ax.set_title("RFT vs RL from the same SFT checkpoint (tiny)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "rft_vs_rl.png"), dpi=120)


def main(argv):
  del argv
  os.makedirs(FLAGS.workdir, exist_ok=True)
  records = []
  for arm in FLAGS.arms:
    if arm not in ("rft", "rl"):
      raise app.UsageError(f"--arms names {arm!r}: use rft and / or rl")
    for record in run_arm(arm, os.path.join(FLAGS.workdir, arm), init_from=FLAGS.init_from,
                          iterations=FLAGS.iterations, eval_every=FLAGS.eval_every,
                          eval_tasks=FLAGS.eval_tasks, learning_rate=FLAGS.learning_rate):
      print(json.dumps(record), flush=True)
      records.append(record)
      write_report(records, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
