"""Three-mode evaluation (LeDex): initial generation, direct refinement of the model's own failing
samples, and explain-then-refine, each at pass@k, plus multi-round refinement success by round.

    tasks = refinement.procedural_eval_tasks(heldout) + refinement.humaneval_eval_tasks(problems)
    result = refinement.evaluate_suite("procedural", tasks, pool, refiner=gen, num_samples=10,
                                       ks=(1, 10), rounds=3, initial_generator=gen)
    result.pass_at_k["refine"]            # {"pass@1": ..., "pass@10": ...}, after one round
    result.by_round["explain_refine"]     # per round: fixed / failing, pass@k after that round
    print(markdown_table([result], ks=(1, 10)))

Per task, ``num_samples`` initial programs are sampled (or given: ``initial_texts``) and graded in
the sandbox on all tests (``self_debug.judge``; for HumanEval the ``check`` function, exactly as
``eval.humaneval`` grades). In a refinement mode each failing sample gets one answer per round to
``self_debug.debug_prompt(spec, program, error, mode)`` — mode ``refine_only`` for ``refine``,
``explain_refine`` for ``explain_refine`` (explanation, then the fixed function, one answer) — and
is graded again; a sample still failing after round r sees its new report as the next user turn
(``followup_message``) for round r + 1. A sample that passed initially is kept as it is, so the
final programs of a mode are "initial if it passed, else its refinement", and pass@k is the
unbiased estimator (``pass_at_k``) over those ``num_samples`` programs per task, averaged over
tasks. A refiner that returns its input unchanged therefore scores exactly the initial pass@k; one
that always answers the reference scores 1.

``refiner`` answers chat prompts (a ``generator.TextGenerator``, e.g. a ``SamplerGenerator`` over
the checkpoint); ``initial_generator`` writes the initial samples from each task's
``initial_prompt`` (HumanEval: the raw prompt to continue; procedural: the spec as a user turn).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

from kat_jax.data import chat
from kat_jax.data import self_debug
from kat_jax.eval.pass_at_k import mean_pass_at_k

MODES = ("initial", "refine", "explain_refine")
REFINE_MODES = {"refine": "refine_only", "explain_refine": "explain_refine"}
MAX_ERROR_CHARS = 2000   # a failure report in a prompt is cut in the middle beyond this


@dataclasses.dataclass(frozen=True)
class EvalTask:
  """One task of a suite: its ``CodeTask`` (spec, reference, jobs), the prompt of the initial
  generation and how an initial response becomes the graded code (what follows a HumanEval
  prompt; the code block of a chat answer)."""
  task_id: str
  code_task: Any
  initial_prompt: Any
  completion_code: Callable[[str], str]


def procedural_eval_tasks(tasks, config=None) -> list[EvalTask]:
  """Procedural tasks: the spec as a user turn, the answer's code graded on every test."""
  from kat_jax.eval.scoring import extract_code
  out = []
  for task in tasks:
    ct = self_debug.code_task(task, config)
    out.append(EvalTask(task.task_id, ct, ct.prompt, extract_code))
  return out


def humaneval_eval_tasks(problems, config=None) -> list[EvalTask]:
  """HumanEval problems: the raw prompt continued, cut at the HumanEval stop strings."""
  from kat_jax.eval.scoring import humaneval_completion
  return [EvalTask(p.task_id, self_debug.code_task(p, config), p.prompt, humaneval_completion)
          for p in problems]


@dataclasses.dataclass
class _Sample:
  code: str                       # graded code (what follows a HumanEval prompt)
  verdict: self_debug.Verdict
  history: Optional[list] = None  # the refinement conversation's messages
  rounds: list = dataclasses.field(default_factory=list)   # per round: (passed, tests_passed)
  fixed_round: Optional[int] = None   # 0: passed initially; r: fixed in round r


@dataclasses.dataclass(frozen=True)
class SuiteModes:
  """A suite's results: pass@k per mode (refinement modes after round 1), per round for each
  refinement mode, and every sample's outcome."""
  suite: str
  pass_at_k: dict                 # mode -> {"pass@k": value}
  by_round: dict                  # refinement mode -> [{"round", "failing", "fixed", "pass@k"...}]
  samples: dict                   # task_id -> [per-sample dict]
  num_samples: int
  rounds: int
  seconds: float = 0.0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _cut(error: str) -> str:
  from kat_jax.rl.envs.tools import truncate
  return truncate(error, MAX_ERROR_CHARS)


def _refine(tasks: Sequence[EvalTask], initial: list[list[_Sample]], mode: str, refiner, pool,
            rounds: int, max_failures: int) -> list[list[_Sample]]:
  """Copies of the initial samples after up to ``rounds`` refinement rounds of ``mode``."""
  kind = REFINE_MODES[mode]
  states = [[_Sample(s.code, s.verdict, fixed_round=0 if s.verdict.passed else None)
             for s in row] for row in initial]
  for round_ in range(1, rounds + 1):
    todo = [(t, j) for t, row in enumerate(states) for j, s in enumerate(row)
            if not s.verdict.passed]
    if not todo:
      break
    prompts = []
    for t, j in todo:
      s, ct = states[t][j], tasks[t].code_task
      if s.history is None:
        s.history = [chat.Message("user", self_debug.debug_prompt(
            ct.prompt, ct.program(s.code), _cut(s.verdict.error), kind))]
      else:
        s.history.append(chat.Message("user", self_debug.followup_message(
            _cut(s.verdict.error), kind)))
      prompts.append(s.history[0].content if len(s.history) == 1
                     else chat.Conversation(tuple(s.history)))
    answers = refiner(prompts)
    codes = [self_debug.split_answer(a)[1] for a in answers]
    verdicts = self_debug.judge(pool, [(tasks[t].code_task, c) for (t, _), c in zip(todo, codes)],
                                max_failures=max_failures)
    for (t, j), answer, code, verdict in zip(todo, answers, codes, verdicts):
      s = states[t][j]
      s.history.append(chat.Message("assistant", answer))
      s.code, s.verdict = code, verdict
      s.rounds.append((verdict.passed, verdict.tests_passed))
      if verdict.passed:
        s.fixed_round = round_
  return states


def _pass_at_k(states: list[list[_Sample]], ks, by: Optional[int] = None) -> dict:
  """pass@k over tasks; ``by`` = r counts a sample correct iff it was fixed by round r."""
  correct = [sum(s.fixed_round is not None and (by is None or s.fixed_round <= by) for s in row)
             for row in states]
  return mean_pass_at_k([len(row) for row in states], correct, ks)


def evaluate_suite(suite: str, tasks: Sequence[EvalTask], pool, *, refiner=None,
                   modes: Sequence[str] = MODES, num_samples: int = 1, ks: Sequence[int] = (1,),
                   rounds: int = 1, initial_generator=None,
                   initial_texts: Optional[Sequence[Sequence[str]]] = None,
                   max_failures: int = 3) -> SuiteModes:
  """The results of ``modes`` on ``tasks`` (module docstring). ``initial_texts[t][j]`` are the
  initial responses if already sampled, else ``initial_generator`` samples them."""
  unknown = [m for m in modes if m not in MODES]
  if unknown or not modes:
    raise ValueError(f"unknown evaluation modes {unknown or modes}: choose among {list(MODES)}")
  if rounds < 1:
    raise ValueError(f"rounds={rounds} must be >= 1")
  too_big = [k for k in ks if k > num_samples]
  if too_big:
    raise ValueError(f"pass@{max(too_big)} needs at least {max(too_big)} samples per task, "
                     f"num_samples={num_samples}")
  if any(m in REFINE_MODES for m in modes) and refiner is None:
    raise ValueError(f"modes {list(modes)} refine: pass a refiner generator")
  start = time.perf_counter()
  if initial_texts is None:
    if initial_generator is None:
      raise ValueError("pass initial_texts (already sampled) or an initial_generator")
    initial_texts = initial_generator.sample([t.initial_prompt for t in tasks], num_samples)
  if len(initial_texts) != len(tasks) or any(len(r) != num_samples for r in initial_texts):
    raise ValueError(f"initial_texts has {[len(r) for r in initial_texts]} samples for "
                     f"{len(tasks)} tasks x {num_samples}")
  codes = [[task.completion_code(text) for text in row] for task, row in zip(tasks, initial_texts)]
  verdicts = self_debug.judge(pool, [(task.code_task, c) for task, row in zip(tasks, codes)
                                     for c in row], max_failures=max_failures)
  flat = iter(verdicts)
  initial = [[_Sample(c, v, fixed_round=0 if v.passed else None)
              for c, v in zip(row, flat)] for row in codes]
  pass_at_k, by_round, per_mode = {}, {}, {}
  if "initial" in modes:
    pass_at_k["initial"] = _pass_at_k(initial, ks)
  for mode in modes:
    if mode not in REFINE_MODES:
      continue
    states = _refine(tasks, initial, mode, refiner, pool, rounds, max_failures)
    per_mode[mode] = states
    failing = sum(s.fixed_round != 0 for row in states for s in row)
    pass_at_k[mode] = _pass_at_k(states, ks, by=1)
    by_round[mode] = [
        {"round": r, "failing": failing,
         "fixed": sum(s.fixed_round is not None and 0 < s.fixed_round <= r
                      for row in states for s in row),
         **_pass_at_k(states, ks, by=r)} for r in range(1, rounds + 1)]
    for entry in by_round[mode]:
      entry["fixed_fraction"] = entry["fixed"] / failing if failing else 0.0
  samples = {}
  for t, task in enumerate(tasks):
    rows = []
    for j, s in enumerate(initial[t]):
      row = {"initial": {"code": s.code, "passed": s.verdict.passed,
                         "tests_passed": s.verdict.tests_passed,
                         "tests_total": s.verdict.tests_total, "status": s.verdict.status}}
      for mode, states in per_mode.items():
        r = states[t][j]
        row[mode] = {"fixed_round": r.fixed_round, "final_code": r.code,
                     "rounds": [{"passed": p, "tests_passed": n} for p, n in r.rounds]}
      rows.append(row)
    samples[task.task_id] = rows
  return SuiteModes(suite, pass_at_k, by_round, samples, num_samples, rounds,
                    time.perf_counter() - start)


def markdown_table(results: Sequence[SuiteModes], ks: Sequence[int], title: str = "") -> str:
  """One markdown table (suite × mode, pass@k columns) and, when refinement ran, one of
  multi-round success by round."""
  keys = [f"pass@{k}" for k in ks]
  lines = ([f"### {title}", ""] if title else []) + [
      "| suite | mode | " + " | ".join(keys) + " |", "|---|---|" + "---:|" * len(keys)]
  for r in results:
    for mode in MODES:
      if mode in r.pass_at_k:
        cells = " | ".join(f"{r.pass_at_k[mode][k]:.4f}" if k in r.pass_at_k[mode] else "-"
                           for k in keys)
        lines.append(f"| {r.suite} | {mode} | {cells} |")
  if any(r.by_round for r in results):
    lines += ["", "| suite | mode | round | fixed / failing | " + " | ".join(keys) + " |",
              "|---|---|---:|---:|" + "---:|" * len(keys)]
    for r in results:
      for mode, entries in r.by_round.items():
        for e in entries:
          cells = " | ".join(f"{e[k]:.4f}" if k in e else "-" for k in keys)
          lines.append(f"| {r.suite} | {mode} | {e['round']} | {e['fixed']} / {e['failing']} | "
                       f"{cells} |")
  return "\n".join(lines) + "\n"
