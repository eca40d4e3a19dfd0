"""Procedural tasks: references pass, mutants fail, held-out split disjoint, determinism, levels,
conversations, repository tasks and the diff utilities."""
import ast
import collections
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as hst

from kat_jax.data import chat, procedural as P, special_tokens as st
from kat_jax.data.procedural.generate import make_task
from byte_tokenizer import ByteTokenizer


def exec_passes(program: str) -> bool:
  """Plain exec of a program of code + assert statements: True iff it runs without an exception."""
  try:
    exec(compile(program, "<program>", "exec"), {"__name__": "program"})
    return True
  except Exception:  # noqa: BLE001 - any failure of our own generated code is a failed test
    return False


@pytest.fixture(scope="module")
def tasks_by_template_level():
  rng = np.random.default_rng(123)
  return {(t.name, level): [make_task(t, rng, level) for _ in range(3)]
          for t in P.TEMPLATES for level in P.LEVELS if t.min_level <= level}


def test_inventory():
  assert len(P.TEMPLATES) >= 30 and len({t.name for t in P.TEMPLATES}) == len(P.TEMPLATES)
  assert {t.family for t in P.TEMPLATES} == set(P.FAMILIES)
  assert sum(t.min_level == 0 for t in P.TEMPLATES) >= 30


def test_every_reference_passes_its_tests(tasks_by_template_level):
  for tasks in tasks_by_template_level.values():
    for task in tasks:
      assert exec_passes(task.program(task.solution)), task
      assert P.run_tests(task.solution, task).all_passed, task
      assert task.solution == ast.unparse(ast.parse(task.solution)) + "\n"
      assert len(task.tests) >= 3 and all(P.canonical(t.expected) is not None for t in task.tests)


def test_every_buggy_variant_fails(tasks_by_template_level):
  for (name, level), tasks in tasks_by_template_level.items():
    task = tasks[0]
    variants = P.buggy_variants(task, max_variants=3)
    assert 1 <= len(variants) <= 3, (name, level)
    assert len({v.code for v in variants}) == len(variants)
    for v in variants:
      assert v.code != task.solution
      assert not exec_passes(task.program(v.code)), (name, v.mutation, v.code)
      failed = [t for t, ok in zip(task.tests, v.report.passed) if not ok]
      assert failed and str(len(failed)) in v.feedback.split(" of ")[0]
      # One single-site edit, formatted like the reference: exactly one line differs.
      ref_lines, bug_lines = task.solution.splitlines(), v.code.splitlines()
      assert len(ref_lines) == len(bug_lines)
      assert sum(a != b for a, b in zip(ref_lines, bug_lines)) == 1
    assert P.buggy_variants(task, max_variants=3) == variants  # deterministic


def test_runner_reports_failures_exactly():
  task = P.Task("t", "x", "arithmetic", 0, (1,), "f", ("x",), "spec", "def f(x):\n    return x + 1\n",
                (P.TestCase((1,), 2), P.TestCase((2,), True)))
  report = P.run_tests("def f(x):\n    return x + 1\n", task)
  assert report.passed == (True, False)  # 3 is not True, and 1 would not be True either
  assert report.failures == ("assert f(2) == True\nAssertionError: got 3",)
  report = P.run_tests("def f(x):\n    return True if x == 2 else 1 + x\n", task)
  assert report.passed == (True, True)
  report = P.run_tests("def f(x):\n    while True:\n        x += 1\n", task, max_steps=1000)
  assert report.passed == (False, False) and "did not finish" in report.failures[0]
  assert P.run_tests("def f(x:\n", task).error.startswith("SyntaxError")
  assert "'f' is not defined" in P.run_tests("def g(x):\n    return x\n", task).error
  report = P.run_tests("def f(x):\n    return 1 // (x - 1)\n", task)
  assert report.failures[0] == "f(1) raised ZeroDivisionError: integer division or modulo by zero"


def test_heldout_split_is_disjoint():
  levels = (0, 1, 2)
  train = P.generate_tasks(0, 400, split="train", levels=levels)
  heldout = P.generate_tasks(0, 80, split="heldout", levels=levels)
  pairs = lambda ts: {(t.template, t.params) for t in ts}
  assert not pairs(train) & pairs(heldout)
  assert all(P.split_of(t.template, t.params) == "train" for t in train)
  assert all(P.split_of(t.template, t.params) == "heldout" for t in heldout)
  assert len({t.task_id for t in train}) == 400
  # About a tenth of all (template, params) pairs are held out.
  rng = np.random.default_rng(0)
  drawn = {(t.name, make_task(t, rng, 2).params) for t in P.TEMPLATES for _ in range(40)}
  frac = np.mean([P.split_of(name, params) == "heldout" for name, params in drawn])
  assert 0.06 < frac < 0.14


def test_determinism_and_json():
  a = P.generate_tasks(7, 50, levels=(0, 2))
  assert a == P.generate_tasks(7, 50, levels=(0, 2))
  assert a != P.generate_tasks(8, 50, levels=(0, 2))
  assert all(P.Task.from_json(t.to_json()) == t for t in a)
  assert P.make_repo_task(3) == P.make_repo_task(3)
  repo = P.make_repo_task(3)
  assert P.RepoTask.from_json(repo.to_json()) == repo


def test_levels_shape_difficulty():
  by_level = {lv: P.generate_tasks(1, 150, levels=(lv,)) for lv in P.LEVELS}
  lvl0 = by_level[0]
  assert {t.entry_point for t in lvl0} == {"f"}
  assert set(a for t in lvl0 for a in t.arg_names) <= {"x", "y", "s", "xs", "d"}
  assert all(0 <= p <= 9 for t in lvl0 for p in t.params if isinstance(p, int))
  spec_len = {lv: np.mean([len(t.spec) for t in ts]) for lv, ts in by_level.items()}
  assert spec_len[0] <= 60 and max(len(t.spec) for t in lvl0) <= 90
  assert spec_len[0] < spec_len[1] < spec_len[2] and spec_len[2] >= 110
  assert {t.entry_point for t in by_level[1]} <= {t.name for t in P.TEMPLATES}
  assert len({t.entry_point for t in by_level[2]}) > 30
  assert any(p >= 10 for t in by_level[2] for p in t.params if isinstance(p, int))
  with pytest.raises(ValueError, match="found only"):
    P.generate_tasks(0, 50, levels=(0,), templates=["add_const"], max_draws=500)
  with pytest.raises(ValueError, match="unknown template family"):
    P.generate_tasks(0, 5, families=["graphs"])


def test_families_select_templates():
  tasks = P.generate_tasks(2, 40, levels=(1,), families=["strings", "dicts"])
  assert {t.family for t in tasks} == {"strings", "dicts"}


def test_conversations_train_on_the_right_tokens():
  tok = ByteTokenizer()
  task = P.generate_tasks(0, 1, levels=(0,))[0]
  ex = chat.render(P.task_to_conversation(task), tok)
  assert tok.decode(ex.tokens[ex.loss_mask]) == task.solution + st.IM_END
  assert ex.labels.task_type == "feature_implementation"
  variant = P.buggy_variants(task)[0]
  for multi_turn in (True, False):
    conv = P.debug_conversation(task, variant.code, variant.feedback, multi_turn=multi_turn)
    ex = chat.render(conv, tok)
    # Only the fix is a target; the buggy attempt (train=False) and the feedback are context.
    assert tok.decode(ex.tokens[ex.loss_mask]) == task.solution + st.IM_END
    assert variant.code in tok.decode(ex.tokens) and variant.feedback in tok.decode(ex.tokens)
    assert ex.labels.task_type == "bug_fixing"


@pytest.mark.parametrize("seed, level, modules, per_module", [(0, 1, 2, 2), (1, 2, 3, 1), (2, 1, 1, 3)])
def test_repo_task_grading(seed, level, modules, per_module):
  task = P.make_repo_task(seed, level=level, num_modules=modules, functions_per_module=per_module)
  assert task.fail_to_pass and not set(task.fail_to_pass) & set(task.pass_to_pass)
  assert sum(p.endswith(".py") and not p.startswith("tests/") for p in task.files) == modules + 1
  ids = task.fail_to_pass + task.pass_to_pass
  before = P.run_repo_tests(P.apply_patch(task.files, task.test_patch), ids)
  assert not any(before[t] for t in task.fail_to_pass) and all(before[t] for t in task.pass_to_pass)
  after = P.run_repo_tests(P.apply_patch(P.apply_patch(task.files, task.gold_patch), task.test_patch), ids)
  assert all(after.values())
  # Only the hidden tests reveal the bug: the shipped tests all pass on the buggy repository.
  shipped = [t for t in task.pass_to_pass]
  assert all(P.run_repo_tests(task.files, shipped).values())
  assert f"`{task.entry_point}`" in task.issue and task.bug_file in task.gold_patch


def test_patches_apply_with_git_too(tmp_path):
  if shutil.which("git") is None:
    pytest.skip("git is not installed")
  task = P.make_repo_task(4)
  for path, content in task.files.items():
    os.makedirs(tmp_path / os.path.dirname(path), exist_ok=True)
    (tmp_path / path).write_text(content)
  for patch in (task.gold_patch, task.test_patch):
    subprocess.run(["git", "apply", "-"], input=patch, text=True, cwd=tmp_path, check=True)
  expected = P.apply_patch(P.apply_patch(task.files, task.gold_patch), task.test_patch)
  for path, content in expected.items():
    assert (tmp_path / path).read_text() == content


lines = hst.lists(hst.sampled_from(["a\n", "b\n", "c\n", "def f():\n", "    return 1\n", "\n", "--- x\n"]), max_size=12)
files = hst.dictionaries(hst.sampled_from(["a.py", "pkg/b.py", "c.txt"]),
                         hst.tuples(lines, hst.booleans()).map(lambda lb: "".join(lb[0]) + ("tail" if lb[1] else "")),
                         max_size=3)


@settings(max_examples=150, deadline=None)
@given(files, files)
def test_diff_then_apply_is_identity(old, new):
  patch = P.make_diff(old, new)
  assert P.apply_patch(old, patch) == new
  assert (patch == "") == (old == new)


def test_apply_patch_errors():
  with pytest.raises(P.PatchError, match="not in the repository"):
    P.apply_patch({}, P.make_diff({"a.py": "x\n"}, {"a.py": "y\n"}))
  with pytest.raises(P.PatchError, match="a.py: hunk 1"):
    P.apply_patch({"a.py": "z\n"}, P.make_diff({"a.py": "x\n"}, {"a.py": "y\n"}))
