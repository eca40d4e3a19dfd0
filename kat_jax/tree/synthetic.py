"""Synthetic agentic trajectory trees (benchmarks and ablations; no model needed).

``agentic_trajectories(rng, target_tree_tokens)`` grows a tree shaped like agentic RL rollouts: one
long shared prompt, a first fan-out of rollouts, then multi-turn continuations — assistant text,
a tool call (tag 1), a tool result (tag 2), sometimes a memory event (tag 3) — where a rollout forks
with some probability inside an assistant turn (sampling diverges mid-text; tool results are
deterministic given the call); when every rollout has finished (``max_turns``), more rollouts of
the same prompt start. Growth stops once the tree holds ``target_tree_tokens`` unique tokens; every
leaf then becomes one trajectory. Random token ids from a large vocabulary keep
branches distinct.

``synthetic_entropies(rng, tree)`` draws per-token policy entropies with the usual shape: zero on
prompt and tool-result tokens (not sampled from the policy), a heavy tail on assistant text (a few
high-entropy "forking" tokens among many near-deterministic ones), low on tool calls.
"""
from __future__ import annotations

import numpy as np

from kat_jax.tree.build import TAG_MEMORY, TAG_PLAIN, TAG_TOOL_CALL, TAG_TOOL_RESULT, TrajectoryTree


def agentic_trajectories(
    rng: np.random.Generator,
    target_tree_tokens: int,
    *,
    prompt_tokens: int | None = None,
    first_fanout: int = 4,
    fork_prob: float = 0.35,
    max_turns: int = 12,
    text_tokens=(16, 256),
    call_tokens=(8, 48),
    result_tokens=(32, 320),
    memory_prob: float = 0.1,
    vocab: int = 32000,
):
  """Returns (trajectories, tags): lists of int32 arrays, one per leaf."""
  if prompt_tokens is None:
    prompt_tokens = int(np.clip(target_tree_tokens // 10, 64, 4096))

  def span(lo_hi, tag):
    n = int(rng.integers(lo_hi[0], lo_hi[1] + 1))
    return rng.integers(3, vocab, n, dtype=np.int32), np.full(n, tag, np.int32)

  # Segments form a tree: seg_parent[i] is the segment before segment i on its path.
  seg_tokens, seg_tags, seg_parent = [], [], []

  def add(tokens, tags, parent):
    seg_tokens.append(tokens)
    seg_tags.append(tags)
    seg_parent.append(parent)
    return len(seg_tokens) - 1

  total = 0
  prompt = add(*span((prompt_tokens, prompt_tokens), TAG_PLAIN), -1)
  total += prompt_tokens
  # leaf = [segment id, turns done]
  leaves = [[prompt, 0] for _ in range(first_fanout)]
  active = list(range(first_fanout))
  while total < target_tree_tokens:
    if not active:  # every rollout finished: sample more rollouts of the same prompt
      active = list(range(len(leaves), len(leaves) + first_fanout))
      leaves += [[prompt, 0] for _ in range(first_fanout)]
    i = active[int(rng.integers(len(active)))]
    at, turns = leaves[i]
    text, text_tags = span(text_tokens, TAG_PLAIN)
    forks = 1
    if rng.random() < fork_prob:
      forks = int(rng.integers(2, 4))
      cut = int(rng.integers(0, text.size))
      if cut:
        at = add(text[:cut], text_tags[:cut], at)
        total += cut
      text, text_tags = text[cut:], text_tags[cut:]
    heads = []
    for f in range(forks):
      if f:  # a sibling continues with its own text
        text, text_tags = span((1, max(1, text_tokens[1] // 2)), TAG_PLAIN)
      parts = [(text, text_tags)]
      done = turns + 1 >= max_turns
      if not done:
        parts.append(span(call_tokens, TAG_TOOL_CALL))
        parts.append(span(result_tokens, TAG_TOOL_RESULT))
        if rng.random() < memory_prob:
          parts.append(span((16, 64), TAG_MEMORY))
      toks = np.concatenate([p[0] for p in parts])
      tags = np.concatenate([p[1] for p in parts])
      heads.append((add(toks, tags, at), done))
      total += toks.size
    first = True
    for seg, done in heads:
      if first:
        leaves[i] = [seg, turns + 1]
        if done:
          active.remove(i)
        first = False
      else:
        leaves.append([seg, turns + 1])
        if not done:
          active.append(len(leaves) - 1)

  trajectories, tags = [], []
  for seg, _ in leaves:
    path = []
    while seg >= 0:
      path.append(seg)
      seg = seg_parent[seg]
    path.reverse()
    trajectories.append(np.concatenate([seg_tokens[s] for s in path]))
    tags.append(np.concatenate([seg_tags[s] for s in path]))
  return trajectories, tags


def synthetic_entropies(rng: np.random.Generator, tree: TrajectoryTree) -> np.ndarray:
  """float32 [N] per-token entropies (see module docstring); prompt = root nodes' first node."""
  n = tree.n_tree
  ent = rng.gamma(0.3, 0.5, n)                       # mostly near-deterministic text
  spikes = rng.random(n) < 0.05
  ent[spikes] = rng.uniform(1.0, 4.0, spikes.sum())  # forking tokens
  ent[tree.tags == TAG_TOOL_CALL] *= 0.3
  ent[(tree.tags == TAG_TOOL_RESULT) | (tree.tags == TAG_MEMORY)] = 0.0
  ent[tree.node_parent[tree.token_node] < 0] = 0.0   # the shared prompt
  return ent.astype(np.float32)
