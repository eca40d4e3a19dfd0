"""Plain-data codec and message framing shared by the host, the judge and the program process.

Values cross process boundaries in the sandbox as *plain data only*: ``None``, ``bool``,
``int``, ``float``, ``complex``, ``str``, ``bytes``, ``bytearray``, ``list``, ``tuple``, ``dict``,
``set`` and ``frozenset``, matched by **exact** type (a subclass of ``int`` is refused, so is any
object with a custom ``__eq__``). The encoding is a JSON tree in which every JSON array is tagged:

  ``["L", ...]`` list, ``["T", ...]`` tuple, ``["S", ...]`` set, ``["F", ...]`` frozenset,
  ``["D", [k, v], ...]`` dict, ``["B", hex]`` bytes, ``["A", hex]`` bytearray,
  ``["C", re, im]`` complex;

JSON scalars stand for themselves (``1`` int, ``1.0`` float, ``true`` bool, NaN/Infinity allowed).
``decode`` rebuilds genuine built-in objects from such a tree and rejects anything else, so whatever
bytes an untrusted process sends, the receiver gets values whose ``==`` is the built-in one.

``canonical`` gives a type-exact canonical string: ``canonical(a) == canonical(b)`` iff ``a`` and
``b`` are the same plain data with the same types at every position (``1``, ``1.0`` and ``True``
differ; set and dict order do not matter; NaN equals NaN; ``-0.0`` differs from ``0.0``).

Framing: a message is a 4-byte big-endian length followed by that many bytes of JSON.

This module uses only the standard library: it is imported inside sandbox children started with
``python -I -S``.
"""
import json
import os
import struct

_HEADER = struct.Struct(">I")
# json.loads of a hostile payload can recurse at most this deep before our decoder refuses it.
_MAX_DEPTH = 200


class UnsupportedValue(TypeError):
  """A value is not plain data (wrong type, too deep, or unrepresentable)."""


class MalformedValue(ValueError):
  """An encoded tree does not describe plain data."""


class ChannelClosed(EOFError):
  """The peer closed the pipe before a whole message arrived."""


class MessageTooLarge(ValueError):
  """A framed message announced more bytes than the receiver accepts."""


def encode(value, _depth=0):
  """Returns the tagged JSON tree of plain-data ``value``; raises UnsupportedValue otherwise."""
  if _depth > _MAX_DEPTH:
    raise UnsupportedValue(f"value nested deeper than {_MAX_DEPTH} levels")
  kind = type(value)
  if value is None or kind is bool or kind is int or kind is float or kind is str:
    return value
  depth = _depth + 1
  if kind is list:
    return ["L"] + [encode(item, depth) for item in value]
  if kind is tuple:
    return ["T"] + [encode(item, depth) for item in value]
  if kind is dict:
    return ["D"] + [[encode(key, depth), encode(item, depth)] for key, item in value.items()]
  if kind is set:
    return ["S"] + [encode(item, depth) for item in value]
  if kind is frozenset:
    return ["F"] + [encode(item, depth) for item in value]
  if kind is bytes:
    return ["B", value.hex()]
  if kind is bytearray:
    return ["A", value.hex()]
  if kind is complex:
    return ["C", value.real, value.imag]
  raise UnsupportedValue(
      f"a value of type {kind.__module__}.{kind.__qualname__} cannot leave the sandbox: results "
      "must be plain data (None, bool, int, float, complex, str, bytes, bytearray, list, tuple, "
      "dict, set, frozenset) of exactly those types")


def decode(tree, _depth=0):
  """Rebuilds genuine built-in values from an ``encode`` tree; raises MalformedValue otherwise."""
  if _depth > _MAX_DEPTH:
    raise MalformedValue(f"value nested deeper than {_MAX_DEPTH} levels")
  kind = type(tree)
  if tree is None or kind is bool or kind is int or kind is float or kind is str:
    return tree
  if kind is not list or not tree or type(tree[0]) is not str:
    raise MalformedValue(f"not an encoded value: {_preview(tree)}")
  tag = tree[0]
  depth = _depth + 1
  try:
    if tag == "L":
      return [decode(item, depth) for item in tree[1:]]
    if tag == "T":
      return tuple(decode(item, depth) for item in tree[1:])
    if tag == "D":
      result = {}
      for pair in tree[1:]:
        if type(pair) is not list or len(pair) != 2:
          raise MalformedValue(f"dict entry is not a [key, value] pair: {_preview(pair)}")
        result[decode(pair[0], depth)] = decode(pair[1], depth)
      return result
    if tag == "S":
      return {decode(item, depth) for item in tree[1:]}
    if tag == "F":
      return frozenset(decode(item, depth) for item in tree[1:])
    if tag in ("B", "A") and len(tree) == 2 and type(tree[1]) is str:
      data = bytes.fromhex(tree[1])
      return data if tag == "B" else bytearray(data)
    if (tag == "C" and len(tree) == 3 and type(tree[1]) in (int, float)
        and type(tree[2]) in (int, float)):
      return complex(tree[1], tree[2])
  except TypeError as error:  # e.g. an unhashable dict key or set element
    raise MalformedValue(f"invalid encoded value: {error}") from None
  raise MalformedValue(f"unknown or malformed tag {tag!r}")


def dumps(value) -> bytes:
  """Plain data -> compact JSON bytes (raises UnsupportedValue)."""
  try:
    return json.dumps(encode(value), separators=(",", ":")).encode()
  except ValueError as error:  # e.g. an int beyond the str-conversion digit limit
    raise UnsupportedValue(str(error)) from None


def loads(data: bytes):
  """JSON bytes -> genuine plain data (raises MalformedValue on anything else)."""
  try:
    return decode(json.loads(data))
  except (ValueError, RecursionError, UnicodeDecodeError) as error:
    if isinstance(error, MalformedValue):
      raise
    raise MalformedValue(f"invalid encoded value: {error}") from None


def canonical(value) -> str:
  """Type-exact canonical string of plain data (raises UnsupportedValue)."""
  return json.dumps(_canonical_tree(encode(value)), separators=(",", ":"))


def _canonical_tree(tree):
  if type(tree) is not list:
    return tree
  tag = tree[0]
  if tag in ("B", "A", "C"):
    return tree
  if tag == "D":
    pairs = [[_canonical_tree(key), _canonical_tree(item)] for key, item in tree[1:]]
    return ["D"] + sorted(pairs, key=lambda pair: json.dumps(pair[0]))
  items = [_canonical_tree(item) for item in tree[1:]]
  if tag in ("S", "F"):
    items.sort(key=json.dumps)
  return [tag] + items


def _preview(obj, limit=80):
  text = repr(obj)
  return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------------------------
# Framing over raw file descriptors (no Python-level buffering, so a process can read exactly one
# message and leave the rest in the pipe for a later reader).


def write_message(fd: int, obj) -> None:
  """Writes one framed JSON message to ``fd``."""
  payload = json.dumps(obj, separators=(",", ":")).encode()
  _write_all(fd, _HEADER.pack(len(payload)) + payload)


def read_message(fd: int, max_bytes: int):
  """Reads one framed JSON message from ``fd`` (raises ChannelClosed / MessageTooLarge)."""
  (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
  if size > max_bytes:
    raise MessageTooLarge(f"message of {size} bytes exceeds the limit of {max_bytes} bytes")
  return json.loads(_read_exactly(fd, size))


def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    written = os.write(fd, view)
    view = view[written:]


def _read_exactly(fd: int, size: int) -> bytes:
  chunks = []
  remaining = size
  while remaining:
    chunk = os.read(fd, min(remaining, 1 << 20))
    if not chunk:
      raise ChannelClosed(f"pipe closed with {remaining} of {size} bytes unread")
    chunks.append(chunk)
    remaining -= len(chunk)
  return b"".join(chunks)
