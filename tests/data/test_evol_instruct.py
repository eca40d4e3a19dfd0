"""Evol-Instruct: the evolution loop with a deterministic fake generator, filters, JSONL, code files."""
import ast
import collections
import inspect

import numpy as np
import pytest

from kat_jax.data import evol_instruct as evol
from kat_jax.data.evol_instruct import EvolConfig, EvolRecord

CLAUSES = {
    "add_constraints": ["Inputs may contain up to one million negative integers.",
                        "Reject malformed entries by raising ValueError with a message.",
                        "The function must be pure and avoid global state."],
    "replace_requirement": ["Instead of lists, accept any iterable including generators.",
                            "Return results as a frozenset rather than a tuple.",
                            "Use Unicode casefolding when comparing words."],
    "add_reasoning_steps": ["First validate, then normalize, finally aggregate per bucket.",
                            "Explain intermediate states by logging each pass at debug level.",
                            "Split the work into parsing, checking and merging phases."],
    "erroneous_reference": ["Note: the draft `return x[::-2]` is wrong; fix it.",
                            "A colleague wrote `while i < n: i =- 1`, which hangs.",
                            "Beware the buggy `sum(x) / len(x)` on empty input."],
    "higher_complexity": ["Achieve O(n log n) time with O(1) extra memory.",
                          "Answer each of q queries in logarithmic time.",
                          "Stream the input using constant auxiliary space."],
}
GOOD_CODE = "```python\ndef solve(values):\n    return sorted(values)\n```"


class FakeGenerator:
  """Deterministic: rewrites append an operation-specific clause; seed keywords trigger each filter."""

  def __init__(self):
    self.calls = []

  def __call__(self, prompts):
    self.calls.append(list(prompts))
    return [self.respond(p) for p in prompts]

  def respond(self, prompt):
    if prompt.startswith("Please increase the difficulty"):
      question = prompt.split("#Given Question#:\n", 1)[1].split("\n\n#Rewritten Question#:", 1)[0]
      method = next(op for op, text in evol.EVOL_METHODS.items() if text in prompt)
      if question.startswith("EMPTY"):
        return "   "
      if question.startswith("DUP"):
        return question + "."
      if question.startswith("LONG"):
        return question + " word" * 1000
      if question.startswith("LEAK"):
        return "#Given Question#: " + question
      if question.startswith("TWIN"):
        return "Write a function that sorts a list of integers in descending order without sorted()."
      clause = CLAUSES[method][len(self.calls) % 3]
      return f"#Rewritten Question#: {question} {clause}"
    assert prompt.startswith("Write a Python solution")
    if "BADCODE" in prompt:
      return "```python\ndef solve(:\n```"
    return GOOD_CODE


SEEDS = ["Write a function that reverses a string.", "Sum the even numbers of a list.",
         "Return the n-th Fibonacci number.", "Count the vowels in a word."]


def test_rounds_and_lineage():
  gen = FakeGenerator()
  records, stats = evol.evolve(SEEDS, gen, np.random.default_rng(0), EvolConfig(rounds=3))
  assert stats.generate_calls == len(gen.calls) == 6 and stats.prompts == 24
  assert stats.accepted_per_round == [4, 4, 4] and not stats.rejected
  assert [r.round for r in records] == [1] * 4 + [2] * 4 + [3] * 4
  by_id = {r.id: r for r in records}
  for r in records:
    parent = by_id.get(r.parent_id)
    if r.round == 1:
      assert r.parent_id.startswith("seed-")
      assert r.instruction.startswith(SEEDS[int(r.parent_id.split("-")[1])])
    else:
      assert parent.round == r.round - 1 and r.instruction.startswith(parent.instruction)
    assert r.solution == "def solve(values):\n    return sorted(values)\n"
    assert r.operation in evol.EVOL_METHODS and not r.instruction.startswith("#Rewritten")
  # Deterministic from the rng seed.
  again, _ = evol.evolve(SEEDS, FakeGenerator(), np.random.default_rng(0), EvolConfig(rounds=3))
  assert again == records


def test_filters_reject_and_parents_retry():
  seeds = SEEDS[:2] + ["EMPTY task", "DUP make a stack class", "LONG parse dates",
                       "LEAK merge intervals", "BADCODE write a trie"]
  gen = FakeGenerator()
  records, stats = evol.evolve(seeds, gen, np.random.default_rng(1), EvolConfig(rounds=2,
                                                                              max_instruction_chars=500))
  assert stats.rejected == collections.Counter(empty=2, no_change=2, too_long=2, template_leak=2,
                                               solution_syntax_error=2)
  assert stats.accepted_per_round == [2, 2] and len(records) == 4
  # Failed parents were retried in round 2 (7 prompts again); solutions asked only for 3 survivors.
  assert [len(c) for c in gen.calls] == [7, 3, 7, 3]
  assert {r.parent_id for r in records if r.round == 1} == {"seed-0", "seed-1"}


def test_near_duplicates_within_a_round():
  records, stats = evol.evolve(["TWIN one", "TWIN two", "TWIN three"], FakeGenerator(),
                               np.random.default_rng(0), EvolConfig(rounds=1))
  assert len(records) == 1 and stats.rejected["near_duplicate"] == 2


def test_operation_weights():
  gen = FakeGenerator()
  config = EvolConfig(rounds=1, operation_weights=(("erroneous_reference", 1.0), ("higher_complexity", 0.0)))
  records, _ = evol.evolve(SEEDS, gen, np.random.default_rng(0), config)
  assert {r.operation for r in records} == {"erroneous_reference"}
  assert all(evol.EVOL_METHODS["erroneous_reference"] in p for p in gen.calls[0])
  with pytest.raises(ValueError, match="unknown operations"):
    EvolConfig(operation_weights=(("make_harder", 1.0),))
  with pytest.raises(ValueError, match="one response per prompt"):
    evol.evolve(SEEDS, lambda prompts: prompts[:1], np.random.default_rng(0))


def test_ngrams_and_code_extraction():
  a = evol.char_ngrams("Sort  the List")
  assert a == evol.char_ngrams("sort the list") and evol.jaccard(a, a) == 1.0
  assert evol.jaccard(a, evol.char_ngrams("completely different")) == 0.0
  assert evol.extract_code(GOOD_CODE) == "def solve(values):\n    return sorted(values)\n"
  assert evol.extract_code("x = 1") == "x = 1\n" and evol.extract_code(" \n") == ""


def test_jsonl_round_trip(tmp_path):
  records, _ = evol.evolve(SEEDS, FakeGenerator(), np.random.default_rng(0), EvolConfig(rounds=2))
  path = tmp_path / "evol.jsonl"
  assert evol.write_jsonl(records, str(path)) == len(records)
  assert evol.read_jsonl(str(path)) == records


def _strip_docstrings(tree):
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is not None:
      node.body = node.body[1:]
  return ast.dump(tree)


@pytest.mark.parametrize("instruction", [
    "Sort the values in place.",
    'Handle the """ quotes and \\ backslashes \\n literally.',
    "Line one of the task.\n\nLine three, after a blank line:\n  - an indented bullet",
])
def test_code_file_puts_instruction_in_docstring(instruction):
  solution = "import math\n\n\ndef solve(values):\n    total = 0\n    for v in values:\n        total += v\n    return total\n"
  text = evol.to_code_file(instruction, solution, path="evol/r1-0.py")
  assert text.startswith("# path: evol/r1-0.py\n# language: python\n")
  tree = ast.parse(text)
  func = tree.body[1]
  assert ast.get_docstring(func) == inspect.cleandoc(instruction)
  assert _strip_docstrings(tree) == ast.dump(ast.parse(solution))


def test_code_file_falls_back_to_comments():
  for solution in ("def solve(x): return x\n", "print(sum(map(int, input().split())))\n"):
    text = evol.to_code_file("Read numbers\nand add them.", solution)
    assert "# Read numbers\n# and add them.\n" + solution in text
    assert ast.dump(ast.parse(text)) == ast.dump(ast.parse(solution))
  with pytest.raises(ValueError, match="does not parse"):
    evol.to_code_file("x", "def (:")


def test_code_file_fim_examples():
  records, _ = evol.evolve(SEEDS, FakeGenerator(), np.random.default_rng(0), EvolConfig(rounds=1))
  text = evol.to_code_file(records[0].instruction, records[0].solution)
  examples = evol.code_file_fim_examples(text, np.random.default_rng(0), num_examples=3)
  assert len(examples) == 3 and len({e.span for e in examples}) == 3
  assert all(e.structured and e.document == text for e in examples)
