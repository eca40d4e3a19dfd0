"""Conversation rendering: exact loss masks, event tags, prompt prefixes, JSON round trips, taxonomy."""
import json

import numpy as np
import pytest

from kat_jax.data import chat, special_tokens as st, taxonomy
from kat_jax.data.chat import Conversation, EventTag, Message
from kat_jax.data.toolcall import ToolCall, ToolSpec
from byte_tokenizer import ByteTokenizer


TOK = ByteTokenizer()
TOOLS = (ToolSpec("read_file", "Read a file.", {"type": "object", "properties": {"path": {"type": "string"}}}),
         ToolSpec("run_tests", "Run the test suite."))


def agent_conversation():
  return Conversation(
      messages=(
          Message("system", "You are a coding agent."),
          Message("user", "Fix the failing test in calc.py — ünïcode ok?"),
          Message("assistant", "Let me look at both files.",
                  (ToolCall("read_file", {"path": "calc.py"}), ToolCall("read_file", {"path": "test_calc.py"}))),
          chat.tool_result("def add(a, b):\n    return a - b\n", name="read_file"),
          chat.tool_result("no such file", name="read_file", is_error=True),
          Message("assistant", "", (ToolCall("run_tests", {}),), memory="calc.add subtracts; test file missing"),
          chat.tool_result("1 failed", name="run_tests"),
          Message("user", "Go on."),
          Message("assistant", "The bug is `a - b`; it should be `a + b`."),
      ),
      tools=TOOLS,
      label=taxonomy.TaskLabel("bug_fixing", "application_development"),
      meta={"source": "unit-test"})


def true_runs(mask):
  runs, start = [], None
  for t, m in enumerate(list(mask) + [False]):
    if m and start is None:
      start = t
    if not m and start is not None:
      runs.append((start, t)); start = None
  return runs


def test_loss_mask_covers_exactly_the_assistant_turns():
  conv = agent_conversation()
  ex = chat.render(conv, TOK)
  assert ex.tokens.dtype == np.int32 and ex.loss_mask.shape == ex.tokens.shape == ex.event_tags.shape
  runs = true_runs(ex.loss_mask)
  assistants = [m for m in conv.messages if m.role == "assistant"]
  assert len(runs) == len(assistants)
  for (a, b), m in zip(runs, assistants):
    assert TOK.decode(ex.tokens[a:b]) == chat.render_assistant_body(m) + st.IM_END
    # Right before each run: the untrained assistant header.
    assert TOK.decode(ex.tokens[a - 11:a]) == "<|im_start|>assistant\n"
  # Outside the runs nothing is a target, so the masked tokens are exactly the assistant turns.
  assert ex.loss_mask.sum() == sum(b - a for a, b in runs)


def test_loss_policies():
  conv = agent_conversation()
  everything = chat.render(conv, TOK, loss_on="all")
  assert everything.loss_mask.all()
  with_tool = chat.render(conv, TOK, loss_on="assistant_and_tool")
  default = chat.render(conv, TOK)
  assert np.array_equal(with_tool.tokens, default.tokens)
  extra = with_tool.loss_mask & ~default.loss_mask
  assert not (default.loss_mask & ~with_tool.loss_mask).any()
  # The extra targets are exactly the tool results (with their newlines) and the tool turns' <|im_end|>.
  text = TOK.decode(with_tool.tokens[extra])
  assert text.count(st.TOOL_RESPONSE_OPEN) == 3 and st.IM_START not in text
  assert text.count(st.IM_END) == 2 and "Error: no such file" in text
  custom = chat.render(conv, TOK, loss_on=chat.LossPolicy(frozenset({"user"})))
  assert TOK.decode(custom.tokens[custom.loss_mask]).startswith("Fix the failing test")
  with pytest.raises(ValueError, match="unknown loss policy"):
    chat.render(conv, TOK, loss_on="assistants")


def test_event_tags_mark_calls_results_and_memory():
  conv = agent_conversation()
  ex = chat.render(conv, TOK)
  calls = [c for m in conv.messages for c in m.tool_calls]
  call_text = TOK.decode(ex.tokens[ex.event_tags == EventTag.TOOL_CALL])
  assert call_text == "".join(f"{st.TOOL_CALL_OPEN}\n{c.to_json_text()}\n{st.TOOL_CALL_CLOSE}" for c in calls)
  results = [m for m in conv.messages if m.role == "tool"]
  result_text = TOK.decode(ex.tokens[ex.event_tags == EventTag.TOOL_RESULT])
  assert result_text == "".join(
      f"{st.TOOL_RESPONSE_OPEN}\n{'Error: ' if m.is_error else ''}{m.content}\n{st.TOOL_RESPONSE_CLOSE}"
      for m in results)
  assert TOK.decode(ex.tokens[ex.event_tags == EventTag.MEMORY]) == (
      f"{st.MEMORY_OPEN}calc.add subtracts; test file missing{st.MEMORY_CLOSE}")
  assert ex.event_tags.dtype == np.int8
  assert ex.labels == conv.label and ex.label_ids == (2, 0, 16)


def test_layout_matches_qwen_template():
  conv = Conversation((
      Message("user", "hi"),
      Message("assistant", "ok", (ToolCall("f", {"a": 1}), ToolCall("g", {}))),
      chat.tool_result("1"), chat.tool_result("2"),
      Message("assistant", "done")))
  expected = ("<|im_start|>user\nhi<|im_end|>\n"
              "<|im_start|>assistant\nok\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>\n"
              "<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call><|im_end|>\n"
              "<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n2\n</tool_response><|im_end|>\n"
              "<|im_start|>assistant\ndone<|im_end|>\n")
  assert chat.render_text(conv) == expected
  assert TOK.decode(chat.render(conv, TOK).tokens) == expected
  # Special strings are single tokens, and tag strings inside plain text are not.
  ex = chat.render(conv, TOK)
  assert (ex.tokens == TOK.token_id(st.TOOL_CALL_OPEN)).sum() == 2
  sneaky = chat.render(Conversation((Message("user", "<tool_call>"),)), TOK)
  assert TOK.token_id(st.TOOL_CALL_OPEN) not in sneaky.tokens.tolist()


def test_system_turn_with_tools():
  text = chat.render_text(agent_conversation())
  assert text.startswith("<|im_start|>system\nYou are a coding agent.\n\n# Tools\n")
  assert '{"type": "function", "function": {"name": "read_file"' in text
  no_system = Conversation((Message("user", "x"),), tools=TOOLS)
  assert chat.render_text(no_system).startswith("<|im_start|>system\n# Tools\n")
  # The tag strings of the template text are special tokens, as a HF tokenizer would produce.
  ex = chat.render(no_system, TOK)
  # ("within <tool_call></tool_call> XML tags" and the example call)
  assert (ex.tokens == TOK.token_id(st.TOOL_CALL_OPEN)).sum() == 2
  assert (ex.tokens == TOK.token_id(st.TOOL_CALL_CLOSE)).sum() == 2


def test_prompt_is_prefix_of_full_render():
  conv = agent_conversation()
  full = chat.render(conv, TOK)
  for k, m in enumerate(conv.messages):
    if m.role != "assistant":
      continue
    prompt = chat.render_prompt(conv.prefix(k), TOK)
    n = len(prompt)
    assert np.array_equal(prompt.tokens, full.tokens[:n])
    assert TOK.decode(prompt.tokens).endswith("<|im_start|>assistant\n")
    assert not prompt.loss_mask.any()
    # The first target of the full render is the first token the model must generate.
    assert full.loss_mask[n] and not full.loss_mask[n - 1]


def test_json_round_trip_and_openai_style():
  conv = agent_conversation()
  again = Conversation.from_json(conv.to_json())
  assert again == conv
  assert chat.conversations_from_jsonl(chat.conversations_to_jsonl([conv, conv]).splitlines()) == [conv, conv]
  openai = {"messages": [{"role": "assistant", "content": None, "tool_calls": [
      {"type": "function", "function": {"name": "f", "arguments": json.dumps({"x": [1, 2]})}}]}],
      "tools": [{"type": "function", "function": {"name": "f", "description": "d"}}]}
  c = Conversation.from_dict(openai)
  assert c.messages[0].tool_calls == (ToolCall("f", {"x": [1, 2]}),) and c.tools[0].name == "f"


def test_validation_errors_name_the_problem():
  with pytest.raises(ValueError, match="unknown role 'bot'"):
    Message("bot", "x")
  with pytest.raises(ValueError, match="only assistant messages carry tool calls"):
    Message("user", "x", (ToolCall("f", {}),))
  with pytest.raises(ValueError, match="system message at index 1"):
    Conversation((Message("user", "a"), Message("system", "b")))
  with pytest.raises(ValueError, match="arguments must be a dict"):
    ToolCall("f", [1])
  with pytest.raises(ValueError, match="only on tool messages"):
    Message("user", "x", is_error=True)


def test_parse_error_becomes_error_observation():
  from kat_jax.data.toolcall import parse_assistant_output
  err = parse_assistant_output("<tool_call>\n{bad json}\n</tool_call>")
  msg = chat.parse_error_observation(err)
  conv = Conversation((Message("user", "u"), Message("assistant", "x"), msg))
  text = chat.render_text(conv)
  assert "<tool_response>\nError: could not parse tool call #1 (invalid_json)" in text


# ---- taxonomy ----

def test_taxonomy_cells_are_a_bijection():
  assert len(taxonomy.TASK_TYPES) == len(taxonomy.SCENARIOS) == 8
  cells = [taxonomy.TaskLabel(t, s) for t in taxonomy.TASK_TYPES for s in taxonomy.SCENARIOS]
  assert [c.cell_id for c in cells] == list(range(64))
  assert all(taxonomy.TaskLabel.from_cell_id(c.cell_id) == c for c in cells)
  with pytest.raises(ValueError, match="unknown scenario 'web'"):
    taxonomy.TaskLabel("bug_fixing", "web")
  with pytest.raises(ValueError, match="unknown task type"):
    taxonomy.TaskLabel("Bug Fixing", "web")


def test_balanced_sampling_weights_equalize_cells():
  rng = np.random.default_rng(0)
  cells = rng.choice([0, 1, 9, 63], size=200, p=[0.7, 0.2, 0.07, 0.03])
  labels = [taxonomy.TaskLabel.from_cell_id(int(c)) for c in cells] + [None] * 10
  w = taxonomy.balanced_sampling_weights(labels)
  assert np.isclose(w.sum(), 1) and (w[-10:] == 0).all()
  for c in (0, 1, 9, 63):
    assert np.isclose(w[:200][cells == c].sum(), 0.25)
  w = taxonomy.balanced_sampling_weights(labels, unlabeled_mass=0.2)
  assert np.isclose(w[-10:].sum(), 0.2) and np.isclose(w[:200][cells == 9].sum(), 0.2)
  cw = np.zeros((8, 8)); cw[0, 0] = 3; cw[0, 1] = 1
  w = taxonomy.balanced_sampling_weights(labels, cell_weights=cw)
  assert np.isclose(w[:200][cells == 0].sum(), 0.75) and w[:200][cells == 9].sum() == 0
  assert taxonomy.cell_counts(labels).sum() == 200


def test_message_train_flag_overrides_the_policy():
  conv = Conversation((Message("user", "task"), Message("assistant", "wrong", train=False),
                       Message("user", "tests fail"), Message("assistant", "right"),
                       Message("user", "remember this", train=True)))
  ex = chat.render(conv, TOK)
  assert TOK.decode(ex.tokens[ex.loss_mask]) == "right<|im_end|>remember this<|im_end|>"
  assert Conversation.from_json(conv.to_json()) == conv


def test_masks_are_exact_with_the_sentencepiece_tokenizer():
  from kat_jax.data.tokenizer import SentencePieceTokenizer
  conv = agent_conversation()
  tok = SentencePieceTokenizer.train([chat.render_text(conv) * 3, "def add(a, b):\n    return a + b\n" * 20],
                                     vocab_size=400)
  ex = chat.render(conv, tok)
  assert tok.decode(ex.tokens.tolist()) == chat.render_text(conv)
  runs = true_runs(ex.loss_mask)
  assistants = [m for m in conv.messages if m.role == "assistant"]
  assert [tok.decode(ex.tokens[a:b].tolist()) for a, b in runs] == [
      chat.render_assistant_body(m) + st.IM_END for m in assistants]
  for k, m in enumerate(conv.messages):
    if m.role == "assistant":
      prompt = chat.render_prompt(conv.prefix(k), tok)
      assert np.array_equal(prompt.tokens, ex.tokens[:len(prompt)])
