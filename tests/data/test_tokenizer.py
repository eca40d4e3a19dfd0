"""SentencePieceTokenizer: exact round trip on the whole standard library, special tokens, save/load."""
import os
import sysconfig

import hypothesis
from hypothesis import strategies as st
import pytest

from kat_jax.data import special_tokens
from kat_jax.data import tokenizer as tokenizer_lib
from kat_jax.data.corpora import source_code

STDLIB = sysconfig.get_paths()["stdlib"]


def _all_stdlib_py_files():
  paths = []
  for directory, subdirs, files in os.walk(STDLIB):
    subdirs[:] = [d for d in subdirs if d not in ("site-packages", "__pycache__")]
    paths.extend(os.path.join(directory, f) for f in files if f.endswith(".py"))
  return sorted(paths)


@pytest.fixture(scope="module")
def tokenizer():
  files = source_code.list_source_files(STDLIB, (".py",), source_code.DEFAULT_EXCLUDE_DIRS)
  texts = []
  for rel in files[::3]:
    with open(os.path.join(STDLIB, rel), encoding="utf-8") as f:
      texts.append(f.read())
  return tokenizer_lib.SentencePieceTokenizer.train(texts, vocab_size=1024, max_sentences=20_000)


def test_round_trip_every_stdlib_file(tokenizer):
  paths = _all_stdlib_py_files()
  assert len(paths) > 500
  checked = 0
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      continue  # a few test files are deliberately not UTF-8
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text, path
    checked += 1
  assert checked > 0.99 * len(paths)


def test_code_is_compressed_and_indentation_is_cheap(tokenizer):
  with open(os.path.join(STDLIB, "argparse.py"), encoding="utf-8") as f:
    text = f.read()
  assert len(text.encode()) / len(tokenizer.encode(text)) > 2.5  # bytes per token
  # Eight spaces of indentation are one whitespace-only piece, not eight.
  assert len(tokenizer.encode("        ")) == 1


@pytest.mark.parametrize("text", [
    "", " ", "  x", "x  ", "\n\n\t \r\n", "\x00\x01", "caf\u00e9 e\u0301 \u00c5ngstr\u00f6m",
    "\uff21\ufb01 \u2460",  # NFKC would rewrite these
    "emoji \U0001f600!", "\u2581", "a \u2581 b\u2581\u2581", "12345678901234567890"])
def test_round_trip_edge_cases(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.text())
def test_round_trip_any_text(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_are_single_ids_never_produced_from_text(tokenizer):
  special_ids = {tokenizer.token_id(s) for s in special_tokens.ALL}
  assert len(special_ids) == len(special_tokens.ALL)
  assert all(0 <= i < tokenizer.vocab_size for i in special_ids)
  assert tokenizer.eos_id == tokenizer.token_id(special_tokens.END_OF_TEXT)
  assert tokenizer.pad_id == tokenizer.token_id(special_tokens.PAD)
  for special in special_tokens.ALL:
    assert tokenizer.decode([tokenizer.token_id(special)]) == special
    text = f"x = '{special}' + '<<{special}{special}>>'"
    ids = tokenizer.encode(text)
    assert not special_ids.intersection(ids), special
    assert tokenizer.decode(ids) == text
  # Rendered structure: specials spliced in by id decode to their strings around plain text.
  im_start, im_end = (tokenizer.token_id(special_tokens.IM_START),
                      tokenizer.token_id(special_tokens.IM_END))
  ids = [im_start] + tokenizer.encode("user\nhi") + [im_end]
  assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>"


def test_unknown_special_token_error_names_it(tokenizer):
  with pytest.raises(KeyError, match="<\\|nope\\|>.*special_tokens"):
    tokenizer.token_id("<|nope|>")


def test_save_load_identical(tokenizer, tmp_path):
  tokenizer.save(str(tmp_path))
  loaded = tokenizer_lib.load_tokenizer(str(tmp_path))
  assert isinstance(loaded, tokenizer_lib.Tokenizer)
  assert loaded.model_proto == tokenizer.model_proto
  text = "def f(x):\n    return x + 1  # <|im_end|>\n"
  assert loaded.encode(text) == tokenizer.encode(text)
  assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id) == (
      tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id)


def test_training_is_deterministic():
  texts = ["def add(a, b):\n    return a + b\n" * 20, "class A:\n    pass\n" * 30]
  a = tokenizer_lib.SentencePieceTokenizer.train(texts, vocab_size=300, num_threads=1)
  b = tokenizer_lib.SentencePieceTokenizer.train(texts, vocab_size=300, num_threads=1)
  assert a.model_proto == b.model_proto


def test_too_small_vocab_is_a_clear_error():
  with pytest.raises(ValueError, match="vocab_size=100 is too small"):
    tokenizer_lib.SentencePieceTokenizer.train(["abc"], vocab_size=100)


def test_missing_tokenizer_directory_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer"):
    tokenizer_lib.SentencePieceTokenizer.load(str(tmp_path))
