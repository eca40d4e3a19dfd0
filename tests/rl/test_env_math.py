"""Procedural math problems (determinism, split, answers checked against sympy's own solution of
the question text) and the math environment's answer checking, tools and hostile inputs."""
import json
import re
import time
from fractions import Fraction

import pytest
import sympy
from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication,
                                        standard_transformations, parse_expr)

from kat_jax.data.procedural import math_tasks
from kat_jax.data.procedural.generate import split_of
from kat_jax.errors import ConfigError
from kat_jax.rl import envs
from kat_jax.rl.envs import base
from kat_jax.rl.envs import math as math_env


@pytest.fixture(scope="module")
def problems():
  """Train problems of every template and level, and more quadratics (rational and surd roots)."""
  return (math_tasks.generate_problems(seed=1, num_problems=90, split="train", levels=(0, 1, 2))
          + math_tasks.generate_problems(seed=1, num_problems=12, split="train", levels=(1, 2),
                                         templates=("quadratic",)))


def call(name, **arguments):
  return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_generation_is_deterministic_and_covers_every_template(problems):
  again = math_tasks.generate_problems(seed=1, num_problems=90, split="train", levels=(0, 1, 2))
  assert [p.to_json() for p in again] == [p.to_json() for p in problems[:90]]
  other = math_tasks.generate_problems(seed=2, num_problems=90, split="train", levels=(0, 1, 2))
  assert [p.problem_id for p in other] != [p.problem_id for p in problems[:90]]
  assert {p.template for p in problems} == {t.name for t in math_tasks.TEMPLATES}
  assert {p.level for p in problems} == set(math_tasks.LEVELS)
  assert len({p.problem_id for p in problems[:90]}) == 90
  assert all(math_tasks.MathProblem.from_json(p.to_json()) == p for p in problems)
  assert all(p.kind == ("roots" if p.family == "quadratic" else "value") for p in problems)


def test_splits_are_disjoint_and_follow_the_hash():
  train = math_tasks.generate_problems(seed=0, num_problems=150, split="train", levels=(0, 1, 2))
  heldout = math_tasks.generate_problems(seed=0, num_problems=40, split="heldout",
                                         levels=(0, 1, 2))
  key = lambda p: (p.template, json.dumps(list(p.params)))   # noqa: E731
  assert not {key(p) for p in train} & {key(p) for p in heldout}
  assert all(split_of(p.template, p.params) == "train" for p in train)
  assert all(split_of(p.template, p.params) == "heldout" for p in heldout)


_SYMPY_TRANSFORMS = standard_transformations + (implicit_multiplication, convert_xor)


def _sympy_solutions(problem):
  """sympy's own real solutions of a linear / quadratic question, from the question text."""
  x = sympy.Symbol("x")
  equation = re.search(r"(?:Solve for x: |real solutions of )(.*?)\. ", problem.question).group(1)
  lhs, rhs = (parse_expr(side, {"x": x}, transformations=_SYMPY_TRANSFORMS)
              for side in equation.split(" = "))
  return [s for s in sympy.solve(sympy.Eq(lhs, rhs), x) if s.is_real]


def test_answers_are_correct_by_independent_computation(problems):
  for p in problems:
    reference = math_env.parse_answer(p.answer)
    if p.family in ("linear", "quadratic"):
      assert math_env.equivalent(_sympy_solutions(p), reference), p
    elif p.family == "arithmetic":
      expression = parse_expr(p.params[0].replace("^", "**"))   # sympy evaluates it exactly
      assert math_env.equivalent([expression], reference), p
    elif p.template == "word_pipes":
      a, b = p.params
      assert Fraction(1, a) + Fraction(1, b) == 1 / Fraction(p.answer), p
    elif p.template == "word_ages":
      _, _, age, times, years = p.params
      assert f"will be {(times + 1) * age + 2 * years}." in p.question and p.answer == str(age)
    elif p.template == "word_ratio":
      *_, a, b, total = p.params
      assert f"share {total} dollars in the ratio {a}:{b}" in p.question
      assert Fraction(p.answer) * (a + b) == total * b, p
    elif p.template == "word_change":
      _, item, count, cents, bill = p.params
      assert f"buys {count} {item}s" in p.question and f"{bill}-dollar bill" in p.question
      assert Fraction(p.answer) == bill - Fraction(count * cents, 100) >= 0, p
    elif p.template == "word_speed":
      distance, hours, later, unit = p.params
      assert f"{distance} km in {hours} hours" in p.question
      per_hour = {"hours": 1, "half-hours": 2, "quarter-hours": 4}[unit]
      assert Fraction(p.answer) * hours * per_hour == distance * later, p
    elif p.template == "word_discount":
      price, off, tax = p.params
      assert f"reduced by {off}%" in p.question
      assert Fraction(p.answer) * 100 * 100 == price * (100 - off) * (100 + tax), p
    else:
      raise AssertionError(f"no independent check for template {p.template}")


def _rewrites(problem):
  """Equivalent forms of the reference answer a model might write."""
  values = [v.strip() for v in problem.answer.split(",")]
  forms = [", ".join(reversed(values)), " or ".join(f"x = {v}" for v in values)]
  if problem.kind == "value":
    value = Fraction(values[0])
    forms += [f"\\frac{{{2 * value.numerator}}}{{{2 * value.denominator}}}",
              f"{3 * value.numerator}/{3 * value.denominator}", f"\\boxed{{{values[0]}}}"]
    if all(q in (2, 5) for q in sympy.factorint(value.denominator)):
      forms.append(str(float(value)))                       # an exact decimal: 0.5 for 1/2
  elif "sqrt" in problem.answer:
    m, n, _ = problem.params
    forms += [f"{m} \\pm \\sqrt{{{n}}}", f"\\frac{{{2 * m} \\pm \\sqrt{{{4 * n}}}}}{{2}}",
              f"\\{{{values[1]}, {values[0]}\\}}"]
  else:
    forms.append(", ".join(values + values))              # repeated roots count once
  return forms


def test_reference_and_rewritten_answers_are_equivalent(problems):
  for p in problems:
    assert math_env.grade_answer(p.answer, p).passed, p
    for form in _rewrites(p):
      grade = math_env.grade_answer(form, p)
      assert grade.passed and grade.compiled, (p.answer, form, grade.details)


def test_decimal_tolerance_and_exactness():
  p = math_tasks.MathProblem("t", "arithmetic", "arithmetic", 0, ("1/3",), "Compute 1/3.", "1/3")
  assert math_env.grade_answer("0.3333333", p).passed
  assert not math_env.grade_answer("0.33", p).passed
  assert not math_env.grade_answer("1/3 + 10^-12", p).passed   # exact forms are compared exactly
  half = math_tasks.MathProblem("h", "arithmetic", "arithmetic", 0, ("1/2",), "Compute 1/2.",
                                "1/2")
  assert all(math_env.grade_answer(a, half).passed for a in ("1/2", "0.5", "2/4", "\\frac12"))


def test_wrong_answers_are_rejected(problems):
  for p in problems:
    values = [v.strip() for v in p.answer.split(",")]
    wrong = [f"{values[0]} + 1", f"-({values[-1]}) - 1/7"]
    if p.kind == "roots" and len(values) == 2:
      wrong += [values[0], values[1], f"{values[0]}, {values[1]}, 1000"]   # both roots needed
    for answer in wrong:
      grade = math_env.grade_answer(answer, p)
      assert not grade.passed and grade.compiled and grade.tests_passed == 0, (p.answer, answer)


HOSTILE = ["9^9^9^9", "((((((9^64)^64)^64)^64)^64)^64)", "2^(10^6)", "(" * 150 + "1" + ")" * 150,
           "1" * 10 ** 6, "__import__('os').system('echo hacked')", "pi.evalf()", "sqrt(2).n(10)",
           "lambda: 1", "\\frac{1}{0}", "0^(-1)", "x", "[1, [2, [3]]]", "\\sqrt[3]{8}", "",
           "\\frac{", "1e400", "exec('1')", "1 ±± 2", "\x00\x01", "٣"]


@pytest.mark.parametrize("answer", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_answers_are_graded_without_raising(answer):
  p = math_tasks.MathProblem("t", "arithmetic", "arithmetic", 0, ("1",), "Compute 1.", "1")
  start = time.perf_counter()
  grade = math_env.grade_answer(answer, p)
  assert not grade.passed and grade.tests_passed == 0
  assert time.perf_counter() - start < 2.0
  assert not grade.compiled and grade.details["reason"], (answer, grade.details)


def test_extraction_from_model_output():
  assert math_env.extract_answer("so \\boxed{\\frac{3}{4}}.") == "\\frac{3}{4}"
  assert math_env.extract_answer("\\boxed{1} then \\boxed{x = {2}}") == "x = {2}"
  assert math_env.extract_answer("Work...\nAnswer: 12 km.\n") == "12 km"
  assert math_env.extract_answer("**Answer:** x = 5") == "x = 5"
  assert math_env.extract_answer("The final answer is 7.") == "7"
  assert math_env.extract_answer("no answer here") is None
  assert math_env.extract_answer("\\boxed{3}<|im_end|>\\boxed{4}") == "3"
  start = time.perf_counter()
  assert math_env.extract_answer("\\boxed{" * 20_000 + "5") is None   # unclosed: no O(n^2)
  assert time.perf_counter() - start < 2.0


def test_answer_only_episode(problems):
  p = next(q for q in problems if q.kind == "roots")
  env = envs.make("math", None)
  obs = env.reset(p)
  assert [m.role for m in obs.messages] == ["system", "user"] and obs.tools == ()
  assert obs.messages[1].content == p.question and "\\boxed" in obs.messages[0].content
  res = env.step(f"Factor it.\nThe solutions are \\boxed{{{p.answer}}}.")
  assert (res.status, res.done) == (base.SUBMITTED, True)
  grade = res.info["grade"]
  assert (grade.passed, grade.compiled, grade.tests_passed, grade.tests_total) == (True, True, 1, 1)
  assert grade.prediction == p.answer and grade.reference == p.answer
  env.reset(p)
  grade = env.step("I do not know.").info["grade"]
  assert (grade.passed, grade.compiled, grade.prediction) == (False, False, "")
  with pytest.raises(RuntimeError, match="reset"):
    env.step("\\boxed{1}")


def test_submit_tool_episode(problems):
  p = next(q for q in problems if q.kind == "value")
  env = envs.make("math", {"submit_tool": True})
  assert env.reset(p).tools == (math_env.SUBMIT,)
  res = env.step("<tool_call>\n{oops\n</tool_call>")
  assert (res.status, res.done) == (base.PARSE_ERROR, False)
  assert res.observation.messages[0].role == "tool" and res.observation.messages[0].is_error
  res = env.step(call("calculator", expression="1+1"))
  assert (res.status, res.done) == (base.UNKNOWN_TOOL, False)
  res = env.step(call("submit", value=p.answer))
  assert (res.status, res.done) == (base.TOOL_ERROR, False)
  assert "'answer'" in res.observation.messages[0].content
  res = env.step("Still thinking.")
  assert (res.status, res.done) == (base.NO_ACTION, False)
  res = env.step(call("submit", answer=p.answer))
  assert (res.status, res.done) == (base.SUBMITTED, True) and res.info["grade"].passed
  assert res.observation.messages[-1].name == "submit"
  env.reset(p)
  res = env.step(f"\\boxed{{{p.answer}}}")        # a boxed answer is accepted with tools too
  assert res.done and res.info["grade"].passed and res.info["submitted_via"] == "answer"


def test_bad_configuration_raises():
  with pytest.raises(ConfigError, match="max_answer_char"):
    envs.make("math", {"max_answer_char": 5})
  with pytest.raises(ConfigError, match="rel_tol"):
    envs.make("math", {"rel_tol": 2.0})
  with pytest.raises(TypeError, match="MathProblem"):
    envs.make("math", None).reset("1 + 1")
  with pytest.raises(ValueError, match="unknown math family"):
    math_tasks.generate_problems(seed=0, num_problems=1, families=("geometry",))
