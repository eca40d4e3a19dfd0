"""Tool-call parsing: exact round trip with rendering (parallel calls, memory), malformed input -> ParseError."""
import json

import pytest
from hypothesis import given, settings, strategies as hst

from kat_jax.data import chat, special_tokens as st
from kat_jax.data.chat import Message
from kat_jax.data.toolcall import (PARSE_ERROR_KINDS, ParsedOutput, ParseError, ToolCall, ToolSpec,
                                   parse_assistant_output)

json_values = hst.recursive(
    hst.none() | hst.booleans() | hst.integers() | hst.floats(allow_nan=False, allow_infinity=False)
    | hst.text(max_size=8),
    lambda children: hst.lists(children, max_size=3) | hst.dictionaries(hst.text(max_size=5), children, max_size=3),
    max_leaves=8)
free_text = hst.text(max_size=40).filter(lambda s: not any(tag in s for tag in st.ALL + ("<memory", "</memory")))
tool_calls = hst.builds(ToolCall, hst.text(min_size=1, max_size=10),
                        hst.dictionaries(hst.text(max_size=6), json_values, max_size=3))
assistant_messages = hst.builds(
    lambda content, calls, memory: Message("assistant", content, tuple(calls), memory=memory),
    free_text, hst.lists(tool_calls, max_size=4), hst.none() | free_text)


@settings(max_examples=150, deadline=None)
@given(assistant_messages)
def test_render_then_parse_is_identity(message):
  text = chat.render_assistant_body(message) + st.IM_END + "\n"
  parsed = parse_assistant_output(text)
  assert parsed == ParsedOutput(message.content, message.tool_calls, message.memory)
  assert chat.message_from_parsed(parsed) == message
  # With the tool list given, every rendered call is accepted.
  assert parse_assistant_output(text, tools=[c.name for c in message.tool_calls]) == parsed


@settings(max_examples=150, deadline=None)
@given(hst.lists(hst.sampled_from(["<tool_call>", "</tool_call>", "<memory>", "</memory>", "{", "}", '"name"',
                                   ":", '"arguments"', "[1]", '"f"', "\n", "x", ",", "<|im_end|>"]), max_size=14))
def test_parser_never_raises(parts):
  out = parse_assistant_output("".join(parts), tools=["f"])
  assert isinstance(out, (ParsedOutput, ParseError))
  if isinstance(out, ParseError):
    assert out.kind in PARSE_ERROR_KINDS and out.to_observation()


def test_parallel_calls_keep_order():
  body = ('I will read both.\n<tool_call>\n{"name": "read", "arguments": {"path": "a"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "read", "arguments": {"path": "b"}}\n</tool_call>')
  out = parse_assistant_output(body)
  assert out == ParsedOutput("I will read both.", (ToolCall("read", {"path": "a"}), ToolCall("read", {"path": "b"})))


@pytest.mark.parametrize("text, kind, index", [
    ('<tool_call>\n{"name": "f", "arguments": {}}\n', "unclosed_tag", 0),
    ('<tool_call>{"name": "f"}</tool_call><tool_call>{"name": "f"', "unclosed_tag", 1),
    ('<tool_call><tool_call>{"name": "f"}</tool_call>', "unclosed_tag", 0),
    ('text </tool_call>', "unopened_tag", 0),
    ('<tool_call>{"name": "f", "arguments": {}</tool_call>', "invalid_json", 0),
    ("<tool_call>{'name': 'f'}</tool_call>", "invalid_json", 0),
    ('<tool_call>["f", {}]</tool_call>', "not_an_object", 0),
    ('<tool_call>{"arguments": {}}</tool_call>', "missing_name", 0),
    ('<tool_call>{"name": "", "arguments": {}}</tool_call>', "missing_name", 0),
    ('<tool_call>{"name": 3}</tool_call>', "missing_name", 0),
    ('<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>', "invalid_arguments", 0),
    ('<tool_call>{"name": "f", "arguments": "not json"}</tool_call>', "invalid_arguments", 0),
    ('<tool_call>{"name": "f"}</tool_call>\n<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
     "unknown_tool", 1),
    ("<memory>never closed", "unclosed_tag", None),
])
def test_malformed_output_is_a_parse_error(text, kind, index):
  out = parse_assistant_output(text, tools=[ToolSpec("f"), "g"])
  assert isinstance(out, ParseError), out
  assert (out.kind, out.call_index) == (kind, index)
  assert kind in out.to_observation()


def test_lenient_forms():
  # Missing arguments means no arguments; OpenAI-style string arguments are decoded.
  assert parse_assistant_output('<tool_call>{"name": "f"}</tool_call>').tool_calls == (ToolCall("f", {}),)
  out = parse_assistant_output('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
  assert out.tool_calls == (ToolCall("f", {"x": 1}),)
  # Text after the calls is kept as content; what follows <|im_end|> is ignored.
  out = parse_assistant_output('<tool_call>{"name": "f"}</tool_call>\nThen I wait.<|im_end|>junk</tool_call>')
  assert out == ParsedOutput("Then I wait.", (ToolCall("f", {}),))
  assert parse_assistant_output("just text") == ParsedOutput("just text")


def test_unknown_tool_message_lists_the_tools():
  out = parse_assistant_output('<tool_call>{"name": "h"}</tool_call>', tools=["f", "g"])
  assert "no tool named 'h'" in out.message and "['f', 'g']" in out.message
  json.dumps(out.__dict__)  # plain data: can be logged / serialized
