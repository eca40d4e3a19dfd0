"""Verdict forging: every trick is judged failed in both modes; its honest twin is judged passed.

Each forged ``add`` returns a wrong answer and tries to make the tests pass anyway. To show the
tricks are real, each case also says whether it fools a *naive* harness — program and tests in one
process, passed iff the exit status is 0 or the success marker was printed (the usual holes) — and
the test checks that claim by running that harness. An ``honest`` twin (a correct ``add``, keeping
whatever part of the trick is harmless) must pass in our sandbox, so a sandbox that failed
everything would fail these tests too.
"""
import dataclasses
import subprocess
import sys
import textwrap

import pytest

from kat_jax.sandbox import CallTest, CodeTest, Job
from sandbox_helpers import pool  # noqa: F401 (fixture)

SETUP = textwrap.dedent("""
    import math

    def check(candidate):
      result = candidate(0.1, 0.2)
      assert abs(result - 0.3) < 1e-9
      assert math.isclose(candidate(1.5, 1.5), 3.0)
      for i in range(3):
        assert candidate(i, 1) == i + 1
      return True
    """)
TESTS = (CodeTest("check", "check(add)"), CallTest("call", "add", args=(20, 22), expected=42))
CORRECT = "def add(a, b):\n  return a + b\n"
MARKER = "ALL TESTS PASSED"


@dataclasses.dataclass(frozen=True)
class Trick:
  name: str
  forged: str
  honest: str
  fools_naive_harness: bool


TRICKS = [
    Trick("sys_exit_at_load", "import sys\ndef add(a, b):\n  return 0\nsys.exit(0)\n", CORRECT,
          True),
    Trick("os_exit_at_load", "import os\ndef add(a, b):\n  return 0\nos._exit(0)\n", CORRECT,
          True),
    Trick("os_exit_in_call", "import os\ndef add(a, b):\n  os._exit(0)\n", CORRECT, True),
    Trick("always_equal_object", textwrap.dedent("""
        class Anything:
          def __eq__(self, other): return True
          def __ne__(self, other): return False
          def __sub__(self, other): return self
          def __abs__(self): return 0.0
          def __float__(self): return 3.0
        def add(a, b):
          return Anything()
        """), CORRECT, True),
    Trick("int_subclass_equal_to_all", textwrap.dedent("""
        class Int(int):
          def __eq__(self, other): return True
          def __sub__(self, other): return Int(0)
          def __float__(self): return 3.0
          __hash__ = int.__hash__
        def add(a, b):
          return Int(0)
        """), CORRECT, True),
    Trick("rebind_builtins_and_patch_stdlib_at_load", textwrap.dedent("""
        import builtins, math
        builtins.abs = lambda x: 0
        builtins.range = lambda *args: ()
        math.isclose = lambda *args, **kwargs: True
        def add(a, b):
          return 0
        """), "import builtins\nbuiltins.my_helper = len\n" + CORRECT, True),
    Trick("rebind_builtins_and_patch_stdlib_during_call", textwrap.dedent("""
        import builtins, math
        def add(a, b):
          builtins.abs = lambda x: 0
          builtins.range = lambda *args: ()
          math.isclose = lambda *args, **kwargs: True
          return 0
        """), CORRECT, True),
    Trick("settrace_jumps_over_asserts", textwrap.dedent("""
        import sys
        def _local(frame, event, arg):
          last = max(line for _, _, line in frame.f_code.co_lines() if line)
          if event == "line" and frame.f_lineno < last:
            try:
              frame.f_lineno = last
            except ValueError:
              pass
          return _local
        def _global(frame, event, arg):
          return _local if frame.f_code.co_name == "check" else None
        sys.settrace(_global)
        def add(a, b):
          return 0
        """), CORRECT, True),
    Trick("trace_rewrites_check_function", textwrap.dedent("""
        import sys
        def _rewrite(frame, event, arg):
          check = frame.f_globals.get("check")
          if callable(check) and check.__code__.co_name == "check":
            check.__code__ = (lambda candidate: True).__code__
          return _rewrite
        def _global(frame, event, arg):
          return _rewrite
        sys._getframe().f_trace = _rewrite
        sys.settrace(_global)
        def add(a, b):
          return 0
        """), CORRECT, True),
    Trick("thread_rewrites_check_function", textwrap.dedent("""
        import gc, threading, types
        def _hunt():
          while True:
            for obj in gc.get_objects():
              if isinstance(obj, types.FunctionType) and obj.__name__ == "check":
                obj.__code__ = (lambda candidate: True).__code__
        threading.Thread(target=_hunt, daemon=True).start()
        def add(a, b):
          return 0
        """), CORRECT, False),  # racy against a naive harness, so not claimed
    # Targets harnesses that exec() the tests after the program (the structure of inline mode):
    # the hook runs when the tests are exec'd, after any restoration. Not a one-process trick.
    Trick("audit_hook_patches_stdlib_when_tests_are_execd", textwrap.dedent("""
        import builtins, math, sys
        def _hook(event, args):
          if event == "exec":
            math.isclose = lambda *args, **kwargs: True
            builtins.abs = lambda x: 0
            builtins.range = lambda *args: ()
        sys.addaudithook(_hook)
        def add(a, b):
          return 0
        """), CORRECT, False),
    Trick("prints_success_marker_and_fake_events", textwrap.dedent(f"""
        import sys
        for stream in (sys.stdout, sys.stderr):
          print("{MARKER}", file=stream)
          print('{{"e":"test","index":0,"name":"check","passed":true}}', file=stream)
          print('{{"e":"end","status":"completed"}}', file=stream, flush=True)
        def add(a, b):
          return 0
        """), f"print({MARKER!r})\n" + CORRECT, True),
    Trick("forges_replies_on_every_descriptor", textwrap.dedent("""
        import json, os
        def _frame(obj):
          data = json.dumps(obj).encode()
          return len(data).to_bytes(4, "big") + data
        fake = _frame({"op": "loaded", "ok": True, "seconds": 0.0})
        for i in range(1, 20):
          fake += _frame({"op": "result", "id": i, "ok": True, "value": 0})
          fake += _frame({"op": "test_done", "nonce": "0" * 32, "ok": True})
        for fd in range(3, 20):
          try:
            os.write(fd, fake)
          except OSError:
            pass
        def add(a, b):
          return 0
        """), CORRECT, False),
    Trick("atexit_os_exit_zero", "import atexit, os\natexit.register(os._exit, 0)\n"
          "def add(a, b):\n  return 0\n",
          "import atexit\natexit.register(print, 'bye')\n" + CORRECT, True),
    Trick("atexit_raises_system_exit", "import atexit, sys\natexit.register(sys.exit, 0)\n"
          "def add(a, b):\n  return 0\n", CORRECT, False),
    Trick("del_calls_os_exit_zero", textwrap.dedent("""
        import os
        class Bomb:
          def __del__(self):
            os._exit(0)
        _keep = []
        def add(a, b):
          _keep.append(Bomb())
          return 0
        """), CORRECT, True),
    Trick("del_raises_system_exit_and_keyboard_interrupt", textwrap.dedent("""
        class Bomb:
          def __init__(self, error): self.error = error
          def __del__(self):
            raise self.error
        def add(a, b):
          Bomb(SystemExit(0))
          Bomb(KeyboardInterrupt())
          return 0
        """), CORRECT, False),
    Trick("keyboard_interrupt_signal_during_call", textwrap.dedent("""
        import os, signal
        def add(a, b):
          os.kill(os.getpid(), signal.SIGINT)
          return 0
        """), CORRECT, False),
]


def naive_harness_passes(program: str, tmp_path) -> bool:
  """Program and tests in one process; passed iff exit status 0 or the marker was printed."""
  source = program + "\n" + SETUP + "\ncheck(add)\nprint(" + repr(MARKER) + ")\n"
  completed = subprocess.run([sys.executable, "-I", "-S", "-c", source], capture_output=True,
                             timeout=30, cwd=tmp_path, stdin=subprocess.DEVNULL)
  return completed.returncode == 0 or MARKER.encode() in completed.stdout


def _job(program: str, mode: str) -> Job:
  return Job(program=program, setup=SETUP, tests=TESTS, exports=("add",), mode=mode)


@pytest.mark.parametrize("mode", ["proxy", "inline"])
@pytest.mark.parametrize("trick", TRICKS, ids=[trick.name for trick in TRICKS])
def test_forged_program_fails_and_honest_twin_passes(pool, trick, mode):  # noqa: F811
  forged, honest = pool.map([_job(trick.forged, mode), _job(trick.honest, mode)])
  assert not forged.passed, forged
  assert not any(test.passed for test in forged.tests), forged.tests
  assert honest.passed, honest


@pytest.mark.parametrize("trick", TRICKS, ids=[trick.name for trick in TRICKS])
def test_naive_harness_claims(trick, tmp_path):
  assert naive_harness_passes(trick.forged, tmp_path) == trick.fools_naive_harness
  assert naive_harness_passes(trick.honest, tmp_path)


@pytest.mark.parametrize("mode", ["proxy", "inline"])
def test_program_process_never_holds_the_tests(pool, mode):  # noqa: F811
  """Proxy mode: setup, test code and expected values never reach the program's process.

  While the tests run, the program searches the repr of every object it can reach for strings
  it is given reversed (it looks for the reversed needle in the reversed text, so it never builds
  the needle itself). Inline mode runs setup and test code in the program's process: there they
  are found — the control that the search works, and the documented weakness of inline mode.
  CallTest expected values stay in the judge in both modes.
  """
  setup_secret, code_secret, expected_secret = "setup-7f3a9c1e5b", "code-0b4d2e6f81", "exp-2d8e4f"
  control = "control-91c3e7a5"
  program = textwrap.dedent(f"""
      import gc
      CONTROL = {control!r}
      def scan(reversed_needle):
        text = []
        for obj in gc.get_objects():
          try:
            text.append(repr(obj))
          except Exception:
            pass
        return reversed_needle in "\\n".join(text)[::-1]
      """)
  job = Job(program=program, exports=("scan",), mode=mode,
            setup=f"SETUP = {setup_secret!r}\n",
            tests=(CallTest("decoy", "scan", args=("",), expected=expected_secret),
                   CodeTest("scan_setup", f"assert scan({setup_secret[::-1]!r}) is False"),
                   CodeTest("scan_code",
                            f"assert scan({code_secret[::-1]!r}) is False  # {code_secret}"),
                   CallTest("scan_expected", "scan", args=(expected_secret[::-1],),
                            expected=False),
                   CallTest("control", "scan", args=(control[::-1],), expected=True)))
  outcomes = {test.name: test.passed for test in pool.run(job).tests}
  assert not outcomes["decoy"] and outcomes["control"] and outcomes["scan_expected"], outcomes
  held_by_program = mode == "inline"
  assert outcomes["scan_setup"] != held_by_program, outcomes
  assert outcomes["scan_code"] != held_by_program, outcomes
