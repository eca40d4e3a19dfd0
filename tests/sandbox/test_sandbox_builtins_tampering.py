"""A program that rebinds or deletes builtins the sandbox's own code in the program process
uses (``isinstance``, ``len``, ``str``) is judged failed — never passed — and the job's error
names the cause (which builtins, that the harness crashed) instead of "the program closed its
reply channel"; the pool keeps running honest jobs; an honest crash is not blamed on builtins."""
import textwrap

import pytest

from kat_jax.sandbox import CallTest, CodeTest, Job
from sandbox_helpers import pool  # noqa: F401 (fixture)

_HONEST = Job(program="def add(a, b):\n  return a + b\n",
              tests=(CallTest("add", "add", args=(2, 3), expected=5),))


@pytest.mark.parametrize("mode", ["proxy", "inline"])
@pytest.mark.parametrize("tamper, names", [
    ("builtins.isinstance = lambda *a: True", ["builtins.isinstance"]),
    ("del builtins.len", ["builtins.len"]),
    ("builtins.str = bytes\nbuiltins.isinstance = None", ["builtins.isinstance", "builtins.str"]),
])
def test_builtins_tampering_is_named_and_fails(pool, mode, tamper, names):  # noqa: F811
  program = f"import builtins\n{tamper}\ndef add(a, b):\n  return a + b\n"
  tests = (CallTest("call", "add", args=(2, 3), expected=5),
           CodeTest("code", "assert add(1, 1) == 2"))
  result = pool.run(Job(program=program, tests=tests, exports=("add",), mode=mode))
  assert not result.passed and not any(t.passed for t in result.tests)
  assert result.status == "crashed"
  for test in result.tests:
    assert "the sandbox's code in the program process crashed" in test.error, test.error
    assert f"the program rebound or deleted {', '.join(names)}" in test.error, test.error
    assert "closed its reply channel" not in test.error
  assert pool.run(_HONEST).passed


def test_an_honest_crash_is_not_blamed_on_builtins(pool):  # noqa: F811
  program = textwrap.dedent("""
      import os
      def add(a, b):
        os._exit(3)
      """)
  result = pool.run(Job(program=program, tests=(CallTest("call", "add", args=(2, 3), expected=5),),
                        exports=("add",)))
  assert not result.passed and "closed its reply channel" in result.tests[0].error
  assert "builtins" not in result.tests[0].error
