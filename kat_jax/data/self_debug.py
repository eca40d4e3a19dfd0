"""Self-debugging data from the model's own mistakes (LeDex): sample, keep the failures with their
real error output, explain, refine, keep what passes.

For each training task (``data.procedural``), ``synthesize`` asks the *programmer* (a
``generator.TextGenerator``: a checkpoint through the KV-cache sampler) for
``samples_per_task`` programs, runs every one in the sandbox on all of the task's tests and keeps
the failing ones with the sandbox's failure report (the same report the ``code`` environment's
``run_tests`` gives: failing call, expected value, error; load errors, time-outs). AST mutants of
the reference solution (``procedural.bugs``) join as a second source, labelled ``"mutant"``, run
through the same sandbox. The *explainer* (the same checkpoint, an imported Hugging Face model, or
the scripted ``oracle`` explainer of the tiny chain) is asked where and why each program is wrong;
the *refiner* writes a fixed program conditioned on the code, the error and the explanation; the
refinement runs in the sandbox. Every refinement becomes a ``SelfDebugRecord`` (prompt, buggy
code, error, explanation, refinement, test outcome, lineage): the passing ones are SFT data
(``sft_conversation`` in the ``explain_refine`` or ``refine_only`` format), the failing ones too
are kept for RL::

    tasks = procedural.generate_tasks(seed=0, num_tasks=64, split="train")
    programmer = generator.from_checkpoint(run_config, workdir, temperature=0.8)
    result = synthesize(tasks, programmer, pool, default_self_debug_config(),
                        explainer=oracle_explainer(tasks))
    result.counts     # {"sampled", "failing", "explained", "refined", "passing", "by_source": ...}
    write_records(result.records, "self_debug.jsonl")
    convs = [sft_conversation(r, "explain_refine") for r in result.records if r.passed]

The prompts (``debug_prompt``) are shared with the ``refine`` RL environment and the refinement
modes of ``experiments.eval``, so a model is trained, rewarded and evaluated on one layout::

    {spec}

    This program fails its tests:
    ```python
    {code}```
    Running the tests gives:
    {error}

    [Explanation of the bug:
    {explanation}

    ]{instruction of the mode}

Modes: ``explain`` (explanation only), ``refine_only`` (fixed function), ``explain_refine``
(explanation, then the fixed function: one answer), ``refine_with_explanation`` (the fix, given
an explanation in the prompt). A later round of a multi-round refinement is a user turn
``followup_message(error, mode)`` after the previous answer.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import os
import tempfile
from typing import Any, Mapping, Optional, Sequence

import ml_collections
from absl import logging

from kat_jax.data import chat
from kat_jax.data import generator as generator_lib
from kat_jax.data.procedural import Task, buggy_variants
from kat_jax.data.procedural.generate import DEBUG_LABEL

CONFIG_PATH = "self_debug"   # how errors name this config's fields
SOURCES = ("model", "mutant")
MODES = ("explain", "refine_only", "explain_refine", "refine_with_explanation")
SFT_FORMATS = ("explain_refine", "refine_only")
CODE_INTRO = "This program fails its tests:"
ERROR_INTRO = "Running the tests gives:"
EXPLANATION_INTRO = "Explanation of the bug:"
ROUND_INTRO = "Running the tests on your fix gives:"
_FIX = "answer with the complete fixed function in one ```python code block."
INSTRUCTIONS = {
    "explain": "Explain the bug: say which line is wrong and why. Do not write code.",
    "refine_only": "Fix the program: " + _FIX,
    "explain_refine": "First explain the bug (which line is wrong and why), then " + _FIX,
    "refine_with_explanation": "Fix the program as the explanation says: " + _FIX,
}
RECORDS_FILE = "records.jsonl"
SFT_FILE = "sft_{format}.jsonl"
DEFAULT_OUT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "kat_jax", "self_debug")


def default_self_debug_config() -> ml_collections.ConfigDict:
  """Every knob of the synthesis (experiments/make_self_debug_data.py)."""
  c = ml_collections.ConfigDict()
  c.seed = 0                      # task draws and the generators' sampling keys
  c.split = "train"               # procedural split of the tasks (train | heldout)
  c.num_tasks = 64                # procedural tasks
  c.levels = "0"                  # their difficulty levels
  c.families = ""                 # their template families ('' = all)
  c.heldout_fraction = 0.1        # of the procedural (template, params) pairs
  c.sources = "model,mutant"      # where buggy programs come from (SOURCES)
  c.samples_per_task = 8          # programs sampled per task from the programmer
  c.temperature = 0.8             # sampling temperature of the model-backed generators
  c.top_p = 1.0                   # nucleus mass of the model-backed generators
  c.max_new_tokens = 256          # tokens per generated program / explanation / refinement
  c.batch_size = 16               # sampled rows per decode batch
  c.max_len = 1024                # KV-cache slots of the sampler (prompt + generated tokens)
  c.dedupe_failing = True         # keep one copy of identical failing programs of a task
  c.max_failing_per_task = 4      # failing model samples kept per task (0 = all)
  c.mutants_per_task = 2          # mutant programs per task (source "mutant"; 0 = none)
  c.explainer = "scripted:oracle"   # same | hf:<dir> | scripted:oracle
  c.refiner = "same"              # same | hf:<dir> | scripted:reference | scripted:copy
  c.explanations_per_program = 1  # explanations asked per failing program
  c.refinements_per_explanation = 1   # refinements asked per explanation
  c.max_failures_shown = 3        # failing tests detailed in an error report
  c.workers = 2                   # sandbox pool workers
  return c


def _validate(c: ml_collections.ConfigDict) -> None:
  sources = [s.strip() for s in c.sources.split(",") if s.strip()]
  unknown = sorted(set(sources) - set(SOURCES))
  if unknown or not sources:
    raise ValueError(f"{CONFIG_PATH}.sources={c.sources!r}: use a comma-separated subset of "
                     f"{list(SOURCES)}")
  for field, low in (("num_tasks", 1), ("samples_per_task", 0), ("max_failing_per_task", 0),
                     ("mutants_per_task", 0), ("explanations_per_program", 1),
                     ("refinements_per_explanation", 1), ("max_failures_shown", 1),
                     ("max_new_tokens", 1), ("batch_size", 1)):
    if c[field] < low:
      raise ValueError(f"{CONFIG_PATH}.{field}={c[field]} must be >= {low}")


def sources_of(c: ml_collections.ConfigDict) -> list[str]:
  return [s.strip() for s in c.sources.split(",") if s.strip()]


# -- prompts -------------------------------------------------------------------------------------


def _fenced(code: str) -> str:
  return "```python\n" + (code if code.endswith("\n") else code + "\n") + "```"


def debug_prompt(spec: str, code: str, error: str, mode: str,
                 explanation: Optional[str] = None) -> str:
  """The user turn that asks for an explanation and/or a fix of ``code`` (module docstring)."""
  if mode not in MODES:
    raise ValueError(f"unknown self-debugging mode {mode!r}: use one of {list(MODES)}")
  if (explanation is not None) != (mode == "refine_with_explanation"):
    raise ValueError(f"mode {mode!r} {'needs' if explanation is None else 'takes no'} an "
                     "explanation (only refine_with_explanation is conditioned on one)")
  parts = [spec.strip(), "", CODE_INTRO, _fenced(code), ERROR_INTRO, error.strip(), ""]
  if explanation is not None:
    parts += [EXPLANATION_INTRO, explanation.strip(), ""]
  parts.append(INSTRUCTIONS[mode])
  return "\n".join(parts)


def parse_debug_prompt(text: str) -> tuple[str, str, str, Optional[str], Optional[str]]:
  """(spec, code, error, explanation or None, mode or None) of a ``debug_prompt`` text."""
  head, sep, rest = text.partition("\n\n" + CODE_INTRO + "\n```python\n")
  if not sep:
    raise ValueError(f"not a self-debugging prompt (no {CODE_INTRO!r} section): {text[:120]!r}")
  code, sep, rest = rest.partition("```\n" + ERROR_INTRO + "\n")
  if not sep:
    raise ValueError(f"not a self-debugging prompt (no {ERROR_INTRO!r} section)")
  mode = next((m for m, instruction in INSTRUCTIONS.items() if rest.endswith(instruction)), None)
  body = rest[:len(rest) - len(INSTRUCTIONS[mode])] if mode else rest
  explanation = None
  error, sep, tail = body.partition("\n\n" + EXPLANATION_INTRO + "\n")
  if sep:
    explanation = tail.strip()
  return head, code, error.strip(), explanation, mode


def followup_message(error: str, mode: str) -> str:
  """The user turn of a later refinement round: the new failure report and the instruction."""
  if mode not in ("refine_only", "explain_refine"):
    raise ValueError(f"a refinement round is refine_only or explain_refine, not {mode!r}")
  return f"{ROUND_INTRO}\n{error.strip()}\n\n{INSTRUCTIONS[mode]}"


def answer_text(mode: str, code: str, explanation: str = "") -> str:
  """The assistant turn of a fix: the fenced code, after the explanation in ``explain_refine``."""
  if mode == "explain_refine":
    if not explanation.strip():
      raise ValueError("an explain_refine answer needs a non-empty explanation")
    return explanation.strip() + "\n\n" + _fenced(code)
  if mode in ("refine_only", "refine_with_explanation"):
    return _fenced(code)
  raise ValueError(f"mode {mode!r} has no code answer: use one of {list(SFT_FORMATS)}")


def split_answer(text: str) -> tuple[str, str]:
  """(explanation, code) of an answer: the prose before the first code fence, and the code
  (first fenced block, else the whole text; ``eval.scoring.extract_code``)."""
  from kat_jax.eval.scoring import extract_code
  text = generator_lib.cut_at_end(text)
  explanation = text.split("```", 1)[0].strip() if "```" in text else ""
  return explanation, extract_code(text)


# -- judging in the sandbox ------------------------------------------------------------------------


def code_env_config(max_failures_shown: int = 3) -> ml_collections.ConfigDict:
  """The code environment's task adapter settings self-debugging uses: every test is a
  feedback test (its failure is reported with call and expected value), none listed in the
  spec."""
  from kat_jax.rl.envs.code import default_code_env_config
  c = default_code_env_config()
  c.visible_tests = 1000
  c.show_visible_tests = False
  c.max_failures_shown = max_failures_shown
  return c


def code_task(task, config: Optional[ml_collections.ConfigDict] = None):
  """The ``rl.envs.code.CodeTask`` of a procedural Task or HumanEval Problem: spec (``prompt``),
  reference, jobs for a piece of code and ``program(code)`` as graded."""
  from kat_jax.rl.envs import code as code_env
  adapter = code_env.ADAPTERS.get(type(task))
  if adapter is None:
    raise TypeError(f"cannot judge a task of type {type(task).__name__}: use one of "
                    f"{[t.__name__ for t in code_env.ADAPTERS]}")
  return adapter(task, config if config is not None else code_env_config())


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The sandbox's outcome of one program on all of a task's tests."""
  passed: bool
  tests_passed: int
  tests_total: int
  compiled: bool
  status: str                 # sandbox status of the graded run
  error: str                  # the failure report shown to a model ('' when passed)

  @property
  def pass_rate(self) -> float:
    return self.tests_passed / self.tests_total if self.tests_total else float(self.passed)


def failure_report(hidden, visible, task, *, max_failures: int, time_limit_s: float) -> str:
  """The report of a failing program: ``code.test_report`` of the feedback run (failing calls,
  expected values, errors, load errors, limits), plus the graded run's count when the feedback
  tests all passed or the task has none (a HumanEval ``check`` with no plain asserts)."""
  from kat_jax.rl.envs import code as code_env
  lines = []
  if visible is not None and task.visible:
    _, text = code_env.test_report(visible, task.visible, max_failures=max_failures,
                                   time_limit_s=time_limit_s)
    lines.append(text)
    if not visible.passed or not code_env.module_loaded(visible):
      return "\n".join(lines)
  if hidden.load_error_type is not None:
    lines.append(f"Your program failed to load:\n{hidden.load_error_type}: {hidden.load_error}")
  else:
    lines.append(f"{len(hidden.tests) - hidden.num_passed} of {len(hidden.tests)} tests failed.")
    for outcome in [o for o in hidden.tests if not o.passed][:max_failures]:
      lines.append(f"FAILED {outcome.name}: {outcome.error_type}"
                   + (f": {outcome.error}" if outcome.error else ""))
  return "\n".join(lines)


def judge(pool, items: Sequence[tuple[Any, str]], *, max_failures: int = 3,
          limits=None) -> list[Verdict]:
  """Verdicts of ``(CodeTask, code)`` pairs: every program graded on all tests in the sandbox
  (one batch), the failing ones run again on the feedback tests for their report. ``limits``
  (a ``sandbox.Limits``) overrides the pool's for these jobs."""
  from kat_jax.rl.envs import code as code_env
  if not items:
    return []
  limited = (lambda job: job) if limits is None else (
      lambda job: dataclasses.replace(job, limits=limits))
  hidden = pool.map([limited(task.hidden_job(code)) for task, code in items])
  failing = [i for i, r in enumerate(hidden) if not r.passed]
  with_visible = [i for i in failing if items[i][0].visible]
  visible = dict(zip(with_visible, pool.map([limited(items[i][0].visible_job(items[i][1]))
                                             for i in with_visible])))
  time_limit_s = (limits or pool.limits).wall_time_s
  out = []
  for i, ((task, _), result) in enumerate(zip(items, hidden)):
    error = "" if result.passed else failure_report(
        result, visible.get(i), task, max_failures=max_failures, time_limit_s=time_limit_s)
    out.append(Verdict(passed=bool(result.passed), tests_passed=result.num_passed,
                       tests_total=len(result.tests), compiled=code_env.module_loaded(result),
                       status=result.status, error=error))
  return out


# -- scripted generators (tests, the tiny chain) -----------------------------------------------


def _meaningful(code: str) -> list[tuple[int, str]]:
  """(1-based line number, stripped text) of the non-blank lines."""
  return [(n, line.strip()) for n, line in enumerate(code.split("\n"), start=1) if line.strip()]


def _why(error: str) -> str:
  lines = [l.strip() for l in error.split("\n") if l.strip()]
  failed = next((l for l in lines if l.startswith("FAILED ")), None)
  detail = next((l for l in lines if "Error" in l.split(":", 1)[0]), None)
  if failed and detail and detail != failed:
    return f"{failed.split(': ', 1)[-1]} fails with {detail}"
  return detail or failed or (lines[0] if lines else "the tests fail")


def oracle_explanation(code: str, reference: str, error: str) -> str:
  """Where and why ``code`` is wrong, from its line diff against ``reference`` and the failure
  report: the scripted explainer of the tiny chain (a teacher that knows the answer)."""
  ours, theirs = _meaningful(code), _meaningful(reference)
  matcher = difflib.SequenceMatcher(None, [t for _, t in ours], [t for _, t in theirs],
                                    autojunk=False)
  changes = [op for op in matcher.get_opcodes() if op[0] != "equal"]
  why = _why(error)
  if not changes:
    return f"The code matches a correct solution line by line; the failure is: {why}."
  tag, i1, i2, j1, j2 = changes[0]
  if tag == "replace":
    where = (f"Line {ours[i1][0]} `{ours[i1][1]}` is wrong: it should be `{theirs[j1][1]}`.")
  elif tag == "delete":
    where = f"Line {ours[i1][0]} `{ours[i1][1]}` should not be there."
  else:
    after = f"after line {ours[i1 - 1][0]}" if i1 > 0 else "at the start"
    where = f"A line is missing {after}: `{theirs[j1][1]}`."
  more = f" {len(changes) - 1} more lines differ from a correct solution." if len(changes) > 1 \
      else ""
  return f"{where}{more} Because of it, {why}."


def _parts(prompt) -> tuple[str, str, str, Optional[str], Optional[str], Optional[str]]:
  """(spec, code, error, explanation, mode, previous answer) of a debug prompt or a
  multi-round conversation (first user turn parsed; mode from the last; the last assistant
  turn is the previous answer)."""
  if isinstance(prompt, str):
    return (*parse_debug_prompt(prompt), None)
  users = [m.content for m in prompt.messages if m.role == "user"]
  answers = [m.content for m in prompt.messages if m.role == "assistant"]
  spec, code, error, explanation, mode = parse_debug_prompt(users[0])
  last = users[-1]
  mode = next((m for m, i in INSTRUCTIONS.items() if last.endswith(i)), mode)
  if len(users) > 1 and last.startswith(ROUND_INTRO):
    error = last[len(ROUND_INTRO):].rsplit("\n\n", 1)[0].strip()
  return spec, code, error, explanation, mode, (answers[-1] if answers else None)


def _references(tasks) -> dict[str, str]:
  out = {}
  for task in tasks:
    ct = code_task(task)
    out[ct.prompt.strip()] = ct.reference
  return out


def _lookup(references: Mapping[str, str], spec: str, who: str) -> str:
  if spec.strip() not in references:
    raise ValueError(f"the scripted {who} knows {len(references)} tasks and not the one of this "
                     f"prompt ({spec[:80]!r}): build it from the tasks being debugged")
  return references[spec.strip()]


def oracle_explainer(tasks) -> generator_lib.ScriptedGenerator:
  """The scripted explainer: ``oracle_explanation`` of the prompt's code and error."""
  references = _references(tasks)

  def respond(prompt, index):
    del index
    spec, code, error, _, _, previous = _parts(prompt)
    if previous is not None:
      code = split_answer(previous)[1]
    return oracle_explanation(code, _lookup(references, spec, "explainer"), error)

  return generator_lib.ScriptedGenerator(respond, name="scripted:oracle")


def reference_refiner(tasks) -> generator_lib.ScriptedGenerator:
  """A refiner that answers with the reference solution (the explanation first in
  ``explain_refine``): every refinement passes — the upper bound of the chain."""
  references = _references(tasks)

  def respond(prompt, index):
    del index
    spec, code, error, _, mode, previous = _parts(prompt)
    if previous is not None:
      code = split_answer(previous)[1]
    reference = _lookup(references, spec, "refiner")
    if mode == "explain_refine":
      return answer_text(mode, reference, oracle_explanation(code, reference, error))
    return answer_text("refine_only", reference)

  return generator_lib.ScriptedGenerator(respond, name="scripted:reference")


def copy_refiner() -> generator_lib.ScriptedGenerator:
  """A refiner that returns its input program unchanged (refinement never helps)."""

  def respond(prompt, index):
    del index
    _, code, _, _, mode, previous = _parts(prompt)
    if previous is not None:
      code = split_answer(previous)[1]
    if mode == "explain_refine":
      return answer_text(mode, code, "The program looks right to me.")
    return answer_text("refine_only", code)

  return generator_lib.ScriptedGenerator(respond, name="scripted:copy")


def resolve_generator(spec: str, *, same: Optional[generator_lib.TextGenerator], tasks,
                      field: str, **hf_options) -> generator_lib.TextGenerator:
  """The generator a config string names: ``same`` (the programmer), ``hf:<dir>`` (an imported
  Hugging Face model), ``scripted:oracle`` / ``scripted:reference`` / ``scripted:copy``."""
  if spec == "same":
    if same is None:
      raise ValueError(f"{CONFIG_PATH}.{field}='same' needs a programmer model")
    return same
  if spec.startswith("hf:") and spec[3:]:
    return generator_lib.from_hf(spec[3:], **hf_options)
  scripted = {"scripted:oracle": lambda: oracle_explainer(tasks),
              "scripted:reference": lambda: reference_refiner(tasks),
              "scripted:copy": copy_refiner}
  if spec in scripted:
    return scripted[spec]()
  raise ValueError(f"{CONFIG_PATH}.{field}={spec!r}: use 'same', 'hf:<checkpoint dir>' or one of "
                   f"{sorted(scripted)}")


# -- records -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SelfDebugRecord:
  """One refinement of one failing program. ``prompt`` is the task as the model saw it;
  ``error`` the sandbox's report of ``buggy_code``; ``passed`` / ``tests_passed`` / ``status``
  the sandbox's outcome of ``refinement`` on all tests (``refinement_error`` its report when it
  fails); ``lineage`` says where every piece came from."""
  record_id: str
  task_id: str
  source: str                   # "model" (the programmer's own sample) | "mutant"
  prompt: str
  task: str                     # procedural Task JSON (Task.from_json)
  reference: str
  buggy_code: str
  error: str
  buggy_tests_passed: int       # of tests_total, by buggy_code
  explanation: str
  refinement: str
  refinement_text: str          # the refiner's whole answer
  passed: bool
  tests_passed: int             # of tests_total, by refinement
  tests_total: int
  status: str
  refinement_error: str
  lineage: dict

  @property
  def pass_rate(self) -> float:
    return self.tests_passed / self.tests_total if self.tests_total else float(self.passed)

  @property
  def buggy_pass_rate(self) -> float:
    return self.buggy_tests_passed / self.tests_total if self.tests_total else 0.0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping) -> "SelfDebugRecord":
    names = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(names - set(d))
    if missing:
      raise ValueError(f"self-debugging record {d.get('record_id', '?')!r} lacks {missing}")
    return cls(**{k: d[k] for k in names})

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)


def write_records(records: Sequence[SelfDebugRecord], path: str) -> str:
  """One record JSON per line, written atomically; returns the path."""
  return _write_lines([r.to_json() for r in records], path)


def read_records(path: str) -> list[SelfDebugRecord]:
  with open(path, encoding="utf-8") as f:
    return [SelfDebugRecord.from_dict(json.loads(line)) for line in f if line.strip()]


def _write_lines(lines: Sequence[str], path: str) -> str:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".self_debug_", suffix=".jsonl", dir=directory)
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))
  os.replace(tmp, path)
  return path


def sft_conversation(record: SelfDebugRecord, fmt: str) -> chat.Conversation:
  """A passing record as SFT data: the debug prompt of ``fmt`` (``explain_refine``: explain,
  then fix; ``refine_only``: fix) and the answer of that format."""
  if fmt not in SFT_FORMATS:
    raise ValueError(f"SFT format {fmt!r}: use one of {list(SFT_FORMATS)}")
  if not record.passed:
    raise ValueError(f"record {record.record_id} did not pass its tests: only passing "
                     "refinements are SFT data")
  user = debug_prompt(record.prompt, record.buggy_code, record.error, fmt)
  answer = answer_text(fmt, record.refinement, record.explanation)
  return chat.Conversation(
      (chat.Message("user", user), chat.Message("assistant", answer)), label=DEBUG_LABEL,
      meta={"task_id": record.task_id, "source": f"self_debug/{record.source}",
            "record_id": record.record_id, "format": fmt})


def write_sft_jsonl(records: Sequence[SelfDebugRecord], fmt: str, path: str) -> str:
  """The passing records as ``fmt`` conversations, one JSON per line (the ``trajectories``
  stream of the ``sft`` stage reads them: configs/sft_tiny_debug.py)."""
  return _write_lines([sft_conversation(r, fmt).to_json() for r in records if r.passed], path)


# -- synthesis -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Buggy:
  """A failing program with its verdict."""
  task_index: int
  source: str
  index: int                    # sample index (model) or mutant index
  code: str
  verdict: Verdict
  mutation: str = ""


@dataclasses.dataclass(frozen=True)
class SynthesisResult:
  records: list
  counts: dict
  failing: list                 # the kept failing programs (Buggy), in task / sample order


def _stage_counts() -> dict:
  return {"sampled": 0, "failing": 0, "kept": 0, "explained": 0, "refined": 0, "passing": 0}


def _model_buggy(tasks, code_tasks, programmer, pool, config, counts) -> list[Buggy]:
  from kat_jax.eval.scoring import extract_code
  n = config.samples_per_task
  texts = programmer.sample([ct.prompt for ct in code_tasks], n)
  items = [(ct, extract_code(texts[t][j])) for t, ct in enumerate(code_tasks) for j in range(n)]
  verdicts = judge(pool, items, max_failures=config.max_failures_shown)
  out = []
  for t in range(len(tasks)):
    seen, kept = set(), 0
    for j in range(n):
      code, verdict = items[t * n + j][1], verdicts[t * n + j]
      counts["sampled"] += 1
      if verdict.passed:
        continue
      counts["failing"] += 1
      if config.dedupe_failing and code.strip() in seen:
        counts["duplicates"] = counts.get("duplicates", 0) + 1
        continue
      if config.max_failing_per_task and kept >= config.max_failing_per_task:
        counts["over_cap"] = counts.get("over_cap", 0) + 1
        continue
      seen.add(code.strip())
      kept += 1
      out.append(Buggy(t, "model", j, code, verdict))
  counts["kept"] += len(out)
  return out


def _mutant_buggy(tasks, code_tasks, pool, config, counts) -> list[Buggy]:
  variants = [(t, k, v) for t, task in enumerate(tasks)
              for k, v in enumerate(buggy_variants(task, max_variants=config.mutants_per_task))]
  verdicts = judge(pool, [(code_tasks[t], v.code) for t, _, v in variants],
                   max_failures=config.max_failures_shown)
  out = []
  for (t, k, variant), verdict in zip(variants, verdicts):
    counts["sampled"] += 1
    if verdict.passed:            # passes in the sandbox although it failed run_tests
      counts["sandbox_passed"] = counts.get("sandbox_passed", 0) + 1
      continue
    counts["failing"] += 1
    out.append(Buggy(t, "mutant", k, variant.code, verdict, variant.mutation))
  counts["kept"] += len(out)
  return out


def synthesize(tasks: Sequence[Task], programmer: Optional[generator_lib.TextGenerator], pool,
               config: Optional[ml_collections.ConfigDict] = None, *,
               explainer: Optional[generator_lib.TextGenerator] = None,
               refiner: Optional[generator_lib.TextGenerator] = None) -> SynthesisResult:
  """Runs the pipeline of the module docstring over procedural ``tasks``. ``explainer`` /
  ``refiner`` default to the ones ``config.explainer`` / ``config.refiner`` name (``same`` =
  the programmer). Counts per stage (``sampled``, ``failing``, ``kept`` after dedupe and cap,
  ``explained``, ``refined``, ``passing``) are returned overall and by source, and logged."""
  from kat_jax.eval.scoring import extract_code
  config = config if config is not None else default_self_debug_config()
  _validate(config)
  bad = [type(t).__name__ for t in tasks if not isinstance(t, Task)]
  if bad:
    raise TypeError(f"synthesize takes procedural Tasks (training tasks), got {sorted(set(bad))}")
  sources = sources_of(config)
  if "model" in sources and config.samples_per_task > 0 and programmer is None:
    raise ValueError("the 'model' source needs a programmer generator (or set "
                     f"{CONFIG_PATH}.sources='mutant')")
  explainer = explainer or resolve_generator(config.explainer, same=programmer, tasks=tasks,
                                             field="explainer", max_len=config.max_len)
  refiner = refiner or resolve_generator(config.refiner, same=programmer, tasks=tasks,
                                         field="refiner", max_len=config.max_len)
  ct_config = code_env_config(config.max_failures_shown)
  code_tasks = [code_task(t, ct_config) for t in tasks]
  by_source = {s: _stage_counts() for s in sources}
  failing: list[Buggy] = []
  if "model" in sources and config.samples_per_task > 0:
    failing += _model_buggy(tasks, code_tasks, programmer, pool, config, by_source["model"])
  if "mutant" in sources and config.mutants_per_task > 0:
    failing += _mutant_buggy(tasks, code_tasks, pool, config, by_source["mutant"])

  # Explain every kept failing program, then refine conditioned on each explanation.
  specs = [code_tasks[b.task_index].prompt for b in failing]
  explanations = explainer.sample([debug_prompt(s, b.code, b.verdict.error, "explain")
                                   for s, b in zip(specs, failing)],
                                  config.explanations_per_program)
  pending = []   # (buggy, explanation index, explanation)
  for b, row in zip(failing, explanations):
    for e, text in enumerate(row):
      text = generator_lib.cut_at_end(text).strip()
      if not text:
        by_source[b.source]["empty_explanations"] = \
            by_source[b.source].get("empty_explanations", 0) + 1
        continue
      by_source[b.source]["explained"] += 1
      pending.append((b, e, text))
  r_count = config.refinements_per_explanation
  answers = refiner.sample(
      [debug_prompt(code_tasks[b.task_index].prompt, b.code, b.verdict.error,
                    "refine_with_explanation", explanation) for b, _, explanation in pending],
      r_count)
  refined = [(p, r, text, extract_code(generator_lib.cut_at_end(text)))
             for p, row in zip(pending, answers) for r, text in enumerate(row)]
  verdicts = judge(pool, [(code_tasks[p[0].task_index], code) for p, _, _, code in refined],
                   max_failures=config.max_failures_shown)
  records = []
  for ((b, e, explanation), r, text, code), verdict in zip(refined, verdicts):
    task, ct = tasks[b.task_index], code_tasks[b.task_index]
    counts = by_source[b.source]
    counts["refined"] += 1
    counts["passing"] += int(verdict.passed)
    lineage = {"source": b.source, "explanation_index": e, "refinement_index": r,
               "programmer": programmer.name if programmer is not None else None,
               "explainer": explainer.name, "refiner": refiner.name, "seed": config.seed}
    lineage.update({"sample_index": b.index} if b.source == "model"
                   else {"mutant_index": b.index, "mutation": b.mutation})
    tag = "s" if b.source == "model" else "m"
    records.append(SelfDebugRecord(
        record_id=f"{task.task_id}/{tag}{b.index}/e{e}/r{r}", task_id=task.task_id,
        source=b.source, prompt=ct.prompt, task=task.to_json(), reference=ct.reference,
        buggy_code=b.code, error=b.verdict.error, buggy_tests_passed=b.verdict.tests_passed,
        explanation=explanation, refinement=code, refinement_text=text,
        passed=verdict.passed, tests_passed=verdict.tests_passed,
        tests_total=verdict.tests_total, status=verdict.status,
        refinement_error=verdict.error, lineage=lineage))
  totals = collections.Counter()
  for counts in by_source.values():
    totals.update({k: v for k, v in counts.items()})
  result_counts = {**{k: int(totals[k]) for k in _stage_counts()}, "tasks": len(tasks),
                   "by_source": by_source,
                   "generators": {"programmer": programmer.stats() if programmer else None,
                                  "explainer": explainer.stats(), "refiner": refiner.stats()}}
  for source, counts in by_source.items():
    logging.info("self-debug %s: %s", source, " ".join(f"{k}={v}" for k, v in counts.items()))
  return SynthesisResult(records, result_counts, failing)
