"""The pool: ordering, throughput stats, faults as structured results, both test modes."""
import textwrap

import pytest

from kat_jax.sandbox import CallTest, CodeTest, Job, run_job
from sandbox_helpers import TIGHT_LIMITS, pool  # noqa: F401 (fixture)


def test_map_preserves_order_and_counts_throughput(pool):  # noqa: F811
  pool.reset_stats()
  jobs = [Job(program=f"def f():\n  return {i}\n", tests=(CallTest("f", "f", expected=i),),
              job_id=str(i)) for i in range(24)]
  results = pool.map(jobs)
  assert [result.job_id for result in results] == [str(i) for i in range(24)]
  assert all(result.passed and result.status == "completed" for result in results)
  stats = pool.stats()
  assert stats.jobs == 24 and stats.statuses == {"completed": 24}
  assert stats.jobs_per_second > 0 and stats.wall_seconds > 0 and stats.mean_job_seconds > 0


def test_per_test_verdicts_and_timings(pool):  # noqa: F811
  result = pool.run(Job(
      program="def sq(x):\n  return x * x if x != 3 else 10\n",
      setup="def check(candidate):\n  assert candidate(3) == 9, 'three'\n",
      tests=(CallTest("two", "sq", (2,), 4), CallTest("three", "sq", (3,), 9),
             CodeTest("check", "check(sq)"), CodeTest("kw", "assert sq(x=4) == 16")),
      exports=("sq",)))
  assert [t.passed for t in result.tests] == [True, False, False, True]
  assert result.tests[1].error == "sq(...) returned 10, expected 9"
  assert (result.tests[2].error_type, result.tests[2].error) == ("AssertionError", "three")
  assert result.status == "completed" and result.num_passed == 2 and not result.passed
  assert all(t.seconds >= 0 for t in result.tests) and result.wall_seconds > 0


def test_call_tests_compare_types_exactly(pool):  # noqa: F811
  result = pool.run(Job(program="def f():\n  return 1\n",
                        tests=(CallTest("int", "f", expected=1),
                               CallTest("float", "f", expected=1.0),
                               CallTest("bool", "f", expected=True))))
  assert [t.passed for t in result.tests] == [True, False, False]


def test_program_exceptions_reach_trusted_tests_as_builtin_types(pool):  # noqa: F811
  result = pool.run(Job(
      program=textwrap.dedent("""
          class Custom(Exception):
            pass
          def f(x):
            if x < 0:
              raise ValueError("negative")
            raise Custom("custom")
          """),
      tests=(CodeTest("value_error", "try:\n  f(-1)\n  raise AssertionError\n"
                                     "except ValueError as e:\n  assert str(e) == 'negative'"),
             CodeTest("custom", "f(1)")),
      exports=("f",)))
  assert result.tests[0].passed
  assert (result.tests[1].error_type, result.tests[1].error) == ("CandidateError",
                                                                  "Custom: custom")


@pytest.mark.parametrize("program,error_type", [
    ("def f():\n  return object()\n", "CandidateError"),       # not plain data
    ("def f():\n  return [[[[1]]]] * 3\n", None),              # plain data: fine
    ("g = 1\n", "NameError"),                                 # missing export
    ("f = 3\n", "TypeError"),                                 # not callable
])
def test_bad_results_and_exports_are_test_failures(pool, program, error_type):  # noqa: F811
  result = pool.run(Job(program=program, tests=(CodeTest("t", "f()"),), exports=("f",)))
  assert result.status == "completed"
  assert result.tests[0].error_type == error_type, result.tests[0]


def test_broken_trusted_setup_is_a_harness_error(pool):  # noqa: F811
  result = pool.run(Job(program="def f():\n  return 1\n", setup="import no_such_module_xyz\n",
                        tests=(CodeTest("t", "f()"),), exports=("f",)))
  assert result.status == "harness_error" and "ModuleNotFoundError" in result.harness_error
  assert result.tests[0].error_type == "SetupError"


def test_unsendable_test_value_is_a_harness_error_not_an_exception(pool):  # noqa: F811
  result = pool.run(Job(program="def f(x):\n  return x\n",
                        tests=(CallTest("t", "f", args=(object(),), expected=None),)))
  assert result.status == "harness_error" and "CallTest 't'" in result.harness_error
  assert not result.passed


def test_inline_mode_supports_program_objects(pool):  # noqa: F811
  program = textwrap.dedent("""
      class Counter:
        def __init__(self):
          self.n = 0
        def bump(self):
          self.n += 1
          return self
      def make():
        return Counter()
      """)
  test = CodeTest("objects", "c = make()\nc.bump().bump()\nassert c.n == 2")
  inline = pool.run(Job(program=program, tests=(test,), exports=("make",), mode="inline",
                        canonicalize_results=False))
  assert inline.passed, inline
  proxy = pool.run(Job(program=program, tests=(test,), exports=("make",)))
  assert proxy.tests[0].error_type == "CandidateError"  # objects cannot leave the program


def test_inline_mode_refuses_program_threads(pool):  # noqa: F811
  result = pool.run(Job(
      program="import threading, time\nthreading.Thread(target=time.sleep, args=(30,), "
              "daemon=True).start()\ndef f():\n  return 1\n",
      tests=(CodeTest("t", "assert f() == 1"),), exports=("f",), mode="inline"))
  assert result.tests[0].error_type == "BackgroundThreads"


def test_program_output_is_captured(pool):  # noqa: F811
  result = pool.run(Job(program="import sys\nprint('to out')\nprint('to err', file=sys.stderr)\n"
                                "def f():\n  print('in call')\n  return 1\n",
                        tests=(CallTest("f", "f", expected=1),)))
  assert result.stdout == "to out\nin call\n" and result.stderr == "to err\n"
  assert not result.stdout_truncated and result.output_bytes == len("to out\nin call\nto err\n")


def test_main_blocks_run_only_when_asked(pool):  # noqa: F811
  program = "x = 'module'\nif __name__ == '__main__':\n  x = 'main'\ndef f():\n  return x\n"
  default = pool.run(Job(program=program, tests=(CallTest("f", "f", expected="module"),)))
  as_main = pool.run(Job(program=program, tests=(CallTest("f", "f", expected="main"),),
                         module_name="__main__"))
  assert default.passed and as_main.passed


def test_run_job_convenience():
  result = run_job(Job(program="def f():\n  return 'ok'\n",
                       tests=(CallTest("f", "f", expected="ok"),)), limits=TIGHT_LIMITS)
  assert result.passed and result.isolation["chroot"]


def test_job_validation_names_the_problem():
  with pytest.raises(ValueError, match="mode"):
    Job(program="", tests=(), mode="sideways")
  with pytest.raises(TypeError, match="CodeTest / CallTest"):
    Job(program="", tests=("assert True",))
  with pytest.raises(ValueError, match="wall_time_s"):
    TIGHT_LIMITS.__class__(wall_time_s=0)
