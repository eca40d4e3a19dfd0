"""Isolated execution of untrusted Python with verdicts the program cannot forge.

Rewards in RL come from running generated code, so this harness is part of the training
algorithm: a policy under reward pressure will find every hole in it. Usage::

    from kat_jax import sandbox

    job = sandbox.Job(
        program="def add(a, b):\\n  return a + b\\n",
        setup="def check(candidate):\\n  assert candidate(2, 3) == 5\\n",
        tests=(sandbox.CodeTest("check", "check(add)"),
               sandbox.CallTest("add_neg", "add", args=(-1, 1), expected=0)),
        exports=("add",))
    with sandbox.SandboxPool(num_workers=2) as pool:
      result = pool.run(job)          # Result: .passed, .tests, .status, .killed_by, .stdout ...

Processes per job (``pool.py`` -> ``zygote.py`` -> ``judge.py`` -> ``program.py``)::

    host (pool thread) --fds--> zygote --fork--> judge --fork--> program (pid 1 of new pid ns)
                                                 trusted: runs    untrusted: runs the program,
                                                 tests, verdict   answers calls with plain data

Isolation of the program process (``confine.py``; each part degrades with a logged warning and an
``isolation`` note in the Result where the kernel refuses it): fresh network namespace (loopback
down: no connection anywhere), pid namespace (sees only itself and its children; all of them die
with it), IPC/UTS namespaces, private read-only root (system dirs + the Python installation;
private size-limited tmpfs as cwd, /tmp, /dev/shm; repositories, datasets, home directories and
host /tmp do not exist), a fresh unprivileged uid per job with no_new_privs, scrubbed
environment, rlimits (CPU, address space, processes, file size, open files, no core dumps),
wall-clock limit, stdout/stderr capture with a kill beyond ``Limits.output_bytes``.

Verdicts. The judge alone decides, and never from the program's exit status or output. Test
material reaches the judge only after the program process was forked, so the program never holds
expected values. Defeated forging tricks, by mode:

====================================================  ===========  ===========================
trick                                                 proxy mode   inline mode
====================================================  ===========  ===========================
``sys.exit(0)`` / ``os._exit(0)`` before or in tests  defeated     defeated (no ack = fail)
``raise SystemExit/KeyboardInterrupt`` (incl. from    defeated     defeated
``__del__``, ``atexit``, signal handlers)
result whose ``__eq__`` is always True / int subclass defeated     defeated (codec round trip)
rebinding builtins (``abs``, ``range``, ...)          defeated     defeated (restored; tests
                                                                   get a private builtins copy)
patching stdlib used by tests (``math.isclose``...)   defeated     defeated for modules loaded
                                                                   before the program or by the
                                                                   test before its call
``sys.settrace``/``setprofile``, signal handlers,     defeated     defeated (reset before each
timers, gc callbacks, import hooks                                 test and after each call)
background thread rewriting test functions            defeated     defeated (tests refused
                                                                   while program threads live)
audit hooks                                           defeated     defeated (addaudithook refused)
deleting / redefining ``check`` or test functions     defeated     defeated (tests compiled
                                                                   fresh, after the program ran)
printing a success marker / writing the verdict pipe  defeated     defeated (random per-test
                                                                   nonce, never in output)
reading the tests or dataset from disk / memory       defeated     NOT defeated: tests run in
                                                                   the program's process
introspecting the harness in its own process (gc,     defeated     NOT defeated
``sys._getframe``, ctypes, ``/proc/self/mem``)
====================================================  ===========  ===========================

In proxy mode the test code runs in the judge, an interpreter that never executes program code;
arguments and results cross as plain data (``codec``: exact built-in types, rebuilt on the
judge's side), so the program can influence a verdict only through the values its functions
return. Use ``"inline"`` only for tests that need the program's own objects; its price: a program
that leaves a thread running or calls ``sys.addaudithook`` fails every inline test, and with
``canonicalize_results=False`` (objects allowed) the ``__eq__`` rows above are no longer defeated.
CallTests are judged in the judge process in both modes.

Directory jobs (``directory.DirectoryJob``): the program is a tree of files (a package, its
modules), written into the program's private tmpfs and imported there; tests are pytest-style ids
(``tests/test_mod.py::test_fn``, ``...::TestX::test_y``) run by a stdlib runner (``testrun``).
In ``"proxy"`` mode the trusted ``test_files`` run in the judge, against proxies of the program's
modules (attributes and calls cross as plain data); they never exist in the program's process or
file system. ``"inline"`` mode runs the program's own test files in its own process: feedback
only, never a reward. What the directory modes defeat:

====================================================  ===========  ===========================
trick (directory jobs)                                proxy mode   inline mode
====================================================  ===========  ===========================
printing "PASSED" / fake judge events, writing fake   defeated     defeated (random per-test
replies on every descriptor                                        nonce)
``os._exit(0)`` / ``sys.exit(0)`` in a module at      defeated     defeated
import or in a call, an infinite loop (wall time)
conftest.py / tests/__init__.py / edited or deleted   defeated     NOT defeated: they are the
test files among the program's files                  (ignored)    tests that run
rewriting or deleting the test files on disk during   defeated     NOT defeated
import; reading the tests' expected values from disk  (not there)
monkeypatching unittest / builtins / the harness      defeated     NOT defeated
objects with a custom ``__eq__`` / int subclasses     defeated     NOT defeated
a program module shadowing a stdlib module            defeated     its own business
(``colorsys.py``) that a test imports                 (judge uses
                                                      the stdlib)
misreporting ``Result.modules`` (which modules        NOT defeated: the program process reports
imported) from another module of the program          it; verdicts are unaffected
====================================================  ===========  ===========================

Proxy mode's price: test code must be standard-library only and pass / receive only plain data
(no program objects, callbacks or instances cross); an object of the program a test holds is a
reference that supports only attribute reads and calls.

Programs run on the standard library only (``python -I -S``; the zygote preloads common modules).
``Isolation.readonly_paths`` adds host directories to the private root (read-only), e.g. a
package directory that setup or program code then puts on ``sys.path``. Aggregate memory of a job
is bounded by ``Limits.max_processes × Limits.memory_bytes`` (rlimits are per process).
"""
from kat_jax.sandbox.directory import DirectoryJob
from kat_jax.sandbox.job import (CallTest, CodeTest, Isolation, Job, Limits, Result,
                                 TestOutcome)
from kat_jax.sandbox.pool import PoolStats, SandboxPool, default_readonly_paths, run_job

__all__ = ["CallTest", "CodeTest", "DirectoryJob", "Isolation", "Job", "Limits", "PoolStats",
           "Result", "SandboxPool", "TestOutcome", "default_readonly_paths", "run_job"]
