"""Event tags of sampled tokens, and multi-level trees grown from prompts with the KV-cache sampler.

``event_tags`` tags sampled tokens as ``chat.render`` tags rendered ones (tool calls, tool results,
memory), so pruning keeps event regions of sampled text too. ``sample_trees`` grows one tree per
prompt: ``branches[0]`` continuations of ``turn_tokens[0]`` tokens from the prompt, then
``branches[1]`` from each of those, ... at temperature 1 without stop tokens, and builds each into
a ``TrajectoryTree`` with per-trajectory fields ``weight`` (0 on the prompt, 1 on sampled tokens)
and ``entropy`` (the sampler's entropy of each sampled token's distribution)::

    trees = sample_trees(sampler, prompts, prompt_tags, rng, branches=(4, 4), turn_tokens=(24, 24),
                         span_ids=event_span_ids(tokenizer))
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from kat_jax.data import special_tokens
from kat_jax.tree import build

_SPANS = ((special_tokens.TOOL_CALL_OPEN, special_tokens.TOOL_CALL_CLOSE, build.TAG_TOOL_CALL),
          (special_tokens.TOOL_RESPONSE_OPEN, special_tokens.TOOL_RESPONSE_CLOSE,
           build.TAG_TOOL_RESULT),
          (special_tokens.MEMORY_OPEN, special_tokens.MEMORY_CLOSE, build.TAG_MEMORY))


def event_span_ids(tokenizer) -> dict:
  """{open id: (close id, tag)} of the event spans, for the tokenizer's special tokens."""
  return {tokenizer.token_id(o): (tokenizer.token_id(c), tag) for o, c, tag in _SPANS}


def event_tags(tokens: Sequence[int], span_ids: dict) -> np.ndarray:
  """int32 tags of sampled tokens: an open id, everything up to its close id and the close id get
  the span's tag (an unclosed span runs to the end); causal, so a shared prefix gets equal tags."""
  tags = np.zeros(len(tokens), np.int32)
  close, tag = None, 0
  for i, t in enumerate(tokens):
    if close is None and t in span_ids:
      close, tag = span_ids[t]
    if close is not None:
      tags[i] = tag
      if t == close:
        close, tag = None, 0
  return tags


def sample_trees(sampler, prompts: Sequence[Sequence[int]], prompt_tags: Sequence[np.ndarray],
                 rng: jax.Array, *, branches: Sequence[int], turn_tokens: Sequence[int],
                 span_ids: dict, vocab_limit: int = 0) -> list:
  """One multi-level sampled tree per prompt (see the module docstring), as TrajectoryTrees with
  fields ``weight`` and ``entropy``."""
  from kat_jax.sample import SamplingConfig
  if len(branches) != len(turn_tokens):
    raise ValueError(f"branches={list(branches)} and turn_tokens={list(turn_tokens)} must have one "
                     "entry per level")
  # Per prompt: partial trajectories (tokens, entropies of the sampled part).
  frontier = [[(list(map(int, p)), np.zeros(0, np.float32))] for p in prompts]
  for level, (b, n) in enumerate(zip(branches, turn_tokens)):
    rows = [(i, tok, ent) for i, parts in enumerate(frontier) for tok, ent in parts
            for _ in range(b)]
    out = sampler.generate([tok for _, tok, _ in rows], jax.random.fold_in(rng, level),
                           SamplingConfig(temperature=1.0, max_new_tokens=n,
                                          vocab_limit=vocab_limit))
    frontier = [[] for _ in prompts]
    for r, (i, tok, ent) in enumerate(rows):
      k = int(out.lengths[r])
      frontier[i].append((tok + out.tokens[r, :k].tolist(),
                          np.concatenate([ent, out.entropies[r, :k].astype(np.float32)])))
  trees = []
  for prompt, ptags, parts in zip(prompts, prompt_tags, frontier):
    p = len(prompt)
    trajs = [tok for tok, _ in parts]
    tags = [np.concatenate([np.asarray(ptags, np.int32), event_tags(tok[p:], span_ids)])
            for tok in trajs]
    weight = [np.concatenate([np.zeros(p, np.float32), np.ones(len(tok) - p, np.float32)])
              for tok in trajs]
    entropy = [np.concatenate([np.zeros(p, np.float32), ent]) for _, ent in parts]
    trees.append(build.build_tree(trajs, tags=tags, fields={"weight": weight, "entropy": entropy}))
  return trees
