"""Tool calls: their data types, their Qwen-style text form, and a parser that never raises.

An assistant turn may hold several tool calls at once (parallel calls). Each is rendered as::

    <tool_call>
    {"name": "read_file", "arguments": {"path": "a.py"}}
    </tool_call>

(the format of the Qwen2.5 / Qwen3 chat templates). ``parse_assistant_output`` turns model output
text back into content + tool calls; malformed output (bad JSON, unclosed tag, missing name,
non-object arguments, a tool not in the offered list) yields a ``ParseError`` value whose
``to_observation()`` text is fed back to the model as a tool-error observation — the agent loop
never sees an exception.

The tool list offered to the model is rendered into the system turn by ``render_tools_block``
(again following the Qwen template), so models imported from Hugging Face see what they were
trained on.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Sequence, Union

from kat_jax.data import special_tokens as st


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """One call: a tool name and a JSON object of arguments."""
  name: str
  arguments: dict

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"tool call name must be a non-empty string, got {self.name!r}")
    if not isinstance(self.arguments, dict):
      raise ValueError(f"tool call {self.name!r}: arguments must be a dict (a JSON object), "
                       f"got {type(self.arguments).__name__}")

  def to_dict(self) -> dict:
    return {"name": self.name, "arguments": self.arguments}

  @classmethod
  def from_dict(cls, d: dict) -> "ToolCall":
    return cls(d["name"], dict(d.get("arguments", {})))

  def to_json_text(self) -> str:
    """The JSON line inside ``<tool_call>`` tags: ``{"name": ..., "arguments": {...}}``."""
    return json.dumps({"name": self.name, "arguments": self.arguments}, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class ToolSpec:
  """A tool offered to the model: name, description and a JSON-schema object for its parameters."""
  name: str
  description: str = ""
  parameters: dict = dataclasses.field(default_factory=lambda: {"type": "object", "properties": {}})

  def to_dict(self) -> dict:
    return {"name": self.name, "description": self.description, "parameters": self.parameters}

  @classmethod
  def from_dict(cls, d: dict) -> "ToolSpec":
    if "function" in d:  # OpenAI-style {"type": "function", "function": {...}}
      d = d["function"]
    return cls(d["name"], d.get("description", ""),
               d.get("parameters", {"type": "object", "properties": {}}))


PARSE_ERROR_KINDS = (
    "unclosed_tag",       # <tool_call> without </tool_call>
    "unopened_tag",       # </tool_call> without a matching <tool_call>
    "invalid_json",       # the text between the tags is not JSON
    "not_an_object",      # the JSON is not an object
    "missing_name",       # no "name", or it is not a non-empty string
    "invalid_arguments",  # "arguments" is not an object (nor a string holding one)
    "unknown_tool",       # the name is not in the offered tool list
)


@dataclasses.dataclass(frozen=True)
class ParseError:
  """Why an assistant output could not be turned into tool calls.

  ``call_index`` is the 0-based index of the offending ``<tool_call>`` block (None when the
  problem is not inside one), ``snippet`` a short excerpt of the offending text.
  """
  kind: str
  message: str
  call_index: Optional[int] = None
  snippet: str = ""

  def to_observation(self) -> str:
    """Text of the tool-error observation returned to the model (chat.py renders an error result
    as ``Error: {text}``; ``chat.parse_error_observation`` builds that message)."""
    what = f"tool call #{self.call_index + 1}" if self.call_index is not None else "your output"
    text = f"could not parse {what} ({self.kind}): {self.message}"
    if self.snippet:
      text += f"\nOffending text: {self.snippet}"
    return text


@dataclasses.dataclass(frozen=True)
class ParsedOutput:
  """A well-formed assistant output: free text, tool calls in order, and an optional memory event."""
  content: str
  tool_calls: tuple[ToolCall, ...] = ()
  memory: Optional[str] = None


def _snippet(text: str, limit: int = 120) -> str:
  return text if len(text) <= limit else text[:limit] + "..."


def _tool_names(tools: Optional[Sequence[Union[ToolSpec, str]]]) -> Optional[set[str]]:
  if tools is None:
    return None
  return {t if isinstance(t, str) else t.name for t in tools}


def _parse_call(body: str, index: int, names: Optional[set[str]]) -> Union[ToolCall, ParseError]:
  try:
    obj = json.loads(body)
  except ValueError as e:
    return ParseError("invalid_json", f"the text inside <tool_call> is not valid JSON ({e}); write "
                      '{"name": "<tool>", "arguments": {...}}', index, _snippet(body.strip()))
  if not isinstance(obj, dict):
    return ParseError("not_an_object", f"expected a JSON object, got {type(obj).__name__}; write "
                      '{"name": "<tool>", "arguments": {...}}', index, _snippet(body.strip()))
  name = obj.get("name")
  if not isinstance(name, str) or not name:
    return ParseError("missing_name", f'"name" must be a non-empty string, got {name!r}', index,
                      _snippet(body.strip()))
  args: Any = obj.get("arguments", {})
  if isinstance(args, str):  # OpenAI style: arguments serialized as a JSON string
    try:
      args = json.loads(args)
    except ValueError:
      pass
  if not isinstance(args, dict):
    return ParseError("invalid_arguments", f'"arguments" of {name!r} must be a JSON object, got '
                      f"{_snippet(json.dumps(args, ensure_ascii=False), 60)}", index,
                      _snippet(body.strip()))
  if names is not None and name not in names:
    return ParseError("unknown_tool", f"no tool named {name!r}; available tools: {sorted(names)}",
                      index, _snippet(body.strip()))
  return ToolCall(name, args)


def _extract_memory(text: str) -> Union[tuple[Optional[str], str], ParseError]:
  """Splits a leading ``<memory>...</memory>\\n`` block (as rendered by chat.py) off ``text``."""
  if not text.startswith(st.MEMORY_OPEN):
    return None, text
  end = text.find(st.MEMORY_CLOSE)
  if end < 0:
    return ParseError("unclosed_tag", f"{st.MEMORY_OPEN} has no matching {st.MEMORY_CLOSE}",
                      None, _snippet(text))
  memory = text[len(st.MEMORY_OPEN):end]
  rest = text[end + len(st.MEMORY_CLOSE):]
  if rest.startswith("\n"):
    rest = rest[1:]
  return memory, rest


def parse_assistant_output(text: str, tools: Optional[Sequence[Union[ToolSpec, str]]] = None
                           ) -> Union[ParsedOutput, ParseError]:
  """Parses one assistant turn (model output text) into content + tool calls, never raising.

  ``text`` is what follows ``<|im_start|>assistant\\n``; a trailing ``<|im_end|>`` (and anything
  after it) is ignored. Content is the text before the first ``<tool_call>`` with the one newline
  the renderer puts before a call removed; non-blank text between or after calls is appended to
  the content on new lines. With ``tools`` given, calls to other names are errors.
  For any message m without tag strings in its content, parsing the rendered body returns m.
  """
  end = text.find(st.IM_END)
  if end >= 0:
    text = text[:end]
  memory_split = _extract_memory(text)
  if isinstance(memory_split, ParseError):
    return memory_split
  memory, text = memory_split
  names = _tool_names(tools)
  calls: list[ToolCall] = []
  segments: list[str] = []  # text outside tool-call blocks
  pos = 0
  while True:
    open_at = text.find(st.TOOL_CALL_OPEN, pos)
    close_at = text.find(st.TOOL_CALL_CLOSE, pos)
    if open_at < 0:
      if close_at >= 0:
        return ParseError("unopened_tag", f"{st.TOOL_CALL_CLOSE} without a preceding "
                          f"{st.TOOL_CALL_OPEN}", len(calls), _snippet(text[max(0, close_at - 60):]))
      segments.append(text[pos:])
      break
    if 0 <= close_at < open_at:
      return ParseError("unopened_tag", f"{st.TOOL_CALL_CLOSE} without a preceding "
                        f"{st.TOOL_CALL_OPEN}", len(calls), _snippet(text[max(0, close_at - 60):]))
    segments.append(text[pos:open_at])
    body_start = open_at + len(st.TOOL_CALL_OPEN)
    close_at = text.find(st.TOOL_CALL_CLOSE, body_start)
    if close_at < 0:
      return ParseError("unclosed_tag", f"{st.TOOL_CALL_OPEN} has no matching {st.TOOL_CALL_CLOSE}; "
                        "close every call", len(calls), _snippet(text[open_at:]))
    body = text[body_start:close_at]
    if st.TOOL_CALL_OPEN in body:
      return ParseError("unclosed_tag", f"{st.TOOL_CALL_OPEN} opened again before "
                        f"{st.TOOL_CALL_CLOSE}", len(calls), _snippet(text[open_at:]))
    call = _parse_call(body, len(calls), names)
    if isinstance(call, ParseError):
      return call
    calls.append(call)
    pos = close_at + len(st.TOOL_CALL_CLOSE)
  content = segments[0]
  if calls and content.endswith("\n"):
    content = content[:-1]
  extra = [s.strip() for s in segments[1:] if s.strip()]
  if extra:
    content = "\n".join([content, *extra]) if content else "\n".join(extra)
  return ParsedOutput(content, tuple(calls), memory)


def render_tools_block(tools: Sequence[ToolSpec]) -> str:
  """The tool-list section that the Qwen templates append to the system prompt."""
  lines = "\n".join(json.dumps({"type": "function", "function": t.to_dict()}, ensure_ascii=False)
                    for t in tools)
  return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
          "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
          f"{lines}\n</tools>\n\nFor each function call, return a json object with function name "
          "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
          '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
