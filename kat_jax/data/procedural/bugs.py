"""Buggy variants of reference solutions, with the failing test output (self-debugging data, LeDex).

Every single-site mutation of the solution's AST is tried — integer constants ±1, string constants
changed, comparison / arithmetic / boolean operators swapped, ``min``/``max`` and ``upper``/``lower``
exchanged, unary minus dropped, one argument used in place of another — and a mutant is kept when
it fails at least one of the task's tests within the step limit (mutants that loop forever are
dropped unless ``allow_timeouts``). Mutants are formatted by ``ast.unparse`` like the reference, so
the diff between a variant and the reference is exactly the mutation::

    for variant in buggy_variants(task, max_variants=3):
        variant.code, variant.mutation, variant.feedback   # feedback: failed assertions as text
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
from typing import Iterator, Optional

import numpy as np

from kat_jax.data.procedural.task import Task, TestReport, run_tests

_COMPARE_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
                  ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In}
_BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.FloorDiv: ast.Mod,
                ast.Mod: ast.FloorDiv}
_NAME_SWAPS = {"min": "max", "max": "min"}
_ATTR_SWAPS = {"upper": "lower", "lower": "upper"}


@dataclasses.dataclass(frozen=True)
class BuggyVariant:
  code: str
  mutation: str
  report: TestReport

  @property
  def feedback(self) -> str:
    return self.report.feedback()


def _mutations_of(node: ast.AST, arg_names: list[str]) -> list[tuple[str, callable]]:
  """(description, in-place edit) pairs for one node."""
  out = []
  if isinstance(node, ast.Constant):
    v = node.value
    if isinstance(v, bool):
      out.append((f"{v} -> {not v}", lambda n: setattr(n, "value", not n.value)))
    elif isinstance(v, int):
      out.append((f"constant {v} -> {v + 1}", lambda n: setattr(n, "value", n.value + 1)))
      out.append((f"constant {v} -> {v - 1}", lambda n: setattr(n, "value", n.value - 1)))
    elif isinstance(v, str) and v:
      new = v[:-1] if len(v) > 1 else ("a" if v != "a" else "b")
      out.append((f"string {v!r} -> {new!r}", lambda n, new=new: setattr(n, "value", new)))
  elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BINOP_SWAPS:
    new = _BINOP_SWAPS[type(node.op)]
    out.append((f"{type(node.op).__name__} -> {new.__name__}", lambda n, new=new: setattr(n, "op", new())))
  elif isinstance(node, ast.Compare):
    for i, op in enumerate(node.ops):
      if type(op) in _COMPARE_SWAPS:
        new = _COMPARE_SWAPS[type(op)]
        out.append((f"{type(op).__name__} -> {new.__name__}",
                    lambda n, i=i, new=new: n.ops.__setitem__(i, new())))
  elif isinstance(node, ast.BoolOp):
    new = ast.Or if isinstance(node.op, ast.And) else ast.And
    out.append((f"{type(node.op).__name__} -> {new.__name__}", lambda n, new=new: setattr(n, "op", new())))
  elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
    if node.id in _NAME_SWAPS:
      new = _NAME_SWAPS[node.id]
      out.append((f"{node.id} -> {new}", lambda n, new=new: setattr(n, "id", new)))
    elif node.id in arg_names:
      for other in arg_names:
        if other != node.id:
          out.append((f"argument {node.id} -> {other}", lambda n, o=other: setattr(n, "id", o)))
  elif isinstance(node, ast.Attribute) and node.attr in _ATTR_SWAPS:
    new = _ATTR_SWAPS[node.attr]
    out.append((f".{node.attr} -> .{new}", lambda n, new=new: setattr(n, "attr", new)))
  return out  # unary operators are dropped by _DropUnary (the edit replaces the node itself)


class _DropUnary(ast.NodeTransformer):
  def __init__(self, target_index: int):
    self.target, self.index = target_index, -1

  def visit_UnaryOp(self, node):
    self.index += 1
    self.generic_visit(node)
    if self.index == self.target:
      return node.operand
    return node


def mutants(code: str, arg_names: list[str]) -> Iterator[tuple[str, str]]:
  """Every single-site mutant of ``code`` as (description, source), in a deterministic order,
  skipping mutants identical to the original."""
  original = ast.unparse(ast.parse(code))
  n_nodes = len(list(ast.walk(ast.parse(code))))
  nodes = list(ast.walk(ast.parse(code)))
  for index in range(n_nodes):
    node = nodes[index]
    line = getattr(node, "lineno", None)
    for k, (description, _) in enumerate(_mutations_of(node, arg_names)):
      tree = ast.parse(code)
      target = list(ast.walk(tree))[index]
      _mutations_of(target, arg_names)[k][1](target)
      source = ast.unparse(tree)
      if source != original:
        yield f"{description} (line {line})", source + "\n"
  tree = ast.parse(code)
  n_unary = sum(isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.Not))
                for n in ast.walk(tree))
  for k in range(n_unary):
    tree = _DropUnary(k).visit(ast.parse(code))
    source = ast.unparse(tree)
    if source != original:
      yield "dropped unary operator", source + "\n"


def buggy_variants(task: Task, *, max_variants: Optional[int] = 3, allow_timeouts: bool = False,
                   max_steps: int = 20_000) -> list[BuggyVariant]:
  """Up to ``max_variants`` distinct mutants of the reference that fail at least one test
  (all of them with ``max_variants=None``), chosen deterministically from the task id."""
  found, seen = [], set()
  for description, code in mutants(task.solution, list(task.arg_names)):
    if code in seen:
      continue
    seen.add(code)
    report = run_tests(code, task, max_steps=max_steps)
    if report.all_passed:
      continue
    if not allow_timeouts and any("did not finish" in f for f in report.failures):
      continue
    found.append(BuggyVariant(code, description, report))
  if max_variants is None or len(found) <= max_variants:
    return found
  seed = int.from_bytes(hashlib.sha256(task.task_id.encode()).digest()[:8], "big")
  keep = np.random.default_rng(seed).choice(len(found), size=max_variants, replace=False)
  return [found[i] for i in sorted(keep)]
