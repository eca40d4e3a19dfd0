"""Three-mode evaluation (kat_jax.eval.refinement): a model that copies the canonical solution
scores pass@k = 1 in every mode; one that returns its input unchanged refines to exactly its
initial pass@k; a buggy first attempt fixed by a refiner is 1 after refinement; multi-round success
is counted by the round that fixed a sample; the refinement prompts carry the sandbox's real
failure report; the markdown table and the CLI's mode checks."""
import numpy as np
import pytest

from kat_jax.data import chat, procedural, self_debug
from kat_jax.data.generator import ScriptedGenerator
from kat_jax.eval import humaneval, refinement
from kat_jax.eval.pass_at_k import pass_at_k
from kat_jax.sandbox import Limits, SandboxPool

LIMITS = Limits(wall_time_s=10.0, cpu_time_s=5)
KS = (1, 2)
N = 3


@pytest.fixture(scope="module")
def pool():
  with SandboxPool(num_workers=2, limits=LIMITS) as sandbox_pool:
    yield sandbox_pool


@pytest.fixture(scope="module")
def suites():
  tasks = procedural.generate_tasks(seed=0, num_tasks=3, split="heldout", levels=(0,))
  tasks = [t for t in tasks if procedural.buggy_variants(t, max_variants=1)]
  problems = humaneval.load_problems()
  chosen = [problems["HumanEval/0"], problems["HumanEval/2"]]
  return {"procedural": (tasks, refinement.procedural_eval_tasks(tasks)),
          "humaneval": (chosen, refinement.humaneval_eval_tasks(chosen))}


def _wrong(task):
  """A failing first attempt: a mutant (procedural) or a body returning None (HumanEval)."""
  if isinstance(task, procedural.Task):
    return "```python\n" + procedural.buggy_variants(task, max_variants=1)[0].code + "```"
  return "    return None\n"


def _right(task):
  if isinstance(task, procedural.Task):
    return "```python\n" + task.solution + "```"
  return task.canonical_solution


def initial_model(raw_tasks, correct):
  """Answers a task's initial prompt with its reference iff ``correct(task_index, sample)``."""
  by_prompt = {t.spec if isinstance(t, procedural.Task) else t.prompt: (i, t)
               for i, t in enumerate(raw_tasks)}

  def respond(prompt, j):
    i, task = by_prompt[prompt]
    return _right(task) if correct(i, j) else _wrong(task)

  return ScriptedGenerator(respond, name="initial")


def _evaluate(name, suites, pool, initial, refiner, rounds=1):
  raw, tasks = suites[name]
  return refinement.evaluate_suite(name, tasks, pool, refiner=refiner, num_samples=N, ks=KS,
                                   rounds=rounds, initial_generator=initial)


@pytest.mark.parametrize("name", ["procedural", "humaneval"])
def test_canonical_copier_scores_one_in_every_mode(suites, pool, name):
  raw, _ = suites[name]
  result = _evaluate(name, suites, pool, initial_model(raw, lambda i, j: True),
                     self_debug.reference_refiner(raw))
  assert set(result.pass_at_k) == set(refinement.MODES)
  for mode in refinement.MODES:
    assert result.pass_at_k[mode] == {"pass@1": 1.0, "pass@2": 1.0}
  # Every first attempt wrong: refinement by the same copier fixes all of them in round 1.
  fixed = _evaluate(name, suites, pool, initial_model(raw, lambda i, j: False),
                    self_debug.reference_refiner(raw))
  assert fixed.pass_at_k["initial"] == {"pass@1": 0.0, "pass@2": 0.0}
  for mode in ("refine", "explain_refine"):
    assert fixed.pass_at_k[mode] == {"pass@1": 1.0, "pass@2": 1.0}
    (entry,) = fixed.by_round[mode]
    assert entry["fixed"] == entry["failing"] == len(raw) * N and entry["fixed_fraction"] == 1.0


@pytest.mark.parametrize("name", ["procedural", "humaneval"])
def test_unchanged_input_refines_to_the_initial_pass_rate(suites, pool, name):
  raw, _ = suites[name]
  correct = lambda i, j: (i + j) % 3 == 0     # 1 of 3 samples right, at a different index per task
  result = _evaluate(name, suites, pool, initial_model(raw, correct), self_debug.copy_refiner(),
                     rounds=2)
  want = {f"pass@{k}": float(np.mean([pass_at_k(N, 1, k) for _ in raw])) for k in KS}
  assert result.pass_at_k["initial"] == pytest.approx(want)
  assert 0 < want["pass@1"] < 1
  for mode in ("refine", "explain_refine"):
    assert result.pass_at_k[mode] == result.pass_at_k["initial"]
    assert [e["fixed"] for e in result.by_round[mode]] == [0, 0]
    for task_id, rows in result.samples.items():
      for row in rows:
        if not row["initial"]["passed"]:      # two graded rounds, both failing, code unchanged
          assert [r["passed"] for r in row[mode]["rounds"]] == [False, False]
          assert row[mode]["final_code"].strip() in {row["initial"]["code"].strip(),
                                                    _program(suites, name, task_id, row)}


def _program(suites, name, task_id, row):
  _, tasks = suites[name]
  task = next(t for t in tasks if t.task_id == task_id)
  return task.code_task.program(row["initial"]["code"]).strip()


def test_success_by_round_and_real_error_messages(suites, pool):
  raw, tasks = suites["procedural"]
  seen = []

  def second_round_fix(prompt, j):
    seen.append(prompt)
    if isinstance(prompt, str):               # round 1: the buggy code back
      return self_debug.copy_refiner().respond(prompt, j)
    return self_debug.reference_refiner(raw).respond(prompt, j)

  result = _evaluate("procedural", suites, pool, initial_model(raw, lambda i, j: j == 0),
                     ScriptedGenerator(second_round_fix), rounds=3)
  failing = len(raw) * (N - 1)
  for mode in ("refine", "explain_refine"):
    assert [(e["round"], e["fixed"], e["failing"]) for e in result.by_round[mode]] == [
        (1, 0, failing), (2, failing, failing), (3, failing, failing)]
    assert result.pass_at_k[mode] == result.pass_at_k["initial"]      # after round 1
    assert result.by_round[mode][1]["pass@1"] == 1.0
  # Round-1 prompts show the buggy program and the sandbox's own report of it.
  first = [p for p in seen if isinstance(p, str)]
  assert len(first) == 2 * failing
  mutant = procedural.buggy_variants(raw[0], max_variants=1)[0].code
  (verdict,) = self_debug.judge(pool, [(tasks[0].code_task, mutant)])
  prompt = next(p for p in first if raw[0].spec in p and p.endswith(
      self_debug.INSTRUCTIONS["refine_only"]))
  spec, code, error, _, mode = self_debug.parse_debug_prompt(prompt)
  assert (spec, code, error, mode) == (raw[0].spec, mutant, verdict.error, "refine_only")
  assert "expected:" in error and "FAILED test_" in error
  # Round-2 prompts are the conversation so far: the answer, then the new report.
  later = [p for p in seen if isinstance(p, chat.Conversation)]
  assert [m.role for m in later[0].messages] == ["user", "assistant", "user"]
  assert later[0].messages[2].content.startswith(self_debug.ROUND_INTRO)


def test_markdown_table_and_argument_errors(suites, pool):
  raw, tasks = suites["procedural"]
  result = _evaluate("procedural", suites, pool, initial_model(raw, lambda i, j: j == 0),
                     self_debug.reference_refiner(raw), rounds=2)
  table = refinement.markdown_table([result], KS, title="step 7")
  p1 = result.pass_at_k["initial"]["pass@1"]
  assert f"| procedural | initial | {p1:.4f} | {result.pass_at_k['initial']['pass@2']:.4f} |" \
      in table
  assert "| procedural | explain_refine | 1.0000 | 1.0000 |" in table
  assert f"| procedural | refine | 2 | {len(raw) * 2} / {len(raw) * 2} | 1.0000 | 1.0000 |" in table
  assert table.startswith("### step 7")
  with pytest.raises(ValueError, match="unknown evaluation modes"):
    refinement.evaluate_suite("x", tasks, pool, modes=("refine_twice",))
  with pytest.raises(ValueError, match="pass a refiner"):
    refinement.evaluate_suite("x", tasks, pool, modes=("refine",), initial_texts=[["x"]] * 3)
  with pytest.raises(ValueError, match="pass@2 needs at least 2"):
    refinement.evaluate_suite("x", tasks, pool, ks=(1, 2), num_samples=1)
  from experiments import eval as eval_cli
  with pytest.raises(ValueError, match="--modes="):
    eval_cli.run_eval(None, "/nonexistent", modes=("initial", "debug"))
  with pytest.raises(ValueError, match="--refine_rounds=0"):
    eval_cli.run_eval(None, "/nonexistent", modes=("refine",), refine_rounds=0)


@pytest.mark.slow
def test_eval_cli_modes_on_a_tiny_checkpoint(tmp_path):
  import json
  import os
  import subprocess
  import sys
  from tests.test_eval_cli import REPO, _check_consistent, _tiny_checkpoint
  workdir = str(tmp_path / "run")
  overrides = _tiny_checkpoint(workdir, str(tmp_path / "data"))
  cmd = [sys.executable, "-m", "experiments.eval", "--config=configs/synthetic_tiny.py",
         f"--workdir={workdir}", "--num_samples=2", "--ks=1,2", "--temperature=1.0",
         "--max_new_tokens=16", "--limit=2", "--batch_size=4", "--sandbox_workers=2",
         "--modes=initial,refine,explain_refine", "--refine_rounds=2",
         "--refine_max_len=1536", *overrides]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                        env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "eval", "step_2.json")) as f:
    report = json.load(f)
  with open(os.path.join(workdir, "eval", "step_2.md")) as f:
    assert f.read() == report["markdown"]
  assert report["markdown"] in proc.stdout
  for name, suite in report["suites"].items():
    _check_consistent(suite, (1, 2))
    modes = report["modes"][name]
    assert set(modes["pass_at_k"]) == set(refinement.MODES)
    # The modes' initial grading is the suite's own: same verdicts, same pass@k.
    assert modes["pass_at_k"]["initial"] == pytest.approx(suite["pass_at_k"])
    verdicts = {t["task_id"]: [s["passed"] for s in t["samples"]] for t in suite["tasks"]}
    assert {k: [r["initial"]["passed"] for r in rows] for k, rows in modes["samples"].items()} \
        == verdicts
    for mode in ("refine", "explain_refine"):
      assert [e["round"] for e in modes["by_round"][mode]] == [1, 2]
      # A refinement never makes pass@k worse (passing samples are kept as they are).
      for k in ("pass@1", "pass@2"):
        assert modes["pass_at_k"][mode][k] >= modes["pass_at_k"]["initial"][k]
