"""Templates of procedural function-writing tasks, in difficulty levels.

A template draws semantic parameters (constants, letters, words) and writes, for given names, a
natural-language spec, a reference solution (source text) and an *independent* oracle (a Python
callable) that computes the expected outputs — so "the reference passes its tests" is a real check.

Levels (curriculum; docs/DESIGN.md, "Background", explains why level 0 is so easy):

* 0: function ``f``, arguments ``x``/``y``/``s``/``xs``/``d``, single-digit constants and inputs,
     specs of about 50 characters ("Write f(x) that returns x plus 3.").
* 1: a descriptive fixed function name per template (``add_const``), constants up to 19, inputs up
     to about 20 (some negative), slightly longer specs.
* 2: random function and argument names, multi-digit constants, larger inputs, specs of about
     130 characters that also describe the argument types.

``TEMPLATES`` lists them all (51); ``FAMILIES`` groups them (arithmetic, conditionals, strings, lists,
dicts, loops).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import numpy as np

LEVELS = (0, 1, 2)
FAMILIES = ("arithmetic", "conditionals", "strings", "lists", "dicts", "loops")

# Level-2 name vocabularies. Solution bodies only use local names outside these lists
# (acc, cnt, out, v, i, ch, key, prev, cur, hi, lo, tally).
_VERBS = ("compute", "get", "find", "make", "calc", "build", "derive", "eval", "select", "apply",
          "produce", "process")
_NOUNS = ("total", "value", "result", "score", "output", "answer", "amount", "metric", "tally_of",
          "figure", "summary", "measure")
_ARG_NAMES = {
    "int": ("n", "num", "val", "m", "p", "q", "k", "t", "w", "z", "amount", "size"),
    "int2": ("a2", "b2", "u", "r", "y2", "other"),
    "str": ("s", "text", "word", "line", "name", "msg", "label"),
    "list": ("xs", "nums", "vals", "seq", "arr", "data"),
    "dict": ("d", "table", "counts", "mapping", "inventory", "stock"),
}
_LEVEL0_ARGS = {"int": "x", "int2": "y", "str": "s", "list": "xs", "dict": "d"}
KIND_WORDS = {"int": "an integer", "int2": "an integer", "str": "a lowercase string",
               "list": "a list of integers", "dict": "a dict from strings to integers"}
_WORDS = ("ab", "pre", "un", "re", "go", "xy", "top", "my", "on", "up")
_DICT_KEYS = {0: "abcde", 1: "abcdefg", 2: "abcdefghij"}


@dataclasses.dataclass
class Draft:
  """What a template writes: parameters, spec phrase, solution body, oracle and input sampler.

  ``what`` completes "Write f(x) that ..." (levels 0-1); ``what_long`` (default ``what``) is used at
  level 2. ``body`` is the function body (4-space indented lines). ``sample_input()`` returns one
  argument tuple; ``edge_inputs`` are always tested first.
  """
  params: tuple
  what: str
  body: str
  oracle: Callable[..., Any]
  sample_input: Callable[[], tuple]
  what_long: Optional[str] = None
  edge_inputs: tuple = ()


class Ctx:
  """Names, constants and inputs for one draft at one level."""

  def __init__(self, rng: np.random.Generator, level: int, template: "Template"):
    self.rng, self.level = rng, level
    kinds = template.arg_kinds
    if level == 0:
      self.fn = "f"
      names = [_LEVEL0_ARGS[k] for k in kinds]
    elif level == 1:
      self.fn = template.name
      names = [_LEVEL0_ARGS[k] for k in kinds]
    else:
      self.fn = f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}"
      names = [str(rng.choice(_ARG_NAMES[k])) for k in kinds]
    self.args = tuple(names)
    self.kinds = kinds

  # --- constants (semantic parameters)
  def const(self, lo: int = 1) -> int:
    """Single digit at level 0, up to 19 at level 1, multi-digit (10..199) at level 2."""
    hi = {0: 9, 1: 19, 2: 199}[self.level]
    lo = max(lo, 10) if self.level == 2 else lo
    return int(self.rng.integers(lo, hi + 1))

  def small(self, lo: int, hi: int) -> int:
    """A constant that stays small at every level (repeat counts, steps, exponents)."""
    return int(self.rng.integers(lo, hi + 1))

  def letter(self, alphabet: Optional[str] = None, exclude: str = "") -> str:
    alphabet = alphabet or _DICT_KEYS[self.level]
    return str(self.rng.choice([c for c in alphabet if c not in exclude]))

  def word(self) -> str:
    return str(self.rng.choice(_WORDS))

  # --- inputs
  def int_in(self, lo: int, hi: int) -> int:
    return int(self.rng.integers(lo, hi + 1))

  def int_arg(self, nonneg: bool = False) -> int:
    lo, hi = {0: (0, 9), 1: (-9, 20), 2: (-50, 200)}[self.level]
    return self.int_in(0 if nonneg else lo, hi)

  def str_arg(self, min_len: int = 0) -> str:
    max_len = {0: 4, 1: 6, 2: 10}[self.level]
    alphabet = _DICT_KEYS[self.level]
    n = self.int_in(max(min_len, 1 if self.level == 0 else 0), max_len)
    return "".join(self.rng.choice(list(alphabet), size=n))

  def list_arg(self, min_len: int = 0, nonneg: bool = False) -> list:
    max_len = {0: 4, 1: 6, 2: 8}[self.level]
    n = self.int_in(min_len, max_len)
    return [self.int_arg(nonneg) for _ in range(n)]

  def dict_arg(self, include: Optional[str] = None) -> dict:
    keys = list(_DICT_KEYS[self.level])
    n = self.int_in(0, {0: 3, 1: 4, 2: 6}[self.level])
    chosen = [str(k) for k in self.rng.choice(keys, size=n, replace=False)]
    if include is not None and include not in chosen and self.rng.random() < 0.5:
      chosen.append(include)
    return {k: self.int_arg(nonneg=self.level == 0) for k in chosen}


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  family: str
  arg_kinds: tuple
  make: Callable[[Ctx], Draft]
  min_level: int = 0

  def draft(self, rng: np.random.Generator, level: int) -> tuple[Ctx, Draft]:
    ctx = Ctx(rng, level, self)
    return ctx, self.make(ctx)


TEMPLATES: list[Template] = []


def _template(family: str, *arg_kinds: str, min_level: int = 0):
  def register(make):
    name = make.__name__.lstrip("_")
    TEMPLATES.append(Template(name, family, tuple(arg_kinds), make, min_level))
    return make
  return register


def _q(text: str) -> str:
  return repr(text)


# =============================================================================== arithmetic

@_template("arithmetic", "int")
def _add_const(c: Ctx) -> Draft:
  k = c.const(); x, = c.args
  return Draft((k,), f"returns {x} plus {k}", f"    return {x} + {k}", lambda a: a + k,
               lambda: (c.int_arg(),), f"returns {x} increased by {k}")


@_template("arithmetic", "int")
def _sub_const(c: Ctx) -> Draft:
  k = c.const(); x, = c.args
  return Draft((k,), f"returns {x} minus {k}", f"    return {x} - {k}", lambda a: a - k,
               lambda: (c.int_arg(),), f"returns {x} decreased by {k}")


@_template("arithmetic", "int")
def _mul_const(c: Ctx) -> Draft:
  k = c.const(2); x, = c.args
  return Draft((k,), f"returns {x} times {k}", f"    return {x} * {k}", lambda a: a * k,
               lambda: (c.int_arg(),), f"returns {x} multiplied by {k}")


@_template("arithmetic", "int")
def _affine(c: Ctx) -> Draft:
  k1, k2 = c.const(2), c.const(); x, = c.args
  return Draft((k1, k2), f"returns {k1} times {x} plus {k2}", f"    return {k1} * {x} + {k2}",
               lambda a: k1 * a + k2, lambda: (c.int_arg(),),
               f"returns {x} multiplied by {k1}, plus {k2}")


@_template("arithmetic", "int", "int2")
def _add_scaled(c: Ctx) -> Draft:
  k = c.const(2); x, y = c.args
  return Draft((k,), f"returns {x} plus {k} times {y}", f"    return {x} + {k} * {y}",
               lambda a, b: a + k * b, lambda: (c.int_arg(), c.int_arg()),
               f"returns {x} plus the product of {k} and {y}")


@_template("arithmetic", "int")
def _mod_const(c: Ctx) -> Draft:
  k = c.const(2); x, = c.args
  return Draft((k,), f"returns the remainder of {x} divided by {k}", f"    return {x} % {k}",
               lambda a: a % k, lambda: (c.int_arg(),),
               f"returns the remainder of {x} divided by {k} (Python's % operator)")


@_template("arithmetic", "int")
def _div_const(c: Ctx) -> Draft:
  k = c.const(2); x, = c.args
  return Draft((k,), f"returns {x} divided by {k}, rounded down", f"    return {x} // {k}",
               lambda a: a // k, lambda: (c.int_arg(),),
               f"returns {x} divided by {k}, rounded down to an integer")


@_template("arithmetic", "int")
def _square_plus(c: Ctx) -> Draft:
  k = c.const(); x, = c.args
  return Draft((k,), f"returns {x} squared plus {k}", f"    return {x} * {x} + {k}",
               lambda a: a * a + k, lambda: (c.int_arg(),), f"returns the square of {x} plus {k}")


@_template("arithmetic", "int")
def _dist_const(c: Ctx) -> Draft:
  k = c.const(); x, = c.args
  return Draft((k,), f"returns the distance between {x} and {k}", f"    return abs({x} - {k})",
               lambda a: abs(a - k), lambda: (c.int_arg(),), edge_inputs=((k - 1,), (k + 1,)),
               what_long=f"returns the absolute difference between {x} and {k}")


@_template("arithmetic", "int")
def _clamp(c: Ctx) -> Draft:
  lo = c.const(); hi = lo + c.small(1, 5 if c.level == 0 else 30)
  if c.level == 0:
    lo, hi = min(lo, 7), min(lo, 7) + c.small(1, 2)
  x, = c.args
  return Draft((lo, hi), f"returns {x} limited to the range {lo} to {hi}",
               f"    return min(max({x}, {lo}), {hi})", lambda a: min(max(a, lo), hi),
               lambda: (c.int_arg(),), edge_inputs=((lo - 1,), (hi + 1,)),
               what_long=f"returns {x} clamped to the closed range from {lo} to {hi}")


@_template("arithmetic", "int")
def _max_const(c: Ctx) -> Draft:
  k = c.const(); x, = c.args
  return Draft((k,), f"returns the larger of {x} and {k}", f"    return max({x}, {k})",
               lambda a: max(a, k), lambda: (c.int_arg(),), edge_inputs=((k - 1,), (k + 1,)))


# =============================================================================== conditionals

@_template("conditionals", "int")
def _is_multiple(c: Ctx) -> Draft:
  k = c.const(2); x, = c.args
  return Draft((k,), f"returns True if {x} is a multiple of {k}, else False",
               f"    return {x} % {k} == 0", lambda a: a % k == 0, lambda: (c.int_arg(),),
               edge_inputs=((k,), (k + 1,)))


@_template("conditionals", "int")
def _pick_by_threshold(c: Ctx) -> Draft:
  k, a, b = c.const(), c.const(), c.const()
  if a == b:
    b = a + 1
  x, = c.args
  body = f"    if {x} > {k}:\n        return {a}\n    return {b}"
  return Draft((k, a, b), f"returns {a} if {x} > {k}, else {b}", body,
               lambda v: a if v > k else b, lambda: (c.int_arg(),),
               edge_inputs=((k,), (k + 1,)),
               what_long=f"returns {a} when {x} is greater than {k} and {b} otherwise")


@_template("conditionals", "int")
def _compare_word(c: Ctx) -> Draft:
  k = c.const(); x, = c.args
  body = (f"    if {x} < {k}:\n        return 'low'\n    if {x} == {k}:\n        return 'same'\n"
          f"    return 'high'")
  return Draft((k,), f"returns 'low', 'same' or 'high' for {x} vs {k}", body,
               lambda v: "low" if v < k else ("same" if v == k else "high"), lambda: (c.int_arg(),),
               edge_inputs=((k,), (k - 1,), (k + 1,)),
               what_long=f"returns 'low' if {x} is below {k}, 'same' if equal, and 'high' otherwise")


@_template("conditionals", "int")
def _in_range(c: Ctx) -> Draft:
  span = c.small(1, 4 if c.level == 0 else 40)
  lo = c.const() if c.level else min(c.const(), 9 - span)
  hi = lo + span
  x, = c.args
  return Draft((lo, hi), f"returns True if {lo} <= {x} <= {hi}", f"    return {lo} <= {x} <= {hi}",
               lambda v: lo <= v <= hi, lambda: (c.int_arg(),),
               edge_inputs=((lo,), (hi,), (hi + 1,), (lo - 1,)),
               what_long=f"returns True when {x} lies between {lo} and {hi} inclusive, else False")


@_template("conditionals", "int")
def _fizz(c: Ctx) -> Draft:
  k = c.const(2); word = c.word(); x, = c.args
  body = f"    if {x} % {k} == 0:\n        return {_q(word)}\n    return str({x})"
  return Draft((k, word), f"returns {_q(word)} if {k} divides {x}, else str({x})", body,
               lambda v: word if v % k == 0 else str(v), lambda: (c.int_arg(),),
               edge_inputs=((k,), (k + 1,)),
               what_long=f"returns the string {_q(word)} if {x} is divisible by {k}, otherwise {x} "
                         "converted to a string")


@_template("conditionals", "int", "int2")
def _min_of_three(c: Ctx) -> Draft:
  k = c.const(); x, y = c.args
  return Draft((k,), f"returns the smallest of {x}, {y} and {k}", f"    return min({x}, {y}, {k})",
               lambda a, b: min(a, b, k), lambda: (c.int_arg(), c.int_arg()),
               edge_inputs=((k + 1, k + 2),))


# =============================================================================== strings

@_template("strings", "str")
def _repeat_str(c: Ctx) -> Draft:
  k = c.small(2, 4); s, = c.args
  return Draft((k,), f"returns {s} repeated {k} times", f"    return {s} * {k}",
               lambda v: v * k, lambda: (c.str_arg(),))


@_template("strings", "str")
def _add_prefix(c: Ctx) -> Draft:
  w = c.word(); s, = c.args
  return Draft((w,), f"returns {_q(w)} followed by {s}", f"    return {_q(w)} + {s}",
               lambda v: w + v, lambda: (c.str_arg(),),
               what_long=f"returns {s} with the prefix {_q(w)} added in front")


@_template("strings", "str")
def _count_char(c: Ctx) -> Draft:
  ch = c.letter(); s, = c.args
  return Draft((ch,), f"returns how many times {_q(ch)} is in {s}", f"    return {s}.count({_q(ch)})",
               lambda v: v.count(ch), lambda: (c.str_arg(),), edge_inputs=((ch * 2,),),
               what_long=f"returns the number of occurrences of the character {_q(ch)} in {s}")


@_template("strings", "str")
def _first_chars(c: Ctx) -> Draft:
  k = c.small(1, 3 if c.level == 0 else 5); s, = c.args
  return Draft((k,), f"returns the first {k} characters of {s}", f"    return {s}[:{k}]",
               lambda v: v[:k], lambda: (c.str_arg(),), edge_inputs=(("abcdefgh"[:k + 1],),))


@_template("strings", "str")
def _last_chars(c: Ctx) -> Draft:
  k = c.small(1, 3 if c.level == 0 else 5); s, = c.args
  return Draft((k,), f"returns the last {k} characters of {s}", f"    return {s}[-{k}:]",
               lambda v: v[-k:], lambda: (c.str_arg(),), edge_inputs=(("abcdefgh"[:k + 1],),))


@_template("strings", "str")
def _replace_char(c: Ctx) -> Draft:
  a = c.letter(); b = c.letter(exclude=a); s, = c.args
  return Draft((a, b), f"returns {s} with each {_q(a)} replaced by {_q(b)}",
               f"    return {s}.replace({_q(a)}, {_q(b)})", lambda v: v.replace(a, b),
               lambda: (c.str_arg(),), edge_inputs=((a + b + a,),))


@_template("strings", "str")
def _upper_if_long(c: Ctx) -> Draft:
  k = c.small(1, 3 if c.level == 0 else 6); s, = c.args
  body = f"    if len({s}) > {k}:\n        return {s}.upper()\n    return {s}"
  return Draft((k,), f"returns {s} upper-cased if len({s}) > {k}, else {s}", body,
               lambda v: v.upper() if len(v) > k else v, lambda: (c.str_arg(),),
               edge_inputs=(("a" * k,), ("b" * (k + 1),)),
               what_long=f"returns {s} in upper case when it has more than {k} characters, and "
                         f"{s} unchanged otherwise")


@_template("strings", "str")
def _count_letters_in(c: Ctx) -> Draft:
  first = c.letter(); letters = "".join(sorted({first, c.letter(exclude=first)})); s, = c.args
  body = (f"    cnt = 0\n    for ch in {s}:\n        if ch in {_q(letters)}:\n            cnt += 1\n"
          f"    return cnt")
  return Draft((letters,), f"returns how many chars of {s} are in {_q(letters)}", body,
               lambda v: sum(ch in letters for ch in v), lambda: (c.str_arg(),),
               edge_inputs=((letters + "z",),),
               what_long=f"returns how many characters of {s} are one of the letters {_q(letters)}")


@_template("strings", "str")
def _pad_str(c: Ctx) -> Draft:
  ch = str(c.rng.choice(list("*-#.+"))); k = c.small(1, 3); s, = c.args
  return Draft((ch, k), f"returns {s} with {k} {_q(ch)} on each side",
               f"    return {_q(ch)} * {k} + {s} + {_q(ch)} * {k}", lambda v: ch * k + v + ch * k,
               lambda: (c.str_arg(),),
               what_long=f"returns {s} with {k} copies of {_q(ch)} added on both the left and right")


@_template("strings", "str")
def _reverse_append(c: Ctx) -> Draft:
  ch = str(c.rng.choice(list("!?.*#"))); s, = c.args
  return Draft((ch,), f"returns {s} reversed, then {_q(ch)}", f"    return {s}[::-1] + {_q(ch)}",
               lambda v: v[::-1] + ch, lambda: (c.str_arg(min_len=2),),
               what_long=f"returns {s} reversed, followed by the character {_q(ch)}")


@_template("strings", "str", min_level=1)
def _caesar(c: Ctx) -> Draft:
  k = c.small(1, 9 if c.level < 2 else 25); s, = c.args
  body = (f"    out = ''\n    for ch in {s}:\n        out += chr((ord(ch) - 97 + {k}) % 26 + 97)\n"
          f"    return out")
  return Draft((k,), f"returns {s} with each letter shifted {k} places forward in the alphabet, "
               "wrapping from z to a", body,
               lambda v: "".join(chr((ord(ch) - 97 + k) % 26 + 97) for ch in v),
               lambda: (c.str_arg(),), edge_inputs=(("xyz",),))


# =============================================================================== lists

@_template("lists", "list")
def _sum_plus(c: Ctx) -> Draft:
  k = c.const(); xs, = c.args
  return Draft((k,), f"returns sum({xs}) plus {k}", f"    return sum({xs}) + {k}",
               lambda v: sum(v) + k, lambda: (c.list_arg(),),
               what_long=f"returns the sum of the items of {xs} plus {k}")


@_template("lists", "list")
def _scale_list(c: Ctx) -> Draft:
  k = c.const(2); xs, = c.args
  return Draft((k,), f"returns each item of {xs} times {k}", f"    return [v * {k} for v in {xs}]",
               lambda v: [i * k for i in v], lambda: (c.list_arg(min_len=1),),
               what_long=f"returns a new list with every item of {xs} multiplied by {k}")


@_template("lists", "list")
def _filter_gt(c: Ctx) -> Draft:
  k = c.const() if c.level else c.small(2, 7); xs, = c.args
  return Draft((k,), f"returns the items of {xs} above {k}", f"    return [v for v in {xs} if v > {k}]",
               lambda v: [i for i in v if i > k], lambda: (c.list_arg(),),
               edge_inputs=(([k, k + 1, k - 1],),),
               what_long=f"returns the items of {xs} that are greater than {k}, in their original order")


@_template("lists", "list")
def _count_gt(c: Ctx) -> Draft:
  k = c.const() if c.level else c.small(2, 7); xs, = c.args
  body = f"    cnt = 0\n    for v in {xs}:\n        if v > {k}:\n            cnt += 1\n    return cnt"
  return Draft((k,), f"returns how many items of {xs} are above {k}", body,
               lambda v: sum(i > k for i in v), lambda: (c.list_arg(),),
               edge_inputs=(([k, k + 1],),),
               what_long=f"returns how many items of {xs} are strictly greater than {k}")


@_template("lists", "list")
def _max_or_default(c: Ctx) -> Draft:
  k = c.const(); xs, = c.args
  body = f"    if not {xs}:\n        return {k}\n    return max({xs})"
  return Draft((k,), f"returns max({xs}), or {k} if {xs} is empty", body,
               lambda v: max(v) if v else k, lambda: (c.list_arg(min_len=1),), edge_inputs=(([],),),
               what_long=f"returns the largest item of {xs}, or {k} when {xs} is empty")


@_template("lists", "list")
def _index_of(c: Ctx) -> Draft:
  k = c.small(0, 9) if c.level == 0 else c.const(); xs, = c.args
  body = (f"    for i, v in enumerate({xs}):\n        if v == {k}:\n            return i\n"
          f"    return -1")
  return Draft((k,), f"returns the index of the first {k} in {xs}, or -1", body,
               lambda v: v.index(k) if k in v else -1, lambda: (c.list_arg(),),
               edge_inputs=(([k + 1, k, k],), ([k + 1],)),
               what_long=f"returns the position of the first item equal to {k} in {xs}, or -1 if "
                         "there is none")


@_template("lists", "list")
def _every_nth(c: Ctx) -> Draft:
  k = c.small(2, 3); xs, = c.args
  return Draft((k,), f"returns every {k}th item of {xs}, from the first", f"    return {xs}[::{k}]",
               lambda v: v[::k], lambda: (c.list_arg(),), edge_inputs=(([1, 2, 3, 4, 5],),),
               what_long=f"returns the items of {xs} at positions 0, {k}, {2 * k}, and so on")


@_template("lists", "list")
def _prefix_sums(c: Ctx) -> Draft:
  k = c.const(); xs, = c.args
  body = (f"    out = []\n    acc = {k}\n    for v in {xs}:\n        acc += v\n        out.append(acc)\n"
          f"    return out")

  def oracle(v):
    out, acc = [], k
    for i in v:
      acc += i
      out.append(acc)
    return out
  return Draft((k,), f"returns the running totals of {xs}, starting at {k}", body, oracle,
               lambda: (c.list_arg(min_len=1),),
               what_long=f"returns the list of running totals of {xs}, where the total starts at {k}")


@_template("lists", "list")
def _top_n(c: Ctx) -> Draft:
  k = c.small(1, 3); xs, = c.args
  return Draft((k,), f"returns the {k} largest items of {xs}, largest first",
               f"    return sorted({xs}, reverse=True)[:{k}]", lambda v: sorted(v)[::-1][:k],
               lambda: (c.list_arg(),), edge_inputs=(([3, 1, 2, 5],),))


@_template("lists", "list")
def _unique_first(c: Ctx) -> Draft:
  k = c.small(1, 4); xs, = c.args
  body = (f"    out = []\n    for v in {xs}:\n        if v not in out:\n            out.append(v)\n"
          f"    return out[:{k}]")
  return Draft((k,), f"returns the first {k} distinct items of {xs}", body,
               lambda v: list(dict.fromkeys(v))[:k], lambda: (c.list_arg(),),
               edge_inputs=(([2, 2, 3, 3, 4, 5, 6],),),
               what_long=f"returns at most {k} distinct items of {xs}, in the order they first appear")


# =============================================================================== dicts

@_template("dicts", "dict")
def _get_default(c: Ctx) -> Draft:
  key = c.letter(); k = c.const(); d, = c.args
  return Draft((key, k), f"returns {d}[{_q(key)}] if present, else {k}",
               f"    return {d}.get({_q(key)}, {k})", lambda v: v.get(key, k),
               lambda: (c.dict_arg(include=key),), edge_inputs=(({key: 1},), ({},)),
               what_long=f"returns the value stored under {_q(key)} in {d}, or {k} if the key is missing")


@_template("dicts", "dict")
def _sum_values_plus(c: Ctx) -> Draft:
  k = c.const(); d, = c.args
  return Draft((k,), f"returns the sum of the values of {d} plus {k}",
               f"    return sum({d}.values()) + {k}", lambda v: sum(v.values()) + k,
               lambda: (c.dict_arg(),))


@_template("dicts", "dict")
def _keys_above(c: Ctx) -> Draft:
  k = c.const() if c.level else c.small(2, 7); d, = c.args
  return Draft((k,), f"returns the sorted keys of {d} with value above {k}",
               f"    return sorted([key for key in {d} if {d}[key] > {k}])",
               lambda v: sorted(key for key, val in v.items() if val > k), lambda: (c.dict_arg(),),
               edge_inputs=(({"a": k, "b": k + 1},),),
               what_long=f"returns, sorted, the keys of {d} whose value is greater than {k}")


@_template("dicts", "str")
def _char_counts(c: Ctx) -> Draft:
  k = c.small(1, 2); s, = c.args
  body = (f"    tally = {{}}\n    for ch in {s}:\n        tally[ch] = tally.get(ch, 0) + 1\n"
          f"    return {{ch: cnt for ch, cnt in tally.items() if cnt >= {k}}}")

  def oracle(v):
    counts: dict = {}
    for ch in v:
      counts[ch] = counts.get(ch, 0) + 1
    return {ch: n for ch, n in counts.items() if n >= k}
  return Draft((k,), f"returns a dict of the chars of {s} seen at least {k} times, with counts",
               body, oracle, lambda: (c.str_arg(),), edge_inputs=(("abca",),),
               what_long=f"returns a dict mapping each character that occurs at least {k} times in "
                         f"{s} to its number of occurrences")


@_template("dicts", "dict", "str")
def _add_to_key(c: Ctx) -> Draft:
  k = c.const(); d, s = c.args
  body = f"    out = dict({d})\n    out[{s}] = out.get({s}, 0) + {k}\n    return out"

  def oracle(v, key):
    out = dict(v)
    out[key] = out.get(key, 0) + k
    return out
  return Draft((k,), f"returns a copy of {d} with {k} added to {d}[{s}] (default 0)", body, oracle,
               lambda: (c.dict_arg(), c.letter()), edge_inputs=(({"a": 1}, "a"),),
               what_long=f"returns a copy of {d} in which the value under key {s} is increased by "
                         f"{k} (a missing key counts as 0)")


# =============================================================================== loops

@_template("loops", "int")
def _count_multiples(c: Ctx) -> Draft:
  k = c.const(2) if c.level else c.small(2, 4); x, = c.args
  body = (f"    cnt = 0\n    for i in range(1, {x} + 1):\n        if i % {k} == 0:\n            cnt += 1\n"
          f"    return cnt")
  return Draft((k,), f"returns how many of 1..{x} are divisible by {k}", body,
               lambda v: max(v, 0) // k, lambda: (c.int_arg(nonneg=True),), edge_inputs=((k,),),
               what_long=f"returns how many integers from 1 to {x} inclusive are divisible by {k}")


@_template("loops", "int")
def _sum_multiples_below(c: Ctx) -> Draft:
  k = c.const(2) if c.level else c.small(2, 4); x, = c.args
  body = (f"    acc = 0\n    for i in range({x}):\n        if i % {k} == 0:\n            acc += i\n"
          f"    return acc")
  return Draft((k,), f"returns the sum of the multiples of {k} below {x}", body,
               lambda v: sum(i for i in range(v) if i % k == 0), lambda: (c.int_arg(nonneg=True),),
               edge_inputs=((k + 1,),),
               what_long=f"returns the sum of all non-negative multiples of {k} that are smaller than {x}")


@_template("loops", "int", min_level=1)
def _fib_like(c: Ctx) -> Draft:
  a, b = c.const(), c.const(); x, = c.args
  body = f"    prev, cur = {a}, {b}\n    for i in range({x}):\n        prev, cur = cur, prev + cur\n    return prev"

  def oracle(v):
    seq = [a, b]
    while len(seq) <= v:
      seq.append(seq[-1] + seq[-2])
    return seq[v]
  return Draft((a, b), f"returns term {x} (from 0) of the sequence {a}, {b}, ... where each term "
               "is the sum of the two before it", body, oracle,
               lambda: (c.int_in(0, 12),), edge_inputs=((0,), (1,), (2,)))


@_template("loops", "int")
def _gcd_const(c: Ctx) -> Draft:
  k = c.const(2); x, = c.args
  body = f"    hi, lo = {x}, {k}\n    while lo:\n        hi, lo = lo, hi % lo\n    return hi"
  return Draft((k,), f"returns the greatest common divisor of {x} and {k}", body,
               lambda v: math.gcd(v, k), lambda: (c.int_arg(nonneg=True),), edge_inputs=((0,), (2 * k,)))


@_template("loops", "int")
def _digit_sum_times(c: Ctx) -> Draft:
  k = c.const(2) if c.level else c.small(2, 4); x, = c.args
  body = f"    acc = 0\n    while {x} > 0:\n        acc += {x} % 10\n        {x} //= 10\n    return acc * {k}"
  return Draft((k,), f"returns the digit sum of {x} times {k}", body,
               lambda v: sum(map(int, str(v))) * k,
               lambda: (c.int_in(0, {0: 99, 1: 999, 2: 99999}[c.level]),), edge_inputs=((0,),),
               what_long=f"returns the sum of the decimal digits of the non-negative {x}, multiplied by {k}")


@_template("loops", "int")
def _power_loop(c: Ctx) -> Draft:
  k = c.small(0, 4); x, = c.args
  body = f"    acc = 1\n    for i in range({k}):\n        acc *= {x}\n    return acc"
  return Draft((k,), f"returns {x} to the power {k}, using a loop", body, lambda v: v ** k,
               lambda: (c.int_arg(),), edge_inputs=((2,), (3,)),
               what_long=f"returns {x} raised to the power {k}, computed with a loop of multiplications")


@_template("loops", "int")
def _halving_steps(c: Ctx) -> Draft:
  k = c.small(2, 4); x, = c.args
  body = f"    cnt = 0\n    while {x} > 0:\n        {x} //= {k}\n        cnt += 1\n    return cnt"

  def oracle(v):
    steps = 0
    while v > 0:
      v, steps = v // k, steps + 1
    return steps
  return Draft((k,), f"returns how many times {x} // {k} runs until {x} is 0", body, oracle,
               lambda: (c.int_in(0, {0: 30, 1: 200, 2: 10000}[c.level]),),
               edge_inputs=((0,), (k,), (k - 1,)),
               what_long=f"returns how many integer divisions by {k} it takes to bring the "
                         f"non-negative {x} down to 0")


@_template("loops", "list")
def _count_changes(c: Ctx) -> Draft:
  k = c.const(); xs, = c.args
  body = (f"    cnt = {k}\n    for i in range(1, len({xs})):\n        if {xs}[i] != {xs}[i - 1]:\n"
          f"            cnt += 1\n    return cnt")
  return Draft((k,), f"returns {k} plus how many items of {xs} differ from the previous one", body,
               lambda v: k + sum(v[i] != v[i - 1] for i in range(1, len(v))),
               lambda: (c.list_arg(),), edge_inputs=(([1, 1, 2, 2, 1],),))
