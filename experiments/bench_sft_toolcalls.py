"""Does SFT on the teacher trajectories teach a model to call tools? The share of sampled assistant
turns that parse as valid tool calls, on held-out tasks, before and after configs/sft_tiny.py.

  python -m experiments.bench_sft_toolcalls [--workdir=DIR --steps=300 --batch_size=4
                                             --seq_len=1024 --tasks=16 --init_from=MIDTRAIN_DIR]

1. writes the SFT data with ``kat_jax.data.agentic`` (train split of the procedural tasks: code,
   repository and math experts through the real environments, and instruction following) into
   ``DIR/data``;
2. trains ``configs/sft_tiny.py`` on it for ``--steps`` steps in ``DIR/run``, from ``--init_from``
   ('' = from scratch: the seed's fresh init and the code corpus's tokenizer);
3. runs greedy multi-turn episodes (``rl.rollout``, the ``code`` environment, the real sandbox)
   on ``--tasks`` held-out procedural tasks — their (template, params) pairs are in no training
   trajectory — with the starting params and with the trained ones, and counts the sampled turns
   whose text ``toolcall.parse_assistant_output`` (with the environment's tools) turns into at
   least one tool call, those whose every call's arguments also fit the tool's schema, those that
   open a ``<tool_call>`` at all, and the parse errors by kind.

Prints one JSON object: ``before`` and ``after`` (turns, valid tool-call turns and their share,
per-turn shares, statuses, submissions and passes), ``rise`` (after - before share), the run's
final train loss and wall times. ``--measure_only`` samples an already trained ``--workdir`` again.

Measured with the defaults (from scratch, 300 steps of 4×1024 tokens, 300 teacher trajectories,
200 instruction examples; 30 min of training on a shared 2-core CPU): before 0 of 32 turns
(share 0.0, no turn even opens a tool call); after 20 of 32 (share 0.625, every call
schema-valid): 16 of 16 first turns, 4 of 16 second turns — after a failure report the tiny
model runs its explanation into the code and drops the opening tag (11 ``unopened_tag``, 1
``invalid_json``). 150 steps (LR decayed over 150) gave 0 of 32: all 16 first turns opened a
call in the right format but are ``invalid_json`` (those inspected close the JSON with one brace
too few), all 16 second turns ``unopened_tag``.

From the 600-step tiny mid-training checkpoint (``--init_from=MIDTRAIN_DIR``, otherwise the
defaults; 28 min of training on the shared CPU): before 0 of 32 turns (no turn opens a tool
call); after 32 of 32 (share 1.0, every call schema-valid, both turns of all 16 episodes; final
train loss 0.21, token accuracy 0.95). No episode submitted within the 2 turns (16 max_turns:
the model calls ``run_tests`` on both turns), so the format is learned, task success is not
measured by this benchmark.
"""
from __future__ import annotations

import collections
import json
import os
import time
from typing import Any, Optional, Sequence

from absl import app, flags

from kat_jax.eval.agentic import classify_turns

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  flags.DEFINE_string("workdir", "/tmp/kat_bench_sft_toolcalls", "Run directory.")
  flags.DEFINE_integer("steps", 300, "SFT steps.")
  flags.DEFINE_integer("batch_size", 4, "Rows per step.")
  flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
  flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate.")
  flags.DEFINE_integer("tasks", 16, "Held-out procedural tasks sampled.")
  flags.DEFINE_integer("max_turns", 2, "Assistant turns per episode.")
  flags.DEFINE_integer("max_new_tokens", 192, "Tokens sampled per turn.")
  flags.DEFINE_string("init_from", "", "Starting checkpoint ('' = from scratch).")
  flags.DEFINE_integer("code_episodes", 240, "Code teacher episodes.")
  flags.DEFINE_integer("repo_episodes", 30, "Repository teacher episodes.")
  flags.DEFINE_integer("math_episodes", 30, "Math teacher episodes.")
  flags.DEFINE_integer("instructions", 200, "Instruction-following examples.")
  flags.DEFINE_bool("measure_only", False,
                    "Sample the run trained in --workdir again (no data, no training).")


def tool_call_share(model, params, tokenizer, tasks: Sequence[Any], pool, *, max_turns: int,
                    max_new_tokens: int, seed: int = 0) -> dict:
  """Greedy episodes of ``params`` in the code environment on ``tasks``: the share of sampled
  turns that are valid tool calls, with per-turn shares, statuses and grades."""
  import jax
  from kat_jax.data import chat
  from kat_jax.rl import envs, rollout
  from kat_jax.sample import Sampler
  env_list = [envs.make("code", None, pool=pool) for _ in tasks]
  prompt = max(len(chat.render_prompt(chat.Conversation(e.reset(t).messages, e.tools),
                                      tokenizer)) for e, t in zip(env_list, tasks))
  cfg = rollout.default_rollout_config()
  cfg.update(dict(max_turns=max_turns, max_new_tokens=max_new_tokens, temperature=0.0,
                  max_observation_tokens=512, env_threads=2))
  sampler = Sampler(model, params, max_len=prompt + max_turns * (max_new_tokens + 512 + 16))
  trajectories = rollout.rollout(sampler, env_list, tasks, jax.random.key(seed), cfg, tokenizer)
  turns = [classify_turns(t, tokenizer, env.tools) for t, env in zip(trajectories, env_list)]
  flat = [v for per in turns for v in per]
  share = lambda key, items: sum(bool(v[key]) for v in items) / max(len(items), 1)
  return {"turns": len(flat), "tool_call_turns": sum(v["valid"] for v in flat),
          "share": share("valid", flat), "schema_valid_share": share("schema", flat),
          "attempted_share": share("attempted", flat),
          "parse_errors": dict(collections.Counter(v["error"] for v in flat if v["error"])),
          "share_by_turn": {k: share("valid", [per[k] for per in turns if len(per) > k])
                            for k in range(max_turns)},
          "statuses": dict(collections.Counter(t.status for t in trajectories)),
          "submitted": sum(t.grade is not None for t in trajectories),
          "passed": sum(bool(t.grade is not None and t.grade.passed) for t in trajectories),
          "episodes": len(trajectories)}


def sft_config(workdir: str, *, steps: int, batch_size: int, seq_len: int,
               learning_rate: float, init_from: str = "",
               config_overrides: Optional[dict] = None):
  """configs/sft_tiny.py on the data in ``workdir/data``, with this run's training knobs."""
  from configs import sft_tiny
  from kat_jax.data import agentic
  c = sft_tiny.get_config()
  c.init_from = init_from
  c.data.data_dir = os.path.join(workdir, "tfds")
  c.data.tokenizer_cache_dir = os.path.join(workdir, "tokenizer_cache")
  for name, pattern in (("trajectories", agentic.TRAJECTORIES_FILE),
                        ("instructions", agentic.INSTRUCTIONS_FILE)):
    c.data[name].paths = os.path.join(workdir, "data", pattern.format(split="train"))
  c.train.update(dict(steps=steps, batch_size=batch_size, seq_len=seq_len,
                      learning_rate=learning_rate, warmup_steps=min(20, steps // 5),
                      eval_every=0, checkpoint_every=steps, progress_bar=False,
                      log_every=max(1, steps // 10)))
  for path, value in (config_overrides or {}).items():
    node = c
    *head, last = path.split(".")
    for part in head:
      node = node[part]
    node[last] = value
  return c


def run(workdir: str, *, steps: int, batch_size: int, seq_len: int, learning_rate: float,
        num_tasks: int, max_turns: int, max_new_tokens: int, init_from: str = "",
        data: Optional[dict] = None, config_overrides: Optional[dict] = None,
        measure_only: bool = False) -> dict:
  """The whole measurement (see the module docstring); ``data`` overrides fields of
  ``agentic.default_agentic_config()``, ``config_overrides`` dotted fields of the SFT config;
  ``measure_only`` samples the run already trained in ``workdir`` again."""
  from kat_jax import workdir as workdir_lib
  from kat_jax.data import agentic, procedural, tokenizer as tokenizer_lib
  from kat_jax.sandbox import SandboxPool
  from kat_jax.train import loop
  from kat_jax.train.trainer import Trainer

  start = time.perf_counter()
  data_config = agentic.default_agentic_config()
  data_config.update(data or {})
  c = sft_config(workdir, steps=steps, batch_size=batch_size, seq_len=seq_len,
                 learning_rate=learning_rate, init_from=init_from,
                 config_overrides=config_overrides)
  run_dir = os.path.join(workdir, "run")
  heldout = procedural.generate_tasks(seed=data_config.seed, num_tasks=num_tasks, split="heldout",
                                      levels=(0,), heldout_fraction=data_config.heldout_fraction)
  summary: dict = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len,
                   "learning_rate": learning_rate, "init_from": init_from or "scratch",
                   "heldout_tasks": len(heldout)}
  with SandboxPool(num_workers=2) as pool:
    if not measure_only:
      conversations, report = agentic.teacher_trajectories(data_config, pool)
      agentic.write_jsonl(conversations, c.data.trajectories.paths)
      agentic.write_jsonl(agentic.instruction_conversations(data_config),
                          c.data.instructions.paths)
      summary.update(trajectories=len(conversations),
                     experts={k: v["kept"] for k, v in report.items()},
                     data_s=round(time.perf_counter() - start, 1))
      t0 = time.perf_counter()
      result = loop.train(c, run_dir)
      summary.update(final_train_loss=result.get("train_loss"),
                     final_train_token_accuracy=result.get("train_correct"),
                     train_s=round(time.perf_counter() - t0, 1))
    tokenizer = tokenizer_lib.load_tokenizer(workdir_lib.tokenizer_dir(run_dir))
    sample = dict(max_turns=max_turns, max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    trainer = Trainer(c, os.path.join(workdir, "start"))   # the run's starting params
    before = tool_call_share(trainer.model, trainer.params, tokenizer, heldout, pool, **sample)
    trainer.close()
    state, model, _, _ = loop.load_state(c, run_dir)
    after = tool_call_share(model, state.params, tokenizer, heldout, pool, **sample)
  summary.update(before=before, after=after, rise=after["share"] - before["share"],
                 sample_s=round(time.perf_counter() - t0, 1),
                 wall_s=round(time.perf_counter() - start, 1))
  return summary


def main(argv):
  del argv
  summary = run(FLAGS.workdir, steps=FLAGS.steps, batch_size=FLAGS.batch_size,
                seq_len=FLAGS.seq_len, learning_rate=FLAGS.learning_rate, num_tasks=FLAGS.tasks,
                max_turns=FLAGS.max_turns, max_new_tokens=FLAGS.max_new_tokens,
                init_from=FLAGS.init_from, measure_only=FLAGS.measure_only,
                data=dict(code_episodes=FLAGS.code_episodes, repo_episodes=FLAGS.repo_episodes,
                          math_episodes=FLAGS.math_episodes, instructions=FLAGS.instructions))
  print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main)
