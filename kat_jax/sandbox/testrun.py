"""A standard-library test runner for directory jobs: test ids, module names, running one test.

Test ids are pytest node ids restricted to what the standard library runs::

    tests/test_mod.py::test_fn            a function: passes iff calling it returns (a
                                          coroutine or generator function fails: its body
                                          would not run)
    tests/test_mod.py::TestX::test_y      a method: of a unittest.TestCase subclass (run by
                                          unittest: setUpModule/setUpClass/setUp and their
                                          tear-downs; passes iff successful and not skipped),
                                          or of a plain class instantiated without arguments

    path, parts = parse_test_id("tests/test_mod.py::TestX::test_y")
    run_test(module, parts)     # None, or raises the test's failure

Parametrized ids (``test_fn[1]``) and pytest fixtures are not supported (such ids fail). Used by
the judge (trusted tests, proxy mode) and by the program process (inline mode), so standard
library only: it is imported before the program process is confined.
"""
import ast
import sys
import traceback
import types

_ERROR_CHARS = 2000
_TEST_DIRS = ("tests", "test")


class TestIdError(ValueError):
  """A test id that does not name a runnable test."""
  __test__ = False   # not a pytest test class


class TestFailed(Exception):
  """A unittest case that failed, erred or was skipped, with unittest's own report."""
  __test__ = False

  def __init__(self, error_type: str, message: str):
    super().__init__(message)
    self.error_type = error_type


def module_name_of(path: str):
  """``pkg/mod.py`` -> ``pkg.mod``, ``pkg/__init__.py`` -> ``pkg``; None if not importable."""
  if not path.endswith(".py"):
    return None
  parts = path[:-3].split("/")
  if parts[-1] == "__init__":
    parts = parts[:-1]
  if not parts or not all(part.isidentifier() for part in parts):
    return None
  return ".".join(parts)


def is_test_path(path: str) -> bool:
  """Whether ``path`` is test code by pytest's conventions: under a tests/ directory, or named
  test_*.py, *_test.py or conftest.py."""
  parts = path.split("/")
  name = parts[-1]
  return (any(part in _TEST_DIRS for part in parts[:-1]) or name == "conftest.py"
          or (name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py"))))


def parse_test_id(test_id) -> tuple:
  """(file path, [object name, method name?]) of a test id; raises TestIdError."""
  if not isinstance(test_id, str):
    raise TestIdError(f"a test id must be a string, got {type(test_id).__name__}")
  path, _, rest = test_id.partition("::")
  parts = rest.split("::") if rest else []
  if not path.endswith(".py") or not 1 <= len(parts) <= 2:
    raise TestIdError(f"test id {test_id[:200]!r} is not 'path/to/test_file.py::test_name' or "
                      "'path/to/test_file.py::TestClass::test_name'")
  if not all(part.isidentifier() for part in parts):
    raise TestIdError(f"test id {test_id[:200]!r}: parametrized or non-identifier test names are "
                      "not supported")
  return path, parts


def run_test(module, parts, foreign=None) -> None:
  """Runs the test ``parts`` names in ``module``; returns iff it passed (see the docstring).
  ``foreign(obj)`` True refuses a test object that is not the test module's own code (the judge
  refuses proxies of program functions)."""
  if parts[0] not in vars(module):
    raise TestIdError(f"{module.__name__} has no test {parts[0]!r}")
  owner = vars(module)[parts[0]]
  if foreign is not None and foreign(owner):
    raise TestIdError(f"{module.__name__}.{parts[0]} is not test code (it comes from the program)")
  if len(parts) == 1:
    if not callable(owner):
      raise TestIdError(f"{module.__name__}.{parts[0]} is not a test function")
    _check_returned(owner(), parts[0])
    return
  if not isinstance(owner, type):
    raise TestIdError(f"{module.__name__}.{parts[0]} is not a test class")
  if not hasattr(owner, parts[1]):
    raise TestIdError(f"{module.__name__}.{parts[0]} has no test {parts[1]!r}")
  # A TestCase subclass exists only if unittest was imported: the runner never imports it (it
  # would weigh on every sandbox fork).
  unittest = sys.modules.get("unittest")
  if unittest is not None and issubclass(owner, unittest.TestCase):
    _run_unittest(unittest, owner, parts[1])
    return
  _check_returned(getattr(owner(), parts[1])(), parts[1])


def _check_returned(value, name: str) -> None:
  """A test that is a coroutine or generator function did not run its body: not a pass."""
  if isinstance(value, (types.CoroutineType, types.GeneratorType)):
    value.close()
    raise TestFailed("NotRun", f"{name} is a coroutine or generator function; only plain "
                     "functions run as tests here")


def _result_class(unittest):
  """A unittest.TestResult that records verdicts and keeps the BaseExceptions that unittest's
  bare ``except:`` would swallow (a deadline, a dead program process) so they still propagate."""

  class Result(unittest.TestResult):
    def __init__(self):
      super().__init__()
      self.escalate = None
      self.first_type = None   # type name of the first error or failure

    def _keep(self, err):
      if err is None:
        return
      if self.first_type is None:
        self.first_type = getattr(err[0], "__name__", "<unnamed>")
      if not issubclass(err[0], Exception) and self.escalate is None:
        self.escalate = err[1]

    def addError(self, test, err):
      self._keep(err)
      super().addError(test, err)

    def addFailure(self, test, err):
      self._keep(err)
      super().addFailure(test, err)

    def addSubTest(self, test, subtest, err):
      self._keep(err)
      super().addSubTest(test, subtest, err)

  return Result


def _run_unittest(unittest, case_class, method: str) -> None:
  result = _result_class(unittest)()
  unittest.TestSuite([case_class(method)]).run(result)
  if result.escalate is not None:
    raise result.escalate
  problems = result.errors + result.failures
  if problems:
    raise TestFailed(str(result.first_type)[:200], problems[0][1][-_ERROR_CHARS:])
  if result.unexpectedSuccesses:
    raise TestFailed("UnexpectedSuccess", f"{case_class.__name__}.{method} is marked "
                     "expectedFailure but passed")
  if result.skipped:
    raise TestFailed("Skipped", f"skipped: {result.skipped[0][1]}"[:_ERROR_CHARS])
  if result.testsRun != 1:
    raise TestFailed("NotRun", f"{result.testsRun} tests ran instead of 1")


def describe_failure(error: BaseException, frame_name=None) -> tuple:
  """(type name, message) of a failed test. With ``frame_name(filename)`` (a display name, or
  None to drop the frame), the message is the traceback of the frames it keeps (the test's and
  the program's, not the harness's)."""
  try:
    name = error.error_type if isinstance(error, TestFailed) else type(error).__name__
    message = str(error)
  except BaseException:  # noqa: BLE001 - hostile __str__ in the program process
    return "<unprintable>", "<unprintable>"
  if frame_name is not None and not isinstance(error, TestFailed):
    try:
      frames = []
      for frame in traceback.extract_tb(error.__traceback__):
        shown = frame_name(frame.filename)
        if shown is not None:
          frame.filename = shown
          frames.append(frame)
      if frames:
        message = ("Traceback (most recent call last):\n"
                   + "".join(traceback.format_list(frames)) + f"{name}: {message}")
    except BaseException:  # noqa: BLE001
      pass
  if type(name) is not str or type(message) is not str:
    return "<unprintable>", "<unprintable>"
  return name[:200], message[-_ERROR_CHARS:]


def stdlib_module_names() -> frozenset:
  """Top-level names of the standard library (never served from a job's files in the judge)."""
  return frozenset(sys.stdlib_module_names) | frozenset(sys.builtin_module_names)


# ------------------------------------------------------------------------- assertion messages

_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
        ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}
_EXPLAIN = "_kat_explain_assert"


def explain_assert(left, op: str, right) -> str:
  """The message of a failed ``assert left <op> right``: both values (reprs cut at 300 chars)."""
  def shown(value):
    try:
      text = repr(value)
    except BaseException:  # noqa: BLE001 - a hostile __repr__ (inline mode)
      return "<unprintable>"
    return text if len(text) <= 300 else text[:300] + "..."
  return f"assert {shown(left)} {op} {shown(right)}"


class _AssertRewriter(ast.NodeTransformer):
  """``assert a == b`` -> ``assert (l := a) == (r := b), explain(l, "==", r)`` (no message of
  its own, one comparison operator): each side is evaluated once, in order, as before."""

  def __init__(self):
    self.count = 0

  def visit_Assert(self, node):
    test = node.test
    if node.msg is not None or not isinstance(test, ast.Compare) or len(test.ops) != 1 or (
        type(test.ops[0]) not in _OPS):
      return node
    self.count += 1
    left_name, right_name = f"_kat_left_{self.count}", f"_kat_right_{self.count}"
    left = ast.NamedExpr(ast.Name(left_name, ast.Store()), test.left)
    right = ast.NamedExpr(ast.Name(right_name, ast.Store()), test.comparators[0])
    message = ast.Call(ast.Name(_EXPLAIN, ast.Load()),
                       [ast.Name(left_name, ast.Load()), ast.Constant(_OPS[type(test.ops[0])]),
                        ast.Name(right_name, ast.Load())], [])
    rewritten = ast.Assert(ast.Compare(left, test.ops, [right]), message)
    return ast.copy_location(rewritten, node)

  def visit_ClassDef(self, node):  # an assignment expression may not bind in a class body
    node.body = [self.visit(child) if not isinstance(child, ast.Assert) else child
                 for child in node.body]
    return node


def compile_test(source: str, filename: str):
  """Code of a test module whose plain ``assert x == y`` statements report both values (as
  pytest's do). Source that does not parse is compiled as is: its SyntaxError is the usual one."""
  try:
    tree = ast.parse(source, filename)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return compile(source, filename, "exec")
  tree = ast.fix_missing_locations(_AssertRewriter().visit(tree))
  try:
    return compile(tree, filename, "exec")
  except SyntaxError:  # e.g. a rewritten assert where an assignment expression may not bind
    return compile(source, filename, "exec")


def test_globals() -> dict:
  """Names the rewritten asserts use; put into a test module's namespace before it runs."""
  return {_EXPLAIN: explain_assert}
