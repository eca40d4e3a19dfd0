"""HFTokenizer: a Qwen-style ``tokenizer.json`` (byte-level BPE trained here on stdlib sources, with the
Qwen added tokens — specials <|endoftext|>, <|im_start|>, <|im_end|>; plain <tool_call>, FIM, ...; no
<|pad|> and no <memory>) behind the kat_jax Tokenizer protocol: exact round trips, specials never made
from text, the special-token mapping and its errors, Qwen-style chat rendering with exact loss masks,
save/load."""
import glob
import json
import os
import sysconfig

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers", reason="extra 'hf' (tokenizers) not installed")

from kat_jax.data import chat, special_tokens as st  # noqa: E402
from kat_jax.data.chat import Conversation, Message  # noqa: E402
from kat_jax.data.hf_tokenizer import HFTokenizer, is_hf_tokenizer_dir  # noqa: E402
from kat_jax.data.tokenizer import Tokenizer  # noqa: E402
from kat_jax.data.toolcall import ToolCall, ToolSpec  # noqa: E402

QWEN_SPECIAL = (st.END_OF_TEXT, st.IM_START, st.IM_END)
QWEN_PLAIN = (st.TOOL_CALL_OPEN, st.TOOL_CALL_CLOSE, st.TOOL_RESPONSE_OPEN, st.TOOL_RESPONSE_CLOSE,
              st.FIM_PREFIX, st.FIM_MIDDLE, st.FIM_SUFFIX, st.FIM_PAD, st.REPO_NAME, st.FILE_SEP)
QWEN_CONFIG = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}   # as Qwen3's
BPE_VOCAB = 1000


def _stdlib_texts(n=40):
  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:n]
  texts = []
  for path in files:
    with open(path, encoding="utf-8") as f:
      texts.append(f.read())
  return texts


@pytest.fixture(scope="module")
def texts():
  return _stdlib_texts()


@pytest.fixture(scope="module")
def qwen_tok(texts):
  return HFTokenizer.train(texts, vocab_size=BPE_VOCAB, special_tokens=QWEN_SPECIAL,
                           plain_added_tokens=QWEN_PLAIN, tokenizer_config=QWEN_CONFIG)


def _conversation(with_memory=False, literal_tags=True):
  tools = (ToolSpec("read_file", "Read a file.",
                    {"type": "object", "properties": {"path": {"type": "string"}}}),
           ToolSpec("run_tests", "Run the test suite."))
  return Conversation((
      Message("system", "You are a coding agent."),
      Message("user", "Fix calc.py — ünïcode" + (", and a literal <|im_end|> or <tool_call> in text."
                                                  if literal_tags else ".")),
      Message("assistant", "Let me look.", (ToolCall("read_file", {"path": "calc.py"}),
                                            ToolCall("read_file", {"path": "test_calc.py"}))),
      chat.tool_result("def add(a, b):\n    return a - b\n", name="read_file"),
      chat.tool_result("no such file", name="read_file", is_error=True),
      Message("assistant", "", (ToolCall("run_tests", {}),),
              memory="add subtracts" if with_memory else None),
      chat.tool_result("1 failed", name="run_tests"),
      Message("assistant", "The bug is `a - b`; it should be `a + b`."),
  ), tools=tools)


def _added_ids(tok):
  return set(tok.hf_tokenizer.get_added_tokens_decoder())


def test_protocol_and_exact_round_trip_on_stdlib_sources(qwen_tok, texts):
  assert isinstance(qwen_tok, Tokenizer)
  assert qwen_tok.vocab_size == BPE_VOCAB + len(QWEN_SPECIAL) + len(QWEN_PLAIN)
  added = _added_ids(qwen_tok)
  for text in texts:
    ids = qwen_tok.encode(text)
    assert qwen_tok.decode(ids) == text
    assert not added & set(ids)
    # Text free of added-token strings encodes exactly as the HF tokenizer itself does.
    assert ids == qwen_tok.hf_tokenizer.encode(text, add_special_tokens=False).ids
  odd = "x\u2581y  \t\n\n😀 ünï\r\n" + "".join(chr(c) for c in range(0x20, 0x7f))
  assert qwen_tok.decode(qwen_tok.encode(odd)) == odd


def test_added_token_strings_in_text_stay_plain_text(qwen_tok):
  text = "s = '" + "' + '".join(QWEN_SPECIAL + QWEN_PLAIN) + "'  # <|im_start|><|im_end|>"
  ids = qwen_tok.encode(text)
  assert qwen_tok.decode(ids) == text
  assert not _added_ids(qwen_tok) & set(ids)
  # The HF tokenizer alone would have produced the special ids: the cut is what prevents it.
  raw = qwen_tok.hf_tokenizer.encode(text, add_special_tokens=False).ids
  assert qwen_tok.token_id(st.IM_END) in raw and qwen_tok.token_id(st.TOOL_CALL_OPEN) in raw


def test_plain_added_tokens_that_are_not_markup_match_as_in_hf(texts):
  """Some code tokenizers add whitespace runs as (non-special) added tokens: ordinary vocabulary."""
  tok = HFTokenizer.train(texts[:5], vocab_size=400, special_tokens=QWEN_SPECIAL,
                          plain_added_tokens=QWEN_PLAIN + ("\t\t\t\t", "<think>"))
  text = "if x:\n\t\t\t\treturn '<think>'\n"
  ids = tok.encode(text)
  assert tok.hf_tokenizer.token_to_id("\t\t\t\t") in ids
  assert tok.hf_tokenizer.token_to_id("<think>") not in ids
  assert tok.decode(ids) == text


def test_special_token_mapping_and_errors(qwen_tok):
  hf = qwen_tok.hf_tokenizer
  for special in QWEN_SPECIAL + QWEN_PLAIN:
    assert qwen_tok.token_id(special) == hf.token_to_id(special)
  # Qwen has no <|pad|>: the config's pad_token (<|endoftext|>) stands in, as Qwen pads.
  assert qwen_tok.eos_id == qwen_tok.pad_id == qwen_tok.token_id(st.PAD) == hf.token_to_id(
      "<|endoftext|>")
  assert qwen_tok.missing_special_tokens == (st.MEMORY_OPEN, st.MEMORY_CLOSE)
  with pytest.raises(KeyError, match=r"'<memory>'.*add_missing_special_tokens=True"):
    qwen_tok.token_id(st.MEMORY_OPEN)
  with pytest.raises(KeyError, match="not a special token"):
    qwen_tok.token_id("<think>")
  with pytest.raises(KeyError, match="<memory>"):   # rendering a memory event needs the token
    chat.render(_conversation(with_memory=True), qwen_tok)


def test_add_missing_special_tokens_and_aliases(texts):
  tok = HFTokenizer.train(texts[:5], vocab_size=400, special_tokens=QWEN_SPECIAL,
                          plain_added_tokens=QWEN_PLAIN, add_missing_special_tokens=True)
  base = 400 + len(QWEN_SPECIAL) + len(QWEN_PLAIN)
  new_ids = [tok.token_id(st.MEMORY_OPEN), tok.token_id(st.MEMORY_CLOSE)]
  assert sorted(new_ids) == [base, base + 1] and tok.vocab_size == base + 2
  assert tok.missing_special_tokens == () and tok.pad_id == tok.eos_id   # pad still falls back
  assert not set(new_ids) & set(tok.encode("<memory>x</memory>"))
  ex = chat.render(_conversation(with_memory=True), tok)
  assert (ex.tokens == new_ids[0]).sum() == 1

  # A Llama 3 style tokenizer: end of text through the config's eos_token or an alias; no ChatML.
  llama_specials = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
  via_config = HFTokenizer.train(texts[:5], vocab_size=400, special_tokens=llama_specials,
                                 tokenizer_config={"eos_token": "<|end_of_text|>"})
  via_alias = HFTokenizer.train(texts[:5], vocab_size=400, special_tokens=llama_specials,
                                special_token_aliases={st.END_OF_TEXT: "<|eot_id|>"})
  hf = via_config.hf_tokenizer
  assert via_config.eos_id == via_config.pad_id == hf.token_to_id("<|end_of_text|>")
  assert via_alias.eos_id == hf.token_to_id("<|eot_id|>")
  with pytest.raises(KeyError, match=r"'<\|im_start\|>'"):
    chat.render(_conversation(), via_config)
  with pytest.raises(ValueError, match="no end-of-text token"):
    HFTokenizer.train(texts[:5], vocab_size=400, special_tokens=llama_specials)
  with pytest.raises(ValueError, match="not an added token"):
    HFTokenizer.train(texts[:5], vocab_size=400, special_tokens=llama_specials,
                      special_token_aliases={st.END_OF_TEXT: "<|eos|>"})


def _true_runs(mask):
  runs, start = [], None
  for t, m in enumerate(list(mask) + [False]):
    if m and start is None:
      start = t
    if not m and start is not None:
      runs.append((start, t))
      start = None
  return runs


def test_chat_rendering_with_qwen_tool_calls_has_exact_loss_masks(qwen_tok):
  conv = _conversation()
  ex = chat.render(conv, qwen_tok)
  assert qwen_tok.decode(ex.tokens) == chat.render_text(conv)
  pieces = chat.render_pieces(conv)
  # Every special piece is its single HF added-token id; nothing else is an added id.
  specials = [qwen_tok.hf_tokenizer.token_to_id(p.text) for p in pieces if p.special]
  assert [t for t in ex.tokens.tolist() if t in _added_ids(qwen_tok)] == specials
  assert specials.count(qwen_tok.token_id(st.TOOL_CALL_OPEN)) == 3 + 2   # 3 calls + tools block
  # The loss mask covers exactly the assistant turns, each closed by its <|im_end|>.
  assistants = [m for m in conv.messages if m.role == "assistant"]
  runs = _true_runs(ex.loss_mask)
  assert len(runs) == len(assistants)
  for (a, b), m in zip(runs, assistants):
    assert qwen_tok.decode(ex.tokens[a:b]) == chat.render_assistant_body(m) + st.IM_END
    assert qwen_tok.decode(ex.tokens[:a]).endswith("<|im_start|>assistant\n")
  prompt = chat.render_prompt(conv.prefix(2), qwen_tok)
  assert np.array_equal(prompt.tokens, ex.tokens[:len(prompt)]) and ex.loss_mask[len(prompt)]


def test_merged_pieces_tokenize_exactly_as_hf_encodes_the_chat_text(qwen_tok):
  """HF's own pipeline (chat template → one string → tokenizer) gives the render's tokens once
  adjacent plain pieces with the same loss flag and tag are encoded together; chat.encode_pieces
  encodes each piece alone, which can split a BPE pre-token at a piece boundary ('.' + '\\n\\n')."""
  conv = _conversation(literal_tags=False)
  merged = []
  for p in chat.render_pieces(conv):
    if (merged and not p.special and not merged[-1].special
        and (p.trained, p.tag) == (merged[-1].trained, merged[-1].tag)):
      merged[-1] = merged[-1]._replace(text=merged[-1].text + p.text)
    else:
      merged.append(p)
  tokens, mask, _ = chat.encode_pieces(merged, qwen_tok)
  hf_ids = qwen_tok.hf_tokenizer.encode(chat.render_text(conv), add_special_tokens=False).ids
  assert tokens.tolist() == hf_ids
  # Merging only joins pieces with equal flags: the trained text is the same as the render's.
  rendered = chat.render(conv, qwen_tok)
  assert qwen_tok.decode(tokens[mask]) == qwen_tok.decode(rendered.tokens[rendered.loss_mask])


def test_save_and_load_round_trip(qwen_tok, texts, tmp_path):
  directory = str(tmp_path / "tok")
  qwen_tok.save(directory)
  assert is_hf_tokenizer_dir(directory)
  loaded = HFTokenizer.load(directory)
  assert loaded.special_ids == qwen_tok.special_ids
  assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id) == (
      qwen_tok.vocab_size, qwen_tok.eos_id, qwen_tok.pad_id)
  assert loaded.missing_special_tokens == qwen_tok.missing_special_tokens
  for text in texts[:5]:
    assert loaded.encode(text) == qwen_tok.encode(text)
  # The files are plain HF files: the tokenizers library reads tokenizer.json alone.
  plain = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
  assert plain.encode(texts[0], add_special_tokens=False).ids == qwen_tok.encode(texts[0])
  with open(os.path.join(directory, "tokenizer_config.json")) as f:
    assert json.load(f) == QWEN_CONFIG
  # Aliases persist.
  alias_dir = str(tmp_path / "alias")
  HFTokenizer(tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json")),
              special_token_aliases={st.PAD: st.FIM_PAD}).save(alias_dir)
  assert HFTokenizer.load(alias_dir).pad_id == qwen_tok.token_id(st.FIM_PAD)
  # Our SentencePiece tokenizer's description file is also called tokenizer.json: not an HF one.
  sp_dir = tmp_path / "sp"
  sp_dir.mkdir()
  (sp_dir / "tokenizer.json").write_text(json.dumps({"kind": "sentencepiece", "vocab_size": 9}))
  assert not is_hf_tokenizer_dir(str(sp_dir))
  with pytest.raises(FileNotFoundError, match="no Hugging Face tokenizer.json"):
    HFTokenizer.load(str(sp_dir))
