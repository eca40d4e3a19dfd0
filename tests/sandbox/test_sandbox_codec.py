"""The plain-data codec: exact round trips, type-exact canonical equality, hostile input refused."""
import math
import os

from hypothesis import given, settings, strategies as st
import pytest

from kat_jax.sandbox import codec

_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
            | st.binary() | st.complex_numbers(allow_nan=False))
_hashables = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    | st.binary(),
    lambda children: st.tuples(children, children) | st.frozensets(children, max_size=3),
    max_leaves=8)
_values = st.recursive(
    _scalars,
    lambda children: (st.lists(children, max_size=4) | st.tuples(children, children)
                      | st.dictionaries(_hashables, children, max_size=3)
                      | st.sets(_hashables, max_size=3) | st.frozensets(_hashables, max_size=3)
                      | st.binary().map(bytearray)),
    max_leaves=20)


def _same_structure(a, b) -> bool:
  if type(a) is not type(b):
    return False
  if isinstance(a, (list, tuple)):
    return len(a) == len(b) and all(_same_structure(x, y) for x, y in zip(a, b))
  if isinstance(a, dict):
    return list(a) == list(b) and all(_same_structure(a[k], b[k]) for k in a)
  if isinstance(a, float) and math.isnan(a):
    return math.isnan(b)
  return a == b and (not isinstance(a, float) or math.copysign(1, a) == math.copysign(1, b))


@settings(max_examples=200, deadline=None)
@given(_values)
def test_round_trip_rebuilds_identical_types_and_values(value):
  assert _same_structure(codec.loads(codec.dumps(value)), value)
  assert codec.canonical(codec.loads(codec.dumps(value))) == codec.canonical(value)


@pytest.mark.parametrize("a,b", [(1, 1.0), (1, True), (0, False), ([1], (1,)),
                                 ({1}, frozenset({1})), (b"a", bytearray(b"a")), ("1", 1),
                                 (0.0, -0.0), (None, 0)])
def test_canonical_is_type_exact(a, b):
  assert codec.canonical(a) != codec.canonical(b)  # even where Python's == says equal


def test_canonical_ignores_set_and_dict_order():
  assert codec.canonical({3, 1, 2}) == codec.canonical({2, 3, 1})
  assert codec.canonical({"b": 1, "a": [2, {"y": 0, "x": 1}]}) == codec.canonical(
      {"a": [2, {"x": 1, "y": 0}], "b": 1})
  assert codec.canonical(float("nan")) == codec.canonical(float("nan"))


class _AlwaysEqual:
  def __eq__(self, other):
    return True


class _Int(int):
  def __eq__(self, other):
    return True


@pytest.mark.parametrize("value", [_AlwaysEqual(), _Int(3), [1, _Int(2)], {"k": _AlwaysEqual()},
                                   lambda: 0, object(), range(3), iter([1])])
def test_encode_refuses_anything_but_exact_plain_types(value):
  with pytest.raises(codec.UnsupportedValue):
    codec.dumps(value)


def test_encode_refuses_values_nested_too_deep():
  deep = []
  for _ in range(1000):
    deep = [deep]
  with pytest.raises(codec.UnsupportedValue, match="deeper"):
    codec.dumps(deep)


@pytest.mark.parametrize("payload", [
    b'{"a": 1}', b'["X", 1]', b'["D", [1]]', b'["D", [["L"], 1]]', b'["S", ["L"]]', b'["B", 3]',
    b'["C", "1", 0]', b"[]", b"[1, 2]", b"not json", b"[" * 100000 + b"]" * 100000,
])
def test_decode_refuses_malformed_payloads(payload):
  with pytest.raises(codec.MalformedValue):
    codec.loads(payload)


def test_framing_reads_exactly_one_message():
  read_fd, write_fd = os.pipe()
  codec.write_message(write_fd, {"first": [1, 2]})
  codec.write_message(write_fd, {"second": True})
  assert codec.read_message(read_fd, 1 << 10) == {"first": [1, 2]}
  assert codec.read_message(read_fd, 1 << 10) == {"second": True}
  codec.write_message(write_fd, {"big": "x" * 100})
  with pytest.raises(codec.MessageTooLarge):
    codec.read_message(read_fd, 50)
  os.close(write_fd)
  os.close(read_fd)
  read_fd, write_fd = os.pipe()
  os.write(write_fd, b"\0\0\0\x10{}")  # announces 16 bytes, delivers 2, then closes
  os.close(write_fd)
  with pytest.raises(codec.ChannelClosed):
    codec.read_message(read_fd, 1 << 10)
  os.close(read_fd)
