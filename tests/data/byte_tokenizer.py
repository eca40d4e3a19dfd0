"""A byte-level test double of the tokenizer protocol, shared by the data tests."""
from kat_jax.data import special_tokens as st


class ByteTokenizer:
  """Test double for the tokenizer protocol: UTF-8 bytes are ids 0..255, specials follow;
  invalid UTF-8 (a random model's bytes) decodes with replacement characters."""

  def __init__(self):
    self.specials = {s: 256 + i for i, s in enumerate(st.ALL)}
    self.by_id = {i: s for s, i in self.specials.items()}
    self.vocab_size = 256 + len(st.ALL)
    self.eos_id = self.specials[st.END_OF_TEXT]
    self.pad_id = self.specials[st.PAD]

  def encode(self, text):
    return list(text.encode("utf-8"))

  def token_id(self, special):
    return self.specials[special]

  def decode(self, ids):
    out, buf = [], bytearray()
    for i in ids:
      i = int(i)
      if i in self.by_id:
        out += [buf.decode("utf-8", errors="replace"), self.by_id[i]]
        buf = bytearray()
      else:
        buf.append(i)
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)

