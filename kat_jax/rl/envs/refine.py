"""The ``refine`` environment: fix a failing program from its error report, over several rounds.

An episode starts from a program that fails its task's tests and the sandbox's report of that
failure; the model answers with a fixed function (``config.mode = "explain_refine"``: first an
explanation of the bug, then the code; ``"refine_only"``: the code), and *every* answer is graded
on all of the task's tests in the sandbox. A passing answer, or the ``config.max_rounds``-th,
ends the episode; otherwise the model sees its own failure — the new report — and tries again.
This is the refinement episode of LeDex's RL, and a multi-round one: the model sees its failure and
tries again. It differs from the ``code`` environment, where the model writes its first program
itself, tests it with ``run_tests`` and is graded once on ``submit``: here the starting program is
given, each round is a graded submission, and the round that first passes is recorded.

    env = envs.make("refine", {"mode": "explain_refine", "max_rounds": 3}, pool=pool)
    obs = env.reset(task)        # user turn: data.self_debug.debug_prompt(spec, code, error, mode)
    res = env.step(answer)       # graded; not passed and rounds left: res.observation = new report
    res.info["grade"]            # on the last step: Grade with details["round"], the explanation
                                 # and its score

Tasks: a ``RefineTask`` (a procedural ``Task`` or HumanEval ``Problem`` with the failing program,
optionally its report and a reference explanation — ``refine_task_of`` builds one from a
``data.self_debug`` record), or a bare procedural ``Task`` as the RL stage draws them: its failing
program is then a model-written one from ``config.records_path`` (self-debugging records) when
the file has one for the task, else one of its AST mutants (``config.buggy_source = "mutant"``,
chosen by the task id, so every row of a group starts from the same program) or a stub returning
None (``"stub"``). The report of a program given without one is computed in the sandbox at
``reset`` (the same ``self_debug.judge`` the synthesis and the evaluation use).

The grade reads like the code environment's (``prediction`` the graded program, ``reference`` the
reference solution, so ``codebleu`` and ``pass_rate`` rewards apply); ``details`` adds ``round``
(1-based), ``explanation``, ``explanation_score`` — the word-level F1 of the explanation against the
reference explanation (``config.explanation_reference = "oracle"``: ``self_debug``'s scripted
explainer on the starting program; 0 when there is none or in ``refine_only``) — and ``source``.
The ``refine`` reward (``refine_reward``, registered in ``kat_jax.rl.rewards``) is
``w_test · pass rate + w_codebleu · CodeBLEU + w_explanation · explanation score``, weights in
``config.rl.rollout.reward.refine`` (``default_refine_reward_config``).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import re
import threading
from typing import Any, Optional

import ml_collections

from kat_jax.data import self_debug
from kat_jax.data.chat import Message
from kat_jax.data.procedural import Task, buggy_variants
from kat_jax.errors import ConfigError
from kat_jax.rl.envs import base
from kat_jax.rl.envs.code import default_code_env_config
from kat_jax.rl.envs.tools import CONFIG_PATH, resolve_config, truncate

REFINE_MODES = ("explain_refine", "refine_only")
BUGGY_SOURCES = ("mutant", "stub")
EXPLANATION_REFERENCES = ("oracle", "none")
REWARD_PATH = "config.rl.rollout.reward.refine"
SYSTEM_PROMPT = ("You are an expert Python programmer. The user shows you a program that fails "
                 "its tests and the test output. Fix it; answer with the complete fixed "
                 "function in one ```python code block.")


def default_refine_env_config() -> ml_collections.ConfigDict:
  """Every knob of the ``refine`` environment (config.rl.env): the code environment's task and
  sandbox settings, plus the refinement ones."""
  c = default_code_env_config()
  c.visible_tests = 1000          # tests whose failures the report details (all of a task's)
  c.show_visible_tests = False    # the spec alone, as self-debugging prompts show it
  c.mode = "explain_refine"       # what an answer holds: explain_refine | refine_only
  c.max_rounds = 2                # graded answers per episode (rollout.max_turns >= this)
  c.buggy_source = "mutant"       # failing program of a bare Task without a record: mutant | stub
  c.records_path = ""             # data.self_debug records (JSONL): the model's failing programs
  c.explanation_reference = "oracle"   # reference explanation for the score: oracle | none
  return c


def default_refine_reward_config() -> ml_collections.ConfigDict:
  """The ``refine`` reward's section (config.rl.rollout.reward.refine)."""
  return ml_collections.ConfigDict(dict(
      w_test=0.8,          # weight of the fraction of tests the final answer passes
      w_codebleu=0.2,      # weight of CodeBLEU of the final answer vs the reference
      w_explanation=0.0,   # weight of the explanation score (grade.details["explanation_score"])
  ))


def _validate(c: ml_collections.ConfigDict) -> None:
  for field, allowed in (("mode", REFINE_MODES), ("buggy_source", BUGGY_SOURCES),
                         ("explanation_reference", EXPLANATION_REFERENCES)):
    if c[field] not in allowed:
      raise ConfigError(f"{CONFIG_PATH}.{field}={c[field]!r}: use one of {list(allowed)}")
  if c.max_rounds < 1:
    raise ConfigError(f"{CONFIG_PATH}.max_rounds={c.max_rounds} must be >= 1")
  if not c.tool_timeout_s > 0:
    raise ConfigError(f"{CONFIG_PATH}.tool_timeout_s={c.tool_timeout_s} must be > 0 seconds")


@dataclasses.dataclass(frozen=True)
class RefineTask:
  """A failing program to fix. ``error`` '' = computed in the sandbox at reset;
  ``reference_explanation`` '' = the oracle's (by config) or none."""
  task: Any                     # procedural Task | eval.humaneval.Problem
  buggy_code: str
  error: str = ""
  source: str = "given"
  reference_explanation: str = ""

  @property
  def task_id(self) -> str:
    return str(getattr(self.task, "task_id"))


def refine_task_of(record) -> RefineTask:
  """The ``RefineTask`` of a ``data.self_debug`` record: its buggy program and error (the
  record's explanation is the reference explanation when its refinement passed)."""
  return RefineTask(Task.from_json(record.task), record.buggy_code, record.error,
                    source=record.source,
                    reference_explanation=record.explanation if record.passed else "")


def explanation_score(explanation: str, reference: str) -> float:
  """Word-level F1 of ``explanation`` against ``reference`` (lowercased ``\\w+`` tokens, counted
  with multiplicity), in [0, 1]; 0 when either is empty."""
  ours = collections.Counter(re.findall(r"\w+", explanation.lower()))
  theirs = collections.Counter(re.findall(r"\w+", reference.lower()))
  common = sum((ours & theirs).values())
  if not common:
    return 0.0
  precision, recall = common / sum(ours.values()), common / sum(theirs.values())
  return 2 * precision * recall / (precision + recall)


# Shared across the environments of a run (one per rollout row): a task's mutants, a program's
# report and a records file, so a group's G resets cost one computation.
_CACHE_LOCK = threading.Lock()
_CACHE: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()
_CACHE_SIZE = 4096


def _cached(key, compute):
  with _CACHE_LOCK:
    if key in _CACHE:
      _CACHE.move_to_end(key)
      return _CACHE[key]
  value = compute()
  with _CACHE_LOCK:
    _CACHE[key] = value
    while len(_CACHE) > _CACHE_SIZE:
      _CACHE.popitem(last=False)
  return value


def _pick(items: list, task_id: str):
  digest = hashlib.sha256(task_id.encode()).digest()
  return items[int.from_bytes(digest[:8], "big") % len(items)]


def _records_by_task(path: str) -> dict:
  """task id -> the failing model programs of a records file, as (code, error) in file order."""
  def load():
    out: dict = collections.defaultdict(list)
    seen = set()
    for record in self_debug.read_records(path):
      key = (record.task_id, record.buggy_code)
      if record.source == "model" and key not in seen:
        seen.add(key)
        out[record.task_id].append((record.buggy_code, record.error))
    return dict(out)
  return _cached(("records", path), load)


def _stub(task: Task) -> str:
  return f"def {task.entry_point}({', '.join(task.arg_names)}):\n    return None\n"


class RefineEnv(base.Environment):
  """One refinement episode at a time over a shared ``SandboxPool`` (module docstring)."""

  tools = ()

  def __init__(self, config: Any = None, *, pool=None):
    self.config = resolve_config(config, default_refine_env_config())
    _validate(self.config)
    if pool is None:
      raise ValueError("the refine environment needs a sandbox: envs.make('refine', config, "
                       "pool=SandboxPool(...))")
    self.pool = pool
    timeout = self.config.tool_timeout_s
    self.limits = dataclasses.replace(pool.limits, wall_time_s=float(timeout),
                                      cpu_time_s=max(1, math.ceil(timeout)))
    self.task: Optional[RefineTask] = None
    self.code_task = None
    self.done, self.round = True, 0

  # -- episode ------------------------------------------------------------------------------

  def reset(self, task: Any) -> base.Observation:
    self.task = self._refine_task(task)
    self.code_task = self_debug.code_task(self.task.task, self.config)
    if not self.task.error:
      key = ("error", self.code_task.task_id, self.task.buggy_code,
             self.config.max_failures_shown, self.config.visible_tests, self.limits)
      error = _cached(key, lambda: self._judge(self.task.buggy_code).error)
      self.task = dataclasses.replace(
          self.task, error=error or "All tests passed (this program is not wrong).")
    if (not self.task.reference_explanation and self.config.explanation_reference == "oracle"
        and self.config.mode == "explain_refine"):
      self.task = dataclasses.replace(self.task, reference_explanation=(
          self_debug.oracle_explanation(self._shown(self.task.buggy_code),
                                        self.code_task.reference, self.task.error)))
    self.done, self.round = False, 0
    user = self_debug.debug_prompt(self.code_task.prompt, self._shown(self.task.buggy_code),
                                   truncate(self.task.error, self.config.max_observation_chars),
                                   self.config.mode)
    system = self.config.system_prompt or SYSTEM_PROMPT
    opening = ((Message("system", system),) if self.config.with_system_prompt else ()) + (
        Message("user", user),)
    return base.Observation(opening)

  def step(self, action: str) -> base.StepResult:
    if self.task is None or self.done:
      raise RuntimeError("RefineEnv.step() without an open episode: call reset(task) first (and "
                         "again after a step returned done=True)")
    self.round += 1
    explanation, code = self_debug.split_answer(action)
    verdict = self._judge(code)
    scored = self.config.mode == "explain_refine" and bool(self.task.reference_explanation)
    score = explanation_score(explanation, self.task.reference_explanation) if scored else 0.0
    grade = base.Grade(
        passed=verdict.passed, compiled=verdict.compiled, tests_passed=verdict.tests_passed,
        tests_total=verdict.tests_total, prediction=self.code_task.program(code),
        reference=self.code_task.reference,
        details={"task_id": self.code_task.task_id, "source": self.task.source,
                 "round": self.round, "explanation": explanation,
                 "explanation_score": score, "explanation_scored": scored,
                 "sandbox_status": verdict.status, "error": verdict.error})
    info = {"round": self.round, "passed": verdict.passed, "tests_passed": verdict.tests_passed}
    if verdict.passed or self.round >= self.config.max_rounds:
      self.done = True
      message = Message("user", f"Graded: {verdict.tests_passed} of {verdict.tests_total} tests "
                                f"passed.")
      return base.StepResult(base.Observation((message,)), True, base.SUBMITTED,
                             info={**info, "grade": grade})
    message = Message("user", self_debug.followup_message(
        truncate(verdict.error, self.config.max_observation_chars), self.config.mode))
    return base.StepResult(base.Observation((message,)), False, base.OK, info=info)

  def close(self) -> None:
    self.task, self.code_task, self.done = None, None, True

  # -- internals ----------------------------------------------------------------------------

  def _shown(self, code: str) -> str:
    """The program as the model is shown it (HumanEval: prompt + completion)."""
    return self.code_task.program(code)

  def _judge(self, code: str) -> self_debug.Verdict:
    return self_debug.judge(self.pool, [(self.code_task, code)],
                            max_failures=self.config.max_failures_shown, limits=self.limits)[0]

  def _refine_task(self, task: Any) -> RefineTask:
    if isinstance(task, RefineTask):
      return task
    if not isinstance(task, Task):
      raise TypeError(f"the refine environment runs a RefineTask or a procedural Task, not a "
                      f"{type(task).__name__}")
    if self.config.records_path:
      programs = _records_by_task(self.config.records_path).get(task.task_id)
      if programs:
        code, error = _pick(programs, task.task_id)
        return RefineTask(task, code, error, source="model")
    if self.config.buggy_source == "mutant":
      variants = _cached(("mutants", task.task_id, task.to_json()),
                         lambda: buggy_variants(task, max_variants=3))
      if variants:
        return RefineTask(task, _pick(variants, task.task_id).code, source="mutant")
    return RefineTask(task, _stub(task), source="stub")


def refine_reward(grade: Optional[base.Grade], cfg) -> dict:
  """``w_test · pass rate + w_codebleu · CodeBLEU + w_explanation · explanation score`` of the
  final answer (weights in ``cfg.refine``, CodeBLEU as the ``codebleu`` reward computes it from
  ``cfg.codebleu``): an empty or unparsable answer has CodeBLEU 0 and, failing to load, pass
  rate 0; never submitted (None) is 0 on every term."""
  from kat_jax.rl import rewards   # rewards registers this function at its end
  if "refine" not in cfg:
    raise ConfigError(f"{REWARD_PATH} is missing: add refine.default_refine_reward_config() "
                      "there (configs/rl_tiny_refine.py does)")
  section = cfg.refine
  weights = {}
  for term in ("test", "codebleu", "explanation"):
    field = f"w_{term}"
    if field not in section:
      raise ConfigError(f"{REWARD_PATH}.{field} is missing: start from "
                        "refine.default_refine_reward_config()")
    try:
      w = float(section[field])
    except (TypeError, ValueError):
      w = math.nan
    if not (math.isfinite(w) and w >= 0):
      raise ConfigError(f"{REWARD_PATH}.{field}={section[field]!r} must be a finite number >= 0")
    weights[term] = w
  terms = {"test": 0.0, "codebleu": float(rewards.codebleu(grade, cfg)["reward"]),
           "explanation": 0.0}
  if grade is not None:
    terms["test"] = float(grade.pass_fraction)
    terms["explanation"] = float(grade.details.get("explanation_score", 0.0))
  return {"reward": math.fsum(weights[t] * terms[t] for t in terms), **terms}


@base.register("refine")
def make_refine_env(config: Any = None, *, pool=None, **unused) -> RefineEnv:
  """Refinement rounds: the model fixes a failing program from its sandbox report."""
  return RefineEnv(config, pool=pool)
