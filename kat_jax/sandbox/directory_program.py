"""The program process of a directory job: writes the files, imports the modules, serves the judge.

Runs in the forked program process after ``confine.confine_program`` (its cwd is the private
tmpfs), speaking framed JSON on fds 3 (requests) and 4 (replies) like ``program``. The files are
written under the cwd, which becomes ``sys.path[0]``; then every module of ``imports`` is imported
(each failure recorded, none fatal).

Replies (program -> judge):
  ``{"op": "loaded", "ok", "modules": {name: null | "Type: message"}, "seconds"}`` once;
  ``{"op": "result", "id", "ok", ...}`` to each request below;
  ``{"op": "test_done", "nonce", "ok", "error_type", "error"}`` (inline mode).
Requests (judge -> program), ``module`` a dotted name and ``path`` a list of attribute names:
  ``{"op": "import", "id", "module"}``                  import it;
  ``{"op": "attr", "id", "module", "path"}``            -> ``"kind": "value"`` with the plain-data
                                                           ``value``, or ``"kind": "ref"`` with
                                                           ``callable`` (a module, a function...);
  ``{"op": "call", "id", "module", "path", "args", "kwargs"}``  -> the plain-data ``value``;
  ``{"op": "run_test", "nonce", "test"}``              inline mode: run a test of the files.

As in ``program``, nothing here decides a verdict: in proxy mode the judge runs the tests and only
uses the plain data this process returns; in inline mode the tests run here, which is why inline
verdicts are feedback only.
"""
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import time
import types

from kat_jax.sandbox import codec
from kat_jax.sandbox import testrun
from kat_jax.sandbox.program import REPLY_FD, REQUEST_FD, describe


def _send(obj) -> None:
  codec.write_message(REPLY_FD, obj)


def _flush_output() -> None:
  for stream in (sys.__stdout__, sys.__stderr__):
    try:
      stream.flush()
    except BaseException:  # noqa: BLE001 - the program may have closed or replaced it
      pass


def materialize(files: dict, root: str) -> None:
  """Writes ``files`` (paths already checked by ``directory.normalize_path``) under ``root``."""
  for path in sorted(files):
    full = os.path.join(root, path)
    parent = os.path.dirname(full)
    if parent:
      os.makedirs(parent, exist_ok=True)
    with open(full, "x", encoding="utf-8", newline="") as f:
      f.write(files[path])


def serve(spec: dict) -> None:
  """Writes and imports the program's files, then answers requests until the pipe closes."""
  inline = spec["mode"] == "inline"
  max_bytes = spec["limits"]["max_value_bytes"]
  sys.modules["__main__"] = types.ModuleType("__main__")  # the harness is not the program's main
  start = time.perf_counter()
  workdir = os.getcwd()
  loaded = {"op": "loaded", "ok": True, "modules": {}}
  try:
    materialize(spec["files"], workdir)
    sys.dont_write_bytecode = True
    sys.path.insert(0, workdir)
    importlib.invalidate_caches()
  except BaseException as error:  # noqa: BLE001 - e.g. the tmpfs is full
    loaded["ok"] = False
    loaded["error_type"], loaded["error"] = describe(error)
  if loaded["ok"]:
    for name in spec["imports"]:
      try:
        importlib.import_module(name)
        loaded["modules"][name] = None
      except BaseException as error:  # noqa: BLE001 - SystemExit / KeyboardInterrupt included
        loaded["modules"][name] = ": ".join(describe(error))
  loaded["seconds"] = time.perf_counter() - start
  _flush_output()
  _send(loaded)
  if not loaded["ok"]:
    return
  prefix = workdir.rstrip(os.sep) + os.sep
  frame_name = lambda name: name[len(prefix):] if name.startswith(prefix) else None  # noqa: E731
  while True:
    try:
      request = codec.read_message(REQUEST_FD, max_bytes)
    except codec.ChannelClosed:
      return
    op = request.get("op")
    if op == "run_test" and inline:
      reply = _run_test(request, frame_name)
    elif op in _HANDLERS:
      reply = {"op": "result", "id": request.get("id")}
      try:
        reply.update(_HANDLERS[op](request))
        reply["ok"] = True
      except BaseException as error:  # noqa: BLE001
        reply["ok"] = False
        reply["error_type"], reply["error"] = describe(error)
    else:
      reply = {"op": "error", "error": f"unknown request {str(op)[:50]!r}"}
    _flush_output()
    try:
      _send(reply)
    except (ValueError, TypeError) as error:  # e.g. an int too large to print
      _send({"op": reply.get("op"), "id": reply.get("id"), "nonce": reply.get("nonce"),
             "ok": False, "error_type": "UnsupportedValue", "error": str(error)[:2000]})


def _resolve(request: dict):
  target = importlib.import_module(request["module"])
  for name in request["path"]:
    target = getattr(target, name)
  return target


def _import(request: dict) -> dict:
  importlib.import_module(request["module"])
  return {}


def _attribute(request: dict) -> dict:
  target = _resolve(request)
  if not isinstance(target, types.ModuleType):
    try:
      return {"kind": "value", "value": codec.encode(target)}
    except codec.UnsupportedValue:
      pass
  return {"kind": "ref", "callable": callable(target)}


def _call(request: dict) -> dict:
  function = _resolve(request)
  value = function(*codec.decode(request["args"]), **codec.decode(request["kwargs"]))
  return {"value": codec.encode(value)}


_HANDLERS = {"import": _import, "attr": _attribute, "call": _call}


class _TestLoader(importlib.machinery.SourceFileLoader):
  """Loads a test module from its source (never a cached .pyc), asserts rewritten to report
  their values (``testrun.compile_test``)."""

  def get_code(self, fullname):
    source = importlib.util.decode_source(self.get_data(self.path))
    return testrun.compile_test(source, self.path)

  def exec_module(self, module):
    module.__dict__.update(testrun.test_globals())
    super().exec_module(module)


def _import_test_module(name: str, path: str):
  if name in sys.modules:
    return sys.modules[name]
  parent = name.rpartition(".")[0]
  if parent:
    importlib.import_module(parent)
  full = os.path.abspath(path)
  spec = importlib.util.spec_from_file_location(name, full, loader=_TestLoader(name, full))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    sys.modules.pop(name, None)
    raise
  return module


def _run_test(request: dict, frame_name) -> dict:
  reply = {"op": "test_done", "nonce": request.get("nonce")}
  try:
    path, parts = testrun.parse_test_id(request.get("test"))
    name = testrun.module_name_of(path)
    if name is None:
      raise testrun.TestIdError(f"{path!r} cannot be imported as a module (use a path whose "
                                "components are identifiers)")
    if not os.path.isfile(path):
      raise testrun.TestIdError(f"no test file {path!r}")
    testrun.run_test(_import_test_module(name, path), parts)
    reply["ok"] = True
  except BaseException as error:  # noqa: BLE001
    reply["ok"] = False
    reply["error_type"], reply["error"] = testrun.describe_failure(error, frame_name)
  return reply
