"""Procedural math problems with exact answers: the verifiable tasks of the ``math`` environment.

Four families in three difficulty levels, every answer computed exactly (``fractions.Fraction``,
surds written by hand) from the parameters drawn:

* ``arithmetic``: an expression of integers (L0), with negatives and division (L1), with fractions
  and squares (L2); the answer is an integer or a reduced fraction.
* ``linear``: solve for x in ``a x + b = c`` (L0), ``a x + b = c x + d`` (L1),
  ``a(x + b) = c(x - d) + e`` (L2); one (possibly fractional) solution.
* ``quadratic``: all real solutions (``kind == "roots"``): integer roots (L0), one rational root
  (L1), the surd pair ``m ± sqrt(n)`` (L2); a double root is one solution.
* ``word``: short word problems (change, speed, pipes, ages, discount, ratio), larger numbers and
  fractions at higher levels.

Like ``generate`` for function tasks, the split of a problem is a stable hash of its (template,
params) pair (``generate.split_of``), so held-out problems share no such pair with training ones::

    from kat_jax.data.procedural import math_tasks
    train = math_tasks.generate_problems(seed=0, num_problems=100, split="train", levels=(0, 1))
    train[0].question      # "Solve for x: 3x + 4 = 19. Give the exact value of x."
    train[0].answer        # "5"    (roots: "-2, 3"; surds: "1 - sqrt(2), 1 + sqrt(2)")

Answers are sympy-parseable text (integers, ``p/q``, ``sqrt(n)``); ``kat_jax.rl.envs.math`` checks
model answers against them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from fractions import Fraction
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from kat_jax.data.procedural.generate import SPLITS, split_of

LEVELS = (0, 1, 2)
FAMILIES = ("arithmetic", "linear", "quadratic", "word")
KINDS = ("value", "roots")   # one exact value, or the set of all real solutions

_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jade")
_ITEMS = ("pencil", "notebook", "apple", "ticket", "stamp", "marker", "candle", "cookie")
_VALUE_HINT = "Give the exact answer as an integer or a reduced fraction."
_ROOTS_HINT = ("Give all real solutions, separated by commas (a repeated root once); use sqrt() "
               "for square roots.")


@dataclasses.dataclass(frozen=True)
class MathProblem:
  """One problem. ``params`` are the template's drawn values (JSON data): held-out problems share
  no (template, params) pair with training ones. ``answer`` is exact sympy-parseable text; for
  ``kind == "roots"`` a comma-separated list of the distinct real solutions in increasing order."""
  problem_id: str
  template: str
  family: str
  level: int
  params: tuple
  question: str
  answer: str
  kind: str = "value"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"MathProblem.kind must be one of {KINDS}, got {self.kind!r}")

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["params"] = list(self.params)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "MathProblem":
    return cls(**{**d, "params": tuple(d["params"])})

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), ensure_ascii=False)

  @classmethod
  def from_json(cls, text: str) -> "MathProblem":
    return cls.from_dict(json.loads(text))


@dataclasses.dataclass(frozen=True)
class Draw:
  """What a template draws: JSON parameters, the question, the exact answer text and its kind."""
  params: tuple
  question: str
  answer: str
  kind: str = "value"


@dataclasses.dataclass(frozen=True)
class MathTemplate:
  name: str
  family: str
  draw: Callable[[np.random.Generator, int], Draw]


# -- number formatting ------------------------------------------------------------------------


def fraction_text(value: Fraction) -> str:
  """``7``, ``-7``, ``3/4``, ``-3/4``: sympy-parseable, reduced."""
  value = Fraction(value)
  return str(value.numerator) if value.denominator == 1 else (
      f"{value.numerator}/{value.denominator}")


def _operand(value: Fraction) -> str:
  """A leaf of an expression: negatives and fractions in parentheses."""
  text = fraction_text(value)
  return f"({text})" if value < 0 or value.denominator != 1 else text


def _money(value: Fraction) -> str:
  """Dollar amounts: ``12`` or ``2.25`` (values with a finite decimal expansion only)."""
  if value.denominator == 1:
    return str(value.numerator)
  cents = value * 100
  if cents.denominator != 1:
    raise ValueError(f"{value} dollars is not a whole number of cents")
  return f"{value.numerator / value.denominator:.2f}"


def _count(n: int, noun: str) -> str:
  """``1 year``, ``3 years``."""
  return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _int(rng: np.random.Generator, low: int, high: int, *, nonzero: bool = False) -> int:
  """A uniform integer in [low, high] (not 0 when ``nonzero``)."""
  while True:
    value = int(rng.integers(low, high + 1))
    if value or not nonzero:
      return value


def _poly_text(coefficients: Sequence[Fraction]) -> str:
  """``2x^2 - 3x + 1`` from integer coefficients, highest degree first (zero terms dropped)."""
  degree = len(coefficients) - 1
  parts = []
  for i, c in enumerate(coefficients):
    power = degree - i
    if c == 0:
      continue
    c = int(c)
    magnitude = abs(c)
    var = "" if power == 0 else ("x" if power == 1 else f"x^{power}")
    body = (str(magnitude) if power == 0 or magnitude != 1 else "") + var
    if not parts:
      parts.append(("-" if c < 0 else "") + body)
    else:
      parts.append(("- " if c < 0 else "+ ") + body)
  return " ".join(parts) if parts else "0"


def _linear_text(a: int, b: int) -> str:
  return _poly_text([Fraction(a), Fraction(b)])


# -- arithmetic -------------------------------------------------------------------------------

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "^": 3}


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction:
  if op == "+":
    return a + b
  if op == "-":
    return a - b
  if op == "*":
    return a * b
  if op == "/":
    if b == 0:
      raise ZeroDivisionError
    return a / b
  return a ** int(b)


def _expression(rng: np.random.Generator, leaves: list, ops: Sequence[str]
                ) -> tuple[str, Fraction, int]:
  """A random binary expression over ``leaves`` (in order): (text, exact value, precedence)."""
  if len(leaves) == 1:
    return _operand(leaves[0]), Fraction(leaves[0]), 4
  split = int(rng.integers(1, len(leaves)))
  left = _expression(rng, leaves[:split], ops)
  right = _expression(rng, leaves[split:], ops)
  op = ops[int(rng.integers(len(ops)))]
  prec = _PRECEDENCE[op]
  left_text = left[0] if left[2] >= prec else f"({left[0]})"
  right_text = right[0] if right[2] > prec or (right[2] == prec and op in "+*") else (
      f"({right[0]})")
  return f"{left_text} {op} {right_text}", _apply(op, left[1], right[1]), prec


def _arithmetic(rng: np.random.Generator, level: int) -> Draw:
  for _ in range(100):
    if level == 0:
      leaves = [Fraction(_int(rng, 0, 12)), Fraction(_int(rng, -12, 12))]
      ops = ("+", "-", "*")
    elif level == 1:
      leaves = [Fraction(_int(rng, -20, 20, nonzero=True)) for _ in range(3)]
      ops = ("+", "-", "*", "/")
    else:
      leaves = [Fraction(_int(rng, -9, 9, nonzero=True), _int(rng, 1, 9)) for _ in range(4)]
      ops = ("+", "-", "*", "/")
    try:
      text, value, _ = _expression(rng, leaves, ops)
    except ZeroDivisionError:
      continue
    if level == 2 and rng.random() < 0.5:   # square the whole expression
      text, value = f"({text})^2", value ** 2
    if abs(value.numerator) > 10 ** 6 or value.denominator > 10 ** 4:
      continue
    return Draw((text,), f"Compute {text}. {_VALUE_HINT}", fraction_text(value))
  raise AssertionError("arithmetic: no well-defined expression in 100 draws")


# -- linear equations -------------------------------------------------------------------------


def _linear(rng: np.random.Generator, level: int) -> Draw:
  if level == 0:
    a, x = _int(rng, -9, 9, nonzero=True), _int(rng, -10, 10)
    if a in (1, -1):
      a *= 2
    b = _int(rng, -20, 20)
    c = a * x + b
    question = f"Solve for x: {_linear_text(a, b)} = {c}."
    return Draw((a, b, c), f"{question} Give the exact value of x.", str(x))
  while True:
    if level == 1:
      a, b, c, d = (_int(rng, -9, 9, nonzero=True), _int(rng, -20, 20),
                    _int(rng, -9, 9, nonzero=True), _int(rng, -20, 20))
      if a == c:
        continue
      x = Fraction(d - b, a - c)                              # a x + b = c x + d
      equation = f"{_linear_text(a, b)} = {_linear_text(c, d)}"
      params: tuple = (a, b, c, d)
    else:
      a, b, c, d, e = (_int(rng, 2, 12), _int(rng, -15, 15, nonzero=True), _int(rng, 2, 12),
                       _int(rng, -15, 15, nonzero=True), _int(rng, -30, 30))
      if a == c:
        continue
      x = Fraction(-c * d + e - a * b, a - c)                 # a(x + b) = c(x - d) + e
      shift_b = f"+ {b}" if b > 0 else f"- {-b}"
      shift_d = f"- {d}" if d > 0 else f"+ {-d}"
      tail = "" if e == 0 else (f" + {e}" if e > 0 else f" - {-e}")
      equation = f"{a}(x {shift_b}) = {c}(x {shift_d}){tail}"
      params = (a, b, c, d, e)
    return Draw(params, f"Solve for x: {equation}. Give the exact value of x.", fraction_text(x))


# -- quadratic equations ----------------------------------------------------------------------


def _roots_text(roots: Sequence[Fraction]) -> str:
  return ", ".join(fraction_text(r) for r in sorted(set(roots)))


def _is_square(n: int) -> bool:
  return n >= 0 and math.isqrt(n) ** 2 == n


def _quadratic(rng: np.random.Generator, level: int) -> Draw:
  if level == 0:                              # (x - r1)(x - r2)
    r1, r2 = sorted((_int(rng, -9, 9), _int(rng, -9, 9)))
    coefficients = [Fraction(1), Fraction(-(r1 + r2)), Fraction(r1 * r2)]
    params: tuple = (r1, r2)
    answer = _roots_text([Fraction(r1), Fraction(r2)])
  elif level == 1:                            # k (x - r)(q x - p), p/q not an integer
    while True:
      r, q, k = _int(rng, -6, 6), _int(rng, 2, 5), _int(rng, 1, 3)
      p = _int(rng, -9, 9, nonzero=True)
      if math.gcd(p, q) == 1:
        break
    coefficients = [Fraction(k * q), Fraction(-k * (p + q * r)), Fraction(k * p * r)]
    params = (r, p, q, k)
    answer = _roots_text([Fraction(r), Fraction(p, q)])
  else:                                       # k (x^2 - 2 m x + m^2 - n): m ± sqrt(n)
    while True:
      m, n, k = _int(rng, -6, 6), _int(rng, 2, 30), _int(rng, 1, 2)
      if not _is_square(n):
        break
    coefficients = [Fraction(k), Fraction(-2 * k * m), Fraction(k * (m * m - n))]
    params = (m, n, k)
    centre = "" if m == 0 else f"{m} "
    answer = (f"{centre}- sqrt({n}), {centre}+ sqrt({n})" if m else f"-sqrt({n}), sqrt({n})")
  question = (f"Find all real solutions of {_poly_text(coefficients)} = 0. {_ROOTS_HINT}")
  return Draw(params, question, answer, "roots")


# -- word problems ----------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))]


def _word_change(rng: np.random.Generator, level: int) -> Draw:
  name, item = _pick(rng, _NAMES), _pick(rng, _ITEMS)
  count = _int(rng, 2, 6 if level == 0 else 12)
  cents = (_int(rng, 1, 5) * 100 if level == 0 else _int(rng, 4, 60) * 25 if level == 1
           else _int(rng, 101, 999))
  price = Fraction(cents, 100)
  bill = next(b for b in (10, 20, 50, 100, 200) if b >= count * price)
  change = bill - count * price
  dollars = "dollar" if price == 1 else "dollars"
  question = (f"{name} buys {count} {item}s at {_money(price)} {dollars} each and pays with a "
              f"{bill}-dollar bill. How many dollars of change does {name} get? {_VALUE_HINT}")
  return Draw((name, item, count, cents, bill), question, fraction_text(change))


def _word_speed(rng: np.random.Generator, level: int) -> Draw:
  hours = _int(rng, 2, 5 if level < 2 else 7)
  distance = _int(rng, 20, 90) * hours if level < 2 else _int(rng, 50, 400)
  unit, per_hour = (("hours", 1), ("half-hours", 2), ("quarter-hours", 4))[level]
  later = _int(rng, 1, 9 if level == 0 else 23)
  answer = Fraction(distance, hours) * Fraction(later, per_hour)
  question = (f"A train travels {distance} km in {hours} hours at a constant speed. How many km "
              f"does it travel in {_count(later, unit[:-1])}? {_VALUE_HINT}")
  return Draw((distance, hours, later, unit), question, fraction_text(answer))


def _word_pipes(rng: np.random.Generator, level: int) -> Draw:
  high = 8 if level == 0 else 15 if level == 1 else 30
  a, b = _int(rng, 2, high), _int(rng, 2, high)
  together = Fraction(a * b, a + b)
  question = (f"One pipe fills a tank in {a} hours and another pipe fills it in {b} hours. How "
              f"many hours do both pipes take together to fill the empty tank? {_VALUE_HINT}")
  return Draw((a, b), question, fraction_text(together))


def _word_ages(rng: np.random.Generator, level: int) -> Draw:
  older, younger = _pick(rng, _NAMES[:5]), _pick(rng, _NAMES[5:])
  age = _int(rng, 2, 12 if level == 0 else 30)
  times = _int(rng, 2, 4 if level < 2 else 7)
  years = _int(rng, 1, 10 if level == 0 else 25)
  total = (times + 1) * age + 2 * years
  question = (f"{older} is {times} times as old as {younger}. In {_count(years, 'year')} the sum "
              f"of their ages will be {total}. How old is {younger} now? {_VALUE_HINT}")
  return Draw((older, younger, age, times, years), question, str(age))


def _word_discount(rng: np.random.Generator, level: int) -> Draw:
  price = _int(rng, 2, 20) * (10 if level == 0 else 5 if level == 1 else 1)
  off = _int(rng, 1, 5) * 10 if level == 0 else _int(rng, 1, 19) * 5 if level == 1 else (
      _int(rng, 1, 60))
  tax = 0 if level == 0 else _int(rng, 1, 20)
  final = Fraction(price) * Fraction(100 - off, 100) * Fraction(100 + tax, 100)
  taxed = "" if tax == 0 else f" and then a {tax}% sales tax is added"
  question = (f"A jacket costs {_count(price, 'dollar')}. Its price is reduced by {off}%{taxed}. "
              f"What is the final price in dollars? {_VALUE_HINT}")
  return Draw((price, off, tax), question, fraction_text(final))


def _word_ratio(rng: np.random.Generator, level: int) -> Draw:
  first, second = _pick(rng, _NAMES[:5]), _pick(rng, _NAMES[5:])
  a, b = _int(rng, 1, 5 if level == 0 else 9), _int(rng, 1, 5 if level == 0 else 9)
  share = _int(rng, 1, 10 if level == 0 else 40)
  total = (a + b) * share if level < 2 else (a + b) * share + _int(rng, 1, a + b - 1 or 1)
  question = (f"{first} and {second} share {total} dollars in the ratio {a}:{b}. How many dollars "
              f"does {second} get? {_VALUE_HINT}")
  return Draw((first, second, a, b, total), question, fraction_text(Fraction(total * b, a + b)))


TEMPLATES = (
    MathTemplate("arithmetic", "arithmetic", _arithmetic),
    MathTemplate("linear", "linear", _linear),
    MathTemplate("quadratic", "quadratic", _quadratic),
    MathTemplate("word_change", "word", _word_change),
    MathTemplate("word_speed", "word", _word_speed),
    MathTemplate("word_pipes", "word", _word_pipes),
    MathTemplate("word_ages", "word", _word_ages),
    MathTemplate("word_discount", "word", _word_discount),
    MathTemplate("word_ratio", "word", _word_ratio),
)


# -- generation -------------------------------------------------------------------------------


def select_templates(families: Optional[Sequence[str]] = None,
                     names: Optional[Sequence[str]] = None) -> list[MathTemplate]:
  """Templates of the given families and/or names (all when both are empty)."""
  for family in families or ():
    if family not in FAMILIES:
      raise ValueError(f"unknown math family {family!r}: use some of {list(FAMILIES)}")
  known = {t.name for t in TEMPLATES}
  for name in names or ():
    if name not in known:
      raise ValueError(f"unknown math template {name!r}: known templates are {sorted(known)}")
  return [t for t in TEMPLATES
          if (not families or t.family in families) and (not names or t.name in names)]


def make_problem(template: MathTemplate, rng: np.random.Generator, level: int) -> MathProblem:
  if level not in LEVELS:
    raise ValueError(f"level {level} is not one of {LEVELS}")
  draw = template.draw(rng, level)
  key = [template.name, level, list(draw.params)]
  digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:10]
  return MathProblem(f"{template.name}-L{level}-{digest}", template.name, template.family, level,
                     tuple(draw.params), draw.question, draw.answer, draw.kind)


def problem_stream(seed: int, *, split: str = "train", levels: Sequence[int] = (0,),
                   families: Optional[Sequence[str]] = None,
                   templates: Optional[Sequence[str]] = None, heldout_fraction: float = 0.1
                   ) -> Iterator[MathProblem]:
  """Endless problems of one split, deterministic from ``seed`` (template and level uniform)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction={heldout_fraction} must lie in (0, 1)")
  for level in levels:
    if level not in LEVELS:
      raise ValueError(f"level {level} is not one of {LEVELS}")
  chosen = select_templates(families, templates)
  if not chosen or not levels:
    raise ValueError(f"no templates selected (families={families}, templates={templates}, "
                     f"levels={levels})")
  levels = list(levels)
  rng = np.random.default_rng([seed, SPLITS.index(split), 7])  # 7: apart from function tasks
  while True:
    level = levels[int(rng.integers(len(levels)))]
    problem = make_problem(chosen[int(rng.integers(len(chosen)))], rng, level)
    if split_of(problem.template, problem.params, heldout_fraction) == split:
      yield problem


def generate_problems(seed: int, num_problems: int, *, split: str = "train",
                      levels: Sequence[int] = (0,), families: Optional[Sequence[str]] = None,
                      templates: Optional[Sequence[str]] = None, heldout_fraction: float = 0.1,
                      unique: bool = True, max_draws: int = 5000) -> list[MathProblem]:
  """``num_problems`` problems of one split; with ``unique`` no two share a problem id. Raises when
  ``max_draws`` draws in a row give no new problem (the selection's space is exhausted)."""
  problems, ids, since_new = [], set(), 0
  for problem in problem_stream(seed, split=split, levels=levels, families=families,
                                templates=templates, heldout_fraction=heldout_fraction):
    if len(problems) == num_problems:
      break
    if unique and problem.problem_id in ids:
      since_new += 1
      if since_new >= max_draws:
        raise ValueError(f"found only {len(problems)} distinct {split} math problems at levels "
                         f"{list(levels)} ({max_draws} draws in a row gave no new one; asked for "
                         f"{num_problems}): add levels or templates, or pass unique=False")
      continue
    since_new = 0
    ids.add(problem.problem_id)
    problems.append(problem)
  return problems
