"""Asking a model for text: one interface over a kat_jax checkpoint, an imported Hugging Face model
and scripted stand-ins, for every pipeline that needs model-written text (self-debugging
explanations and refinements, Evol-Instruct rewrites, solutions and tests, the refinement modes of
the evaluation)::

    gen = generator.from_checkpoint(config, workdir, max_len=1024, temperature=0.8)   # Sampler
    gen = generator.from_hf("/ckpt/Qwen2.5-Coder-0.5B-Instruct", max_len=2048)        # HF import
    gen = generator.ScriptedGenerator(lambda prompt, index: "...")                     # tests
    texts = gen(["Write f(x) that returns x plus 3."])         # one response per prompt
    samples = gen.sample(prompts, num_samples=8)               # [prompt][sample] -> text
    evol_instruct.evolve(seeds, gen, rng)                      # any TextGenerator is a `generate`

A prompt is a ``str`` — by default the content of one user turn, rendered with ``chat`` (the
model answers as the assistant and stops at ``<|im_end|>``); with ``prompt_format="raw"`` the text
itself, continued as plain text (HumanEval-style completion) — or a ``chat.Conversation`` (a
multi-turn history, e.g. a refinement after a failed one), rendered as is with the generation
prompt. Responses are decoded text cut at the first end-of-turn / end-of-text token.

``SamplerGenerator`` batches every call through the KV-cache sampler
(``eval.sampling.sample_completions``: row j of a call draws with ``fold_in(key(seed, call), j)``,
so results do not depend on the batch size and two calls draw differently). ``from_checkpoint``
restores a training workdir's params and tokenizer; ``from_hf`` imports a Hugging Face checkpoint
through ``kat_jax.model.hf`` (Qwen2/2.5/3, Llama 3) with its ``tokenizer.json``.
"""
from __future__ import annotations

import abc
from typing import Callable, Optional, Sequence, Union

from kat_jax.data import chat
from kat_jax.data import special_tokens

Prompt = Union[str, chat.Conversation]
PROMPT_FORMATS = ("chat", "raw")
OVERFLOW_POLICIES = ("error", "empty")
_END_STRINGS = (special_tokens.IM_END, special_tokens.END_OF_TEXT)


def cut_at_end(text: str) -> str:
  """``text`` up to its first end-of-turn / end-of-text token string (the response proper)."""
  for end in _END_STRINGS:
    index = text.find(end)
    if index >= 0:
      text = text[:index]
  return text


def as_conversation(prompt: Prompt) -> chat.Conversation:
  """A ``str`` prompt as a one-user-turn conversation; a conversation as is."""
  if isinstance(prompt, chat.Conversation):
    return prompt
  if not isinstance(prompt, str):
    raise TypeError(f"a prompt is a str (a user turn) or a chat.Conversation, got "
                    f"{type(prompt).__name__}")
  return chat.Conversation((chat.Message("user", prompt),))


def prompt_text(prompt: Prompt) -> str:
  """The text a scripted generator reads: a ``str`` prompt, or a conversation's last user turn."""
  if isinstance(prompt, str):
    return prompt
  users = [m.content for m in prompt.messages if m.role == "user"]
  return users[-1] if users else ""


class TextGenerator(abc.ABC):
  """Prompts in, text out. ``calls`` / ``prompts_seen`` / ``samples_drawn`` count the work done
  (pipelines log them)."""

  name: str = "generator"

  def __init__(self):
    self.calls = 0
    self.prompts_seen = 0
    self.samples_drawn = 0

  @abc.abstractmethod
  def _sample(self, prompts: Sequence[Prompt], num_samples: int) -> list[list[str]]:
    """``num_samples`` responses per prompt, [prompt][sample]."""

  def sample(self, prompts: Sequence[Prompt], num_samples: int = 1) -> list[list[str]]:
    """``num_samples`` responses per prompt: ``out[i][j]`` is sample j of prompt i."""
    if num_samples < 1:
      raise ValueError(f"num_samples={num_samples} must be >= 1")
    prompts = list(prompts)
    if not prompts:
      return []
    out = self._sample(prompts, num_samples)
    if len(out) != len(prompts) or any(len(row) != num_samples for row in out):
      raise ValueError(f"{self.name} returned {[len(r) for r in out]} samples for {len(prompts)} "
                       f"prompts x {num_samples}: a generator must return exactly that many")
    self.calls += 1
    self.prompts_seen += len(prompts)
    self.samples_drawn += len(prompts) * num_samples
    return out

  def __call__(self, prompts: Sequence[Prompt]) -> list[str]:
    """One response per prompt (the ``generate(prompts) -> list[str]`` of ``evol_instruct``)."""
    return [row[0] for row in self.sample(prompts, 1)]

  def stats(self) -> dict:
    return {"name": self.name, "calls": self.calls, "prompts": self.prompts_seen,
            "samples": self.samples_drawn}


class ScriptedGenerator(TextGenerator):
  """A deterministic stand-in: ``respond(prompt, sample_index) -> text`` (tests, the tiny chain's
  scripted explainer). ``prompt`` is what the caller passed (a str or a Conversation)."""

  def __init__(self, respond: Callable[[Prompt, int], str], name: str = "scripted"):
    super().__init__()
    self.respond, self.name = respond, name

  def _sample(self, prompts, num_samples):
    return [[self.respond(p, j) for j in range(num_samples)] for p in prompts]


class SamplerGenerator(TextGenerator):
  """A model behind the KV-cache sampler (``kat_jax.sample.Sampler``), see the module docstring.

  ``max_new_tokens`` bounds each response; a prompt must leave room for at least one generated
  token in the sampler's ``max_len`` cache slots: else a ValueError names it and the fix, or with
  ``overflow="empty"`` its responses are "" (counted in ``overflowed``; an evaluation scores them
  as failures instead of stopping)."""

  def __init__(self, sampler, tokenizer, *, temperature: float = 0.8, top_p: float = 1.0,
               top_k: int = 0, max_new_tokens: int = 256, batch_size: int = 16, seed: int = 0,
               prompt_format: str = "chat", stop_strings: Sequence[str] = (),
               overflow: str = "error", name: str = "sampler"):
    super().__init__()
    if prompt_format not in PROMPT_FORMATS:
      raise ValueError(f"prompt_format={prompt_format!r}: use one of {list(PROMPT_FORMATS)}")
    if overflow not in OVERFLOW_POLICIES:
      raise ValueError(f"overflow={overflow!r}: use one of {list(OVERFLOW_POLICIES)}")
    self.overflow, self.overflowed = overflow, 0
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    from kat_jax.sample import SamplingConfig
    self.sampler, self.tokenizer, self.name = sampler, tokenizer, name
    self.prompt_format, self.batch_size, self.seed = prompt_format, int(batch_size), int(seed)
    vocab = getattr(tokenizer, "vocab_size", 0) or 0
    limit = vocab if 0 < vocab < sampler.model.cfg.vocab_size else 0
    end_ids = tuple(tokenizer.token_id(s) for s in _END_STRINGS)
    self.config = SamplingConfig(temperature=float(temperature), top_p=float(top_p),
                                 top_k=int(top_k), max_new_tokens=int(max_new_tokens),
                                 stop_token_ids=end_ids, stop_strings=tuple(stop_strings),
                                 vocab_limit=limit)

  def encode(self, prompt: Prompt) -> list[int]:
    """The token ids the model is given for ``prompt``."""
    if self.prompt_format == "raw":
      if not isinstance(prompt, str):
        raise TypeError("prompt_format='raw' continues plain text: pass str prompts, not "
                        f"{type(prompt).__name__}")
      return list(self.tokenizer.encode(prompt))
    return chat.render_prompt(as_conversation(prompt), self.tokenizer).tokens.tolist()

  def _sample(self, prompts, num_samples):
    import jax
    from kat_jax.eval.sampling import sample_completions
    encoded = [self.encode(p) for p in prompts]
    fits = [1 <= len(ids) < self.sampler.max_len for ids in encoded]
    for i, ids in enumerate(encoded):
      if not fits[i] and self.overflow == "error":
        raise ValueError(f"prompt {i} of {self.name} has {len(ids)} tokens; the sampler holds "
                         f"{self.sampler.max_len}: raise max_len (or shorten the prompt)")
    self.overflowed += fits.count(False)
    kept = [ids for ids, ok in zip(encoded, fits) if ok]
    rng = jax.random.fold_in(jax.random.key(self.seed), self.calls)
    rows = iter(sample_completions(self.sampler, kept, num_samples, self.config, rng,
                                   self.batch_size, self.tokenizer) if kept else [])
    return [[cut_at_end(text) for text, _, _ in next(rows)] if ok else [""] * num_samples
            for ok in fits]

  def stats(self) -> dict:
    return {**super().stats(), "overflowed": self.overflowed}


def from_checkpoint(config, workdir: str, *, step: Optional[int] = None, max_len: int = 1024,
                    **options) -> SamplerGenerator:
  """A ``SamplerGenerator`` over the params of a training workdir (latest step by default) and
  the tokenizer saved beside them; ``options`` go to ``SamplerGenerator``."""
  from kat_jax import workdir as workdir_lib
  from kat_jax.data import tokenizer as tokenizer_lib
  from kat_jax.sample import Sampler
  from kat_jax.train import loop
  tokenizer = tokenizer_lib.load_tokenizer(workdir_lib.find_tokenizer_dir(workdir, config))
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f"the tokenizer of {workdir} has {tokenizer.vocab_size} tokens but "
                     f"config.model.vocab_size={config.model.vocab_size}: the config does not "
                     "match the checkpoint")
  state, model, _, restored = loop.load_state(config, workdir, step)
  options.setdefault("name", f"checkpoint:{workdir}@{restored}")
  return SamplerGenerator(Sampler(model, state.params, max_len=max_len), tokenizer, **options)


def from_hf(hf_dir: str, *, max_len: int = 2048, param_dtype: str = "float32",
            dtype: str = "float32", **options) -> SamplerGenerator:
  """A ``SamplerGenerator`` over a Hugging Face checkpoint directory (``config.json``,
  safetensors, ``tokenizer.json``), imported by ``kat_jax.model.hf.import_hf`` onto one device."""
  from kat_jax.data.hf_tokenizer import HFTokenizer
  from kat_jax.model import ModelConfig, Transformer, hf
  from kat_jax.sample import Sampler
  model_config, params = hf.import_hf(hf_dir, param_dtype=param_dtype, dtype=dtype)
  tokenizer = HFTokenizer.load(hf_dir)
  model = Transformer(ModelConfig.from_config(model_config))
  options.setdefault("name", f"hf:{hf_dir}")
  return SamplerGenerator(Sampler(model, params, max_len=max_len), tokenizer, **options)
