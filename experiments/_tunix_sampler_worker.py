"""The Tunix side of ``experiments.bench_sample_tunix``: Google Tunix's ``Sampler`` on a Hugging
Face Qwen3 checkpoint, served over stdin/stdout JSON lines.

Run by the bench with the Python of a virtualenv that has Tunix (never imported by kat_jax: this
file imports only tunix, jax, flax and numpy, and those only inside ``main``, so importing it as
``experiments._tunix_sampler_worker`` in kat_jax's own environment needs no Tunix)::

  V/bin/python experiments/_tunix_sampler_worker.py --checkpoint=DIR --cache_size=S

It loads ``DIR`` (``config.json`` + safetensors) with Tunix's own loader
(``tunix.models.qwen3.params.create_model_from_safe_tensors``), builds
``tunix.generate.sampler.Sampler`` with a KV cache of ``S`` slots, answers one line
``{"ready": true, ...}`` (versions, device, parameter count), then one JSON line per command:

* ``{"cmd": "prompts", "ids": [[...], ...]}``: the prompts as token ids, every row of one length
  P (no padding). They reach the sampler as text ``"5 17 3"`` that ``IdTokenizer`` maps back to
  ``[5, 17, 3]``; the reply is an error unless Tunix's own tokenization gives back exactly these
  ids (no BOS added).
* ``{"cmd": "logits", "path": F}``: float32 ``[B, P, V]`` logits of one full forward pass of the
  model over the prompts (no cache), saved to ``F`` with ``numpy.save``.
* ``{"cmd": "warm", "new_tokens": [N, 1]}``: one sampler call per entry (compiles its programs;
  Tunix's buffers have ``P + n`` slots, so every ``n`` compiles its own).
* ``{"cmd": "time", "new_tokens": n, "seed": k}``: one timed sampler call; replies ``seconds``
  (wall time of the call, which returns host arrays), ``lengths`` and the first generated token
  and its log-prob per row (``warm`` too, of its last call).
* ``{"cmd": "quit"}``.

Every sampler call samples at temperature 1 from the whole vocabulary (``top_p=1``: Tunix samples
greedily when ``top_p`` is None, whatever the temperature), with ``return_logprobs=True``,
``max_prompt_length=P`` (so no padding) and an end-of-sequence id outside the vocabulary (every
row generates exactly ``n`` tokens). The pad id is outside the vocabulary too: Tunix masks every
slot whose token equals the pad id, which a sampled token must never be.

A failed command answers ``{"error": traceback}``; anything a library prints goes to stderr
(file descriptor 1 is pointed at 2, the replies use a copy of the original stdout).
"""
import argparse
import json
import os
import sys
import time
import traceback

# Outside [0, vocab): never a prompt token nor a sampled one.
PAD_ID = -1
EOS_ID = -2
# tunix 0.1.7 qwen3 Attention calls apply_rope without the config's rope_theta: always this.
TUNIX_ROPE_THETA = 1_000_000


class IdTokenizer:
  """Text of space-separated token ids <-> those ids: ``"5 17 3"`` <-> ``[5, 17, 3]``. The
  methods Tunix's ``TokenizerAdapter`` needs of a custom tokenizer; no BOS."""

  def encode(self, text: str, **kwargs) -> list:
    del kwargs
    return [int(t) for t in text.split()]

  def decode(self, ids, **kwargs) -> str:
    del kwargs
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return None

  def eos_id(self) -> int:
    return EOS_ID

  def pad_id(self) -> int:
    return PAD_ID


def tunix_config(hf: dict, jnp, model_lib):
  """Tunix's qwen3 ``ModelConfig`` for a Qwen3 ``config.json`` (float32)."""
  if hf.get("model_type") != "qwen3":
    raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; this worker loads "
                     "qwen3 checkpoints only")
  if float(hf.get("rope_theta", TUNIX_ROPE_THETA)) != TUNIX_ROPE_THETA:
    raise ValueError(f"config.json has rope_theta={hf['rope_theta']}, but tunix's qwen3 applies "
                     f"RoPE with theta={TUNIX_ROPE_THETA} whatever its config says: export the "
                     f"checkpoint with rope_theta={TUNIX_ROPE_THETA}")
  return model_lib.ModelConfig(
      num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
      embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
      num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
      num_kv_heads=hf["num_key_value_heads"], rope_theta=TUNIX_ROPE_THETA,
      norm_eps=hf["rms_norm_eps"], use_tied_embedding=bool(hf["tie_word_embeddings"]),
      dtype=jnp.float32, param_dtype=jnp.float32)


class Worker:
  """The loaded model and sampler, and the commands of the module docstring."""

  def __init__(self, checkpoint: str, cache_size: int):
    import importlib.metadata

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tunix.generate import sampler as sampler_lib
    from tunix.models.qwen3 import model as model_lib
    from tunix.models.qwen3 import params as params_lib

    self.jax, self.jnp, self.nnx = jax, jnp, nnx
    with open(os.path.join(checkpoint, "config.json")) as f:
      hf = json.load(f)
    self.config = tunix_config(hf, jnp, model_lib)
    t0 = time.perf_counter()
    self.model = params_lib.create_model_from_safe_tensors(checkpoint, self.config,
                                                           dtype=jnp.float32)
    self.load_s = time.perf_counter() - t0
    self.sampler = sampler_lib.Sampler(
        transformer=self.model, tokenizer=IdTokenizer(),
        cache_config=sampler_lib.CacheConfig(cache_size=cache_size,
                                             num_layers=self.config.num_layers,
                                             num_kv_heads=self.config.num_kv_heads,
                                             head_dim=self.config.head_dim))
    self.cache_size = cache_size
    self.prompts = None
    self.hello = dict(
        ready=True, jax_version=jax.__version__,
        tunix_version=importlib.metadata.version("google-tunix"),
        device=str(jax.devices()[0].device_kind), load_s=self.load_s,
        params=int(sum(x.size for x in jax.tree.leaves(nnx.state(self.model, nnx.Param)))),
        tied_embeddings=bool(self.config.use_tied_embedding))

  def _strings(self) -> list:
    if self.prompts is None:
      raise ValueError("send {'cmd': 'prompts', 'ids': [[...]]} first")
    return [" ".join(str(t) for t in row) for row in self.prompts]

  def cmd_prompts(self, ids) -> dict:
    lengths = {len(row) for row in ids}
    if len(lengths) != 1:
      raise ValueError(f"prompts of lengths {sorted(lengths)}: send rows of one length (the "
                       "bench compares unpadded prompts)")
    self.prompts = [[int(t) for t in row] for row in ids]
    vocab = self.config.vocab_size
    if any(not 0 <= t < vocab for row in self.prompts for t in row):
      raise ValueError(f"prompt ids outside [0, {vocab})")
    for i, text in enumerate(self._strings()):
      got = [int(t) for t in self.sampler.tokenize(text)]
      if got != self.prompts[i]:
        raise ValueError(f"Tunix tokenizes prompt {i} to {got[:8]}..., not {self.prompts[i][:8]}")
    return dict(batch=len(self.prompts), prompt_len=lengths.pop())

  def cmd_logits(self, path: str) -> dict:
    import numpy as np
    jnp = self.jnp
    tokens = jnp.asarray(np.asarray(self.prompts, np.int32))
    b, p = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((p, p), jnp.bool_)), (b, p, p))
    graphdef, state = self.nnx.split(self.model)
    forward = self.jax.jit(lambda s, t, pos, m: self.nnx.merge(graphdef, s)(t, pos, None, m)[0])
    logits = forward(state, tokens, positions, mask)     # jitted: eager dispatch compiles more
    logits = np.asarray(self.jax.device_get(logits), np.float32)
    np.save(path, logits)
    return dict(path=path, shape=list(logits.shape))

  def _sample(self, new_tokens: int, seed: int):
    return self.sampler(
        input_strings=self._strings(), max_generation_steps=int(new_tokens),
        max_prompt_length=len(self.prompts[0]), temperature=1.0, top_p=1.0,
        return_logprobs=True, eos_tokens=[EOS_ID], seed=int(seed))

  def _summary(self, out, new_tokens: int) -> dict:
    import numpy as np
    lengths = [len(t) for t in out.tokens]
    logprobs = [np.asarray(lp, np.float64) for lp in out.logprobs]
    padded = np.asarray(out.padded_prompt_tokens)
    return dict(lengths=lengths,
                prompts_as_sent=bool(np.array_equal(padded, np.asarray(self.prompts))),
                logprobs_ok=bool(all(len(lp) == new_tokens and np.all(np.isfinite(lp))
                                     and np.all(lp <= 0) for lp in logprobs)),
                first_tokens=[int(t[0]) for t in out.tokens],
                first_logprobs=[float(lp[0]) for lp in logprobs])

  def cmd_warm(self, new_tokens) -> dict:
    seconds = {}
    for n in new_tokens:
      t0 = time.perf_counter()
      out = self._sample(n, seed=0)
      self.jax.block_until_ready(out.tokens)
      seconds[str(n)] = time.perf_counter() - t0
    return dict(seconds=seconds, **self._summary(out, int(new_tokens[-1])))

  def cmd_time(self, new_tokens: int, seed: int) -> dict:
    t0 = time.perf_counter()
    out = self._sample(new_tokens, seed)
    self.jax.block_until_ready((out.tokens, out.logprobs))
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, **self._summary(out, int(new_tokens)))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="Hugging Face Qwen3 checkpoint dir.")
  parser.add_argument("--cache_size", type=int, required=True, help="KV-cache slots (P + N).")
  args = parser.parse_args()
  replies = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)                         # library prints go to stderr, not into the replies
  sys.stdout = sys.stderr

  def reply(message: dict) -> None:
    replies.write(json.dumps(message) + "\n")
    replies.flush()

  try:
    worker = Worker(args.checkpoint, args.cache_size)
  except Exception:  # noqa: BLE001 - reported to the bench, which raises it
    reply(dict(error=traceback.format_exc()))
    return 1
  reply(worker.hello)
  for line in sys.stdin:
    if not line.strip():
      continue
    try:
      command = json.loads(line)
      name = command.pop("cmd")
      if name == "quit":
        reply(dict(bye=True))
        return 0
      handler = getattr(worker, f"cmd_{name}", None)
      if handler is None:
        raise ValueError(f"unknown command {name!r}: use prompts, logits, warm, time or quit")
      reply(handler(**command))
    except Exception:  # noqa: BLE001 - reported to the bench, which raises it
      reply(dict(error=traceback.format_exc()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
