"""Generating procedural tasks: deterministic from a seed, with a held-out split, and SFT conversations.

The split of a task is a hash of its (template, params) pair, so held-out tasks share no such pair
with training tasks at any level and no bookkeeping is needed across runs::

    train = generate_tasks(seed=0, num_tasks=2000, split="train", levels=(0, 1))
    heldout = generate_tasks(seed=0, num_tasks=200, split="heldout", levels=(0, 1))
    conv = task_to_conversation(train[0])            # user spec -> assistant code

``task_stream`` yields tasks forever (duplicates allowed, fresh test inputs) for training streams.
"""
from __future__ import annotations

import ast
import copy
import hashlib
import json
from typing import Iterator, Optional, Sequence

import numpy as np

from kat_jax.data.chat import Conversation, Message
from kat_jax.data.procedural.task import Task, TestCase, canonical
from kat_jax.data.procedural.templates import FAMILIES, KIND_WORDS, LEVELS, TEMPLATES, Template
from kat_jax.data.taxonomy import TaskLabel

SPLITS = ("train", "heldout")
TESTS_PER_LEVEL = {0: 3, 1: 4, 2: 5}
FUNCTION_LABEL = TaskLabel("feature_implementation", "application_development")
DEBUG_LABEL = TaskLabel("bug_fixing", "application_development")


def _hash_unit(*parts) -> float:
  """A deterministic number in [0, 1) from JSON-serializable parts (stable across processes)."""
  digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_of(template: str, params: Sequence, heldout_fraction: float = 0.1) -> str:
  """'heldout' for a ``heldout_fraction`` of (template, params) pairs, else 'train'."""
  return "heldout" if _hash_unit("split", template, list(params)) < heldout_fraction else "train"


def select_templates(families: Optional[Sequence[str]] = None,
                     names: Optional[Sequence[str]] = None) -> list[Template]:
  """Templates of the given families and/or names (all when both are empty)."""
  for family in families or ():
    if family not in FAMILIES:
      raise ValueError(f"unknown template family {family!r}: use some of {list(FAMILIES)}")
  known = {t.name for t in TEMPLATES}
  for name in names or ():
    if name not in known:
      raise ValueError(f"unknown template {name!r}: known templates are {sorted(known)}")
  return [t for t in TEMPLATES
          if (not families or t.family in families) and (not names or t.name in names)]


def make_task(template: Template, rng: np.random.Generator, level: int,
              num_tests: Optional[int] = None) -> Task:
  """One task from a template: reference solution in canonical form, edge tests then random ones."""
  if level not in LEVELS:
    raise ValueError(f"level {level} is not one of {LEVELS}")
  ctx, draft = template.draft(rng, level)
  source = f"def {ctx.fn}({', '.join(ctx.args)}):\n{draft.body}\n"
  solution = ast.unparse(ast.parse(source)) + "\n"
  num_tests = TESTS_PER_LEVEL[level] if num_tests is None else num_tests
  inputs: list[tuple] = []
  seen: set[str] = set()

  def add(args: tuple):
    key = canonical(list(args))
    if key not in seen:
      seen.add(key)
      inputs.append(tuple(args))

  for args in draft.edge_inputs:
    add(tuple(args))
  for _ in range(20 * num_tests):
    if len(inputs) >= len(draft.edge_inputs) + num_tests:
      break
    add(draft.sample_input())
  tests = []
  for args in inputs:
    expected = draft.oracle(*copy.deepcopy(args))
    if canonical(expected) is None:
      raise ValueError(f"template {template.name} produced a non-JSON expected value {expected!r}")
    tests.append(TestCase(args, expected))
  if level == 0:
    spec = f"Write {ctx.fn}({', '.join(ctx.args)}) that {draft.what}."
  elif level == 1:
    spec = f"Write a function {ctx.fn}({', '.join(ctx.args)}) that {draft.what}."
  else:
    takes = " and ".join(f"{KIND_WORDS[k]} {a}" for k, a in zip(template.arg_kinds, ctx.args))
    spec = (f"Define a Python function {ctx.fn}({', '.join(ctx.args)}). It takes {takes}, and "
            f"{draft.what_long or draft.what}.")
  key = [template.name, level, list(draft.params), ctx.fn, list(ctx.args)]
  task_id = f"{template.name}-L{level}-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:10]}"
  return Task(task_id, template.name, template.family, level, tuple(draft.params), ctx.fn,
              tuple(ctx.args), spec, solution, tuple(tests))


def _eligible(templates: Sequence[Template], level: int) -> list[Template]:
  return [t for t in templates if t.min_level <= level]


def task_stream(seed: int, *, split: str = "train", levels: Sequence[int] = (0,),
                families: Optional[Sequence[str]] = None, templates: Optional[Sequence[str]] = None,
                heldout_fraction: float = 0.1, level_weights: Optional[Sequence[float]] = None
                ) -> Iterator[Task]:
  """Endless tasks of one split (deterministic from ``seed``): template uniform among those
  available at the drawn level, level by ``level_weights`` (uniform by default)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction={heldout_fraction} must lie in (0, 1)")
  chosen = select_templates(families, templates)
  levels = list(levels)
  by_level = {lv: _eligible(chosen, lv) for lv in levels}
  empty = [lv for lv in levels if not by_level[lv]]
  if empty:
    raise ValueError(f"no selected template is available at levels {empty}")
  p = None if level_weights is None else np.asarray(level_weights, np.float64) / np.sum(level_weights)
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  while True:
    level = levels[int(rng.choice(len(levels), p=p))]
    pool = by_level[level]
    template = pool[int(rng.integers(len(pool)))]
    task = make_task(template, rng, level)
    if split_of(task.template, task.params, heldout_fraction) == split:
      yield task


def generate_tasks(seed: int, num_tasks: int, *, split: str = "train", levels: Sequence[int] = (0,),
                   families: Optional[Sequence[str]] = None,
                   templates: Optional[Sequence[str]] = None, heldout_fraction: float = 0.1,
                   unique: bool = True, max_draws: Optional[int] = None) -> list[Task]:
  """``num_tasks`` tasks of one split; with ``unique`` no two share a task id (template, level,
  params and names). Raises as soon as the parameter space looks exhausted: ``max_draws``
  (default ``max(5000, 20 * tasks found)``) draws in a row without a new task. Level 0 alone has
  about 1,070 distinct training and 130 held-out tasks (heldout_fraction 0.1); ask for more with
  more levels or ``unique=False`` (repeats with fresh test inputs)."""
  stream = task_stream(seed, split=split, levels=levels, families=families, templates=templates,
                       heldout_fraction=heldout_fraction)
  tasks, ids = [], set()
  since_new = 0
  for task in stream:
    if len(tasks) == num_tasks:
      return tasks
    if unique and task.task_id in ids:
      since_new += 1
      patience = max_draws or max(5000, 20 * len(tasks))
      if since_new >= patience:
        raise ValueError(
            f"found only {len(tasks)} distinct {split} tasks at levels {list(levels)} ({patience} "
            f"draws in a row gave no new task; asked for {num_tasks}); add levels or templates, "
            "lower num_tasks, or pass unique=False")
      continue
    since_new = 0
    ids.add(task.task_id)
    tasks.append(task)
  raise AssertionError("unreachable")


def task_to_conversation(task: Task, *, system: Optional[str] = None) -> Conversation:
  """SFT example: the spec as the user turn, the reference solution as the assistant turn."""
  messages = ([Message("system", system)] if system else []) + [
      Message("user", task.spec), Message("assistant", task.solution)]
  return Conversation(tuple(messages), label=FUNCTION_LABEL,
                      meta={"task_id": task.task_id, "source": "procedural"})


def debug_conversation(task: Task, buggy_code: str, feedback: str, *,
                       multi_turn: bool = True) -> Conversation:
  """Self-debugging example ending in the reference solution.

  ``multi_turn``: user spec → assistant buggy code (not trained) → user test output → assistant
  fix. Otherwise one user turn holds spec, buggy code and test output.
  """
  if multi_turn:
    messages = (Message("user", task.spec), Message("assistant", buggy_code, train=False),
                Message("user", f"Running the tests gives:\n{feedback}\nFix the function."),
                Message("assistant", task.solution))
  else:
    messages = (Message("user", f"{task.spec}\n\nThis code fails its tests:\n{buggy_code}\n"
                                f"Test output:\n{feedback}\nFix the function."),
                Message("assistant", task.solution))
  return Conversation(messages, label=DEBUG_LABEL,
                      meta={"task_id": task.task_id, "source": "procedural-debug"})
