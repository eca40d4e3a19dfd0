"""Cyclomatic complexity of a program (radon's counting rules) and the complexity reward term.

``cyclomatic_complexity(code)`` is 1 + the number of decision points anywhere in the module, each
counted by radon's ``ComplexityVisitor`` (``if`` / ternary, ``for`` / ``while`` (+1 for their
``else``), each extra operand of ``and`` / ``or``, comprehensions and their ``if`` clauses,
``except`` handlers and ``try``'s ``else``, ``match`` cases, ``assert``). For a single function
it equals radon's ``cc_visit(code)[0].complexity``; unlike radon's ``total_complexity`` it also
counts the branches of nested functions (radon leaves closures out of their parent), so a policy
cannot hide branches in an inner ``def``. The code is only parsed (``ast``), never run::

    cyclomatic_complexity("def f(x):\\n  return 1 if x else 2\\n")    # 2
    complexity_score(prediction, reference)                          # min(1, C_ref / C_pred)
"""
from __future__ import annotations

import ast
from typing import Optional

_SCOPES = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def parse_python(code: str) -> Optional[ast.Module]:
  """The module's AST, or None when ``code`` is not valid Python (including source the parser
  rejects as too deeply nested or containing null bytes)."""
  try:
    return ast.parse(code)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None


def cyclomatic_complexity(code: str) -> Optional[int]:
  """1 + the decision points of every scope (module, functions, methods, classes, closures), or
  None when ``code`` does not parse."""
  from radon.visitors import ComplexityVisitor   # imported here: only complexity rewards need it
  tree = parse_python(code)
  if tree is None:
    return None
  decisions = 0
  try:
    for scope in ast.walk(tree):
      if isinstance(scope, _SCOPES):
        # A visitor started at 0 counts one statement's decision points and records (without
        # counting) the functions and classes it meets; ast.walk reaches those as scopes.
        decisions += sum(ComplexityVisitor.from_ast(stmt, off=False).complexity
                         for stmt in scope.body)
  except RecursionError:   # nesting deep enough to exhaust the visitor's recursion
    return None
  return 1 + decisions


def complexity_score(prediction: str, reference: str, power: float = 1.0) -> float:
  """``min(1, C_ref / C_pred) ** power`` with C the ``cyclomatic_complexity``: 1 when the
  prediction is as simple as the reference or simpler, ``(C_ref / C_pred) ** power`` when it is
  more complex, 0 when it does not parse. C >= 1 for any valid module, so the ratio is defined.

  Raises ValueError when the reference is empty or does not parse (an environment bug, not model
  behaviour).
  """
  c_ref = cyclomatic_complexity(reference) if reference.strip() else None
  if c_ref is None:
    raise ValueError(f"the reference solution is empty or does not parse as Python, so its "
                     f"complexity is undefined: Grade.reference must hold the reference source "
                     f"(got {reference[:80]!r}{'...' if len(reference) > 80 else ''})")
  c_pred = cyclomatic_complexity(prediction)
  if c_pred is None:
    return 0.0
  return min(1.0, c_ref / c_pred) ** power
