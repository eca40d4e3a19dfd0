"""The ``math`` environment: one procedurally generated problem, one final answer, checked exactly.

Tasks are ``data.procedural.math_tasks.MathProblem`` s. The model writes its final answer as
``\\boxed{...}`` (the last one counts) or after ``Answer:``; with ``config.submit_tool`` it may
also call ``submit(answer)``::

    env = envs.make("math", None)
    obs = env.reset(problem)              # (system, user) messages; tools: () or (submit,)
    res = env.step("... so x = 5/2. \\\\boxed{5/2}")
    res.done, res.status, res.info["grade"].passed       # True, "submitted", True

Checking an answer (pure functions, no sandbox: nothing is executed):

1. ``extract_answer``: the text of the last ``\\boxed{}`` / ``\\fbox{}``, else of the last
   ``Answer: ...`` line (``the answer is ...`` too).
2. ``parse_answer``: longer than ``config.max_answer_chars`` → refused before any parsing. LaTeX
   (``\\frac``, ``\\sqrt``, ``\\cdot``, ``\\pm``, ``\\{ \\}``) and unicode (``−``, ``√``, ``π``,
   ``±``) become plain syntax; ``x =`` prefixes, units and currency signs are dropped; the text is
   split into items on top-level commas, ``or`` and ``and``. Each item must then consist of
   numbers, ``+ - * / ^ ( )`` and the names ``sqrt`` and ``pi`` only — so the code that
   ``sympy.parsing.sympy_parser.parse_expr`` builds and evaluates can only construct sympy numbers
   — and is parsed unevaluated. An item whose value could exceed ``10 ** config.max_digits``
   (``9^9^9``) or is not a finite number (``1/0``) is refused before sympy evaluates it.
3. ``equivalent``: the items, deduplicated, must match the reference items one to one (so a
   quadratic needs both roots, and a repeated root counts once). Two items are equal if
   ``simplify(a - b) == 0`` (after a numeric pre-check); an item written with decimals matches
   within ``config.rel_tol`` relative error, so ``0.5`` equals ``1/2`` and ``0.333333`` equals
   ``1/3`` but ``0.33`` does not.

Without the tool every step ends the episode (no answer found: compiled=False). With it, format
faults keep the episode open — PARSE_ERROR, UNKNOWN_TOOL, TOOL_ERROR (naming the argument),
NO_ACTION (neither a call nor an answer, with a nudge) — until an answer is given.

Grade: passed = equivalent, compiled = an answer was found and parsed, tests 1/1 or 0/1,
prediction = the extracted answer text, reference = the problem's exact answer.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import ml_collections
import sympy
from sympy.parsing.sympy_parser import (auto_number, convert_xor, implicit_multiplication,
                                        parse_expr)

from kat_jax.data import chat
from kat_jax.data import special_tokens
from kat_jax.data import toolcall
from kat_jax.data.chat import Message
from kat_jax.data.procedural.math_tasks import MathProblem
from kat_jax.data.toolcall import ToolSpec
from kat_jax.errors import ConfigError
from kat_jax.rl.envs import base
from kat_jax.rl.envs.tools import CONFIG_PATH, check_arguments, resolve_config, truncate


def default_math_env_config() -> ml_collections.ConfigDict:
  """Every knob of the math environment (config.rl.env for "math")."""
  c = ml_collections.ConfigDict()
  c.submit_tool = False           # offer submit(answer); format errors then keep the episode open
  c.max_answer_chars = 200        # longer answers are refused unparsed (compiled=False)
  c.max_digits = 1000             # refuse answers whose value may exceed 10**max_digits
  c.rel_tol = 1e-6                # relative tolerance for answers written with decimals
  c.max_observation_chars = 2000  # longer tool results are cut in the middle, with a marker
  c.system_prompt = ""            # '' = the built-in prompt of the variant (SYSTEM_PROMPTS)
  return c


def _validate(c: ml_collections.ConfigDict) -> None:
  for field, low in (("max_answer_chars", 1), ("max_digits", 1), ("max_observation_chars", 200)):
    if c[field] < low:
      raise ConfigError(f"{CONFIG_PATH}.{field}={c[field]} must be >= {low}")
  if not 0.0 <= c.rel_tol < 1.0:
    raise ConfigError(f"{CONFIG_PATH}.rel_tol={c.rel_tol} must lie in [0, 1)")


SUBMIT = ToolSpec("submit", "Submits the final answer (an exact number; several solutions "
                  "separated by commas). The episode ends.", {
                      "type": "object",
                      "properties": {"answer": {"type": "string", "description":
                                                "the final answer, e.g. '5/2' or '-2, 3'"}},
                      "required": ["answer"]})
SYSTEM_PROMPTS = {
    "answer": ("Solve the math problem. Reason step by step, then write the final answer as "
               "\\boxed{...}: an exact number (an integer, a reduced fraction p/q, sqrt() for "
               "square roots), several solutions separated by commas."),
    "submit": ("Solve the math problem. Reason step by step, then call submit with the final "
               "answer (or write it as \\boxed{...}): an exact number (an integer, a reduced "
               "fraction p/q, sqrt() for square roots), several solutions separated by commas."),
}
NUDGE = ("Your reply had no final answer. Call submit(answer), or write the answer as "
         "\\boxed{...}.")


# -- extraction -------------------------------------------------------------------------------

_BOXES_TRIED = 4   # unclosed boxes tried from the end (each try scans the rest of the text)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_LINE = re.compile(r"(?:\banswer\s*(?:is)?\s*[:：]|\bthe\s+(?:final\s+)?answer\s+is\b)"
                          r"[ \t]*([^\n]*)", re.IGNORECASE)


def _braced(text: str, start: int) -> Optional[tuple[str, int]]:
  """(content, index after the closing brace) of the group whose ``{`` is at ``start``."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[start + 1:i], i + 1
  return None


def extract_answer(text: str) -> Optional[str]:
  """The final answer written in ``text``: the last ``\\boxed{...}``, else the last ``Answer:``
  line; None if there is neither."""
  for special in (special_tokens.IM_END, special_tokens.END_OF_TEXT):
    index = text.find(special)
    if index >= 0:
      text = text[:index]
  boxes = list(_BOXED.finditer(text))
  for match in boxes[::-1][:_BOXES_TRIED]:
    group = _braced(text, match.end() - 1)
    if group is not None:
      return group[0].strip()
  lines = list(_ANSWER_LINE.finditer(text))
  if lines:
    answer = lines[-1].group(1).strip().strip("*").strip()
    return answer[:-1].strip() if answer.endswith(".") else answer
  return None


# -- parsing ----------------------------------------------------------------------------------

# LaTeX and unicode to plain syntax, in this order (applied to the lower-cased answer).
_PLAIN = (("\\boxed", ""), ("\\left", ""), ("\\right", ""), ("\\displaystyle", ""),
          ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cdot", "*"), ("\\times", "*"),
          ("\\div", "/"), ("\\pi", " pi "), ("\\pm", "±"), ("\\mp", "±"), ("\\in", "="),
          ("\\{", ""), ("\\}", ""), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""),
          ("\\,", " "), ("\\;", " "), ("\\!", ""), ("\\ ", " "), ("\\%", ""), ("\\$", ""),
          ("$", ""), ("%", ""), ("\u2212", "-"), ("\u00d7", "*"), ("\u00f7", "/"),
          ("\u00b7", "*"), ("\u03c0", " pi "), ("\u221a", "sqrt"), ("\u2213", "±"),
          ("**", "^"))
_TEXT_MACRO = re.compile(r"\\(?:text|mathrm|mbox|textrm|operatorname)\s*\{[^{}]*\}")
_VARIABLE_PREFIX = re.compile(r"^\s*[a-z](?:_\(?[a-z0-9]+\)?)?\s*=\s*")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TRAILING_WORDS = re.compile(r"^(.*?[\d)])\s*[a-z][a-z\s.\-]*$")
_ALLOWED = re.compile(r"[0-9+\-*/^().\s a-z]*")
_BARE_ROOT = re.compile(r"sqrt\s*(\d+(?:\.\d+)?)")           # "sqrt 2", "√2" -> "sqrt(2)"
_ATTRIBUTE = re.compile(r"\.\s*[a-z]")
_NAMES = ("sqrt", "pi")
_GLOBALS = {"__builtins__": {}, "Integer": sympy.Integer, "Float": sympy.Float,
            "Rational": sympy.Rational, "Add": sympy.Add, "Mul": sympy.Mul, "Pow": sympy.Pow,
            "sqrt": sympy.sqrt, "pi": sympy.pi}
_TRANSFORMATIONS = (auto_number, convert_xor, implicit_multiplication)


class AnswerError(ValueError):
  """An answer that cannot be read as numbers (the message says why)."""


def _latex_macros(text: str) -> str:
  """``\\frac{a}{b}`` → ``((a)/(b))``, ``\\sqrt{a}`` → ``sqrt(a)`` (innermost first)."""
  while True:
    at = max(text.rfind("\\frac"), text.rfind("\\sqrt"))
    if at < 0:
      return text
    name = text[at + 1:at + 5]
    pos = at + 5
    args = []
    for _ in range(2 if name == "frac" else 1):
      while pos < len(text) and text[pos] == " ":
        pos += 1
      if pos >= len(text) or text[pos] in "[}":
        raise AnswerError(f"\\{name} without its argument")
      if text[pos] == "{":
        group = _braced(text, pos)
        if group is None:
          raise AnswerError(f"unbalanced braces after \\{name}")
        args.append(group[0])
        pos = group[1]
      else:
        args.append(text[pos])
        pos += 1
    replacement = f"(({args[0]})/({args[1]}))" if name == "frac" else f"sqrt({args[0]})"
    text = text[:at] + replacement + text[pos:]


def _split_top_level(text: str) -> list[str]:
  """Splits on commas outside parentheses."""
  items, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += ch == "("
    depth -= ch == ")"
    if ch == "," and depth == 0:
      items.append(text[start:i])
      start = i + 1
  return items + [text[start:]]


def _enclosed(text: str) -> bool:
  """``text`` is one parenthesized group: its first ``(`` closes at its last character."""
  if len(text) < 2 or text[0] != "(" or text[-1] != ")":
    return False
  depth = 0
  for i, ch in enumerate(text):
    depth += (ch == "(") - (ch == ")")
    if depth == 0:
      return i == len(text) - 1
  return False


def _unwrap(text: str) -> str:
  """``(a, b)`` → ``a, b`` while the parentheses enclose a whole list of several items."""
  text = text.strip()
  while _enclosed(text) and len(_split_top_level(text[1:-1])) > 1:
    text = text[1:-1].strip()
  return text


def _items(answer: str) -> list[str]:
  """The comma / ``or`` / ``and``-separated items of a normalized answer, ``±`` expanded."""
  text = answer.replace("[", "(").replace("]", ")").replace("{", "(").replace("}", ")")
  text = _unwrap(text)
  if _THOUSANDS.fullmatch(text.strip()):
    text = text.replace(",", "")
  text = re.sub(r"\b(?:or|and)\b", ",", text)
  items = []
  for item in _split_top_level(text):
    item = _VARIABLE_PREFIX.sub("", item).strip()
    if not item:
      continue
    if "±" in item:
      if item.count("±") > 1:
        raise AnswerError("more than one ± in one solution")
      items += [item.replace("±", "+"), item.replace("±", "-")]
    else:
      items.append(item)
  return items


def _digits_bound(expr: sympy.Basic, max_digits: int) -> float:
  """An upper bound on log10 of |expr| and of the reciprocal of its parts (AnswerError past
  ``max_digits``), computed without evaluating powers."""
  if expr.is_Integer or expr.is_Rational:
    p, q = sympy.fraction(expr)
    bound = float(max(len(str(abs(int(p)))), len(str(abs(int(q))))))
  elif expr.is_Float:   # a plain decimal (no exponent notation gets this far)
    bound = float(len(str(int(abs(expr))))) + 1.0
  elif expr is sympy.pi:
    bound = 1.0
  elif expr.is_Add:
    bound = max(_digits_bound(a, max_digits) for a in expr.args) + 1.0
  elif expr.is_Mul:
    bound = sum(_digits_bound(a, max_digits) for a in expr.args)
  elif expr.is_Pow:
    base_bound = _digits_bound(expr.base, max_digits)
    _digits_bound(expr.exp, max_digits)
    try:
      exponent = abs(complex(sympy.N(expr.exp, 15)))
    except (TypeError, ValueError, ArithmeticError):
      raise AnswerError(f"the exponent {str(expr.exp)[:40]!r} is not a usable number") from None
    bound = max(1.0, exponent) * base_bound
  else:
    raise AnswerError(f"unexpected term {str(expr)[:40]!r}")
  if bound > max_digits:
    raise AnswerError(f"the value may have more than {max_digits} digits")
  return bound


def parse_item(item: str, *, max_digits: int = 1000) -> sympy.Expr:
  """One normalized item as an unevaluated sympy number (AnswerError if it is not one)."""
  if not _ALLOWED.fullmatch(item):
    bad = sorted(set(re.sub(r"[0-9+\-*/^().\sa-z]", "", item) or item))
    raise AnswerError(f"unexpected characters {''.join(bad)[:20]!r}")
  if _ATTRIBUTE.search(item):
    raise AnswerError(f"unexpected attribute access in {item[:40]!r}")
  names = set(re.findall(r"[a-z]+", item))
  if names - set(_NAMES):
    stripped = _TRAILING_WORDS.match(item)   # units: "12 km", "28/9 hours"
    if stripped and not set(re.findall(r"[a-z]+", stripped.group(1))) - set(_NAMES):
      item = stripped.group(1)
    else:
      raise AnswerError(f"unknown names {sorted(names - set(_NAMES))[:3]} (only numbers, "
                        f"+ - * / ^ ( ), sqrt and pi)")
  try:
    expr = parse_expr(item, local_dict={}, global_dict=dict(_GLOBALS),
                      transformations=_TRANSFORMATIONS, evaluate=False)
  except Exception as error:  # noqa: BLE001 - any parse failure of model text is a verdict
    raise AnswerError(f"cannot parse {item[:40]!r} ({type(error).__name__})") from None
  if not isinstance(expr, sympy.Expr):
    raise AnswerError(f"{item[:40]!r} is not a number")
  _digits_bound(expr, max_digits)
  value = sympy.N(expr, 30)
  if not value.is_number or value.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
    raise AnswerError(f"{item[:40]!r} is not a finite number")
  return expr


def parse_answer(answer: str, *, max_chars: int = 200, max_digits: int = 1000
                 ) -> tuple[sympy.Expr, ...]:
  """The numbers an answer text states (see the module docstring); AnswerError if it states
  none or cannot be read."""
  if len(answer) > max_chars:
    raise AnswerError(f"the answer has {len(answer)} characters; at most {max_chars} are read")
  text = _TEXT_MACRO.sub(" ", answer.lower())
  for old, new in _PLAIN:
    text = text.replace(old, new)
  text = _BARE_ROOT.sub(r"sqrt(\1)", _latex_macros(text))
  items = _items(text)
  if not items:
    raise AnswerError("the answer is empty")
  return tuple(parse_item(item, max_digits=max_digits) for item in items)


# -- equivalence ------------------------------------------------------------------------------


def numbers_equal(a: sympy.Expr, b: sympy.Expr, rel_tol: float = 1e-6) -> bool:
  """``a == b`` exactly (``simplify(a - b) == 0``), or within ``rel_tol`` if either has decimals."""
  try:
    difference = abs(sympy.N(a - b, 50))
    scale = sympy.Max(1, abs(sympy.N(b, 50)))
    if a.has(sympy.Float) or b.has(sympy.Float):
      return bool(difference <= rel_tol * scale)
    if bool(difference > sympy.Float(1e-20) * scale):
      return False
    residual = sympy.simplify(a - b)
    return residual == 0 or residual.equals(0) is True
  except (TypeError, ValueError, ArithmeticError):
    return False


def equivalent(predicted: Sequence[sympy.Expr], reference: Sequence[sympy.Expr],
               rel_tol: float = 1e-6) -> bool:
  """The same set of numbers: each distinct predicted number matches a distinct reference one."""
  distinct: list[sympy.Expr] = []
  for value in predicted:
    if not any(numbers_equal(value, kept, rel_tol) for kept in distinct):
      distinct.append(value)
  unmatched = list(reference)
  if len(distinct) != len(unmatched):
    return False
  for value in distinct:
    match = next((i for i, ref in enumerate(unmatched) if numbers_equal(value, ref, rel_tol)),
                 None)
    if match is None:
      return False
    unmatched.pop(match)
  return True


def grade_answer(answer: Optional[str], problem: MathProblem,
                 config: Optional[ml_collections.ConfigDict] = None) -> base.Grade:
  """The Grade of ``answer`` (None: no answer found) against the problem's exact answer."""
  config = config or default_math_env_config()
  details: dict = {"problem_id": problem.problem_id, "kind": problem.kind}
  reference = parse_answer(problem.answer, max_chars=10 ** 4, max_digits=10 ** 4)
  if answer is None:
    details["reason"] = "no final answer found"
    return base.Grade(False, False, 0, 1, "", problem.answer, details)
  try:
    predicted = parse_answer(answer, max_chars=config.max_answer_chars,
                             max_digits=config.max_digits)
  except AnswerError as error:
    details["reason"] = str(error)
    return base.Grade(False, False, 0, 1, answer, problem.answer, details)
  passed = equivalent(predicted, reference, config.rel_tol)
  details["parsed"] = tuple(str(v) for v in predicted)
  return base.Grade(passed, True, int(passed), 1, answer, problem.answer, details)


# -- the environment --------------------------------------------------------------------------


class MathEnv(base.Environment):
  """One math problem per episode (see the module docstring)."""

  def __init__(self, config: Any = None):
    self.config = resolve_config(config, default_math_env_config())
    _validate(self.config)
    self.tools = (SUBMIT,) if self.config.submit_tool else ()
    self.problem: Optional[MathProblem] = None
    self.done = True

  def reset(self, task: Any) -> base.Observation:
    if not isinstance(task, MathProblem):
      raise TypeError(f"the math environment runs MathProblem tasks "
                      f"(data.procedural.math_tasks), got {type(task).__name__}")
    self.problem, self.done = task, False
    system = self.config.system_prompt or SYSTEM_PROMPTS[
        "submit" if self.config.submit_tool else "answer"]
    return base.Observation((Message("system", system), Message("user", task.question)),
                            self.tools)

  def step(self, action: str) -> base.StepResult:
    if self.problem is None or self.done:
      raise RuntimeError("MathEnv.step() without an open episode: call reset(problem) first "
                         "(and again after a step returned done=True)")
    if not self.config.submit_tool:
      return self._graded(extract_answer(action), "answer", None)
    parsed = toolcall.parse_assistant_output(action, self.tools)
    if isinstance(parsed, toolcall.ParseError):
      status = base.UNKNOWN_TOOL if parsed.kind == "unknown_tool" else base.PARSE_ERROR
      return base.StepResult(base.Observation((chat.parse_error_observation(parsed),)), False,
                             status, info={"parse_error": parsed.kind})
    errors = []
    for call in parsed.tool_calls:
      problem = check_arguments(SUBMIT, call.arguments)
      if problem is None:
        return self._graded(call.arguments["answer"], "submit", tuple(errors))
      errors.append(chat.tool_result(truncate(problem, self.config.max_observation_chars),
                                     name=call.name, is_error=True))
    if errors:
      return base.StepResult(base.Observation(tuple(errors)), False, base.TOOL_ERROR)
    answer = extract_answer(parsed.content)
    if answer is None:
      return base.StepResult(base.Observation((Message("user", NUDGE),)), False, base.NO_ACTION)
    return self._graded(answer, "answer", None)

  def close(self) -> None:
    self.problem, self.done = None, True

  def _graded(self, answer: Optional[str], via: str, errors: Optional[tuple]) -> base.StepResult:
    grade = grade_answer(answer, self.problem, self.config)
    self.done = True
    text = "Answer submitted." if grade.compiled else (
        f"Answer submitted, but it could not be read: {grade.details.get('reason')}.")
    message = (chat.tool_result(text, name=SUBMIT.name) if via == "submit"
               else Message("user", text))
    return base.StepResult(base.Observation((errors or ()) + (message,)), True, base.SUBMITTED,
                           info={"grade": grade, "submitted_via": via})


@base.register("math")
def make_math_env(config: Any = None, **unused) -> MathEnv:
  """Procedural math problems, answer-only (``config.submit_tool`` adds submit(answer))."""
  return MathEnv(config)
