"""The sandbox's directory mode (DirectoryJob): semantics, equivalence with the trusted runner on
generated repositories, and a hostile battery.

Hostile cases follow ``test_sandbox_forging``: each forged repository has a wrong ``add`` and
``scale`` plus a trick meant to make the trusted tests pass anyway; its honest twin (correct code,
keeping whatever part of the trick is harmless) must pass, so a sandbox that failed everything
would fail these tests too. Inline-mode controls show the weaknesses the package docstring
documents (the tests run beside the program there).
"""
import dataclasses
import json
import textwrap
from typing import Optional

import pytest

from kat_jax.data.procedural.repos import apply_patch, make_repo_task, run_repo_tests
from kat_jax.sandbox import CallTest, DirectoryJob, Job
from kat_jax.sandbox import testrun
from sandbox_helpers import TIGHT_LIMITS, pool, processes_of_uid  # noqa: F401 (fixture)

CORRECT = textwrap.dedent("""\
    def add(a, b):
      return a + b


    def scale(xs, k):
      return [x * k for x in xs]
    """)
WRONG = textwrap.dedent("""\
    def add(a, b):
      return a - b


    def scale(xs, k):
      return [x + k for x in xs]
    """)
SECRET = "kat-secret-7d1e9a"   # appears only in the trusted test file
TEST_FILE = textwrap.dedent(f"""\
    import unittest

    from calc.ops import add, scale

    EXPECTED_NOTE = {SECRET!r}


    def test_add():
      assert add(2, 3) == 5


    def test_scale():
      assert scale([1, 2], 3) == [3, 6]


    class TestAdd(unittest.TestCase):
      def test_add_negative(self):
        self.assertEqual(add(-2, -3), -5)
    """)
TEST_FILES = {"tests/test_ops.py": TEST_FILE}
TESTS = ("tests/test_ops.py::test_add", "tests/test_ops.py::test_scale",
         "tests/test_ops.py::TestAdd::test_add_negative")


def repo(ops: str, extra: Optional[dict] = None) -> dict:
  return {"calc/__init__.py": '"""calc: arithmetic."""\n', "calc/ops.py": ops, **(extra or {})}


def run(pool, files, tests=TESTS, test_files=TEST_FILES, **job_args):  # noqa: F811
  result = pool.run(DirectoryJob(files=files, test_files=test_files, tests=tests, **job_args))
  assert result.isolation.get("namespaces") and result.isolation.get("chroot") and (
      result.isolation.get("uid") is not None), f"full isolation not granted: {result.isolation}"
  assert processes_of_uid(result.isolation["uid"]) == [], "processes survived the job"
  return result


def outcomes(result) -> dict:
  return {t.name: t.passed for t in result.tests}


# ------------------------------------------------------------------------------- semantics


def test_correct_passes_wrong_fails_with_assertion_values(pool):  # noqa: F811
  good, bad = run(pool, repo(CORRECT)), run(pool, repo(WRONG))
  assert good.passed and good.status == "completed", good
  assert good.modules == {"calc": None, "calc.ops": None}
  assert not any(outcomes(bad).values()) and bad.status == "completed"
  add = bad.tests[0]
  assert add.error_type == "AssertionError" and "assert -1 == 5" in add.error
  assert "tests/test_ops.py" in add.error and "assert add(2, 3) == 5" in add.error
  negative = bad.tests[2]   # unittest's own report, with the exception's type
  assert negative.error_type == "AssertionError" and "AssertionError: 1 != -5" in negative.error


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("mode", ["proxy", "inline"])
def test_outcomes_equal_the_trusted_runner_on_generated_repos(pool, seed, mode):  # noqa: F811
  """On code we generated, both modes give exactly the verdicts of repos.run_repo_tests (the
  unisolated reference runner), for the buggy and the fixed repository."""
  task = make_repo_task(seed, num_modules=2)
  ids = task.fail_to_pass + task.pass_to_pass
  tested = apply_patch(task.files, task.test_patch)
  test_files = {p: t for p, t in tested.items() if testrun.is_test_path(p)}
  for files in (task.files, apply_patch(task.files, task.gold_patch)):
    with_tests = {**files, **test_files}
    want = run_repo_tests(with_tests, ids)
    if mode == "proxy":
      result = run(pool, files, ids, test_files)
    else:
      result = run(pool, with_tests, ids, {}, mode="inline")
    assert outcomes(result) == want, (mode, result)
  assert not all(run_repo_tests({**task.files, **test_files}, task.fail_to_pass).values())


def test_missing_tests_fail_and_others_still_run(pool):  # noqa: F811
  ids = TESTS[:1] + ("tests/test_ops.py::test_absent", "tests/test_gone.py::test_add",
                     "tests/test_ops.py::TestAdd::test_absent", "tests/test_ops.py::test_x[1]",
                     "tests/test_ops.py", "tests/test_ops.py::add")
  result = run(pool, repo(CORRECT), ids)
  assert [t.passed for t in result.tests] == [True] + [False] * 6
  errors = {t.name: t.error for t in result.tests}
  assert "no test 'test_absent'" in errors["tests/test_ops.py::test_absent"]
  assert "no test file" in errors["tests/test_gone.py::test_add"]
  assert "parametrized" in errors["tests/test_ops.py::test_x[1]"]
  # `add` is bound in the trusted module, but it is the program's function, not a test.
  assert "not test code" in errors["tests/test_ops.py::add"]
  assert result.status == "completed"


def test_import_errors_are_reported_per_module_and_fail_only_their_tests(pool):  # noqa: F811
  files = repo(CORRECT, {"calc/broken.py": "def oops(:\n  pass\n"})
  test_files = {**TEST_FILES, "tests/test_broken.py": "from calc.broken import oops\n\n\n"
                "def test_oops():\n  assert oops() is None\n"}
  result = run(pool, files, TESTS + ("tests/test_broken.py::test_oops",), test_files)
  assert [t.passed for t in result.tests] == [True, True, True, False]
  assert result.modules["calc.ops"] is None and result.modules["calc"] is None
  assert result.modules["calc.broken"].startswith("SyntaxError")
  assert result.tests[3].error_type == "ImportError" and "SyntaxError" in result.tests[3].error


def test_proxies_cover_constants_packages_classes_and_exceptions(pool):  # noqa: F811
  files = {
      "calc/__init__.py": "from calc.ops import add\nVERSION = (1, 2)\n",
      "calc/ops.py": CORRECT + textwrap.dedent("""\
          LIMITS = {"max": 10}

          class Box:
            unit = 3
            @staticmethod
            def make(n):
              return [Box.unit] * n

          def check(x):
            if x < 0:
              raise ValueError(f"negative: {x}")
            return x

          def apply(f, x):
            return f(x)
          """),
      "calc/deep/inner/mod.py": "def depth():\n  return 3\n",
  }
  tests_source = textwrap.dedent("""\
      import unittest
      import calc
      import calc.ops as ops
      from calc import add, VERSION
      from calc.deep.inner import mod
      from calc.ops import Box, LIMITS, check, apply

      def test_constants():
        assert VERSION == (1, 2) and type(VERSION) is tuple and LIMITS == {"max": 10}

      def test_reexport_and_module_attribute():
        assert add(1, 2) == 3 and calc.add(2, 2) == 4 and ops.scale([1], 2) == [2]

      def test_namespace_packages():
        assert mod.depth() == 3

      def test_class_attributes_and_static_methods():
        assert Box.unit == 3 and Box.make(2) == [3, 3]

      def test_instances_do_not_cross():
        Box()

      def test_callbacks_do_not_cross():
        apply(lambda x: x, 1)

      def test_program_objects_have_no_truth_value():
        assert Box

      class TestExceptions(unittest.TestCase):
        def test_value_error_crosses_as_value_error(self):
          with self.assertRaisesRegex(ValueError, "negative: -1"):
            check(-1)
          self.assertEqual(check(2), 2)
      """)
  names = ["test_constants", "test_reexport_and_module_attribute", "test_namespace_packages",
           "test_class_attributes_and_static_methods", "test_instances_do_not_cross",
           "test_callbacks_do_not_cross", "test_program_objects_have_no_truth_value",
           "TestExceptions::test_value_error_crosses_as_value_error"]
  result = run(pool, files, tuple(f"tests/test_p.py::{n}" for n in names),
               {"tests/test_p.py": tests_source})
  assert [t.passed for t in result.tests] == [True] * 4 + [False] * 3 + [True], result.tests
  instance = result.tests[4]    # an instance is not plain data
  assert instance.error_type == "CandidateError" and "UnsupportedValue" in instance.error
  assert result.tests[5].error_type == "ProxyArgumentError"    # a callback is not plain data
  assert result.tests[6].error_type == "TypeError"


def test_unittest_fixtures_skips_and_expected_failures(pool):  # noqa: F811
  tests_source = textwrap.dedent("""\
      import unittest
      from calc.ops import add

      class TestFixtures(unittest.TestCase):
        @classmethod
        def setUpClass(cls):
          cls.base = add(1, 1)
        def setUp(self):
          self.offset = add(self.base, 1)
        def test_uses_fixtures(self):
          self.assertEqual(self.offset, 3)
        def test_skipped(self):
          self.skipTest("not today")
        @unittest.expectedFailure
        def test_expected_failure(self):
          self.assertEqual(add(1, 1), 3)
        @unittest.expectedFailure
        def test_unexpected_success(self):
          self.assertEqual(add(1, 1), 2)

      class Plain:
        def test_plain_method(self):
          assert add(2, 2) == 4

      async def test_coroutine():
        assert add(2, 2) == 5

      def test_generator():
        yield
        assert add(2, 2) == 5
      """)
  names = ["TestFixtures::test_uses_fixtures", "TestFixtures::test_skipped",
           "TestFixtures::test_expected_failure", "TestFixtures::test_unexpected_success",
           "Plain::test_plain_method", "test_coroutine", "test_generator"]
  for mode in ("proxy", "inline"):
    files = repo(CORRECT)
    test_files = {"tests/test_u.py": tests_source}
    if mode == "inline":
      files, test_files = {**files, **test_files}, {}
    result = run(pool, files, tuple(f"tests/test_u.py::{n}" for n in names), test_files,
                 mode=mode)
    assert [t.passed for t in result.tests] == [True, False, True, False, True, False, False], (
        mode, result)
    assert [t.error_type for t in result.tests[5:]] == ["NotRun", "NotRun"]   # bodies never ran
    assert result.tests[1].error_type == "Skipped" and "not today" in result.tests[1].error
    assert result.tests[3].error_type == "UnexpectedSuccess"


def test_invalid_jobs_are_refused_with_the_reason():
  for bad in ("../evil.py", "/etc/passwd", "a/../../b.py", "a\x00b.py", "a\\b.py", "x" * 2000,
              "/".join(["d"] * 40) + ".py", "a/" + "n" * 300 + ".py", "", "."):
    with pytest.raises(ValueError, match="DirectoryJob.files"):
      DirectoryJob(files={bad: ""}, tests=())
  with pytest.raises(ValueError, match="is a file and also the directory"):
    DirectoryJob(files={"calc": "", "calc/ops.py": ""}, tests=())
  with pytest.raises(ValueError, match="both name"):
    DirectoryJob(files={"calc/ops.py": "", "./calc//ops.py": ""}, tests=())
  with pytest.raises(ValueError, match="not valid UTF-8"):
    DirectoryJob(files={"calc/ops.py": "x = '\ud800'"}, tests=())
  with pytest.raises(ValueError, match="mode='proxy'"):
    DirectoryJob(files={}, test_files=TEST_FILES, tests=TESTS, mode="inline")
  with pytest.raises(TypeError, match="single string"):
    DirectoryJob(files={}, tests="tests/test_ops.py::test_add")
  job = DirectoryJob(files=repo(CORRECT, {"tests/test_ops.py": "edited", "tests/conftest.py": ""}),
                     test_files=TEST_FILES, tests=TESTS)
  assert "tests/test_ops.py" not in job.files and job.test_files == TEST_FILES
  assert job.imports == ("calc", "calc.ops")   # test code is not imported at load


# ------------------------------------------------------------------------------ hostile battery


@dataclasses.dataclass(frozen=True)
class Trick:
  name: str
  forged: dict
  honest: dict


_FAKE_OUTPUT = textwrap.dedent("""\
    import sys
    for stream in (sys.stdout, sys.stderr):
      print("PASSED", file=stream)
      print("===== 3 passed in 0.01s =====", file=stream)
      for i in range(3):
        print(json.dumps({"e": "test", "index": i, "passed": True}), file=stream)
      print('{"e":"end","status":"completed"}', file=stream, flush=True)
    """)
_FORGE_FRAMES = textwrap.dedent("""\
    import json, os
    def _frame(obj):
      data = json.dumps(obj).encode()
      return len(data).to_bytes(4, "big") + data
    fake = _frame({"op": "loaded", "ok": True, "modules": {}, "seconds": 0.0})
    for i in range(1, 40):
      fake += _frame({"op": "result", "id": i, "ok": True, "kind": "value", "value": 5})
      fake += _frame({"op": "test_done", "nonce": "0" * 32, "ok": True})
    for fd in range(3, 20):
      try:
        os.write(fd, fake)
      except OSError:
        pass
    """)
_PATCH_UNITTEST = textwrap.dedent("""\
    import builtins, unittest
    unittest.TestCase.assertEqual = lambda self, *args, **kwargs: None
    unittest.TestCase.run = lambda self, result=None: None
    unittest.TestResult.wasSuccessful = lambda self: True
    builtins.AssertionError = type("AssertionError", (Exception,), {})
    """)
_REWRITE_TESTS = textwrap.dedent("""\
    import os
    for root in (os.getcwd(), "/tmp", "/"):
      path = os.path.join(root, "tests", "test_ops.py")
      try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
          f.write("def test_add():\\n  pass\\n\\ndef test_scale():\\n  pass\\n")
      except OSError:
        pass
    """)
_EDITED_TESTS = ("def test_add():\n  pass\n\n\ndef test_scale():\n  pass\n\n\nclass TestAdd:\n"
                 "  def test_add_negative(self):\n    pass\n")
_CONFTEST = textwrap.dedent("""\
    import sys, unittest
    unittest.TestCase.assertEqual = lambda self, *args, **kwargs: None
    sys.exit(0)
    """)
_PATCH_HARNESS = textwrap.dedent("""\
    import sys
    for name, module in list(sys.modules.items()):
      if name.startswith("kat_jax.sandbox"):
        for attr in ("run_test", "_run_unittest", "describe_failure"):
          if hasattr(module, attr):
            setattr(module, attr, lambda *args, **kwargs: None)
    """)
_TEST_DIR_FILES = {"tests/conftest.py": _CONFTEST, "tests/__init__.py": "import os\nos._exit(0)\n",
                   "tests/test_ops.py": _EDITED_TESTS}
_ALWAYS_EQUAL = textwrap.dedent("""\
    class Anything(list):
      def __eq__(self, other): return True
      def __ne__(self, other): return False
      __hash__ = None
    class Int(int):
      def __eq__(self, other): return True
      __hash__ = int.__hash__
    def add(a, b):
      return Int(0)
    def scale(xs, k):
      return Anything()
    """)


def _ops(trick: str, code: str) -> str:
  return "import json\n" + trick + "\n" + code


TRICKS = [
    Trick("prints_passed_and_fake_events",
          repo(_ops(_FAKE_OUTPUT, WRONG)), repo(_ops(_FAKE_OUTPUT, CORRECT))),
    Trick("forges_replies_on_every_descriptor",
          repo(_ops(_FORGE_FRAMES, WRONG)), repo(CORRECT)),
    Trick("os_exit_zero_at_import", repo("import os\n" + WRONG + "os._exit(0)\n"), repo(CORRECT)),
    Trick("os_exit_zero_in_call", repo("import os\n" + WRONG.replace(
        "return a - b", "os._exit(0)")), repo(CORRECT)),
    Trick("sys_exit_in_package_init",
          {**repo(WRONG), "calc/__init__.py": "import sys\nsys.exit(0)\n"}, repo(CORRECT)),
    Trick("conftest_tests_init_and_edited_tests", repo(WRONG, _TEST_DIR_FILES),
          repo(CORRECT, _TEST_DIR_FILES)),
    Trick("monkeypatches_unittest_and_builtins",
          repo(_ops(_PATCH_UNITTEST, WRONG)), repo(_ops(_PATCH_UNITTEST, CORRECT))),
    Trick("rewrites_test_files_on_disk_at_import",
          repo(_ops(_REWRITE_TESTS, WRONG)), repo(_ops(_REWRITE_TESTS, CORRECT))),
    Trick("always_equal_results", repo(_ALWAYS_EQUAL), repo(CORRECT)),
    Trick("patches_the_harness_in_its_process",
          repo(_ops(_PATCH_HARNESS, WRONG)), repo(_ops(_PATCH_HARNESS, CORRECT))),
]


@pytest.mark.parametrize("trick", TRICKS, ids=[t.name for t in TRICKS])
def test_forged_repository_fails_and_honest_twin_passes(pool, trick):  # noqa: F811
  forged, honest = run(pool, trick.forged), run(pool, trick.honest)
  assert not any(outcomes(forged).values()), forged
  assert honest.passed, honest


def test_package_init_exit_is_an_import_error(pool):  # noqa: F811
  result = run(pool, TRICKS[4].forged)
  assert result.modules["calc"] == "SystemExit: 0" and result.status == "completed"
  assert all(t.error_type == "ImportError" for t in result.tests)


@pytest.mark.parametrize("mode", ["proxy", "inline"])
@pytest.mark.parametrize("where", ["import", "call"])
def test_infinite_loops_time_out(pool, where, mode):  # noqa: F811
  loop = "while True:\n  pass\n"
  ops = WRONG + loop if where == "import" else WRONG.replace("return a - b", "while True: pass")
  limits = dataclasses.replace(TIGHT_LIMITS, wall_time_s=1.5, cpu_time_s=30)
  if mode == "proxy":
    result = run(pool, repo(ops), limits=limits)
  else:
    result = run(pool, repo(ops, TEST_FILES), test_files={}, mode="inline", limits=limits)
  assert result.status == "timeout" and result.killed_by == "wall_time", result
  assert not any(outcomes(result).values())
  assert result.tests[0].error_type == "Timeout"


def test_stdlib_names_are_never_served_from_the_program(pool):  # noqa: F811
  """A program file named like a standard module (not loaded in the judge yet) that a trusted
  test imports: the judge uses the standard library's."""
  test_files = {"tests/test_std.py": textwrap.dedent("""\
      import colorsys

      def test_stdlib():
        assert colorsys.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
        assert colorsys.__file__.endswith("colorsys.py")
      """)}
  forged = repo(CORRECT, {"colorsys.py": "def rgb_to_hsv(*args):\n  return 'forged'\n"})
  result = run(pool, forged, ("tests/test_std.py::test_stdlib",), test_files)
  assert result.passed, result.tests
  # The control: the program's own process does import its colorsys.py.
  probe = {"tests/test_std.py": "import calc.ops\n\ndef test_probe():\n"
                                "  assert calc.ops.which() == 'forged'\n"}
  forged["calc/ops.py"] = (CORRECT + "import colorsys\n\n\ndef which():\n"
                           "  return colorsys.rgb_to_hsv()\n")
  assert run(pool, forged, ("tests/test_std.py::test_probe",), probe).passed


_SCAN = textwrap.dedent("""\
    import gc, os, sys
    _SKIP = {"/proc", "/sys", "/dev", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
             "/libx32", "/etc", os.path.realpath(sys.base_prefix)}
    def _on_disk(reversed_needle):
      for root, dirs, files in os.walk("/"):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in _SKIP]
        for name in files:
          try:
            with open(os.path.join(root, name), "rb") as f:
              if reversed_needle in f.read(1 << 20).decode("latin-1")[::-1]:
                return True
          except OSError:
            pass
      return False
    def _in_memory(reversed_needle):
      for obj in gc.get_objects():
        try:
          if reversed_needle in repr(obj)[::-1]:
            return True
        except Exception:
          pass
      return False
    _HELD = [CONTROL]                     # the control, in memory ...
    with open("control_note.txt", "w") as f:  # ... and on disk
      f.write(CONTROL)
    def scan(reversed_needle):
      # Looks for the reversed needle in reversed text: it never builds the needle itself.
      return [_on_disk(reversed_needle), _in_memory(reversed_needle)]
    """)


def test_program_never_sees_the_trusted_tests_on_disk_or_in_memory(pool):  # noqa: F811
  """While the tests run, the program searches its file system (all of it but the read-only
  system directories) and every object it can reach for the trusted test file's secret and
  source; it finds only what it wrote itself (the control: the search works). The secret is also
  in this file on the host, so a repository visible in the sandbox would be found too."""
  control = "ctl-5c2e9b0f"
  files = repo(CORRECT + _SCAN.replace("CONTROL", repr(control)))
  test_files = {"tests/test_scan.py": textwrap.dedent(f"""\
      from calc.ops import scan
      NOTE = {SECRET!r}

      def test_secret_hidden():
        assert scan({SECRET[::-1]!r}) == [False, False]

      def test_test_source_hidden():
        assert scan({"assert scan("[::-1]!r}) == [False, False]

      def test_control_found():
        assert scan({control[::-1]!r}) == [True, True]
      """)}
  ids = tuple(f"tests/test_scan.py::{n}" for n in ("test_secret_hidden", "test_test_source_hidden",
                                                    "test_control_found"))
  result = run(pool, files, ids, test_files,
               limits=dataclasses.replace(TIGHT_LIMITS, wall_time_s=20.0, cpu_time_s=15))
  assert result.passed, result.tests


# -------------------------------------------------------------- inline mode: feedback only


def test_inline_defeats_exits_printing_and_forged_replies(pool):  # noqa: F811
  for trick in TRICKS[:5]:
    result = run(pool, {**trick.forged, **TEST_FILES}, TESTS, {}, mode="inline")
    assert not any(outcomes(result).values()), (trick.name, result)


def test_the_module_report_is_the_programs_word(pool):  # noqa: F811
  """The documented limit of Result.modules: program code imported first can misreport the
  import of another module (the verdicts, decided by the judge, still fail its tests)."""
  hide = textwrap.dedent("""\
      import importlib
      _real = importlib.import_module
      def _quiet(name, package=None):
        return None if name == "calc.broken" else _real(name, package)
      importlib.import_module = _quiet
      """)
  files = repo(CORRECT, {"calc/__init__.py": hide, "calc/broken.py": "def oops(:\n"})
  test_files = {"tests/test_broken.py": "from calc.broken import oops\n\n\n"
                "def test_oops():\n  assert oops() is None\n"}
  result = run(pool, files, ("tests/test_broken.py::test_oops",), test_files)
  assert result.modules == {"calc": None, "calc.broken": None, "calc.ops": None}
  assert not result.passed


def test_inline_is_not_a_grader(pool):  # noqa: F811
  """The documented weaknesses of inline mode, shown: the tests run beside the program, so a
  program that patches the harness in its process, returns always-equal objects or rewrites the
  test file passes there (proxy mode fails all three, above)."""
  for trick in (TRICKS[9], TRICKS[8], TRICKS[7]):
    tests = TESTS[:2] if trick.name.startswith("rewrites") else TESTS
    result = run(pool, {**trick.forged, **TEST_FILES}, tests, {}, mode="inline")
    assert result.passed, (trick.name, result)


def test_honest_single_file_jobs_still_work_beside_directory_jobs(pool):  # noqa: F811
  jobs = [Job(program="def f():\n  return 1\n", tests=(CallTest("f", "f", expected=1),)),
          DirectoryJob(files=repo(CORRECT), test_files=TEST_FILES, tests=TESTS)]
  plain, tree = pool.map(jobs)
  assert plain.passed and tree.passed and plain.modules == {}
  assert json.dumps(tree.modules) == '{"calc": null, "calc.ops": null}'


def test_the_unisolated_runner_is_fooled_where_the_sandbox_is_not(pool):  # noqa: F811
  """Why model output is never graded by repos.run_repo_tests: a wrong repository that prints the
  runner's result marker passes there, and fails here in both modes."""
  ids = TESTS[:2]
  marker = "@@RESULTS@@" + json.dumps({test: True for test in ids})
  forged = repo(f"print({marker!r}, flush=True)\nimport os\nos._exit(0)\n" + WRONG)
  assert run_repo_tests({**forged, **TEST_FILES}, ids) == {test: True for test in ids}
  assert not any(outcomes(run(pool, forged, ids)).values())
  inline = run(pool, {**forged, **TEST_FILES}, ids, {}, mode="inline")
  assert not any(outcomes(inline).values())
