"""Compaction of pruned trajectory trees on the host: training pays only for the kept tokens.

Entropy-budget pruning (``kat_jax.tree.prune``) keeps a set of tree tokens closed under ancestors.
Inside the train step (``config.train.prune``) that mask only gates the loss; the pruned tokens'
forward and backward are still computed. Here the pruned subtrees are removed before batching, so
a batch of compacted trees needs fewer tree tokens (a smaller static ``max_tokens``)::

  keeps, metrics = prune_keep_masks(trees, config.train.prune)   # host entry point (jitted rule)
  trees = [compact_tree(t, k).tree for t, k in zip(trees, keeps)]
  batch = batch_to_arrays(batch_trees(trees, max_tokens=T_small, ...))
  # or on a tree batch dict, whose batch-level fields (advantages, old log-probs) come along:
  keep_bt, metrics = batch_keep_masks(batch, config.train.prune)
  batch = compact_batch(batch, keep_bt, max_tokens=T_small)

What the compacted tree holds (so that the ``tree`` losses over it equal the masked losses over
the original, value and gradients, for both normalizers):

* **Pairs.** ``losses.pair_weights`` keeps a pair (the row of token j of trajectory k predicting
  token j + 1) iff its predicted token is kept. On a root path the kept tokens form a prefix (the
  set is closed under ancestors), so trajectory k keeps its first ``m_k`` tokens, ``m_k`` = its
  kept tokens, and its pairs ``j + 1 < m_k`` are exactly its kept pairs, with the same labels,
  fields (the per-trajectory values of those tokens, unchanged) and so the same weights and
  normalizer. Each kept token attends to its root path, all of it kept, at unchanged positions
  (depth), so its hidden state, hence every kept pair's log-prob, is unchanged.
* **Trajectories.** Every trajectory stays, at its index (K, order and ``traj_ids`` unchanged), so
  anything indexed by trajectory — rewards, group ids, advantages — stays aligned. A trajectory
  pruned to its shared prompt keeps the prompt (its prompt pairs are kept pairs: they count in
  the normalizer with their weights, 0 for an SFT / RL loss mask). A trajectory with no kept
  token (its root pruned, possible when trajectories start differently) keeps its first token: a
  one-token trajectory has no pair, so it adds nothing to the loss; it costs one token per
  distinct pruned root, and is why ``n_tree`` can exceed ``keep.sum()``.
* **Structure.** The tree is rebuilt with ``build.build_tree`` from the kept prefixes: DFS order,
  intervals, parents, row maps and nodes are recomputed (a node whose other branches were pruned
  merges with its remaining child). Token ids, tags and positions of kept tokens are unchanged;
  ``token_index`` maps each compacted token to a token of the input. A forest (``concat_trees``)
  is rebuilt as one prefix tree: identical prefixes of different members are merged, which is
  exact for the loss (same tokens, positions and context) and saves tokens; members must then
  agree on the tags of merged tokens (``build_tree`` names the conflict).

Compaction replaces in-step pruning for these batches: run the step with ``prune.enabled = False``
on them, or the step prunes the compacted trees again against a budget of their (smaller) size.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np

from kat_jax.tree import batch as batch_lib
from kat_jax.tree import build
from kat_jax.tree.logprobs import batch_to_arrays
from kat_jax.tree.prune import prune_tree_batch

# Keys of a tree batch dict (``logprobs.batch_to_arrays``) that compaction rebuilds or drops.
_REBUILT_KEYS = frozenset(f.name for f in dataclasses.fields(batch_lib.TreeBatch)
                          if f.name != "fields")
_STALE_KEYS = frozenset({"keep", "attention_blocks"})  # recomputed after compaction, if wanted
FIELD_PREFIX = "field/"


class CompactTree(NamedTuple):
  """A compacted tree and where its tokens come from."""
  tree: build.TrajectoryTree   # the compacted tree (trajectory k = kept prefix of input k)
  token_index: np.ndarray      # int32 [N']: an input token of each compacted token
  kept_lengths: np.ndarray     # int32 [K]: kept tokens of each trajectory (m_k; 0 = none)


def check_keep_mask(keep, parent: np.ndarray, what: str = "keep") -> np.ndarray:
  """``keep`` as bool [N]; raises ValueError unless it has N entries and is closed under
  ancestors (every kept token's parent is kept), as ``prune_tree_batch`` returns it."""
  keep = np.asarray(keep)
  if keep.shape != parent.shape:
    raise ValueError(f"{what} has shape {keep.shape}; expected {parent.shape}, one entry per tree "
                     "token (slice a [B, T] mask to the tree's n_tree tokens)")
  keep = keep.astype(bool)
  orphan = keep & (parent >= 0) & ~keep[np.maximum(parent, 0)]
  if orphan.any():
    t = int(np.flatnonzero(orphan)[0])
    raise ValueError(
        f"{what} keeps token {t} but not its parent {int(parent[t])}: a keep mask must be closed "
        "under ancestors (a kept token's context is kept), as prune_tree_batch's is")
  return keep


def _compact(tokens, tags, fields, traj_ids, kept_lengths, split_on_tags, max_node_tokens):
  """Rebuilds from per-trajectory arrays cut to their kept prefixes (at least one token)."""
  cut = [max(int(m), 1) for m in kept_lengths]
  return build.build_tree(
      [t[:c] for t, c in zip(tokens, cut)], tags=[t[:c] for t, c in zip(tags, cut)],
      fields={name: [v[:c] for v, c in zip(values, cut)] for name, values in fields.items()},
      traj_ids=traj_ids, split_on_tags=split_on_tags, max_node_tokens=max_node_tokens)


def _token_index(new: build.TrajectoryTree, old_rows: Sequence[np.ndarray]) -> np.ndarray:
  """For each compacted token, the input row that trajectory paths map it from."""
  index = np.zeros(new.n_tree, np.int32)
  for k, rows in enumerate(old_rows):
    n = int(new.lengths[k])
    index[new.row_map[k, :n]] = rows[:n]
  return index


def compact_tree(tree: build.TrajectoryTree, keep, *, split_on_tags: bool = True,
                 max_node_tokens: Optional[int] = None) -> CompactTree:
  """The tree without the tokens ``keep`` (bool [N], closed under ancestors) drops.

  ``split_on_tags`` and ``max_node_tokens`` are ``build_tree``'s node options (pass those the
  tree was built with; they shape nodes only, never the loss). See the module docstring for what
  is kept.
  """
  keep = check_keep_mask(keep, tree.parent)
  rows = [tree.row_map[k, :tree.lengths[k]] for k in range(tree.num_traj)]
  kept_lengths = np.array([int(keep[r].sum()) for r in rows], np.int32)
  new = _compact([tree.tokens[r] for r in rows], [tree.tags[r] for r in rows],
                 {name: [v[k, :tree.lengths[k]] for k in range(tree.num_traj)]
                  for name, v in tree.fields.items()},
                 tree.traj_ids, kept_lengths, split_on_tags, max_node_tokens)
  return CompactTree(tree=new, token_index=_token_index(new, rows), kept_lengths=kept_lengths)


def tree_token_values(tree: build.TrajectoryTree, name: str) -> np.ndarray:
  """float32 [N] per tree token from the per-trajectory field ``name``: the largest value among
  the trajectories through the token, floored at 0 (the train step's rule for the rollout's
  ``entropy`` field, ``step.token_entropies``)."""
  if name not in tree.fields:
    raise ValueError(f"the tree has no field {name!r} (fields: {sorted(tree.fields)}); pass the "
                     "per-token values explicitly")
  out = np.zeros(tree.n_tree, np.float32)
  valid = tree.row_map >= 0
  np.maximum.at(out, tree.row_map[valid], tree.fields[name][valid])
  return out


def batch_token_values(batch: Mapping[str, np.ndarray], name: str) -> np.ndarray:
  """float32 [B, T] per tree token from the field ``field/<name>`` [B, K, L] of a tree batch dict,
  by ``tree_token_values``' rule (what ``step.token_entropies`` computes in the step)."""
  key = FIELD_PREFIX + name
  if key not in batch:
    raise ValueError(f"the batch has no {key!r}; pass the per-token values explicitly")
  b = np.arange(batch["row_map"].shape[0])[:, None, None]
  values = np.where(batch["row_valid"], batch[key], 0.0).astype(np.float32)
  out = np.zeros(np.shape(batch["tokens"]), np.float32)
  np.maximum.at(out, (np.broadcast_to(b, batch["row_map"].shape), batch["row_map"]), values)
  return out


def batch_keep_masks(batch: Mapping[str, np.ndarray], prune_config, *, entropies_bt=None,
                     logprobs_bt=None, rng=None):
  """The pruning rule of ``config.train.prune`` on a host tree batch dict: ``prune_tree_batch``,
  the jitted rule the step runs (per row, independent of the other rows and of padding).
  ``entropies_bt`` [B, T] default to the rollout's ``field/entropy`` (``batch_token_values``);
  ``logprobs_bt`` feed ``reach = 'policy'``. With ``prune_config.enabled`` false every valid
  token is kept. Returns (keep_bt: bool [B, T] numpy, metrics: name -> numpy [B])."""
  if entropies_bt is None:
    entropies_bt = batch_token_values(batch, "entropy")
  keep_bt, metrics = prune_tree_batch(batch, entropies_bt, prune_config, logprobs_bt, rng)
  return np.asarray(keep_bt), {k: np.asarray(v) for k, v in metrics.items()}


def prune_keep_masks(trees: Sequence[build.TrajectoryTree], prune_config, *,
                     entropies: Optional[Sequence[np.ndarray]] = None,
                     logprobs: Optional[Sequence[np.ndarray]] = None, rng=None, **limits):
  """``batch_keep_masks`` for a list of trees, padded into one batch by ``batch_trees(trees,
  **limits)`` (pass fixed ``max_tokens`` etc. to compile the rule once; default: the largest
  tree). ``entropies`` / ``logprobs``: one float [n_tree] array per tree (default: each tree's
  ``entropy`` field, ``tree_token_values``).

  Returns (keep masks: one bool [n_tree] array per tree, metrics: name -> numpy [len(trees)]).
  """
  if not trees:
    raise ValueError("prune_keep_masks needs at least one tree")
  batch = batch_to_arrays(batch_lib.batch_trees(trees, **limits))
  t = batch["tokens"].shape[1]

  def per_token(values, what):
    if len(values) != len(trees):
      raise ValueError(f"{what} has {len(values)} entries but there are {len(trees)} trees")
    out = np.zeros((len(trees), t), np.float32)
    for i, (tree, v) in enumerate(zip(trees, values)):
      v = np.asarray(v, np.float32)
      if v.shape != (tree.n_tree,):
        raise ValueError(f"{what}[{i}] has shape {v.shape}; tree {i} has {tree.n_tree} tokens")
      out[i, :tree.n_tree] = v
    return out

  if entropies is None:
    entropies = [tree_token_values(tree, "entropy") for tree in trees]
  lp_bt = None if logprobs is None else per_token(logprobs, "logprobs")
  keep_bt, metrics = batch_keep_masks(batch, prune_config, entropies_bt=per_token(
      entropies, "entropies"), logprobs_bt=lp_bt, rng=rng)
  return [keep_bt[i, :tree.n_tree] for i, tree in enumerate(trees)], metrics


def compact_batch(batch: Mapping[str, np.ndarray], keep_bt, *, max_tokens: Optional[int] = None,
                  max_nodes: Optional[int] = None, max_traj: Optional[int] = None,
                  max_len: Optional[int] = None, split_on_tags: bool = True,
                  max_node_tokens: Optional[int] = None) -> dict:
  """A tree batch dict (``batch_to_arrays`` form, host numpy) with every row compacted.

  Per row, trajectory k (``traj_valid``) is its tokens, tags and ``field/*`` values read through
  ``row_map``, cut to its kept prefix under ``keep_bt`` [B, T] (closed under ancestors per row),
  and the rows are re-batched with ``batch_trees`` under the given limits (``max_traj`` defaults
  to the input's K, the others to the largest compacted tree; trajectory k stays trajectory k,
  so [B, K] bookkeeping — rewards, group ids — stays aligned). ``keep`` and ``attention_blocks``
  are dropped (rebuild the layout for the new intervals: ``kat_jax.tree.layout``). Raises on
  keys it cannot remap, and when a row's positions are not depths on the root path (rebuilding
  would change RoPE).
  """
  unknown = sorted(k for k in batch if k not in _REBUILT_KEYS | _STALE_KEYS
                   and not k.startswith(FIELD_PREFIX))
  if unknown:
    raise ValueError(f"compact_batch cannot remap batch keys {unknown}: compact before adding "
                     "them, or add them as per-trajectory fields 'field/<name>' [B, K, L]")
  keep_bt = np.asarray(keep_bt)
  tokens_bt = np.asarray(batch["tokens"])
  if keep_bt.shape != tokens_bt.shape:
    raise ValueError(f"keep_bt has shape {keep_bt.shape}; expected {tokens_bt.shape} ([B, T])")
  names = sorted(k[len(FIELD_PREFIX):] for k in batch if k.startswith(FIELD_PREFIX))
  trees = []
  for b in range(tokens_bt.shape[0]):
    n = int(np.sum(batch["token_valid"][b]))
    keep = check_keep_mask(keep_bt[b, :n], np.asarray(batch["parent"][b, :n]), f"keep_bt[{b}]")
    traj = np.flatnonzero(batch["traj_valid"][b])
    lengths = np.asarray(batch["lengths"][b])
    rows = [np.asarray(batch["row_map"][b, k, :lengths[k]]) for k in traj]
    for k, r in zip(traj, rows):
      if not np.array_equal(batch["positions"][b, r], np.arange(r.size)):
        raise ValueError(
            f"row {b}, trajectory {k}: positions are not depths on the root path, so rebuilding "
            "the row would change them; compact the TrajectoryTree (compact_tree) instead")
    kept_lengths = [int(keep[r].sum()) for r in rows]
    trees.append(_compact(
        [tokens_bt[b, r] for r in rows], [np.asarray(batch["tags"][b, r]) for r in rows],
        {name: [np.asarray(batch[FIELD_PREFIX + name][b, k, :lengths[k]]) for k in traj]
         for name in names},
        np.asarray(batch["traj_ids"][b, traj]), kept_lengths, split_on_tags, max_node_tokens))
  k_in = np.shape(batch["traj_valid"])[1]
  return batch_to_arrays(batch_lib.batch_trees(trees, max_tokens=max_tokens, max_nodes=max_nodes,
                                               max_traj=max_traj or k_in, max_len=max_len))
