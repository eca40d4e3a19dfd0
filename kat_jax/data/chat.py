"""Conversations and agent trajectories, rendered Qwen-style to tokens with exact per-token loss masks.

A ``Conversation`` is a tuple of ``Message`` s (system / user / assistant / tool) plus the tools
offered and an optional taxonomy label. An assistant message may carry several tool calls at once
(parallel calls); a tool message carries one result, possibly an error; any non-tool message may
carry a memory (context-compression) event. Layout, as in the Qwen2.5 / Qwen3 chat templates::

    <|im_start|>system\\n{system}\\n\\n# Tools ...<tools>...</tools>...<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n<memory>{memory}</memory>\\n{content}\\n<tool_call>\\n{json}\\n</tool_call>\\n<tool_call>...</tool_call><|im_end|>\\n
    <|im_start|>user\\n<tool_response>\\n{result}\\n</tool_response>\\n<tool_response>...</tool_response><|im_end|>\\n

(consecutive tool messages share one ``user`` turn; an error result is written ``Error: {result}``).

Rendering works on ``Piece`` s — text fragments that are either one special token or plain text,
each with its training flag and event tag — and tokenizes every piece separately, so the loss mask
and event tags are exact at token level, and the tokens of ``render_prompt(conversation[:k])`` are
a prefix of the tokens of ``render(conversation)`` whenever message k is an assistant turn. Use::

    example = render(conversation, tokenizer)            # loss on assistant turns (default)
    example.tokens, example.loss_mask, example.event_tags, example.labels
    prompt = render_prompt(conversation_prefix, tokenizer).tokens  # ends with <|im_start|>assistant\\n
    parsed = toolcall.parse_assistant_output(model_text, conversation.tools)

``loss_mask[t]`` is True when token t is a training target (predicted from tokens < t); the loss
code does the shift. Note that a sampled continuation may tokenize differently from
``tokenizer.encode`` of its text: RL keeps the sampled ids rather than re-rendering.
"""
from __future__ import annotations

import dataclasses
import enum
import json
from typing import Iterable, NamedTuple, Optional, Protocol, Sequence, Union

import numpy as np

from kat_jax.data import special_tokens as st
from kat_jax.data.taxonomy import TaskLabel, label_ids
from kat_jax.data.toolcall import ParsedOutput, ParseError, ToolCall, ToolSpec, render_tools_block

ROLES = ("system", "user", "assistant", "tool")


class Tokenizer(Protocol):
  """What rendering needs from a tokenizer (kat_jax.data.tokenizer implements it)."""
  vocab_size: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...  # special-token strings are NOT parsed as specials
  def decode(self, ids) -> str: ...
  def token_id(self, special: str) -> int: ...


class EventTag(enum.IntEnum):
  """Per-token event tags (stored as int8): tree pruning keeps tool and memory regions."""
  PLAIN = 0
  TOOL_CALL = 1
  TOOL_RESULT = 2
  MEMORY = 3


@dataclasses.dataclass(frozen=True)
class Message:
  """One turn. ``tool_calls`` only on assistant messages; ``name`` / ``is_error`` only on tool
  messages (the tool that answered, and whether the result is an error); ``memory`` on any
  non-tool message (a context-compression event rendered before the content). ``train``
  overrides the loss policy for this message (e.g. False for a failed first attempt in
  self-debugging data, so the model is not trained to write the bug); None follows the policy."""
  role: str
  content: str = ""
  tool_calls: tuple[ToolCall, ...] = ()
  name: Optional[str] = None
  is_error: bool = False
  memory: Optional[str] = None
  train: Optional[bool] = None

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f"unknown role {self.role!r}: use one of {list(ROLES)}")
    if not isinstance(self.content, str):
      raise ValueError(f"{self.role} message content must be a str, got {type(self.content).__name__}")
    object.__setattr__(self, "tool_calls", tuple(self.tool_calls))
    if self.tool_calls and self.role != "assistant":
      raise ValueError(f"only assistant messages carry tool calls, got {len(self.tool_calls)} on a "
                       f"{self.role} message")
    if self.role != "tool" and (self.is_error or self.name is not None):
      raise ValueError(f"name/is_error describe tool results; set them only on tool messages "
                       f"(got role {self.role!r})")
    if self.role == "tool" and self.memory is not None:
      raise ValueError("a tool message cannot carry a memory event; attach it to the next "
                       "user/assistant message")

  def to_dict(self) -> dict:
    d: dict = {"role": self.role, "content": self.content}
    if self.tool_calls:
      d["tool_calls"] = [c.to_dict() for c in self.tool_calls]
    if self.name is not None:
      d["name"] = self.name
    if self.is_error:
      d["is_error"] = True
    if self.memory is not None:
      d["memory"] = self.memory
    if self.train is not None:
      d["train"] = self.train
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "Message":
    calls = []
    for c in d.get("tool_calls", ()):
      if "function" in c:  # OpenAI style {"type": "function", "function": {...}}
        c = c["function"]
      args = c.get("arguments", {})
      calls.append(ToolCall(c["name"], json.loads(args) if isinstance(args, str) else dict(args)))
    return cls(d["role"], d.get("content") or "", tuple(calls), d.get("name"),
               bool(d.get("is_error", False)), d.get("memory"), d.get("train"))


def tool_result(content: str, *, name: Optional[str] = None, is_error: bool = False) -> Message:
  return Message("tool", content, name=name, is_error=is_error)


def parse_error_observation(error: ParseError) -> Message:
  """The tool-error message that tells the model why its output could not be parsed."""
  return Message("tool", error.to_observation(), is_error=True)


def message_from_parsed(parsed: ParsedOutput) -> Message:
  return Message("assistant", parsed.content, parsed.tool_calls, memory=parsed.memory)


@dataclasses.dataclass(frozen=True)
class Conversation:
  """Messages (a system message only at index 0), the tools offered, an optional taxonomy label,
  and free-form ``meta`` (source, ids; never rendered)."""
  messages: tuple[Message, ...]
  tools: tuple[ToolSpec, ...] = ()
  label: Optional[TaskLabel] = None
  meta: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, "messages", tuple(self.messages))
    object.__setattr__(self, "tools", tuple(self.tools))
    for i, m in enumerate(self.messages):
      if m.role == "system" and i != 0:
        raise ValueError(f"system message at index {i}: only the first message may be a system "
                         "message")

  def __len__(self) -> int:
    return len(self.messages)

  def prefix(self, n: int) -> "Conversation":
    """The first n messages, same tools/label/meta."""
    return dataclasses.replace(self, messages=self.messages[:n])

  def to_dict(self) -> dict:
    d: dict = {"messages": [m.to_dict() for m in self.messages]}
    if self.tools:
      d["tools"] = [t.to_dict() for t in self.tools]
    if self.label is not None:
      d["label"] = self.label.to_dict()
    if self.meta:
      d["meta"] = self.meta
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "Conversation":
    return cls(tuple(Message.from_dict(m) for m in d["messages"]),
               tuple(ToolSpec.from_dict(t) for t in d.get("tools", ())),
               TaskLabel.from_dict(d.get("label")), dict(d.get("meta", {})))

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), ensure_ascii=False)

  @classmethod
  def from_json(cls, text: str) -> "Conversation":
    return cls.from_dict(json.loads(text))


class Piece(NamedTuple):
  """A fragment of rendered text: one special token (``special``) or plain text to encode."""
  text: str
  special: bool = False
  trained: bool = False
  tag: int = EventTag.PLAIN


@dataclasses.dataclass(frozen=True)
class LossPolicy:
  """Which tokens are training targets: the turns of ``roles`` (content, tool calls, memory and
  the closing ``<|im_end|>``), and with ``structure`` also the turn headers and newlines."""
  roles: frozenset
  structure: bool = False


LOSS_POLICIES = {
    "assistant": LossPolicy(frozenset({"assistant"})),
    "assistant_and_tool": LossPolicy(frozenset({"assistant", "tool"})),
    "all": LossPolicy(frozenset(ROLES), structure=True),
}


def _policy(loss_on: Union[str, LossPolicy]) -> LossPolicy:
  if isinstance(loss_on, LossPolicy):
    bad = set(loss_on.roles) - set(ROLES)
    if bad:
      raise ValueError(f"LossPolicy roles {sorted(bad)} are not roles; use a subset of {list(ROLES)}")
    return loss_on
  if loss_on not in LOSS_POLICIES:
    raise ValueError(f"unknown loss policy {loss_on!r}: use one of {list(LOSS_POLICIES)} or a "
                     "LossPolicy")
  return LOSS_POLICIES[loss_on]


def _trained(message: Optional[Message], role: str, policy: LossPolicy) -> bool:
  if message is not None and message.train is not None:
    return message.train
  return role in policy.roles


def _split_tool_tags(text: str, trained: bool) -> list[Piece]:
  """Template text (the tools block) with its tag strings as special pieces, like a HF tokenizer."""
  pieces: list[Piece] = []
  tags = (st.TOOL_CALL_OPEN, st.TOOL_CALL_CLOSE)
  pos = 0
  while pos < len(text):
    hits = [(text.find(t, pos), t) for t in tags]
    hits = [(i, t) for i, t in hits if i >= 0]
    if not hits:
      pieces.append(Piece(text[pos:], False, trained))
      break
    i, tag = min(hits)
    if i > pos:
      pieces.append(Piece(text[pos:i], False, trained))
    pieces.append(Piece(tag, True, trained))
    pos = i + len(tag)
  return pieces


def _body_pieces(message: Message, trained: bool) -> list[Piece]:
  """Memory, content and tool calls of a non-tool message (what follows the turn header)."""
  pieces: list[Piece] = []
  if message.memory is not None:
    pieces += [Piece(st.MEMORY_OPEN, True, trained, EventTag.MEMORY),
               Piece(message.memory, False, trained, EventTag.MEMORY),
               Piece(st.MEMORY_CLOSE, True, trained, EventTag.MEMORY),
               Piece("\n", False, trained)]
  if message.content:
    pieces.append(Piece(message.content, False, trained))
  for i, call in enumerate(message.tool_calls):
    if i > 0 or message.content:
      pieces.append(Piece("\n", False, trained))
    pieces += [Piece(st.TOOL_CALL_OPEN, True, trained, EventTag.TOOL_CALL),
               Piece("\n" + call.to_json_text() + "\n", False, trained, EventTag.TOOL_CALL),
               Piece(st.TOOL_CALL_CLOSE, True, trained, EventTag.TOOL_CALL)]
  return pieces


def render_assistant_body(message: Message) -> str:
  """The text a model writes for this assistant turn (without ``<|im_end|>``); the inverse of
  ``toolcall.parse_assistant_output`` for content free of tag strings."""
  return "".join(p.text for p in _body_pieces(message, False))


def render_pieces(conversation: Conversation, *, loss_on: Union[str, LossPolicy] = "assistant",
                  add_generation_prompt: bool = False) -> list[Piece]:
  """The conversation as pieces with training flags (see ``LossPolicy``) and event tags."""
  policy = _policy(loss_on)
  msgs = conversation.messages
  pieces: list[Piece] = []

  def header(role_text: str, trained: bool):
    pieces.extend([Piece(st.IM_START, True, trained), Piece(role_text, False, trained)])

  def footer(trained_end: bool):
    pieces.extend([Piece(st.IM_END, True, trained_end), Piece("\n", False, policy.structure)])

  start = 0
  if conversation.tools or (msgs and msgs[0].role == "system"):
    system = msgs[0] if msgs and msgs[0].role == "system" else None
    trained = _trained(system, "system", policy)
    header("system\n", trained and policy.structure)
    if system is not None:
      pieces.extend(_body_pieces(system, trained))
      start = 1
    if conversation.tools:
      if system is not None:
        pieces.append(Piece("\n\n", False, trained))
      pieces.extend(_split_tool_tags(render_tools_block(conversation.tools), trained))
    footer(trained)
  i = start
  while i < len(msgs):
    m = msgs[i]
    trained = _trained(m, m.role, policy)
    if m.role == "tool":
      header("user", trained and policy.structure)
      while i < len(msgs) and msgs[i].role == "tool":
        result = msgs[i]
        trained = _trained(result, "tool", policy)
        text = ("Error: " if result.is_error else "") + result.content
        pieces += [Piece("\n", False, trained),
                   Piece(st.TOOL_RESPONSE_OPEN, True, trained, EventTag.TOOL_RESULT),
                   Piece("\n" + text + "\n", False, trained, EventTag.TOOL_RESULT),
                   Piece(st.TOOL_RESPONSE_CLOSE, True, trained, EventTag.TOOL_RESULT)]
        i += 1
      footer(trained)
      continue
    header(m.role + "\n", trained and policy.structure)
    pieces.extend(_body_pieces(m, trained))
    footer(trained)
    i += 1
  if add_generation_prompt:
    header("assistant\n", False)
  return [p for p in pieces if p.text]


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: compare fields with np.array_equal
class RenderedExample:
  """tokens int32 [T]; loss_mask bool [T] (token t is a target); event_tags int8 [T] (EventTag);
  labels: the conversation's TaskLabel or None (``label_ids`` gives ints for batching)."""
  tokens: np.ndarray
  loss_mask: np.ndarray
  event_tags: np.ndarray
  labels: Optional[TaskLabel] = None

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def label_ids(self) -> tuple[int, int, int]:
    """(task_type_id, scenario_id, cell_id); -1 each when unlabeled."""
    return label_ids(self.labels)


def encode_pieces(pieces: Iterable[Piece], tokenizer: Tokenizer
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Tokenizes the pieces: (tokens int32 [T], loss_mask bool [T], event_tags int8 [T]).

  Adjacent plain pieces with the same (trained, tag) are encoded as one text, so that a BPE merge
  across their boundary happens exactly as when the whole text is encoded (a pretrained tokenizer's
  own encoding of the rendered chat); pieces that differ in mask or tag are encoded apart, which keeps
  every mask boundary on a token boundary."""
  tokens: list[int] = []
  mask: list[bool] = []
  tags: list[int] = []
  merged: list[Piece] = []
  for p in pieces:
    last = merged[-1] if merged else None
    if (last is not None and not p.special and not last.special and p.trained == last.trained
        and p.tag == last.tag):
      merged[-1] = last._replace(text=last.text + p.text)
    else:
      merged.append(p)
  for p in merged:
    if p.special:
      if p.text not in st.ALL:
        raise ValueError(f"piece {p.text!r} is marked special but is not in special_tokens.ALL")
      ids = [tokenizer.token_id(p.text)]
    else:
      ids = tokenizer.encode(p.text)
    tokens += ids
    mask += [p.trained] * len(ids)
    tags += [int(p.tag)] * len(ids)
  return (np.asarray(tokens, np.int32), np.asarray(mask, np.bool_), np.asarray(tags, np.int8))


def render(conversation: Conversation, tokenizer: Tokenizer, *,
           loss_on: Union[str, LossPolicy] = "assistant") -> RenderedExample:
  """Tokens, loss mask, event tags and labels of a whole conversation (for SFT / mid-training)."""
  tokens, mask, tags = encode_pieces(render_pieces(conversation, loss_on=loss_on), tokenizer)
  return RenderedExample(tokens, mask, tags, conversation.label)


def render_prompt(conversation_prefix: Conversation, tokenizer: Tokenizer) -> RenderedExample:
  """The prompt for generating the next assistant turn: ends with ``<|im_start|>assistant\\n``.
  The loss mask is all False."""
  pieces = render_pieces(conversation_prefix, add_generation_prompt=True)
  tokens, _, tags = encode_pieces(pieces, tokenizer)
  return RenderedExample(tokens, np.zeros_like(tokens, np.bool_), tags, conversation_prefix.label)


def render_text(conversation: Conversation, *, add_generation_prompt: bool = False) -> str:
  """The rendered conversation as one string (special tokens written out), e.g. for a HF tokenizer."""
  return "".join(p.text for p in render_pieces(conversation,
                                               add_generation_prompt=add_generation_prompt))


def conversations_from_jsonl(lines: Iterable[str]) -> list[Conversation]:
  return [Conversation.from_json(line) for line in lines if line.strip()]


def conversations_to_jsonl(conversations: Sequence[Conversation]) -> str:
  return "".join(c.to_json() + "\n" for c in conversations)
