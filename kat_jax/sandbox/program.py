"""The program process: loads the untrusted program and serves the judge's requests.

Runs in the forked program process after ``confine.confine_program``. It speaks framed JSON
(``codec``) on two pipes: requests from the judge on fd 3, replies on fd 4. Its stdout/stderr are
the job's captured output (fds 1, 2); stdin is /dev/null.

Messages (judge -> program):
  ``{"op": "call", "id", "fn", "args", "kwargs"}``  call an exported function with plain data;
  ``{"op": "test", "nonce", "setup", "code", "exports", "canonicalize"}``  run an inline CodeTest.
Replies (program -> judge):
  ``{"op": "loaded", "ok", "error_type", "error", "seconds"}`` once, after the program ran;
  ``{"op": "harness_error", "error"}`` instead of any reply, when the code here crashed after the
  program rebound or deleted builtins it uses (the judge names that cause; the job fails);
  ``{"op": "result", "id", "ok", "value" | "error_type", "error"}``;
  ``{"op": "test_done", "nonce", "ok", "error_type", "error"}``.

Nothing here decides a verdict: the judge validates every reply (exact ids and nonces, plain-data
values rebuilt on its side), so a program that patches this module can only make itself fail —
except in inline mode, where the CodeTest itself executes here (see the package docstring).

Inline hardening (``_Pristine``): before each inline test and after every call the test makes into
the program, the interpreter is put back to the state it had before the program ran: the builtins
module, the attribute bindings of every module loaded at that time (the harness's own modules
included), sys hooks (trace, profile, excepthook, displayhook, import machinery, std streams),
gc callbacks, signal handlers and interval timers; modules the program imported are dropped from
``sys.modules`` so the test imports fresh copies; a test never starts or ends while a program
thread is alive; an audit hook refuses ``sys.addaudithook`` so the program cannot keep code
running inside the test through audit events. Test code gets a private copy of the pristine
builtins dict as its ``__builtins__``.
"""
import builtins
import gc
import os
import signal
import sys
import time
import types

from kat_jax.sandbox import codec

REQUEST_FD = 3
REPLY_FD = 4
_ERROR_CHARS = 2000
_SYS_ATTRS = ("stdin", "stdout", "stderr", "excepthook", "displayhook", "breakpointhook",
              "unraisablehook")
_SYS_LISTS = ("meta_path", "path_hooks", "path")
_TIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)


def describe(error: BaseException) -> tuple[str, str]:
  """(type name, message) of an exception raised by untrusted code; never raises."""
  try:
    name = type(error).__name__
    if type(name) is not str:
      name = "<unnamed>"
  except BaseException:  # noqa: BLE001 - hostile metaclasses
    name = "<unnamed>"
  try:
    message = str(error)
    if type(message) is not str:
      message = "<unprintable>"
  except BaseException:  # noqa: BLE001 - hostile __str__
    message = "<unprintable>"
  return name[:200], message[:_ERROR_CHARS]


class _Pristine:
  """Snapshot of interpreter state taken before the program runs; ``restore`` puts it back."""

  def __init__(self):
    self.builtins = dict(builtins.__dict__)
    self.modules = {}
    for name, module in list(sys.modules.items()):
      if isinstance(module, types.ModuleType) and name not in ("builtins", "sys", "__main__"):
        self.modules[name] = (module, dict(module.__dict__))
    self.sys_attrs = {name: getattr(sys, name) for name in _SYS_ATTRS if hasattr(sys, name)}
    self.sys_lists = {name: list(getattr(sys, name)) for name in _SYS_LISTS}
    self.gc_callbacks = list(gc.callbacks)
    self.signal_handlers = {}
    for signum in signal.valid_signals():
      try:
        handler = signal.getsignal(signum)
      except (OSError, ValueError):
        continue
      if handler is not None:
        self.signal_handlers[signum] = handler

  def track_new_modules(self) -> None:
    """Adds modules imported by trusted test code since the last restore to the snapshot."""
    for name, module in list(sys.modules.items()):
      if name not in self.modules and isinstance(module, types.ModuleType) and name not in (
          "builtins", "sys", "__main__"):
        self.modules[name] = (module, dict(module.__dict__))

  def restore(self) -> None:
    sys.settrace(None)
    sys.setprofile(None)
    for timer in _TIMERS:
      signal.setitimer(timer, 0)
    _restore_dict(builtins.__dict__, self.builtins)
    for name in list(sys.modules):
      if name not in self.modules and name not in ("builtins", "sys", "__main__"):
        del sys.modules[name]
    for name, (module, snapshot) in self.modules.items():
      sys.modules[name] = module
      _restore_dict(module.__dict__, snapshot)
    for name, value in self.sys_attrs.items():
      setattr(sys, name, value)
    for name, items in self.sys_lists.items():
      getattr(sys, name)[:] = items
    sys.path_importer_cache.clear()
    gc.callbacks[:] = self.gc_callbacks
    gc.enable()
    for signum, handler in self.signal_handlers.items():
      try:
        if signal.getsignal(signum) is not handler:
          signal.signal(signum, handler)
      except (OSError, ValueError, TypeError):
        pass


def _restore_dict(current: dict, snapshot: dict) -> None:
  # update-then-delete: no moment at which a pristine name is missing.
  current.update(snapshot)
  for key in current.keys() - snapshot.keys():
    del current[key]


class BackgroundThreads(RuntimeError):
  """Inline mode refuses to run tests while program threads are alive."""


def _refuse_threads() -> None:
  count = len(sys._current_frames())  # counts every thread, threading module or not
  if count > 1:
    raise BackgroundThreads(
        f"{count - 1} program thread(s) still running; inline tests cannot be isolated from "
        "them (join threads before returning, or use proxy mode)")


def _block_audit_hooks(event, args):
  if event == "sys.addaudithook":
    raise RuntimeError("sys.addaudithook is not allowed in inline sandbox mode")


def _send(obj) -> None:
  codec.write_message(REPLY_FD, obj)


def _flush_output() -> None:
  for stream in (sys.__stdout__, sys.__stderr__):
    try:
      stream.flush()
    except BaseException:  # noqa: BLE001 - the program may have closed or replaced it
      pass


def serve(spec: dict) -> None:
  """Loads ``spec["program"]`` and answers requests until the judge closes the pipe."""
  inline = spec["mode"] == "inline"
  max_bytes = spec["limits"]["max_value_bytes"]
  pristine = None
  if inline:
    pristine = _Pristine()
    sys.addaudithook(_block_audit_hooks)
  sys.modules["__main__"] = types.ModuleType("__main__")  # the harness is not the program's main
  namespace = {"__name__": spec["module_name"], "__builtins__": builtins}
  builtins_before = dict(builtins.__dict__)
  start = time.perf_counter()
  try:
    code = compile(spec["program"], "<program>", "exec")
    exec(code, namespace)  # noqa: S102 - this is the sandboxed program
    loaded = {"op": "loaded", "ok": True}
  except BaseException as error:  # noqa: BLE001 - SystemExit / KeyboardInterrupt included
    error_type, message = describe(error)
    loaded = {"op": "loaded", "ok": False, "error_type": error_type, "error": message}
  loaded["seconds"] = time.perf_counter() - start
  try:
    _answer(spec, namespace, loaded, pristine, inline, max_bytes)
  except BaseException as error:  # noqa: BLE001
    tampered = restore_builtins(builtins_before)
    if not tampered:
      raise
    report_tampering(tampered, error)


_MISSING = object()


def restore_builtins(before: dict) -> list:
  """Puts back every ``builtins`` binding the program changed or deleted since ``before`` was
  taken; returns their names. Uses no builtin name itself (they may be the program's)."""
  current = builtins.__dict__
  changed = []
  for name, value in before.items():
    if current.get(name, _MISSING) is not value:
      current[name] = value
      changed.append(name)
  return changed


def report_tampering(tampered: list, error: BaseException) -> None:
  """After the harness code here crashed with the program's builtins in place (now restored):
  tells the judge the cause (``harness_error``), so the job's error names it."""
  error_type, message = describe(error)
  shown = ", ".join(f"builtins.{name}" for name in sorted(tampered)[:8])
  _send({"op": "harness_error",
         "error": f"the program rebound or deleted {shown}{' ...' if len(tampered) > 8 else ''}, "
                  f"which the sandbox's own code in the program process uses; that code then "
                  f"failed ({error_type}: {message[:500]}). Do not modify builtins"})


def _answer(spec: dict, namespace: dict, loaded: dict, pristine, inline: bool,
            max_bytes: int) -> None:
  """Sends the load report, then answers requests until the judge closes the pipe."""
  _flush_output()
  _send(loaded)
  if not loaded["ok"]:
    return
  while True:
    try:
      request = codec.read_message(REQUEST_FD, max_bytes)
    except codec.ChannelClosed:
      return
    if request.get("op") == "call":
      reply = _handle_call(namespace, request)
    elif request.get("op") == "test" and inline:
      reply = _handle_inline_test(namespace, request, pristine)
    else:
      reply = {"op": "error", "error": f"unknown request {str(request.get('op'))[:50]!r}"}
    _flush_output()
    try:
      _send(reply)
    except (ValueError, TypeError) as error:  # e.g. an int too large to print
      _send({"op": reply.get("op"), "id": reply.get("id"), "nonce": reply.get("nonce"),
             "ok": False, "error_type": "UnsupportedValue", "error": str(error)[:_ERROR_CHARS]})


def _lookup(namespace: dict, name: str):
  if name not in namespace:
    raise NameError(f"the program defines no {name!r}")
  return namespace[name]


def _handle_call(namespace: dict, request: dict) -> dict:
  reply = {"op": "result", "id": request.get("id")}
  try:
    function = _lookup(namespace, request["fn"])
    args = codec.decode(request["args"])
    kwargs = codec.decode(request["kwargs"])
    value = function(*args, **kwargs)
    reply["value"] = codec.encode(value)
    reply["ok"] = True
  except BaseException as error:  # noqa: BLE001
    reply["ok"] = False
    reply["error_type"], reply["error"] = describe(error)
  return reply


def _guarded(function, pristine: _Pristine, canonicalize: bool):
  """Wraps an exported program function for inline tests (restore state after every call)."""

  def call(*args, **kwargs):
    pristine.track_new_modules()
    try:
      result = function(*args, **kwargs)
    finally:
      pristine.restore()
      _refuse_threads()
    if canonicalize:
      result = codec.loads(codec.dumps(result))
    return result

  return call


def _handle_inline_test(namespace: dict, request: dict, pristine: _Pristine) -> dict:
  reply = {"op": "test_done", "nonce": request.get("nonce")}
  try:
    pristine.restore()
    _refuse_threads()
    test_namespace = {"__name__": "__test__", "__builtins__": dict(pristine.builtins)}
    for name in request["exports"]:
      test_namespace[name] = _guarded(_lookup(namespace, name), pristine,
                                      bool(request["canonicalize"]))
    exec(compile(request["setup"], "<setup>", "exec"), test_namespace)  # noqa: S102
    exec(compile(request["code"], "<test>", "exec"), test_namespace)  # noqa: S102
    _refuse_threads()
    reply["ok"] = True
  except BaseException as error:  # noqa: BLE001
    reply["ok"] = False
    reply["error_type"], reply["error"] = describe(error)
  return reply
