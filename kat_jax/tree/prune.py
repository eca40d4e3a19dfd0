"""Entropy-budget pruning of trajectory trees: which tree tokens get a loss under a token budget.

Even with prefix sharing, a loss on every token of every tree costs too much. Pruning keeps the parts
of each tree that carry the most training signal within ``budget`` tokens and returns a per-token
keep mask over the serialized tree. Pruned tokens contribute no loss; kept tokens still attend to
their full context, and because the kept set is closed under ancestors, the kept tokens' context is
kept too (the tree could be compacted to the kept tokens). The public description (KAT-Coder) gives
only the ingredients; the rule below is ours — docs/PRUNING.md explains the choices and measurements.

Nodes are the compressed trie nodes of ``kat_jax.tree.build`` (split at tag changes, so a tool call,
a tool result, a memory event is a node of its own). Per tree:

1. **Events and windows.** An *event node* holds a token tagged in ``event_tags`` (tool_call,
   tool_result, memory). Its *window* is local context after it: ``event_window_unit='tokens'``: the
   first ``event_window`` tokens after the event node's end on every branch below it (positions
   ``[end, end + w)`` of its subtree); ``'nodes'``: every descendant node at most ``w`` node-levels
   below. Context before an event is its root path (kept by the ancestor closure). Each node gets an
   *event prefix*: all of an event node, the window-covered prefix of other nodes (a prefix, since a
   node is a chain). ``event_mode`` says what that prefix means:

   * ``'attached'`` (default): events are atomic with the turn that caused them. The event prefix of
     a node is *attached* to its nearest strict ancestor node that is not wholly attached (its
     *head*: the assistant text that emitted the tool call), forming a *unit* = the head's own tokens
     + everything attached to it. A unit is kept whole or not at all (except the last one, below),
     so a kept tool call always comes with its result and the model's first reaction, and no event
     is cut. Event prefixes with no head (events at a root) are mandatory.
   * ``'mandatory'``: every event prefix and its ancestor closure is always kept (the literal reading
     of the public description). In agentic trees events lie on almost every path, so the closure
     is nearly the whole tree (measured in docs/PRUNING.md) — kept as an option, not the default.

   The *mandatory* part (``'mandatory'`` mode; headless events in ``'attached'`` mode) is always
   kept; if it alone exceeds the budget exactly it is kept and ``mandatory_exceeds_budget`` is set.
2. **Score** of a unit (in ``'mandatory'`` mode every node is its own unit):
   ``score = log(agg_entropy) + log(reach)`` (log of a product, so path probabilities cannot
   underflow). ``agg_entropy``: sum or mean (``entropy_agg``) of per-token policy entropies over the
   unit's tokens (``entropy_scope='node'``) or over all tokens of the node's subtree (``'subtree'``).
   ``entropies[t]`` is the entropy of the distribution token t was sampled from (computed at its
   parent's row; 0 for tokens not sampled from the policy). ``reach``: ``'fraction'`` of the
   trajectories through the node, ``'branch'`` the product of empirical branch frequencies along its
   path (child count over the count of all its siblings; equal to the fraction unless trajectories
   end at inner nodes), ``'policy'`` exp of the summed log-probs of the path through the node's own
   tokens, or ``'uniform'``. Default: mean over the *subtree* × fraction — the expected entropy per
   token, in the flat (per-trajectory) loss, of what lies behind the node (a value density for a
   token-budget knapsack that looks past zero-entropy context such as the prompt; with
   ``'node'`` a zero-entropy prompt would have the lowest score and, as every path's bottleneck,
   reduce the order to plain DFS order — measured in docs/PRUNING.md).
3. **Best-first expansion.** A unit can only be kept after the unit above it, so its effective
   priority is its *bottleneck* ``min(score over the units on its root path)``. Expansion pops units
   from the frontier in decreasing bottleneck order, ties by node index (pre-order, so a parent
   precedes its children); each costs its not-yet-kept tokens. Expansion *stops* at the first unit
   that does not fit the remaining budget; with ``truncate_last_node`` that unit keeps the prefix of
   its own node's tokens that fits (a prefix of a chain keeps the closure; its attached events are
   not cut into, so they are dropped), and nothing after it is taken.

Vectorized: bottleneck = path-min by pointer jumping (log-depth rounds of gathers); expansion order =
stable argsort of ``-bottleneck`` (a unit sorts after the units above it: its key is not smaller and
its index is larger); the budget cut = cumulative token sum over that order. No Python loop over
nodes; O(T + M log M) per tree, vmapped over the batch. ``kat_jax.tree.reference`` implements the
same rule with explicit child lists and a heap, for the tests.

Usage::

  config = default_prune_config(); config.enabled = True
  keep_bt, metrics = prune_tree_batch(batch, entropies_bt, config)   # jittable
  loss_weight = keep_bt[b, batch.pred_label_rows]                    # gate prediction pairs
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from kat_jax.tree.build import EVENT_TAGS

SCORES = ("entropy", "random", "longest_path")
ENTROPY_AGGS = ("mean", "sum")
ENTROPY_SCOPES = ("node", "subtree")
REACHES = ("fraction", "branch", "policy", "uniform")
WINDOW_UNITS = ("tokens", "nodes")
EVENT_MODES = ("attached", "mandatory")
_NO_EVENT = -(2 ** 30)


def default_prune_config() -> ml_collections.ConfigDict:
  """The ``prune`` block of a train config (see the module docstring for each field)."""
  c = ml_collections.ConfigDict()
  c.enabled = False
  c.budget_tokens = -1          # >= 0: tokens kept per tree; -1: use budget_fraction
  c.budget_fraction = 0.5       # of each tree's tokens, floor(fraction * N_tree)
  c.score = "entropy"           # entropy | random | longest_path (the last two are baselines)
  c.entropy_agg = "mean"        # mean | sum
  c.entropy_scope = "subtree"   # node (the unit's tokens) | subtree (all tokens below the node)
  c.reach = "fraction"          # fraction | branch | policy | uniform
  c.event_tags = EVENT_TAGS     # tags that make a node an event
  c.event_mode = "attached"     # attached (events atomic with their turn) | mandatory (always kept)
  c.event_window = 16
  c.event_window_unit = "tokens"  # tokens | nodes
  c.truncate_last_node = True   # the first unit that does not fit keeps the prefix that fits
  c.seed = 0                    # for score='random' when no rng is passed
  return c


class PruneSettings(NamedTuple):
  """Validated, hashable form of the ``prune`` config (static under jit)."""
  enabled: bool
  budget_tokens: int
  budget_fraction: float
  score: str
  entropy_agg: str
  entropy_scope: str
  reach: str
  event_tags: tuple
  event_mode: str
  event_window: int
  event_window_unit: str
  truncate_last_node: bool
  seed: int


def _choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"prune.{name} = {value!r} is not one of {allowed}")
  return value


def settings_from_config(config: Any) -> PruneSettings:
  """Validates a ``prune`` ConfigDict (or mapping / PruneSettings); errors name field and fix."""
  if isinstance(config, PruneSettings):
    return config
  if not hasattr(config, "get"):
    raise TypeError(f"prune config must be a ConfigDict or a mapping, got {type(config).__name__}")
  d = default_prune_config()
  unknown = sorted(set(config.keys()) - set(d.keys()))
  if unknown:
    raise ValueError(f"unknown prune config fields {unknown}; known: {sorted(d.keys())}")
  merged = {key: config.get(key, d[key]) for key in d.keys()}
  budget_tokens = int(merged["budget_tokens"])
  fraction = float(merged["budget_fraction"])
  if budget_tokens < -1:
    raise ValueError(f"prune.budget_tokens = {budget_tokens}: use >= 0, or -1 for budget_fraction")
  if budget_tokens == -1 and not 0.0 <= fraction <= 1.0:
    raise ValueError(f"prune.budget_fraction = {fraction} must lie in [0, 1]")
  window = int(merged["event_window"])
  if window < 0:
    raise ValueError(f"prune.event_window = {window} must be >= 0")
  return PruneSettings(
      enabled=bool(merged["enabled"]),
      budget_tokens=budget_tokens,
      budget_fraction=fraction,
      score=_choice("score", merged["score"], SCORES),
      entropy_agg=_choice("entropy_agg", merged["entropy_agg"], ENTROPY_AGGS),
      entropy_scope=_choice("entropy_scope", merged["entropy_scope"], ENTROPY_SCOPES),
      reach=_choice("reach", merged["reach"], REACHES),
      event_tags=tuple(int(t) for t in merged["event_tags"]),
      event_mode=_choice("event_mode", merged["event_mode"], EVENT_MODES),
      event_window=window,
      event_window_unit=_choice("event_window_unit", merged["event_window_unit"], WINDOW_UNITS),
      truncate_last_node=bool(merged["truncate_last_node"]),
      seed=int(merged["seed"]),
  )


class PruneResult(NamedTuple):
  keep_mask: jax.Array         # bool [B, T]: token gets a loss
  node_kept_tokens: jax.Array  # int32 [B, M]: kept prefix length of each node (size = whole node)
  node_scores: jax.Array       # float32 [B, M]: the scores the expansion used
  metrics: dict                # name -> [B]


# ---------------------------------------------------------------------------------------------
# Per-tree building blocks (vmapped below). A tree is a dict of the TreeBatch arrays of one row.

_TREE_KEYS = ("positions", "token_node", "token_traj_count", "token_valid", "node_start",
              "node_size", "node_parent", "node_depth", "node_subtree_end", "node_traj_count",
              "node_tag_bits", "row_map", "lengths", "traj_valid")


def _tree_arrays(batch) -> dict:
  get = batch.get if isinstance(batch, Mapping) else lambda k: getattr(batch, k)
  return {k: jnp.asarray(get(k)) for k in _TREE_KEYS}


def path_reduce(values_m, parent_m, op):
  """Inclusive reduction of ``values`` over each node's root path (ancestor-or-self).

  Pointer jumping: after round r each node holds the reduction over its 2^r nearest path nodes;
  a while loop stops when every pointer has left the root. ``op`` must be associative
  (min, max, add).
  """
  def cond(carry):
    return jnp.any(carry[1] >= 0)

  def body(carry):
    val, anc = carry
    has = anc >= 0
    a = jnp.where(has, anc, 0)
    return jnp.where(has, op(val, val[a]), val), jnp.where(has, anc[a], -1)

  val, _ = jax.lax.while_loop(cond, body, (values_m, parent_m))
  return val


def _subtree_sum(x_m, subtree_end_m, first_m):
  """Sum of x over the pre-order node range [first, subtree_end) of each node.

  Integers: prefix-sum differences (exact). Floats: a segment-tree decomposition of each range into
  O(log M) aligned blocks whose sums are added — no cancellation between large prefix sums, so a
  small subtree behind a large one keeps its relative precision.
  """
  if jnp.issubdtype(x_m.dtype, jnp.integer):
    c = jnp.concatenate([jnp.zeros((1,), x_m.dtype), jnp.cumsum(x_m)])
    return c[subtree_end_m] - c[first_m]
  m = x_m.shape[0]
  size = 1 << max(0, (m - 1).bit_length())
  level = jnp.zeros((size,), x_m.dtype).at[:m].set(x_m)
  total = jnp.zeros(first_m.shape, x_m.dtype)
  lo, hi = first_m, subtree_end_m
  while True:
    n = level.shape[0]
    take_lo = (lo < hi) & (lo % 2 == 1)
    total = total + jnp.where(take_lo, level[jnp.clip(lo, 0, n - 1)], 0)
    lo = lo + take_lo
    take_hi = (lo < hi) & (hi % 2 == 1)
    hi = hi - take_hi
    total = total + jnp.where(take_hi, level[jnp.clip(hi, 0, n - 1)], 0)
    if n == 1:
      return total
    level = level.reshape(-1, 2).sum(axis=1)
    lo, hi = lo // 2, hi // 2


def _subtree_max(x_m, subtree_end_m):
  """Max of x over [n, subtree_end[n]) via a sparse table (log M levels)."""
  m = x_m.shape[0]
  levels = [x_m]
  span = 1
  while 2 * span <= m:
    prev = levels[-1]
    shifted = jnp.concatenate([prev[span:], jnp.full((span,), prev.min(), prev.dtype)])
    levels.append(jnp.maximum(prev, shifted))
    span *= 2
  table = jnp.stack(levels)
  lo = jnp.arange(m)
  length = jnp.maximum(subtree_end_m - lo, 1)
  k = 31 - jax.lax.clz(length.astype(jnp.int32))
  return jnp.maximum(table[k, lo], table[k, subtree_end_m - (1 << k)])


class _Structure(NamedTuple):
  """Units and mandatory prefixes of one tree (node-level [M]; see the module docstring)."""
  mandatory: jax.Array    # always-kept prefix of each node
  attached: jax.Array     # prefix attached to the node's head (0 if none)
  head: jax.Array         # head node of the attached prefix (-1 if none)
  is_unit: jax.Array      # the node owns tokens of its own (a unit of the expansion)


def _event_prefix_one(tree, s: PruneSettings):
  """[M] event prefix of each node: whole event nodes, window-covered prefixes of the others."""
  size = tree["node_size"]
  parent = tree["node_parent"]
  event_bits = sum(1 << tag for tag in set(s.event_tags))
  is_event = (tree["node_tag_bits"] & event_bits) != 0
  w = s.event_window
  if s.event_window_unit == "tokens":
    pos0 = tree["positions"][tree["node_start"]]
    window_end = jnp.where(is_event, pos0 + size + w, _NO_EVENT)
    window_end = path_reduce(window_end, parent, jnp.maximum)
    from_above = jnp.where(parent >= 0, window_end[jnp.maximum(parent, 0)], _NO_EVENT)
    prefix = jnp.where(is_event, size, jnp.clip(from_above - pos0, 0, size))
  else:
    event_depth = jnp.where(is_event, tree["node_depth"], _NO_EVENT)
    nearest = path_reduce(event_depth, parent, jnp.maximum)
    prefix = jnp.where((nearest >= 0) & (tree["node_depth"] - nearest <= w), size, 0)
  return jnp.where(size > 0, prefix, 0).astype(jnp.int32)


def _structure_one(tree, s: PruneSettings) -> _Structure:
  size = tree["node_size"]
  parent = tree["node_parent"]
  m = size.shape[0]
  prefix = _event_prefix_one(tree, s)
  idx = jnp.arange(m, dtype=jnp.int32)
  zeros = jnp.zeros((m,), jnp.int32)
  if s.event_mode == "mandatory":
    below = _subtree_sum((prefix > 0).astype(jnp.int32), tree["node_subtree_end"], idx + 1)
    mandatory = jnp.where(below > 0, size, prefix).astype(jnp.int32)
    attached, head = zeros, zeros - 1
  else:
    # Head = nearest strict ancestor that keeps tokens of its own (pre-order: the deepest such
    # ancestor has the largest index, so a path max finds it).
    owns = (size > prefix) & (size > 0)
    nearest = path_reduce(jnp.where(owns, idx, -1), parent, jnp.maximum)
    head = jnp.where(parent >= 0, nearest[jnp.maximum(parent, 0)], -1)
    head = jnp.where(prefix > 0, head, -1)
    attached = jnp.where(head >= 0, prefix, 0)
    mandatory = jnp.where(head < 0, prefix, 0)  # events with no head: always kept
  is_unit = (size > attached) & (size > 0)
  return _Structure(mandatory=mandatory, attached=attached, head=head, is_unit=is_unit)


def _token_units(tree, st: _Structure):
  """[T] unit of each token (its head for an attached prefix, else its node; M for padding)."""
  m = tree["node_size"].shape[0]
  node_t = jnp.minimum(tree["token_node"], m - 1)
  offset_t = jnp.arange(node_t.shape[0]) - tree["node_start"][node_t]
  unit_t = jnp.where(offset_t < st.attached[node_t], st.head[node_t], node_t)
  return jnp.where(tree["token_valid"], unit_t, m)


def _segment_sums(ids_bt, x_bt, m, *, sorted_ids):
  """[B, M] sums of x over token ids (id M = padding, dropped), as ONE flat segment sum over the
  batch: a batched (vmapped) scatter is several times slower on CPU."""
  b = ids_bt.shape[0]
  flat_ids = (ids_bt + (m + 1) * jnp.arange(b, dtype=ids_bt.dtype)[:, None]).reshape(-1)
  sums = jax.ops.segment_sum(x_bt.reshape(-1), flat_ids, b * (m + 1),
                             indices_are_sorted=sorted_ids)
  return sums.reshape(b, m + 1)[:, :m]


def _entropy_scores_one(tree, ent_m, count_m, lp_node_m, s: PruneSettings):
  """Scores from per-node (scope 'subtree') or per-unit (scope 'node') entropy sums and counts."""
  node_valid = tree["node_size"] > 0
  m = tree["node_size"].shape[0]
  if s.entropy_scope == "subtree":
    idx = jnp.arange(m)
    ent = _subtree_sum(ent_m, tree["node_subtree_end"], idx)
    count = _subtree_sum(count_m, tree["node_subtree_end"], idx)
  else:
    ent, count = ent_m, count_m
  agg = ent / jnp.maximum(count, 1.0) if s.entropy_agg == "mean" else ent
  score = jnp.log(jnp.maximum(agg, 0.0))
  traj_count = tree["node_traj_count"].astype(jnp.float32)
  if s.reach == "fraction":
    num_traj = jnp.sum(tree["traj_valid"]).astype(jnp.float32)
    score = score + (jnp.log(traj_count) - jnp.log(num_traj))
  elif s.reach == "branch":
    parent = tree["node_parent"]
    siblings = jax.ops.segment_sum(traj_count, parent + 1, m + 1)[parent + 1]
    log_ratio = jnp.where(node_valid, jnp.log(traj_count) - jnp.log(siblings), 0.0)
    score = score + path_reduce(log_ratio, parent, jnp.add)
  elif s.reach == "policy":
    score = score + path_reduce(lp_node_m, tree["node_parent"], jnp.add)
  return jnp.where(node_valid, score, -jnp.inf)


def _longest_path_scores_one(tree):
  node_valid = tree["node_size"] > 0
  end_pos = tree["positions"][tree["node_start"]] + tree["node_size"]
  longest = _subtree_max(jnp.where(node_valid, end_pos, 0), tree["node_subtree_end"])
  return jnp.where(node_valid, jnp.log(longest.astype(jnp.float32)), -jnp.inf)


def _select_one(tree, st: _Structure, scores_m, budget, truncate: bool):
  """Best-first expansion of units by bottleneck score under a token budget -> kept prefix/node."""
  size = tree["node_size"]
  m = size.shape[0]
  unit_score = jnp.where(st.is_unit, scores_m.astype(jnp.float32), jnp.inf)  # others: transparent
  bottleneck = path_reduce(unit_score, tree["node_parent"], jnp.minimum)
  key = -bottleneck
  key = jnp.where(key == 0, 0.0, key)  # one zero: -0.0 and 0.0 compare equal in the reference
  key = jnp.where(st.is_unit, key, jnp.inf)  # non-units last (they cost nothing)
  order = jnp.argsort(key, stable=True)
  # New tokens of a unit: its node past what is mandatory, plus the prefixes attached to it (in
  # 'attached' mode a node's mandatory and attached prefixes are exclusive; in 'mandatory' mode
  # nothing is attached).
  own_cost = size - jnp.maximum(st.mandatory, st.attached)
  attached_cost = jax.ops.segment_sum(jnp.maximum(st.attached - st.mandatory, 0),
                                      jnp.where(st.head >= 0, st.head, m), m)
  cost = jnp.where(st.is_unit, own_cost + attached_cost, 0)[order]
  cum_prev = jnp.cumsum(cost) - cost
  remaining = jnp.maximum(budget - jnp.sum(st.mandatory), 0)
  if truncate:
    full_sorted = remaining - cum_prev >= cost
    extra_sorted = jnp.clip(remaining - cum_prev, 0, cost)
  else:
    full_sorted = cum_prev + cost <= remaining
    extra_sorted = jnp.where(full_sorted, cost, 0)
  full = jnp.zeros((m,), bool).at[order].set(full_sorted)
  extra = jnp.zeros((m,), jnp.int32).at[order].set(extra_sorted.astype(jnp.int32))
  # The last (partial) unit keeps a prefix of its own node past what is already kept.
  base = jnp.maximum(st.mandatory, st.attached)
  own = jnp.where(full, size, jnp.where(extra > 0, base + jnp.minimum(extra, size - base), 0))
  own = jnp.where(st.is_unit, own, 0)
  head_full = (st.head >= 0) & full[jnp.maximum(st.head, 0)]
  kept = jnp.maximum(jnp.maximum(st.mandatory, jnp.where(head_full, st.attached, 0)), own)
  return jnp.where(size > 0, kept, 0).astype(jnp.int32)


def tree_budgets(batch, config) -> jax.Array:
  """int32 [B] token budget per tree: ``budget_tokens``, or floor(budget_fraction * N_tree)."""
  s = settings_from_config(config)
  valid = _tree_arrays(batch)["token_valid"]
  if s.budget_tokens >= 0:
    return jnp.full(valid.shape[:1], s.budget_tokens, jnp.int32)
  n = jnp.sum(valid, axis=1).astype(jnp.float32)
  return jnp.floor(jnp.float32(s.budget_fraction) * n).astype(jnp.int32)


def _static(s: PruneSettings) -> PruneSettings:
  """The settings the compiled code depends on (budgets and seed are traced / used outside)."""
  return s._replace(budget_tokens=0, budget_fraction=0.0, seed=0)


def _prune_one(tree, scores_m, entropies_t, budget, s: PruneSettings):
  st = _structure_one(tree, s)
  kept = _select_one(tree, st, scores_m, budget, s.truncate_last_node)
  kept_end = jnp.append(tree["node_start"] + kept, 0)  # padding tokens (node M): nothing
  keep = jnp.arange(tree["token_node"].shape[0]) < kept_end[tree["token_node"]]
  mandatory = st.mandatory

  weight = jnp.where(tree["token_valid"], entropies_t * tree["token_traj_count"], 0.0)
  total = jnp.sum(weight)
  kept_weight = jnp.sum(jnp.where(keep, weight, 0.0))
  last_rows = jnp.take_along_axis(tree["row_map"], jnp.maximum(tree["lengths"] - 1, 0)[:, None],
                                  axis=1)[:, 0]
  mandatory_tokens = jnp.sum(mandatory)
  kept_tokens = jnp.sum(keep.astype(jnp.int32))
  tree_tokens = jnp.sum(tree["token_valid"].astype(jnp.int32))
  metrics = {
      "kept_tokens": kept_tokens,
      "tree_tokens": tree_tokens,
      "kept_fraction": kept_tokens / jnp.maximum(tree_tokens, 1),
      "budget": budget,
      "mandatory_tokens": mandatory_tokens,
      "mandatory_exceeds_budget": mandatory_tokens > budget,
      "kept_entropy_fraction": jnp.where(total > 0, kept_weight / jnp.where(total > 0, total, 1.0),
                                         1.0),
      "kept_trajectories": jnp.sum(tree["traj_valid"] & keep[last_rows]),
      "kept_nodes": jnp.sum((kept == tree["node_size"]) & (tree["node_size"] > 0)),
  }
  return keep, kept, metrics


# ---------------------------------------------------------------------------------------------
# Batched public API.

def _zeros_like_tokens(tree):
  return jnp.zeros(tree["token_valid"].shape, jnp.float32)


def entropy_node_scores(batch, entropies_bt, config, logprobs_bt=None) -> jax.Array:
  """[B, M] entropy × reach scores (log domain) of the configured variant."""
  s = settings_from_config(config)
  tree = _tree_arrays(batch)
  if logprobs_bt is None:
    if s.reach == "policy":
      raise ValueError("prune.reach = 'policy' needs logprobs_bt (log-prob of each tree token)")
    logprobs_bt = _zeros_like_tokens(tree)
  return _entropy_scores_jit(tree, jnp.asarray(entropies_bt, jnp.float32),
                             jnp.asarray(logprobs_bt, jnp.float32), _static(s))


@jax.jit
def _longest_path_scores_jit(tree):
  return jax.vmap(_longest_path_scores_one)(tree)


def longest_path_node_scores(batch) -> jax.Array:
  """[B, M] log of the longest root-to-leaf path (tokens) through each node."""
  return _longest_path_scores_jit(_tree_arrays(batch))


def random_node_scores(batch, rng) -> jax.Array:
  """[B, M] i.i.d. uniform scores (the random baseline)."""
  shape = jnp.shape(_tree_arrays(batch)["node_size"])
  return jax.random.uniform(rng, shape)


@functools.partial(jax.jit, static_argnums=1)
def _structure_jit(tree, s):
  return jax.vmap(lambda t: _structure_one(t, s))(tree)


def unit_structure(batch, config) -> dict:
  """Per node [B, M]: ``mandatory``, ``attached`` (prefix lengths), ``head``, ``is_unit``."""
  st = _structure_jit(_tree_arrays(batch), _static(settings_from_config(config)))
  return {"mandatory": st.mandatory, "attached": st.attached, "head": st.head,
          "is_unit": st.is_unit}


def _entropy_scores_impl(tree, entropies_bt, logprobs_bt, s):
  m = tree["node_size"].shape[1]
  valid = tree["token_valid"]
  ent = jnp.where(valid, entropies_bt, 0.0).astype(jnp.float32)
  if s.entropy_scope == "subtree":
    ent_m = _segment_sums(tree["token_node"], ent, m, sorted_ids=True)
    count_m = tree["node_size"].astype(jnp.float32)
  else:
    st = jax.vmap(lambda t: _structure_one(t, s))(tree)
    unit_t = jax.vmap(_token_units)(tree, st)
    ent_m = _segment_sums(unit_t, ent, m, sorted_ids=False)
    count_m = _segment_sums(unit_t, valid.astype(jnp.float32), m, sorted_ids=False)
  if s.reach == "policy":
    lp = jnp.where(valid, logprobs_bt, 0.0).astype(jnp.float32)
    lp_m = _segment_sums(tree["token_node"], lp, m, sorted_ids=True)
  else:
    lp_m = jnp.zeros_like(ent_m)
  return jax.vmap(lambda t, e, c, lp: _entropy_scores_one(t, e, c, lp, s))(tree, ent_m, count_m,
                                                                          lp_m)


def _prune_impl(tree, scores_bm, entropies_bt, budget_b, s):
  fn = lambda t, sc, e, bu: _prune_one(t, sc, e, bu, s)
  keep, kept, metrics = jax.vmap(fn)(tree, scores_bm, entropies_bt, budget_b)
  return PruneResult(keep_mask=keep, node_kept_tokens=kept, node_scores=scores_bm, metrics=metrics)


def _entropy_prune_impl(tree, entropies_bt, logprobs_bt, budget_b, s):
  scores = _entropy_scores_impl(tree, entropies_bt, logprobs_bt, s)
  return _prune_impl(tree, scores, entropies_bt, budget_b, s)


_entropy_scores_jit = jax.jit(_entropy_scores_impl, static_argnums=3)
_prune_jit = jax.jit(_prune_impl, static_argnums=4)
_entropy_prune_jit = jax.jit(_entropy_prune_impl, static_argnums=4)


def prune_with_scores(batch, node_scores_bm, config, entropies_bt=None) -> PruneResult:
  """Expansion with caller-given node scores (baselines, tests); entropies only feed the metrics."""
  s = settings_from_config(config)
  tree = _tree_arrays(batch)
  ent = _zeros_like_tokens(tree) if entropies_bt is None else jnp.asarray(entropies_bt, jnp.float32)
  return _prune_jit(tree, jnp.asarray(node_scores_bm, jnp.float32), ent, tree_budgets(batch, s),
                    _static(s))


def prune_random(batch, config, rng=None, entropies_bt=None) -> PruneResult:
  """Random baseline: i.i.d. node scores, same mandatory part, closure and budget."""
  s = settings_from_config(config)
  rng = jax.random.PRNGKey(s.seed) if rng is None else rng
  return prune_with_scores(batch, random_node_scores(batch, rng), s, entropies_bt)


def prune_longest_path(batch, config, entropies_bt=None) -> PruneResult:
  """Keep-longest-path baseline: nodes on the longest root-to-leaf paths first."""
  return prune_with_scores(batch, longest_path_node_scores(batch), config, entropies_bt)


def prune_nodes(batch, entropies_bt, config, logprobs_bt=None, rng=None) -> PruneResult:
  """The configured pruning rule (``config.score``) on a batch; jittable (config is static)."""
  s = settings_from_config(config)
  if s.score == "random":
    return prune_random(batch, s, rng, entropies_bt)
  if s.score == "longest_path":
    return prune_longest_path(batch, s, entropies_bt)
  tree = _tree_arrays(batch)
  if logprobs_bt is None:
    if s.reach == "policy":
      raise ValueError("prune.reach = 'policy' needs logprobs_bt (log-prob of each tree token)")
    logprobs_bt = _zeros_like_tokens(tree)
  return _entropy_prune_jit(tree, jnp.asarray(entropies_bt, jnp.float32),
                            jnp.asarray(logprobs_bt, jnp.float32), tree_budgets(batch, s),
                            _static(s))


def prune_tree_batch(batch, entropies_bt, config, logprobs_bt=None, rng=None):
  """Train-step hook: ``(keep_mask [B, T] bool, metrics {name: [B]})``.

  With ``config.enabled`` false every valid token is kept and the metrics say so.
  """
  s = settings_from_config(config)
  if not s.enabled:
    valid = jnp.asarray(_tree_arrays(batch)["token_valid"])
    n = jnp.sum(valid, axis=1).astype(jnp.int32)
    metrics = {"kept_tokens": n, "tree_tokens": n, "kept_fraction": jnp.ones(n.shape),
               "budget": n, "mandatory_tokens": jnp.zeros_like(n),
               "mandatory_exceeds_budget": jnp.zeros(n.shape, bool),
               "kept_entropy_fraction": jnp.ones(n.shape),
               "kept_trajectories": jnp.sum(_tree_arrays(batch)["traj_valid"], axis=1),
               "kept_nodes": jnp.sum(_tree_arrays(batch)["node_size"] > 0, axis=1)}
    return valid, metrics
  result = prune_nodes(batch, entropies_bt, s, logprobs_bt, rng)
  return result.keep_mask, result.metrics
