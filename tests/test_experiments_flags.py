"""Importing experiments/ modules defines no absl flags: every module of the package (found with
pkgutil, so a new script is covered without editing this test) imports cleanly in one fresh process
and leaves ``absl.flags.FLAGS`` as it found it, but for the flags third-party libraries define on
their own first import (absl.logging's ``--verbosity``, grain's, TFDS's). Tests import helpers
from several scripts into one pytest process; two scripts defining the same flag name at import
(``--dtype``, ``--seed``) raise DuplicateFlagError there. A script defines its flags in
``define_flags()``, called under ``if __name__ == "__main__":`` before ``app.run``."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a child: imports every experiments module in turn and reports, per module, the traceback
# of a failed import and each flag the import added with the module absl says defined it.
_CHILD = r"""
import importlib, json, pkgutil, traceback
from absl import flags
import experiments

initial = set(flags.FLAGS)
report = {}
for info in sorted(pkgutil.iter_modules(experiments.__path__), key=lambda i: i.name):
  name = f"experiments.{info.name}"
  before = set(flags.FLAGS)
  try:
    importlib.import_module(name)
    error = None
  except BaseException:  # noqa: BLE001 - any failure is reported by the test
    error = traceback.format_exc()
  added = sorted(set(flags.FLAGS) - before)
  report[name] = {"error": error, "flags": {
      f: flags.FLAGS.find_module_defining_flag(f) for f in added}}
print(json.dumps({"modules": report, "removed": sorted(initial - set(flags.FLAGS))}))
"""


def _import_all() -> dict:
  out = subprocess.run([sys.executable, "-c", _CHILD], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, f"the import child failed:\n{out.stderr[-4000:]}"
  return json.loads(out.stdout.strip().splitlines()[-1])


def _repo_packages() -> set[str]:
  """Top-level packages of this repository (a flag owned by one of them is ours to fix)."""
  return {d for d in os.listdir(REPO) if os.path.isfile(os.path.join(REPO, d, "__init__.py"))}


def test_importing_experiments_defines_no_flags():
  result = _import_all()
  modules = result["modules"]
  # Discovery found the package's scripts (an empty walk would pass vacuously).
  expected = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(REPO, "experiments"))
              if f.endswith(".py") and f != "__init__.py"}
  assert {m.removeprefix("experiments.") for m in modules} == expected
  assert {"experiments.main", "experiments.convert", "experiments.bench_attention"} <= set(modules)

  # The flag set is unchanged but for what third-party libraries define on their own first import
  # (absl.logging's --verbosity, grain's and TFDS's options): no flag has an owner in this repo.
  ours = _repo_packages()
  assert {"experiments", "kat_jax"} <= ours, ours
  defining = [f"{module} defines --{flag} at import" + (f" (in {owner})" if owner != module else "")
              for module, r in modules.items() for flag, owner in r["flags"].items()
              if owner.split(".")[0] in ours or owner == "__main__"]
  assert not defining, (
      "importing experiments modules must define no absl flags, or two scripts imported into one "
      "process (the tests) clash with DuplicateFlagError:\n  " + "\n  ".join(defining) +
      "\nfix: define the flags in a define_flags() function called under "
      "`if __name__ == \"__main__\":` before app.run (see experiments/bench_rl_step.py)")

  failed = {m: r["error"] for m, r in modules.items() if r["error"]}
  assert not failed, "importing these experiments modules raised:\n" + "\n".join(
      f"{m}:\n{e}" for m, e in failed.items())
  assert result["removed"] == [], result["removed"]
