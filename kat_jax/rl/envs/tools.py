"""Tool plumbing shared by the environments: config sections resolved against their defaults,
tool-call arguments checked against a ``ToolSpec``, overlong observations cut with a marker.

    cfg = resolve_config(config, default_code_env_config())   # ConfigError names a bad field
    problem = check_arguments(SUBMIT, call.arguments)         # None, or why the call is wrong
    text = truncate(report, cfg.max_observation_chars)
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import ml_collections

from kat_jax.data.procedural.task import short_repr
from kat_jax.data.toolcall import ToolSpec
from kat_jax.errors import ConfigError

CONFIG_PATH = "config.rl.env"   # where the environment section lives, for error messages


def resolve_config(config: Any, defaults: ml_collections.ConfigDict,
                   path: str = CONFIG_PATH) -> ml_collections.ConfigDict:
  """``defaults`` overridden by the fields of ``config`` (None, a ConfigDict or a mapping);
  ConfigError naming the field for an unknown field or a value of the wrong type."""
  resolved = ml_collections.ConfigDict(defaults.to_dict())
  if config is None:
    return resolved
  items = config.items() if hasattr(config, "items") else None
  if items is None:
    raise ConfigError(f"{path} must be a ConfigDict or a mapping of fields, got "
                      f"{type(config).__name__}")
  for key, value in items:
    if key not in defaults:
      raise ConfigError(f"{path}.{key} is not a field of this environment: use some of "
                        f"{sorted(defaults.keys())}")
    default = defaults[key]
    if not _same_kind(value, default):
      raise ConfigError(f"{path}.{key}={value!r} must be a {type(default).__name__} (default "
                        f"{default!r})")
    resolved[key] = type(default)(value)
  return resolved


def _same_kind(value: Any, default: Any) -> bool:
  """A config value may replace ``default``: same type, ints allowed for floats, bools only for
  bools."""
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(default, bool) and isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  return isinstance(value, type(default))


def truncate(text: str, max_chars: int) -> str:
  """``text`` if it fits, else its head and tail around a visible marker (result <= max_chars)."""
  if len(text) <= max_chars:
    return text
  marker = f"\n[... {len(text)} characters in all; the middle was cut ...]\n"
  room = max(0, max_chars - len(marker))
  head = room * 2 // 3
  tail = room - head
  return text[:head] + marker + (text[len(text) - tail:] if tail else "")


_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
               "array": (list,), "object": (dict,)}


def check_arguments(spec: ToolSpec, arguments: Mapping[str, Any]) -> Optional[str]:
  """Why ``arguments`` do not fit ``spec.parameters`` (required, known, JSON-schema types), or
  None. The message names the argument and shows the expected call."""
  properties = spec.parameters.get("properties", {})
  signature = f"{spec.name}({', '.join(properties)})"
  for name in spec.parameters.get("required", ()):
    if name not in arguments:
      return f"{spec.name} needs the argument {name!r}: call {signature}"
  for name, value in arguments.items():
    if name not in properties:
      return (f"{spec.name} has no argument {name!r}; its arguments are {sorted(properties)}: "
              f"call {signature}")
    expected = properties[name].get("type")
    kinds = _JSON_TYPES.get(expected)
    if kinds and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
      return (f"argument {name!r} of {spec.name} must be a JSON {expected}, got "
              f"{type(value).__name__} {short_repr(value, 60)}")
  return None
