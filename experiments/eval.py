"""Evaluates a checkpoint: samples completions with the KV-cache sampler and prints pass@k tables.

  python -m experiments.eval --config=configs/midtrain_tiny.py --workdir=DIR \
      [--num_samples=10 --ks=1,10 --temperature=0.8 --max_new_tokens=256 --limit=20 \
       --suites=humaneval,procedural --step=N]
  python -m experiments.eval ... --decode=beam --beam_width=4 [--length_penalty=1.0]
  python -m experiments.eval ... --modes=initial,refine,explain_refine --num_samples=10 \
      --ks=1,10 [--refine_rounds=3]

Restores the latest checkpoint in DIR (``kat_jax.train.loop.load_state``, on the config's mesh)
and the tokenizer saved beside it (``DIR/tokenizer``), then for each suite:

* ``humaneval``: prompt = the HumanEval prompt as a plain code completion; generation stops at
  the usual HumanEval stop strings (a new top-level ``def``/``class``/``if``/``print``/comment) or
  an end-of-text / end-of-turn token, which are cut from the completion; scored by
  ``kat_jax.eval.humaneval`` (sandboxed, ``check(entry_point)`` in the judge).
* ``procedural``: the held-out split of ``kat_jax.data.procedural`` (``config.data.procedural``'s
  seed, levels, heldout fraction); prompt = ``chat.render_prompt`` of the task's conversation
  without the assistant turn; generation stops at ``<|im_end|>``; the code is extracted from the
  assistant text (first fenced block, else the whole text) and its function is called on every
  test case in the sandbox (plain-data ``CallTest`` s, judged outside the program's process).

Each prompt gets ``--num_samples`` samples (temperature 0 = greedy when one sample is drawn, unless
``--temperature`` says otherwise); pass@k is the unbiased estimator averaged over tasks, for every k
in ``--ks`` that is <= num_samples. The table is printed and written with every sample's
completion and verdict to ``DIR/eval/step_<N>.json``. A failed run ends with one last line
``error: <root cause>`` (``errors.run_main``).

``--modes`` adds LeDex's refinement modes (``kat_jax.eval.refinement``): ``refine`` asks the
model to fix each of its failing samples from the sandbox's failure report, ``explain_refine`` to
explain the bug and then fix it (one answer); a sample that passed stays as it is, and pass@k of
a mode is over the final programs (after one round in the main table). ``--refine_rounds=R`` goes
on for up to R rounds, the model seeing its new failure each time; success by round is tabulated.
Refinement prompts are chat turns (``data.self_debug.debug_prompt``) sampled with the same
temperature in a sampler of ``--refine_max_len`` slots; one that does not fit gets no answer and
fails (counted in the report's ``refine_overflowed``). Every run also writes the table as
markdown, ``DIR/eval/step_<N>.md`` (one table per checkpoint), beside the JSON.

``--decode=beam`` replaces sampling by beam search (``kat_jax.sample.beam``: ``--beam_width``
hypotheses per prompt, ranked by ``sum log p / length ** length_penalty``) and scores the top
hypothesis of each prompt: one completion per prompt, so ``--num_samples`` must be 1 and pass@1 is
the top beam's verdict. Beam search knows stop tokens only: a HumanEval beam runs past a stop
string, and its text is cut after the first token completing one (finish reason "stop_string"),
as the sampler cuts samples — the ranking itself saw the whole beam.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

# Scoring (code extraction, sandbox jobs, pass@k records) lives in kat_jax.eval.scoring.
from kat_jax import config as config_lib
from kat_jax import errors
from kat_jax import workdir as workdir_lib
from kat_jax.eval import refinement
from kat_jax.eval.sampling import sample_completions
from kat_jax.eval.scoring import (HUMANEVAL_STOP_STRINGS, format_table, humaneval_completion,
                                  score_humaneval, score_procedural)

SUITES = ("humaneval", "procedural")
DECODES = ("sample", "beam")
MODES = refinement.MODES   # initial, refine, explain_refine


def _cut_at_stop_strings(tokens: Sequence[int], reason: str, stop_strings: Sequence[str],
                         tokenizer) -> tuple[str, str, int]:
  """(text, finish_reason, num_tokens) of ``tokens`` cut after the first token whose decoded
  prefix contains a stop string (reason "stop_string"), as the sampler cuts its samples."""
  text = tokenizer.decode(list(tokens))
  if not any(s in text for s in stop_strings):
    return text, reason, len(tokens)
  for k in range(1, len(tokens) + 1):
    prefix = tokenizer.decode(list(tokens[:k]))
    if any(s in prefix for s in stop_strings):
      same = k == len(tokens) and reason == "stop_token"   # the stop token completed it
      return prefix, reason if same else "stop_string", k
  return text, "stop_string", len(tokens)


def beam_completions(sampler, prompts: Sequence[Sequence[int]], config, *, beam_width: int,
                     length_penalty: float, batch_size: int,
                     tokenizer) -> list[list[tuple[str, str, int]]]:
  """The top beam of every prompt, shaped like ``sample_completions`` with one sample:
  [prompt][0] -> (text, finish_reason, tokens). ``config`` (a ``SamplingConfig``) gives
  ``max_new_tokens``, the stop tokens, ``vocab_limit`` and the stop strings (cut afterwards, see
  the module docstring). A decode batch holds ``batch_size // beam_width`` prompts (at least
  one), longest first."""
  order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
  per_call = max(1, batch_size // beam_width)
  out: list[list] = [None] * len(prompts)
  for start in range(0, len(order), per_call):
    chunk = order[start:start + per_call]
    result = sampler.beam_search([prompts[i] for i in chunk], beam_width=beam_width,
                                 max_new_tokens=config.max_new_tokens,
                                 length_penalty=length_penalty,
                                 stop_token_ids=config.stop_token_ids,
                                 vocab_limit=config.vocab_limit)
    for row, i in enumerate(chunk):
      if result.num_beams[row] == 0:                  # no finite candidate at all
        out[i] = [("", "inactive", 0)]
        continue
      tokens = result.tokens[row, 0, :result.lengths[row, 0]].tolist()
      out[i] = [_cut_at_stop_strings(tokens, result.finish_reason[row][0], config.stop_strings,
                                     tokenizer)]
  return out


def generate_completions(sampler, prompts: Sequence[Sequence[int]], config, *, decode: str,
                         num_samples: int, rng, batch_size: int, tokenizer, beam_width: int = 4,
                         length_penalty: float = 1.0) -> list[list[tuple[str, str, int]]]:
  """[prompt][sample] -> (text, finish_reason, tokens): ``num_samples`` samples per prompt
  (``decode="sample"``), or the top beam of each (``decode="beam"``, one per prompt)."""
  if decode == "beam":
    return beam_completions(sampler, prompts, config, beam_width=beam_width,
                            length_penalty=length_penalty, batch_size=batch_size,
                            tokenizer=tokenizer)
  return sample_completions(sampler, prompts, num_samples, config, rng, batch_size, tokenizer)


def run_eval(config, workdir: str, *, suites: Sequence[str] = SUITES, num_samples: int = 1,
             ks: Sequence[int] = (1,), temperature: Optional[float] = None, top_p: float = 1.0,
             top_k: int = 0, max_new_tokens: int = 256, limit: int = 0, batch_size: int = 16,
             seed: int = 0, step: Optional[int] = None, procedural_tasks: int = 100,
             sandbox_workers: Optional[int] = None, decode: str = "sample", beam_width: int = 4,
             length_penalty: float = 1.0, modes: Sequence[str] = ("initial",),
             refine_rounds: int = 1, refine_max_len: int = 2048) -> dict:
  """Samples and scores every suite; returns the JSON-ready report (also written to DIR/eval/)."""
  import jax
  from kat_jax.data import chat, special_tokens, tokenizer as tokenizer_lib
  from kat_jax.data import procedural
  from kat_jax.data.config import split_list
  from kat_jax.eval import humaneval
  from kat_jax.sample import Sampler, SamplingConfig
  from kat_jax.sandbox import SandboxPool
  from kat_jax.train import loop

  unknown = [s for s in suites if s not in SUITES]
  if unknown:
    raise ValueError(f"unknown suites {unknown}: choose among {list(SUITES)}")
  bad_modes = [m for m in modes if m not in MODES]
  if bad_modes or not modes:
    raise ValueError(f"--modes={list(modes)}: choose among {list(MODES)}")
  if refine_rounds < 1:
    raise ValueError(f"--refine_rounds={refine_rounds} must be >= 1")
  refining = [m for m in modes if m != "initial"]
  if num_samples < 1:
    raise ValueError(f"--num_samples={num_samples} must be >= 1")
  if decode not in DECODES:
    raise ValueError(f"--decode={decode!r}: choose among {list(DECODES)}")
  if decode == "beam":
    if num_samples != 1:
      raise ValueError(f"--decode=beam scores one completion per prompt (the top beam), so "
                       f"pass@k needs --num_samples=1, not {num_samples} (or use --decode=sample)")
    if beam_width < 1:
      raise ValueError(f"--beam_width={beam_width} must be >= 1")
    if temperature not in (None, 0.0) or top_p != 1.0 or top_k != 0:
      raise ValueError("--decode=beam ranks by the model's own log-probs: --temperature, --top_p "
                       "and --top_k do not apply; drop them (or use --decode=sample)")
  too_big = [k for k in ks if k > num_samples]
  if too_big:
    raise ValueError(f"--ks={list(ks)} asks pass@k with k > num_samples={num_samples}: "
                     f"draw at least {max(too_big)} samples or drop those k")
  if temperature is None:
    temperature = 0.0 if num_samples == 1 else 0.8
  if num_samples > 1 and temperature == 0.0:
    logging.warning("greedy decoding with num_samples=%d: every sample is the same", num_samples)

  tokenizer = tokenizer_lib.load_tokenizer(workdir_lib.find_tokenizer_dir(workdir, config))
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but config.model.vocab_size="
                     f"{config.model.vocab_size}: the config does not match the checkpoint")
  state, model, _, restored_step = loop.load_state(config, workdir, step)
  logging.info("restored step %d from %s", restored_step, workdir)

  prompts: dict[str, tuple[list[str], list[list[int]]]] = {}
  problems, tasks = None, None
  if "humaneval" in suites:
    problems = humaneval.load_problems()
    ids = list(problems)[:limit] if limit else list(problems)
    prompts["humaneval"] = (ids, [tokenizer.encode(problems[i].prompt) for i in ids])
  if "procedural" in suites:
    pcfg = config.data.procedural if "procedural" in config.get("data", {}) else None
    levels = tuple(int(x) for x in split_list(pcfg.levels)) if pcfg else (0,)
    tasks = procedural.generate_tasks(
        seed=int(pcfg.seed) if pcfg else 0, num_tasks=limit or procedural_tasks, split="heldout",
        levels=levels, families=split_list(pcfg.families) if pcfg else None,
        heldout_fraction=float(pcfg.heldout_fraction) if pcfg else 0.1)
    prompts["procedural"] = (
        [t.task_id for t in tasks],
        [chat.render_prompt(procedural.task_to_conversation(t).prefix(1), tokenizer).tokens.tolist()
         for t in tasks])
  longest = max(len(p) for _, ps in prompts.values() for p in ps)
  sampler = Sampler(model, state.params, max_len=longest + max_new_tokens)
  end_ids = (tokenizer.eos_id, tokenizer.token_id(special_tokens.IM_END))
  base = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
              stop_token_ids=end_ids, vocab_limit=tokenizer.vocab_size)
  sampling = {"humaneval": SamplingConfig(stop_strings=HUMANEVAL_STOP_STRINGS, **base),
              "procedural": SamplingConfig(**base)}
  rng = jax.random.key(seed)
  refiner = None
  if refining:
    from kat_jax.data.generator import SamplerGenerator
    refiner = SamplerGenerator(Sampler(model, state.params, max_len=refine_max_len), tokenizer,
                               temperature=temperature, top_p=top_p, top_k=top_k,
                               max_new_tokens=max_new_tokens, batch_size=batch_size,
                               seed=seed + 1, overflow="empty", name=f"step_{restored_step}")

  results, mode_results = [], []
  pool = SandboxPool(num_workers=sandbox_workers)
  try:
    for index, (suite, (ids, suite_prompts)) in enumerate(prompts.items()):
      start = time.perf_counter()
      samples = generate_completions(
          sampler, suite_prompts, sampling[suite], decode=decode, num_samples=num_samples,
          rng=jax.random.fold_in(rng, index), batch_size=batch_size, tokenizer=tokenizer,
          beam_width=beam_width, length_penalty=length_penalty)
      logging.info("%s: %s %d x %d in %.1fs", suite, decode, len(ids), num_samples,
                   time.perf_counter() - start)
      extras = {i: [{"finish_reason": f, "num_tokens": n} for _, f, n in s]
                for i, s in zip(ids, samples)}
      if suite == "humaneval":
        completions = {i: [humaneval_completion(t) for t, _, _ in s] for i, s in zip(ids, samples)}
        results.append(score_humaneval(completions, ks, pool, problems, extras))
      else:
        completions = {i: [t for t, _, _ in s] for i, s in zip(ids, samples)}
        results.append(score_procedural(tasks, completions, ks, pool, extras))
      if refining:
        eval_tasks = (refinement.humaneval_eval_tasks([problems[i] for i in ids])
                      if suite == "humaneval" else refinement.procedural_eval_tasks(tasks))
        start = time.perf_counter()
        mode_results.append(refinement.evaluate_suite(
            suite, eval_tasks, pool, refiner=refiner, modes=modes, num_samples=len(samples[0]),
            ks=ks, rounds=refine_rounds, initial_texts=[[t for t, _, _ in s] for s in samples]))
        logging.info("%s: modes %s in %.1fs", suite, list(modes), time.perf_counter() - start)
  finally:
    pool.close()

  report = {
      "step": int(restored_step), "workdir": os.path.abspath(workdir),
      "sampling": {"num_samples": num_samples, "ks": list(ks), "temperature": temperature,
                   "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens,
                   "limit": limit, "seed": seed, "decode": decode,
                   **({"beam_width": beam_width, "length_penalty": length_penalty}
                      if decode == "beam" else {})},
      "table": format_table(results, ks),
      "suites": {r.suite: r.to_dict() for r in results},
  }
  title = f"step {restored_step} ({os.path.abspath(workdir)})"
  if refining:
    report["modes"] = {r.suite: r.to_dict() for r in mode_results}
    report["refine_rounds"] = refine_rounds
    # Refinement prompts longer than --refine_max_len got no answer (scored as failures).
    report["refine_overflowed"] = refiner.overflowed
    markdown = refinement.markdown_table(mode_results, ks, title)
  else:   # the same table with the initial mode only
    markdown = refinement.markdown_table(
        [refinement.SuiteModes(r.suite, {"initial": r.pass_at_k}, {}, {}, num_samples, 0)
         for r in results], ks, title)
  report["markdown"] = markdown
  out_dir = workdir_lib.eval_dir(workdir)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"step_{restored_step}.json")
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=1)
  os.replace(path + ".tmp", path)
  with open(os.path.join(out_dir, f"step_{restored_step}.md"), "w") as f:
    f.write(markdown)
  report["path"] = path
  return report


# ---------------------------------------------------------------------------------------- CLI

def _define_flags() -> dict:
  """The CLI flags, defined only when run as a program (importing the module defines none)."""
  return {
      "config": config_flags.DEFINE_config_file(
          "config", None, "Experiment config file (as trained).", lock_config=True),
      "workdir": flags.DEFINE_string("workdir", None,
                                     "Training workdir: checkpoints/ and tokenizer/."),
      "suites": flags.DEFINE_list("suites", list(SUITES), "Suites to run."),
      "num_samples": flags.DEFINE_integer("num_samples", 1, "Samples per prompt."),
      "ks": flags.DEFINE_list("ks", ["1"], "pass@k values (each <= num_samples)."),
      "temperature": flags.DEFINE_float(
          "temperature", None,
          "Sampling temperature; default 0 (greedy) for one sample, else 0.8."),
      "top_p": flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off)."),
      "top_k": flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off)."),
      "max_new_tokens": flags.DEFINE_integer("max_new_tokens", 256,
                                             "Generated tokens per sample at most."),
      "limit": flags.DEFINE_integer(
          "limit", 0, "Only the first N tasks of each suite (0: all of HumanEval and "
          "--procedural_tasks procedural tasks)."),
      "procedural_tasks": flags.DEFINE_integer("procedural_tasks", 100,
                                               "Held-out procedural tasks."),
      "batch_size": flags.DEFINE_integer("batch_size", 16, "Sampled rows per decode batch."),
      "seed": flags.DEFINE_integer("seed", 0, "Sampling seed."),
      "step": flags.DEFINE_integer("step", None, "Checkpoint step (default: latest)."),
      "sandbox_workers": flags.DEFINE_integer("sandbox_workers", None,
                                              "Sandbox processes (default: CPU count)."),
      "decode": flags.DEFINE_enum("decode", "sample", list(DECODES),
                                  "sample: --num_samples samples per prompt; beam: beam search, "
                                  "pass@1 of the top beam (needs --num_samples=1)."),
      "beam_width": flags.DEFINE_integer("beam_width", 4, "Beams per prompt (--decode=beam)."),
      "length_penalty": flags.DEFINE_float(
          "length_penalty", 1.0, "Beam score = sum log p / length ** length_penalty "
          "(--decode=beam; 0: plain sum)."),
      "modes": flags.DEFINE_list(
          "modes", ["initial"], "Evaluation modes among initial, refine (fix the failing "
          "samples from their error) and explain_refine (explain, then fix)."),
      "refine_rounds": flags.DEFINE_integer(
          "refine_rounds", 1, "Refinement rounds at most (the model sees its new failure)."),
      "refine_max_len": flags.DEFINE_integer(
          "refine_max_len", 2048, "KV-cache slots of the refinement sampler (prompt + answer)."),
  }


def main(argv, f: dict):
  del argv
  errors.quiet_library_noise(bool(flags.FLAGS["verbosity"].present))
  values = {name: flag.value for name, flag in f.items()}
  if not values["config"] or not values["workdir"]:
    raise app.UsageError("--config and --workdir are required")
  report = run_eval(values.pop("config"), values.pop("workdir"),
                    ks=[int(k) for k in values.pop("ks")], **values)
  print(f"step {report['step']}  ({report['workdir']})")
  print(report["table"])
  if "modes" in report:
    print(report["markdown"])
  print(f"wrote {report['path']}")


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(errors.run_main(lambda argv: main(argv, _flags)), flags_parser=config_lib.parse_flags)
