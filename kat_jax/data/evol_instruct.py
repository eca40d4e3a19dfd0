"""Evol-Instruct (WizardCoder): evolve seed coding instructions into harder ones with any generator.

Each round, every instruction in the pool is rewritten by one of five evolution operations (prompt
templates below), the rewrite is filtered, a solution is generated for each surviving rewrite and
filtered in turn; accepted (instruction, solution) pairs join the dataset and the next round's pool.
Parents whose evolution was rejected stay in the pool and are tried again. The generator is any
batched callable, so a local model, a remote service or a deterministic fake all plug in::

    records, stats = evolve(seeds, generate, np.random.default_rng(0), EvolConfig(rounds=3))
    write_jsonl(records, "evol.jsonl")
    text = to_code_file(r.instruction, r.solution, path=f"evol/{r.id}.py")   # aiXcoder-style file
    examples = code_file_fim_examples(text, rng, num_examples=4)          # structured FIM

``generate(prompts: list[str]) -> list[str]`` must return one response per prompt: a
``data.generator.TextGenerator`` (a kat_jax checkpoint through the KV-cache sampler, an imported
Hugging Face model) is one, as is any plain function. Filters: non-empty,
not longer than a limit, no leaked template markers, a real change from the parent (at least
``min_new_ngram_fraction`` of the rewrite's character n-grams are new), not a near-duplicate of any
other kept instruction outside its own lineage (character n-gram Jaccard ≥ threshold; ancestors are
exempt because an evolution legitimately extends its parent), and a solution that parses as Python.
``EvolStats.rejected`` counts each reason, ``proposed_per_operation`` / ``accepted_per_operation``
each evolution operation.

Execution filter (``verify``): every accepted solution runs in the sandbox against tests — the
generator's own (``tests="generated"``: assert statements asked for with ``TESTS_TEMPLATE``), the
seed's (``"given"``: the ``tests`` of its lineage's root seed) or both — and is kept only when all
of them pass (proxy mode: the asserts run in the judge against the program's functions)::

    verified, report = verify(records, generate, pool, tests="generated", seeds=seeds)
    report["per_operation"]    # {operation: {"evolved", "verified"}}, report["rejected"]: reasons
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import json
import re
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np

from kat_jax.data import fim as fim_lib

# The five WizardCoder evolution methods (Luo et al. 2023), by name.
EVOL_METHODS = {
    "add_constraints": "Add new constraints and requirements to the original problem, adding "
                       "approximately 10 additional words.",
    "replace_requirement": "Replace a commonly used requirement in the programming task with a less "
                           "common and more specific one.",
    "add_reasoning_steps": "If the original problem can be solved with only a few logical steps, "
                           "please add more reasoning steps.",
    "erroneous_reference": "Provide a piece of erroneous code as a reference to increase "
                           "misdirection.",
    "higher_complexity": "Propose higher time or space complexity requirements, but please refrain "
                         "from doing so frequently.",
}
# "refrain from doing so frequently": the complexity operation is drawn less often.
DEFAULT_OPERATION_WEIGHTS = {"add_constraints": 1.0, "replace_requirement": 1.0,
                             "add_reasoning_steps": 1.0, "erroneous_reference": 1.0,
                             "higher_complexity": 0.25}

EVOL_TEMPLATE = (
    "Please increase the difficulty of the given programming test question a bit.\n\n"
    "You can increase the difficulty using, but not limited to, the following methods:\n"
    "{method}\n\n#Given Question#:\n{instruction}\n\n#Rewritten Question#:\n")
SOLVE_TEMPLATE = (
    "Write a Python solution for the following task. Reply with one ```python code block.\n\n"
    "{instruction}\n")
_TEMPLATE_MARKERS = ("#Given Question#", "#Rewritten Question#", "following methods:")

REJECT_REASONS = ("empty", "too_long", "template_leak", "no_change", "near_duplicate", "solution_empty",
                  "solution_too_long", "solution_syntax_error")


def evolution_prompt(instruction: str, operation: str) -> str:
  if operation not in EVOL_METHODS:
    raise ValueError(f"unknown evolution operation {operation!r}: use one of {list(EVOL_METHODS)}")
  return EVOL_TEMPLATE.format(method=EVOL_METHODS[operation], instruction=instruction)


def solution_prompt(instruction: str) -> str:
  return SOLVE_TEMPLATE.format(instruction=instruction)


def extract_instruction(response: str) -> str:
  """The rewritten question: the response, stripped, without an echoed ``#Rewritten Question#:``."""
  text = response.strip()
  marker = "#Rewritten Question#:"
  if text.startswith(marker):
    text = text[len(marker):].strip()
  return text


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
  """The first fenced code block of the response, else the whole response (stripped)."""
  match = _FENCE.search(response)
  code = (match.group(1) if match else response).strip("\n").rstrip()
  return code + "\n" if code.strip() else ""


def char_ngrams(text: str, n: int = 5) -> frozenset:
  """Character n-grams of whitespace-normalized lowercase text (the whole text when shorter)."""
  text = " ".join(text.lower().split())
  if len(text) <= n:
    return frozenset([text])
  return frozenset(text[i:i + n] for i in range(len(text) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
  if not a and not b:
    return 1.0
  return len(a & b) / len(a | b)


@dataclasses.dataclass(frozen=True)
class EvolConfig:
  rounds: int = 3
  operation_weights: tuple = tuple(DEFAULT_OPERATION_WEIGHTS.items())
  max_instruction_chars: int = 2000
  max_solution_chars: int = 8000
  near_duplicate_jaccard: float = 0.85  # reject when Jaccard(n-grams) with a non-ancestor >= this
  min_new_ngram_fraction: float = 0.1   # reject when fewer of the rewrite's n-grams are not in the parent
  ngram: int = 5
  require_code_parses: bool = True

  def __post_init__(self):
    if self.rounds < 1:
      raise ValueError(f"rounds={self.rounds} must be >= 1")
    unknown = {op for op, _ in self.operation_weights} - set(EVOL_METHODS)
    if unknown:
      raise ValueError(f"operation_weights names unknown operations {sorted(unknown)}; use "
                       f"{list(EVOL_METHODS)}")
    if not 0.0 < self.near_duplicate_jaccard <= 1.0:
      raise ValueError(f"near_duplicate_jaccard={self.near_duplicate_jaccard} must lie in (0, 1]")


@dataclasses.dataclass(frozen=True)
class EvolRecord:
  """An (instruction, solution) pair. Seeds have round 0 and no operation/parent."""
  id: str
  instruction: str
  solution: str = ""
  round: int = 0
  operation: Optional[str] = None
  parent_id: Optional[str] = None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "EvolRecord":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclasses.dataclass
class EvolStats:
  generate_calls: int = 0
  prompts: int = 0
  accepted_per_round: list = dataclasses.field(default_factory=list)
  rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  proposed_per_operation: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  accepted_per_operation: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)


class _NearDuplicateIndex:
  """Instructions kept so far as n-gram sets by id, with their parents (a linear scan; fine for
  tens of thousands of instructions)."""

  def __init__(self, threshold: float):
    self.threshold = threshold
    self.grams: dict[str, frozenset] = {}
    self.parent: dict[str, Optional[str]] = {}

  def lineage(self, record_id: Optional[str]) -> set[str]:
    out = set()
    while record_id is not None and record_id not in out:
      out.add(record_id)
      record_id = self.parent.get(record_id)
    return out

  def is_duplicate(self, grams: frozenset, parent_id: str) -> bool:
    exempt = self.lineage(parent_id)
    return any(jaccard(grams, other) >= self.threshold
               for rid, other in self.grams.items() if rid not in exempt)

  def add(self, record_id: str, grams: frozenset, parent_id: Optional[str]):
    self.grams[record_id] = grams
    self.parent[record_id] = parent_id

  def remove(self, record_id: str):
    del self.grams[record_id], self.parent[record_id]


def _as_record(seed: Union[str, dict, EvolRecord], i: int) -> EvolRecord:
  if isinstance(seed, EvolRecord):
    return seed
  if isinstance(seed, str):
    return EvolRecord(f"seed-{i}", seed)
  return EvolRecord(str(seed.get("id", f"seed-{i}")), seed["instruction"],
                    seed.get("solution", "") or "")


def _call(generate, prompts: list[str], stats: EvolStats) -> list[str]:
  responses = list(generate(prompts))
  if len(responses) != len(prompts):
    raise ValueError(f"generate returned {len(responses)} responses for {len(prompts)} prompts; it "
                     "must return exactly one response per prompt")
  stats.generate_calls += 1
  stats.prompts += len(prompts)
  return responses


def instruction_reject_reason(instruction: str, config: EvolConfig) -> Optional[str]:
  if not instruction.strip():
    return "empty"
  if len(instruction) > config.max_instruction_chars:
    return "too_long"
  if any(marker in instruction for marker in _TEMPLATE_MARKERS):
    return "template_leak"
  return None


def solution_reject_reason(code: str, config: EvolConfig) -> Optional[str]:
  if not code.strip():
    return "solution_empty"
  if len(code) > config.max_solution_chars:
    return "solution_too_long"
  if config.require_code_parses:
    try:
      ast.parse(code)
    except (SyntaxError, ValueError):
      return "solution_syntax_error"
  return None


def evolve(seeds: Sequence[Union[str, dict, EvolRecord]], generate: Callable[[list[str]], list[str]],
           rng: np.random.Generator, config: EvolConfig = EvolConfig()
           ) -> tuple[list[EvolRecord], EvolStats]:
  """Runs ``config.rounds`` rounds of evolution over the seeds; returns the accepted evolved records
  (seeds not included) in order of acceptance, and statistics. Ids are ``r{round}-{k}`` with k
  counting the rewrites that passed the instruction filters (so accepted ids may have gaps). At most two ``generate`` calls per
  round (rewrites, then solutions for the rewrites that passed the instruction filters)."""
  pool = [_as_record(s, i) for i, s in enumerate(seeds)]
  ops = [op for op, _ in config.operation_weights]
  p = np.array([w for _, w in config.operation_weights], np.float64)
  p = p / p.sum()
  if len({r.id for r in pool}) != len(pool):
    raise ValueError("seed ids must be unique")
  index = _NearDuplicateIndex(config.near_duplicate_jaccard)
  for record in pool:
    index.add(record.id, char_ngrams(record.instruction, config.ngram), None)
  stats = EvolStats()
  records: list[EvolRecord] = []
  next_id = 0
  for round_ in range(1, config.rounds + 1):
    if not pool:
      break
    chosen = [ops[int(k)] for k in rng.choice(len(ops), size=len(pool), p=p)]
    stats.proposed_per_operation.update(chosen)
    responses = _call(generate, [evolution_prompt(r.instruction, op) for r, op in zip(pool, chosen)],
                      stats)
    next_pool: list[EvolRecord] = []
    candidates: list[tuple[EvolRecord, str, str, str]] = []  # (parent, operation, instruction, id)
    for parent, op, response in zip(pool, chosen, responses):
      instruction = extract_instruction(response)
      reason = instruction_reject_reason(instruction, config)
      if reason is None:
        grams = char_ngrams(instruction, config.ngram)
        new = len(grams - index.grams[parent.id]) / len(grams)
        if new < config.min_new_ngram_fraction:
          reason = "no_change"
        elif index.is_duplicate(grams, parent.id):
          reason = "near_duplicate"
        else:  # indexed now, so later rewrites of this round are compared with it too
          new_id = f"r{round_}-{next_id}"
          next_id += 1
          index.add(new_id, grams, parent.id)
      if reason is not None:
        stats.rejected[reason] += 1
        next_pool.append(parent)
        continue
      candidates.append((parent, op, instruction, new_id))
    accepted = 0
    if candidates:
      solutions = _call(generate, [solution_prompt(c[2]) for c in candidates], stats)
      for (parent, op, instruction, new_id), response in zip(candidates, solutions):
        code = extract_code(response)
        reason = solution_reject_reason(code, config)
        if reason is not None:
          stats.rejected[reason] += 1
          index.remove(new_id)
          next_pool.append(parent)
          continue
        record = EvolRecord(new_id, instruction, code, round_, op, parent.id)
        records.append(record)
        next_pool.append(record)
        accepted += 1
        stats.accepted_per_operation[op] += 1
    stats.accepted_per_round.append(accepted)
    pool = next_pool
  return records, stats


def write_jsonl(records: Iterable[EvolRecord], path: str) -> int:
  """Writes one JSON object per line; returns the number written."""
  n = 0
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
      n += 1
  return n


def read_jsonl(path: str) -> list[EvolRecord]:
  with open(path, encoding="utf-8") as f:
    return [EvolRecord.from_dict(json.loads(line)) for line in f if line.strip()]


# --------------------------------------------------------------------- execution filter

TESTS_TEMPLATE = (
    "Write 3 to 5 assert statements that check a correct Python solution of the following task. "
    "Reply with one ```python code block holding only the assert statements.\n\n{instruction}\n")
TEST_SOURCES = ("generated", "given", "both")
VERIFY_REJECT_REASONS = ("no_tests", "no_function", "tests_failed")


def tests_prompt(instruction: str) -> str:
  return TESTS_TEMPLATE.format(instruction=instruction)


def extract_asserts(response: str) -> list[str]:
  """The top-level ``assert`` statements of the response's code (``extract_code``), as source;
  [] when it does not parse."""
  try:
    tree = ast.parse(extract_code(response))
  except (SyntaxError, ValueError):
    return []
  return [ast.unparse(node) for node in tree.body if isinstance(node, ast.Assert)]


def function_names(code: str) -> tuple[str, ...]:
  """Names of the top-level functions of ``code`` (what tests may call)."""
  try:
    tree = ast.parse(code)
  except (SyntaxError, ValueError):
    return ()
  return tuple(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


@dataclasses.dataclass(frozen=True)
class VerifiedRecord:
  """An evolved record whose solution passed its tests in the sandbox, with the tests, where they
  came from and its lineage (ids from the seed to the record)."""
  record: EvolRecord
  tests: tuple
  tests_source: str
  lineage: tuple

  def to_dict(self) -> dict:
    """The instruction record (``EvolRecord`` fields) plus tests, tests_source and lineage: a line
    the JSONL corpus reads as an instruction record (``corpora.jsonl``)."""
    return {**self.record.to_dict(), "tests": list(self.tests),
            "tests_source": self.tests_source, "lineage": list(self.lineage)}


def _lineage(record: EvolRecord, parents: dict) -> tuple:
  chain, rid = [], record.id
  while rid is not None and rid not in chain:
    chain.append(rid)
    rid = parents.get(rid)
  return tuple(reversed(chain))


def verify(records: Sequence[EvolRecord], generate: Callable[[list[str]], list[str]], pool, *,
           tests: str = "generated",
           seeds: Sequence[Union[str, dict, EvolRecord]] = ()) -> tuple[list, dict]:
  """Keeps the records whose solution passes its tests in the sandbox (module docstring).
  ``seeds`` (as given to ``evolve``) give the lineage roots and, for ``"given"`` / ``"both"``,
  their ``tests`` (lists of assert statements). Returns (verified records, report)."""
  from kat_jax.sandbox import CodeTest, Job  # pylint: disable=g-import-not-at-top
  if tests not in TEST_SOURCES:
    raise ValueError(f"tests={tests!r}: use one of {list(TEST_SOURCES)}")
  seed_records = [_as_record(s, i) for i, s in enumerate(seeds)]
  given = {r.id: list(s.get("tests", ())) if isinstance(s, dict) else []
           for r, s in zip(seed_records, seeds)}
  parents = {r.id: r.parent_id for r in records}
  parents.update({r.id: None for r in seed_records})
  lineages = [_lineage(r, parents) for r in records]
  generated: list[list[str]] = [[] for _ in records]
  stats = EvolStats()
  if tests in ("generated", "both") and records:
    responses = _call(generate, [tests_prompt(r.instruction) for r in records], stats)
    generated = [extract_asserts(text) for text in responses]
  report = {"evolved": len(records), "verified": 0, "rejected": collections.Counter(),
            "tests_generate_calls": stats.generate_calls,
            "per_operation": collections.defaultdict(lambda: {"evolved": 0, "verified": 0})}
  jobs, candidates = [], []
  for record, lineage, own in zip(records, lineages, generated):
    report["per_operation"][record.operation]["evolved"] += 1
    checks = (list(own) if tests != "given" else []) + (
        given.get(lineage[0], []) if tests != "generated" else [])
    names = function_names(record.solution)
    if not checks:
      report["rejected"]["no_tests"] += 1
      continue
    if not names:
      report["rejected"]["no_function"] += 1
      continue
    source = tests if tests != "both" else (
        "both" if own and given.get(lineage[0]) else "generated" if own else "given")
    jobs.append(Job(program=record.solution, exports=names, job_id=record.id,
                    tests=tuple(CodeTest(f"assert_{i}", code) for i, code in enumerate(checks))))
    candidates.append(VerifiedRecord(record, tuple(checks), source, lineage))
  kept = []
  for candidate, result in zip(candidates, pool.map(jobs) if jobs else []):
    if result.passed:
      kept.append(candidate)
      report["per_operation"][candidate.record.operation]["verified"] += 1
    else:
      report["rejected"]["tests_failed"] += 1
  report["verified"] = len(kept)
  report["rejected"] = dict(report["rejected"])
  report["per_operation"] = {op: dict(v) for op, v in sorted(report["per_operation"].items())}
  return kept, report


# --------------------------------------------------------------------- aiXcoder-style code files


def _docstring_literal(text: str, indent: str) -> list[str]:
  escaped = text.strip().replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
  lines = escaped.split("\n")
  body = [indent + '"""' + lines[0]] + [(indent + line) if line.strip() else "" for line in lines[1:]]
  if len(lines) == 1:
    return [body[0] + '"""']
  return body + [indent + '"""']


def to_code_file(instruction: str, solution: str, *, path: str = "solution.py",
                 language: str = "python") -> str:
  """A code file: path/language header (as the code corpus writes it), then the solution with the
  instruction as the docstring of its first top-level function or class that has none (and whose
  body starts on its own line), else as a comment block above the code."""
  try:
    tree = ast.parse(solution)
  except SyntaxError as e:
    raise ValueError(f"solution for {path} does not parse ({e}); filter it out first") from e
  lines = solution.split("\n")
  inserted = False
  for node in tree.body:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      continue
    if ast.get_docstring(node) is not None or node.body[0].lineno == node.lineno:
      break
    first = node.body[0]
    first_line = lines[first.lineno - 1]
    indent = first_line[:len(first_line) - len(first_line.lstrip())]
    lines[first.lineno - 1:first.lineno - 1] = _docstring_literal(instruction, indent)
    inserted = True
    break
  code = "\n".join(lines)
  if not inserted:
    comment = "\n".join(("# " + line).rstrip() for line in instruction.strip().split("\n"))
    code = comment + "\n" + code
  header = f"# path: {path}\n# language: {language}\n"
  return header + code if code.endswith("\n") else header + code + "\n"


def code_file_fim_examples(file_text: str, rng: np.random.Generator, *, num_examples: int = 4,
                           spm_rate: float = 0.5, max_middle_chars: Optional[int] = 2048
                           ) -> list[fim_lib.FimExample]:
  """Up to ``num_examples`` structured-FIM examples of one code file, with distinct middles."""
  examples, spans = [], set()
  for _ in range(4 * num_examples):
    if len(examples) == num_examples:
      break
    example = fim_lib.structured_fim(file_text, rng, spm_rate=spm_rate,
                                     max_middle_chars=max_middle_chars)
    if example is None:
      break
    if example.span not in spans:
      spans.add(example.span)
      examples.append(example)
  return examples
