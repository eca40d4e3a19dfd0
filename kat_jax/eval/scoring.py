"""Scoring sampled completions in the sandbox: HumanEval bodies and procedural-task programs.

Library code shared by the evaluation CLI (``experiments.eval``) and anything that turns completions
into verdicts (e.g. RL rewards from test pass rates):

* ``extract_code`` — the code of an assistant turn (first fenced block, else the whole text);
* ``humaneval_completion`` — a sampled HumanEval continuation cut at the Codex stop strings;
* ``procedural_job`` — a sandbox job calling a procedural task's function on each test case
  (plain-data ``CallTest`` s: expected values stay in the judge, outside the program's process);
* ``score_humaneval`` / ``score_procedural`` — per-sample records (``SampleRecord``: verdict,
  sandbox status, tests passed) and mean pass@k (``SuiteResult``); ``format_table`` prints them.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import time
from typing import Any, Mapping, Optional, Sequence

# Codex/HumanEval stop sequences: the function body ends where a new top-level statement starts.
HUMANEVAL_STOP_STRINGS = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")
_FENCE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class SampleRecord:
  """One completion and its verdict."""
  completion: str                   # what was scored (HumanEval: the body; procedural: the code)
  passed: bool
  status: str                       # sandbox status (completed, load_error, timeout, ...)
  tests_passed: int = 0
  tests_total: int = 0
  finish_reason: str = ""           # from the sampler (empty when scored without sampling)
  num_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class SuiteResult:
  suite: str
  pass_at_k: dict                   # {"pass@k": mean over tasks}
  tasks: dict                       # task_id -> list[SampleRecord] (sample order)
  seconds: float = 0.0              # sandbox wall time

  def to_dict(self) -> dict:
    from kat_jax.eval.pass_at_k import pass_at_k
    rows = []
    for task_id, records in self.tasks.items():
      n, correct = len(records), sum(r.passed for r in records)
      row = {"task_id": task_id, "n": n, "correct": correct}
      for key in self.pass_at_k:
        row[key] = pass_at_k(n, correct, int(key.split("@")[1]))
      row["samples"] = [dataclasses.asdict(r) for r in records]
      rows.append(row)
    return {"suite": self.suite, "num_tasks": len(self.tasks),
            "num_samples": sum(len(r) for r in self.tasks.values()),
            "num_passed": sum(r.passed for rs in self.tasks.values() for r in rs),
            "pass_at_k": dict(self.pass_at_k), "sandbox_seconds": self.seconds, "tasks": rows}


def extract_code(assistant_text: str) -> str:
  """The code of an assistant turn: its first fenced block if it has one, else the whole text
  (special-token strings removed either way)."""
  from kat_jax.data import special_tokens
  text = assistant_text
  for special in (special_tokens.IM_END, special_tokens.END_OF_TEXT):
    index = text.find(special)
    if index >= 0:
      text = text[:index]
  match = _FENCE.search(text)
  return match.group(1) if match else text


def humaneval_completion(text: str) -> str:
  """A sampled continuation of a HumanEval prompt, cut at the first stop string or special token."""
  from kat_jax.data import special_tokens
  from kat_jax.sample import cut_at_stop_string
  return cut_at_stop_string(text, HUMANEVAL_STOP_STRINGS + special_tokens.ALL)


def procedural_job(task, code: str, job_id: str = ""):
  """Sandbox job calling the task's function on each test case (expected values stay outside)."""
  from kat_jax.sandbox import CallTest, Job
  tests = tuple(CallTest(name=f"test_{i}", function=task.entry_point, args=tuple(t.args),
                         expected=t.expected) for i, t in enumerate(task.tests))
  return Job(program=code, tests=tests, exports=(task.entry_point,),
             job_id=job_id or task.task_id)


def suite_pass_at_k(tasks: Mapping[str, Sequence[SampleRecord]], ks: Sequence[int]) -> dict:
  from kat_jax.eval.pass_at_k import mean_pass_at_k
  return mean_pass_at_k([len(r) for r in tasks.values()],
                        [sum(x.passed for x in r) for r in tasks.values()], ks)


def score_humaneval(completions: Mapping[str, Sequence[str]], ks: Sequence[int], pool,
                    problems=None, extras: Optional[Mapping[str, Sequence[dict]]] = None
                    ) -> SuiteResult:
  """Scores HumanEval completions (task_id -> completions of its prompt) in the sandbox."""
  from kat_jax.eval import humaneval
  problems = problems if problems is not None else humaneval.load_problems()
  results = humaneval.evaluate_humaneval(completions, ks=ks, pool=pool, problems=problems)
  tasks = {}
  for task_id, outcomes in results.results.items():
    tasks[task_id] = [
        SampleRecord(completion=c, passed=bool(r.passed), status=r.status,
                     tests_passed=r.num_passed, tests_total=len(r.tests),
                     **(extras[task_id][i] if extras else {}))
        for i, (c, r) in enumerate(zip(completions[task_id], outcomes))]
  return SuiteResult("humaneval", suite_pass_at_k(tasks, ks), tasks, results.seconds)


def score_procedural(tasks: Sequence[Any], completions: Mapping[str, Sequence[str]],
                     ks: Sequence[int], pool,
                     extras: Optional[Mapping[str, Sequence[dict]]] = None) -> SuiteResult:
  """Scores procedural tasks: ``completions`` maps task_id to assistant texts (code extracted)."""
  by_id = {t.task_id: t for t in tasks}
  jobs, owners = [], []
  for task_id, texts in completions.items():
    if task_id not in by_id:
      raise ValueError(f"completions for unknown procedural task {task_id!r}")
    for i, text in enumerate(texts):
      jobs.append(procedural_job(by_id[task_id], extract_code(text), f"{task_id}#{i}"))
      owners.append((task_id, i))
  start = time.perf_counter()
  outcomes = pool.map(jobs)
  seconds = time.perf_counter() - start
  records = collections.defaultdict(list)
  for (task_id, i), job, result in zip(owners, jobs, outcomes):
    records[task_id].append(SampleRecord(
        completion=job.program, passed=bool(result.passed), status=result.status,
        tests_passed=result.num_passed, tests_total=len(result.tests),
        **(extras[task_id][i] if extras else {})))
  records = {task_id: records[task_id] for task_id in completions}
  return SuiteResult("procedural", suite_pass_at_k(records, ks), records, seconds)


def format_table(results: Sequence[SuiteResult], ks: Sequence[int]) -> str:
  keys = [f"pass@{k}" for k in ks]
  lines = [f"{'suite':<12}{'tasks':>7}{'samples':>9}" + "".join(f"{k:>10}" for k in keys)]
  for r in results:
    cells = "".join(f"{r.pass_at_k[k]:>10.4f}" if k in r.pass_at_k else f"{'-':>10}"
                    for k in keys)
    lines.append(f"{r.suite:<12}{len(r.tasks):>7}{sum(len(x) for x in r.tasks.values()):>9}"
                 + cells)
  return "\n".join(lines)
