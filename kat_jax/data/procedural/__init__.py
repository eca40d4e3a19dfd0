"""Procedural verifiable tasks: the learning signal of the embedded default (a tiny model on a CPU).

Python function-writing tasks with a natural-language spec, a reference solution and unit tests as
data, from 51 templates in six families and three difficulty levels (``templates``); a held-out
split sharing no (template, params) pair with training (``generate``); buggy variants with their
failing test output for self-debugging (``bugs``); and small multi-file repositories with an issue,
FAIL_TO_PASS / PASS_TO_PASS tests and a gold patch for the SWE-style environment (``repos``).
Everything is deterministic from a seed::

    from kat_jax.data import procedural
    tasks = procedural.generate_tasks(seed=0, num_tasks=1000, split="train", levels=(0,))
    procedural.run_tests(tasks[0].solution, tasks[0]).all_passed          # True
    conv = procedural.task_to_conversation(tasks[0])                      # for SFT (chat.render)
    bugs = procedural.buggy_variants(tasks[0])                            # self-debugging data
    repo = procedural.make_repo_task(seed=0)                              # SWE-style task
"""
from kat_jax.data.procedural.bugs import BuggyVariant, buggy_variants, mutants
from kat_jax.data.procedural.generate import (SPLITS, debug_conversation, generate_tasks, make_task,
                                              select_templates, split_of, task_stream,
                                              task_to_conversation)
from kat_jax.data.procedural.repos import (PatchError, RepoTask, apply_patch, make_diff,
                                           make_repo_task, run_repo_tests)
from kat_jax.data.procedural.task import Task, TestCase, TestReport, canonical, run_tests
from kat_jax.data.procedural.templates import FAMILIES, LEVELS, TEMPLATES, Template
