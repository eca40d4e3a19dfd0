"""Many samples per prompt with the KV-cache sampler, batched independently of the batch size::

    samples = sample_completions(sampler, prompts, num_samples=8, config=SamplingConfig(...),
                                 rng=jax.random.key(0), batch_size=16, tokenizer=tok)
    text, finish_reason, num_tokens = samples[prompt_index][sample_index]
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def sample_completions(sampler, prompts: Sequence[Sequence[int]], num_samples: int, config, rng,
                       batch_size: int, tokenizer) -> list[list[tuple[str, str, int]]]:
  """``num_samples`` completions per prompt: [prompt][sample] -> (text, finish_reason, tokens).

  Row j of the flattened (prompt, sample) list draws with ``fold_in(rng, j)``, so results do not
  depend on ``batch_size``. Rows are batched longest-prompt-first to waste little padding.
  """
  rows = [(p, s) for p in range(len(prompts)) for s in range(num_samples)]
  order = sorted(range(len(rows)), key=lambda j: -len(prompts[rows[j][0]]))
  out: list[list] = [[None] * num_samples for _ in prompts]
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.asarray(chunk))
    result = sampler.generate([prompts[rows[j][0]] for j in chunk], keys, config, tokenizer)
    for i, j in enumerate(chunk):
      p, s = rows[j]
      out[p][s] = (result.texts[i], result.finish_reason[i], int(result.lengths[i]))
  return out
