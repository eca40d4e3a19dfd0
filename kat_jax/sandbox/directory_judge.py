"""The judge's side of a directory job: trusted test modules, proxies of program modules, verdicts.

Called by ``judge._run_tests`` for a ``DirectoryJob`` once the program process is forked. It
reads the test message (trusted test files and test ids: never seen by the program process),
waits for the program's load report, then judges each test id:

* proxy mode: the trusted test module is imported here, in the judge. A meta-path finder serves
  the job's names: a trusted test file is executed from its trusted source; a module of the
  program becomes a ``_ProxyModule`` (the program imports it; attribute reads and calls cross as
  plain data); standard-library names are never served from the program's files. A test passes
  iff it runs to completion here (``testrun.run_test``).
* inline mode: the program process runs the test and acknowledges it with the random nonce sent
  for that test only.
"""
import importlib
import importlib.machinery
import linecache
import os
import sys
import time
import types

from kat_jax.sandbox import codec
from kat_jax.sandbox import judge
from kat_jax.sandbox import testrun

_SPEC_BYTES = 256 << 20
_ERROR_CHARS = 2000


class _Client:
  """Requests to the program process about its modules (see ``directory_program``)."""

  def __init__(self, program):
    self.program = program

  def _request(self, message: dict) -> dict:
    program = self.program
    program.next_id += 1
    message["id"] = program.next_id
    program.send(message)
    reply = program.receive()
    if reply.get("op") != "result" or type(reply.get("id")) is not int or (
        reply["id"] != program.next_id):
      program._broken("protocol violation: unexpected reply to a request")
    return reply

  def import_module(self, name: str) -> None:
    reply = self._request({"op": "import", "module": name})
    if reply.get("ok") is not True:
      raise ImportError(f"the program's module {name} failed to import: "
                        f"{str(reply.get('error_type'))[:200]}: "
                        f"{str(reply.get('error'))[:_ERROR_CHARS]}", name=name)

  def attribute(self, module: str, path: tuple):
    reply = self._request({"op": "attr", "module": module, "path": list(path)})
    if reply.get("ok") is not True:
      raise judge._candidate_exception(reply.get("error_type"), reply.get("error"))
    if reply.get("kind") == "value":
      try:
        return codec.decode(reply.get("value"))
      except codec.MalformedValue as error:
        raise judge.CandidateError(f"malformed value of {_dotted(module, path)}: {error}") from None
    if reply.get("kind") == "ref":
      return _Remote(self, module, path, reply.get("callable") is True)
    self.program._broken("protocol violation: an attribute reply of unknown kind")

  def call(self, module: str, path: tuple, args: tuple, kwargs: dict):
    name = _dotted(module, path)
    try:
      encoded_args, encoded_kwargs = codec.encode(tuple(args)), codec.encode(dict(kwargs))
    except codec.UnsupportedValue as error:
      raise judge.ProxyArgumentError(f"argument of {name}() cannot be sent to the program: "
                                     f"{error}") from None
    reply = self._request({"op": "call", "module": module, "path": list(path),
                           "args": encoded_args, "kwargs": encoded_kwargs})
    if reply.get("ok") is True:
      try:
        return codec.decode(reply.get("value"))
      except codec.MalformedValue as error:
        raise judge.CandidateError(f"malformed result from {name}(): {error}") from None
    raise judge._candidate_exception(reply.get("error_type"), reply.get("error"))


def _dotted(module: str, path: tuple) -> str:
  return ".".join((module,) + tuple(path))


class _Remote:
  """A non-plain-data object of the program (a function, class, module attribute), named by its
  module and attribute path: attributes and calls are requests; it has no other behaviour."""
  __slots__ = ("_kat_client", "_kat_module", "_kat_path", "_kat_callable")

  def __init__(self, client: _Client, module: str, path: tuple, is_callable: bool):
    object.__setattr__(self, "_kat_client", client)
    object.__setattr__(self, "_kat_module", module)
    object.__setattr__(self, "_kat_path", tuple(path))
    object.__setattr__(self, "_kat_callable", is_callable)

  def __getattr__(self, name):
    if name.startswith("__") and name.endswith("__"):
      raise AttributeError(name)
    return self._kat_client.attribute(self._kat_module, self._kat_path + (name,))

  def __setattr__(self, name, value):
    raise TypeError(f"cannot set attributes of the program object {self!r} from a test")

  def __call__(self, *args, **kwargs):
    if not self._kat_callable:
      raise TypeError(f"the program object {self!r} is not callable")
    return self._kat_client.call(self._kat_module, self._kat_path, args, kwargs)

  def __bool__(self):
    raise TypeError(f"the program object {self!r} has no truth value in proxy mode")

  def __repr__(self):
    return f"<program object {_dotted(self._kat_module, self._kat_path)}>"


class _ProxyModule(types.ModuleType):
  """A module of the program as the judge sees it: every attribute read is a request."""

  def __getattr__(self, name):
    if name.startswith("__") and name.endswith("__"):
      raise AttributeError(name)
    return type(self).__kat_client__.attribute(self.__name__, (name,))


def _dirs_of(names) -> set:
  """Every proper dotted prefix of ``names`` (the packages holding them)."""
  dirs = set()
  for name in names:
    parts = name.split(".")
    dirs.update(".".join(parts[:k]) for k in range(1, len(parts)))
  return dirs


class _Finder:
  """Serves the job's module names in the judge (see the module docstring): a meta-path finder
  and the loader of what it finds (``importlib.abc`` is not imported: it weighs on every fork)."""

  TRUSTED, PROGRAM, TRUSTED_DIR, PROGRAM_DIR = "trusted", "program", "trusted_dir", "program_dir"

  def __init__(self, test_files: dict, program_paths, proxy_class):
    preloaded = set(sys.modules)
    never_program = testrun.stdlib_module_names() | preloaded
    self.sources = {}   # trusted module name -> (path, source)
    for path, source in test_files.items():
      name = testrun.module_name_of(path)
      if name is not None:
        self.sources[name] = (path, source)
    program, program_tests = set(), set()
    for path in program_paths:
      name = testrun.module_name_of(path)
      if name is not None and name.partition(".")[0] not in never_program:
        program.add(name)
        if testrun.is_test_path(path):
          program_tests.add(name)
    self.packages = {name for name, (path, _) in self.sources.items()
                     if path.endswith("/__init__.py")}
    self.program_packages = {testrun.module_name_of(p) for p in program_paths
                             if p.endswith("__init__.py")} & program
    self.trusted_dirs = _dirs_of(self.sources)
    # Test code of the program (tests/__init__.py, a conftest.py) never shadows a directory of
    # trusted tests: that directory stays the judge's.
    self.program = program - (program_tests & self.trusted_dirs)
    self.program_dirs = _dirs_of(program)
    self.tops = {name.partition(".")[0] for name in (set(self.sources) | program)}
    self.tops -= preloaded
    self.proxy_class = proxy_class

  def kind(self, name: str):
    if name in self.sources:
      return self.TRUSTED
    if name in self.program:
      return self.PROGRAM
    if name in self.trusted_dirs:
      return self.TRUSTED_DIR
    if name in self.program_dirs:
      return self.PROGRAM_DIR
    return None

  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] not in self.tops:
      return None
    kind = self.kind(name)
    if kind is None:
      raise ModuleNotFoundError(f"No module named {name!r} (neither a test file of the job nor a "
                                "module of the program)", name=name)
    is_package = (kind in (self.TRUSTED_DIR, self.PROGRAM_DIR) or name in self.packages
                  or name in self.program_packages)
    origin = self.sources[name][0] if kind == self.TRUSTED else None
    spec = importlib.machinery.ModuleSpec(name, self, origin=origin, is_package=is_package)
    spec.has_location = origin is not None
    return spec

  def create_module(self, spec):
    if self.kind(spec.name) in (self.PROGRAM, self.PROGRAM_DIR):
      self.proxy_class.__kat_client__.import_module(spec.name)
      return self.proxy_class(spec.name)
    return None

  def exec_module(self, module):
    if self.kind(module.__name__) == self.TRUSTED:
      path, source = self.sources[module.__name__]
      linecache.cache[path] = (len(source), None, source.splitlines(True), path)  # tracebacks
      module.__dict__.update(testrun.test_globals())
      exec(testrun.compile_test(source, path), module.__dict__)  # noqa: S102 - trusted test code


def run_tests(state) -> None:
  """Judges a directory job (``state`` is the judge's ``_State``; see the module docstring)."""
  spec, program = state.spec, state.program
  tests_msg = codec.read_message(0, _SPEC_BYTES)
  test_files, test_ids = tests_msg["test_files"], tests_msg["tests"]
  state.tests = [{"name": test_id} for test_id in test_ids]
  try:
    loaded = program.receive()
    if loaded.get("op") != "loaded":
      program._broken("protocol violation: no load report")
  except judge.ProgramDied as died:
    state.status = "crashed"
    state.fail_rest("ProgramDied", f"before loading finished: {died}")
    return
  seconds = loaded.get("seconds")
  event = {"e": "loaded", "ok": loaded.get("ok") is True,
           "seconds": seconds if type(seconds) is float else 0.0,
           "modules": _module_report(loaded.get("modules"), spec["imports"])}
  if not event["ok"]:
    event["error_type"] = str(loaded.get("error_type"))[:200]
    event["error"] = str(loaded.get("error"))[:_ERROR_CHARS]
  judge._emit(event)
  if not event["ok"]:
    state.status = "load_error"
    state.fail_rest("ProgramLoadError", f"{event['error_type']}: {event['error']}")
    return
  if spec["mode"] == "inline":
    _judge_inline(state, test_ids)
    return
  # A per-job subclass holds the client under a dunder name: the program's own attribute names
  # (never dunders, see __getattr__) cannot be shadowed by it.
  proxy_class = type("ProxyModule", (_ProxyModule,), {"__kat_client__": _Client(program)})
  finder = _Finder(test_files, spec["files"], proxy_class)
  sys.meta_path.insert(0, finder)
  try:
    _judge_proxy(state, test_ids, test_files, finder)
  finally:
    sys.meta_path.remove(finder)


def _module_report(modules, imports) -> dict:
  """The program's import outcomes for exactly the modules the job asked for (text or None)."""
  modules = modules if type(modules) is dict else {}
  report = {}
  for name in imports:
    if name in modules:
      outcome = modules[name]
      report[name] = None if outcome is None else str(outcome)[:_ERROR_CHARS]
  return report


def _judge_proxy(state, test_ids, test_files, finder: _Finder) -> None:
  loaded_modules = {}  # test file path -> module, or the exception its import raised
  frame_name = lambda filename: filename if filename in test_files else None  # noqa: E731
  foreign = lambda obj: isinstance(obj, (_Remote, _ProxyModule))  # noqa: E731
  for index, test_id in enumerate(test_ids):
    start = time.monotonic()
    try:
      path, parts = testrun.parse_test_id(test_id)
      if path not in test_files:
        raise testrun.TestIdError(f"no test file {path!r} among the job's test files")
      if path not in loaded_modules:
        loaded_modules[path] = _import_test_module(path, finder)
      module = loaded_modules[path]
      if isinstance(module, BaseException):
        raise module
      testrun.run_test(module, parts, foreign)
      state.emit_test(index, True, None, None, time.monotonic() - start)
    except judge._Deadline:
      state.emit_test(index, False, "Timeout", "the job's wall-time limit expired",
                      time.monotonic() - start)
      raise
    except judge.ProgramDied as died:
      state.status = "crashed"
      state.emit_test(index, False, "ProgramDied", str(died), time.monotonic() - start)
      state.fail_rest("ProgramDied", f"not run: {died}")
      return
    except BaseException as error:  # noqa: BLE001 - includes SystemExit raised by test code
      error_type, message = testrun.describe_failure(error, frame_name)
      state.emit_test(index, False, error_type, message, time.monotonic() - start)


def _import_test_module(path: str, finder: _Finder):
  """The trusted test module at ``path``, or the (non-fatal) exception importing it raised."""
  name = testrun.module_name_of(path)
  if name is None:
    return testrun.TestIdError(f"test file {path!r} cannot be imported as a module (use a path "
                               "whose components are identifiers)")
  try:
    module = importlib.import_module(name)
  except (judge._Deadline, judge.ProgramDied):
    raise
  except BaseException as error:  # noqa: BLE001
    return error
  if finder.kind(name) != finder.TRUSTED or getattr(module, "__spec__", None) is None or (
      module.__spec__.loader is not finder):
    return testrun.TestIdError(f"{path!r} did not load as a trusted test file")
  return module


def _judge_inline(state, test_ids) -> None:
  program = state.program
  for index, test_id in enumerate(test_ids):
    start = time.monotonic()
    try:
      nonce = os.urandom(16).hex()
      program.send({"op": "run_test", "nonce": nonce, "test": test_id})
      reply = program.receive()
      if reply.get("op") != "test_done" or reply.get("nonce") != nonce:
        program._broken("protocol violation: test acknowledgement without its nonce")
      if reply.get("ok") is True:
        state.emit_test(index, True, None, None, time.monotonic() - start)
      else:
        state.emit_test(index, False, str(reply.get("error_type"))[:200],
                        str(reply.get("error"))[-_ERROR_CHARS:], time.monotonic() - start)
    except judge._Deadline:
      state.emit_test(index, False, "Timeout", "the job's wall-time limit expired",
                      time.monotonic() - start)
      raise
    except judge.ProgramDied as died:
      state.status = "crashed"
      state.emit_test(index, False, "ProgramDied", str(died), time.monotonic() - start)
      state.fail_rest("ProgramDied", f"not run: {died}")
      return
