"""Entropy-budget pruning: jitted rule == heap reference, and the rule's invariants."""
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.tree import prune
from kat_jax.tree.batch import batch_trees
from kat_jax.tree.build import EVENT_TAGS, build_tree
from kat_jax.tree.reference import (reference_budget, reference_longest_path_scores,
                                    reference_node_scores, reference_prune, reference_units)
from tree_strategies import trajectory_sets

# One padded shape for every example, so each rule variant compiles once.
T_MAX, M_MAX, K_MAX, L_MAX = 128, 128, 8, 16
SETTINGS = hypothesis.settings(max_examples=25, deadline=None)


def _batch(trees):
  return batch_trees(trees, max_tokens=T_MAX, max_nodes=M_MAX, max_traj=K_MAX, max_len=L_MAX)


def _config(**overrides):
  c = prune.default_prune_config()
  c.enabled = True
  for k, v in overrides.items():
    c[k] = v
  return c


def _signals(seed, batch_size=1):
  """Entropies with ties and zeros (half of the draws) or continuous; negative log-probs."""
  rng = np.random.default_rng(seed)
  if rng.random() < 0.5:
    ent = rng.choice([0.0, 0.5, 1.0, 2.0], size=(batch_size, T_MAX))
  else:
    ent = rng.gamma(0.5, 1.0, size=(batch_size, T_MAX))
  logp = -rng.gamma(1.0, 1.0, size=(batch_size, T_MAX))
  return ent.astype(np.float32), logp.astype(np.float32)


@st.composite
def trees(draw):
  trajs, tags = draw(trajectory_sets(max_traj=K_MAX, max_len=10))
  split = draw(st.booleans())
  chunk = draw(st.sampled_from([None, 2, 3]))
  return build_tree(trajs, tags=tags, split_on_tags=split, max_node_tokens=chunk)


def _assert_scores_close(got, want):
  assert np.array_equal(np.isneginf(got), np.isneginf(want)), (got, want)
  fin = np.isfinite(want)
  np.testing.assert_allclose(got[fin], want[fin], rtol=2e-5, atol=2e-5)


# Every reach with both aggregations and both scopes (8 of the 16 combinations).
@pytest.mark.parametrize("agg,scope,reach", [
    ("mean", "node", "fraction"), ("sum", "subtree", "fraction"), ("sum", "node", "branch"),
    ("mean", "subtree", "branch"), ("mean", "subtree", "policy"), ("sum", "node", "policy"),
    ("mean", "node", "uniform"), ("sum", "subtree", "uniform")])
@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(tree=trees(), seed=st.integers(0, 2 ** 31 - 1))
def test_entropy_scores_match_reference(agg, scope, reach, tree, seed):
  config = _config(entropy_agg=agg, entropy_scope=scope, reach=reach)
  ent, logp = _signals(seed)
  got = np.asarray(prune.entropy_node_scores(_batch([tree]), ent, config, logp))[0]
  want = reference_node_scores(tree, ent[0], config, logp[0])
  _assert_scores_close(got[:tree.num_nodes], want)
  assert np.isneginf(got[tree.num_nodes:]).all()


@SETTINGS
@hypothesis.given(tree=trees())
def test_longest_path_scores_match_reference(tree):
  got = np.asarray(prune.longest_path_node_scores(_batch([tree])))[0]
  np.testing.assert_allclose(got[:tree.num_nodes], reference_longest_path_scores(tree), rtol=1e-6)


@pytest.mark.parametrize("mode", prune.EVENT_MODES)
@pytest.mark.parametrize("unit,window", [("tokens", 3), ("nodes", 2)])
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(tree=trees())
def test_units_and_mandatory_part_match_reference(mode, unit, window, tree):
  config = _config(event_window=window, event_window_unit=unit, event_mode=mode)
  got = {k: np.asarray(v)[0] for k, v in prune.unit_structure(_batch([tree]), config).items()}
  want = reference_units(tree, config)
  m = tree.num_nodes
  for k in ("mandatory", "attached", "is_unit"):
    np.testing.assert_array_equal(got[k][:m], want[k], err_msg=k)
  attached = np.asarray(want["attached"]) > 0
  np.testing.assert_array_equal(got["head"][:m][attached], np.asarray(want["head"])[attached])
  assert (got["mandatory"][m:] == 0).all() and not got["is_unit"][m:].any()


@pytest.mark.parametrize("mode,unit,window,truncate", [
    ("attached", "tokens", 2, True), ("attached", "nodes", 1, False),
    ("mandatory", "tokens", 0, True), ("mandatory", "tokens", 3, False)])
@SETTINGS
@hypothesis.given(tree=trees(), seed=st.integers(0, 2 ** 31 - 1), budget=st.integers(0, 130))
def test_selection_matches_heap_reference(mode, unit, window, truncate, tree, seed, budget):
  """Caller-given scores with many ties and -inf: the sort+cumsum expansion == the heap."""
  config = _config(event_window=window, event_window_unit=unit, truncate_last_node=truncate,
                   budget_tokens=budget, event_mode=mode)
  rng = np.random.default_rng(seed)
  scores = rng.choice([-np.inf, -1.0, 0.0, 0.5, 2.0], size=(1, M_MAX)).astype(np.float32)
  result = prune.prune_with_scores(_batch([tree]), scores, config)
  keep, kept, exceeds = reference_prune(tree, None, config, node_scores=scores[0, :tree.num_nodes])
  np.testing.assert_array_equal(np.asarray(result.keep_mask)[0, :tree.n_tree], keep)
  np.testing.assert_array_equal(np.asarray(result.node_kept_tokens)[0, :tree.num_nodes], kept)
  assert bool(result.metrics["mandatory_exceeds_budget"][0]) == exceeds


@pytest.mark.parametrize("overrides", [
    {},
    {"entropy_scope": "subtree", "entropy_agg": "sum", "reach": "branch"},
    {"reach": "policy", "event_window_unit": "nodes", "event_window": 1,
     "truncate_last_node": False},
    {"event_mode": "mandatory", "entropy_scope": "subtree"},
])
@SETTINGS
@hypothesis.given(tree=trees(), seed=st.integers(0, 2 ** 31 - 1),
                  fraction=st.floats(0.0, 1.0))
def test_end_to_end_matches_reference(overrides, tree, seed, fraction):
  config = _config(budget_fraction=fraction, **overrides)
  ent, logp = _signals(seed)
  result = prune.prune_nodes(_batch([tree]), ent, config, logp)
  scores = np.asarray(result.node_scores)[0, :tree.num_nodes]
  _assert_scores_close(scores, reference_node_scores(tree, ent[0], config, logp[0]))
  keep, _, exceeds = reference_prune(tree, ent[0], config, node_scores=scores)
  np.testing.assert_array_equal(np.asarray(result.keep_mask)[0, :tree.n_tree], keep)
  assert int(result.metrics["budget"][0]) == reference_budget(tree, config)
  assert bool(result.metrics["mandatory_exceeds_budget"][0]) == exceeds
  assert not np.asarray(result.keep_mask)[0, tree.n_tree:].any()


@pytest.mark.parametrize("mode", prune.EVENT_MODES)
@SETTINGS
@hypothesis.given(tree=trees(), seed=st.integers(0, 2 ** 31 - 1), budget=st.integers(0, 130),
                  more=st.integers(0, 40), truncate=st.booleans())
def test_invariants(mode, tree, seed, budget, more, truncate):
  config = _config(budget_tokens=budget, event_window=2, truncate_last_node=truncate,
                   event_mode=mode)
  ent, _ = _signals(seed)
  batch = _batch([tree])
  res = prune.prune_nodes(batch, ent, config)
  keep = np.asarray(res.keep_mask)[0, :tree.n_tree]
  node_kept = np.asarray(res.node_kept_tokens)[0, :tree.num_nodes]
  units = reference_units(tree, config)
  mandatory = np.asarray(units["mandatory"])
  mandatory_mask = np.zeros(tree.n_tree, bool)
  for a, z in zip(tree.node_start, mandatory):
    mandatory_mask[a:a + z] = True
  metrics = {k: np.asarray(v)[0] for k, v in res.metrics.items()}
  assert metrics["kept_tokens"] == keep.sum()
  if mandatory.sum() > budget:
    assert metrics["mandatory_exceeds_budget"]
    np.testing.assert_array_equal(keep, mandatory_mask)          # exactly the mandatory part
  else:
    assert not metrics["mandatory_exceeds_budget"] and keep.sum() <= budget
    if truncate and mode == "mandatory":
      assert keep.sum() == min(budget, tree.n_tree)               # the budget is used exactly
  assert keep[mandatory_mask].all()
  event_t = np.isin(tree.tags, EVENT_TAGS)
  if mode == "mandatory":
    assert keep[event_t].all()                                    # events always kept
  else:
    # Events are atomic with their head: an attached prefix is kept whole or not at all, and only
    # below a complete head node.
    for n in range(tree.num_nodes):
      h = units["head"][n]
      if units["attached"][n] > 0:
        assert node_kept[n] == 0 or node_kept[n] >= units["attached"][n]
        assert node_kept[n] == 0 or node_kept[h] == tree.node_size[h]
  has_parent = tree.parent >= 0
  assert (~keep[has_parent] | keep[tree.parent[has_parent]]).all()  # ancestor closure
  assert metrics["kept_nodes"] == (node_kept == tree.node_size).sum()
  last = tree.row_map[np.arange(tree.num_traj), tree.lengths - 1]
  assert metrics["kept_trajectories"] == keep[last].sum()
  weight = ent[0, :tree.n_tree].astype(np.float64) * tree.token_traj_count
  want_frac = weight[keep].sum() / weight.sum() if weight.sum() > 0 else 1.0
  assert metrics["kept_entropy_fraction"] == pytest.approx(want_frac, rel=1e-5, abs=1e-6)
  # A larger budget keeps a superset; a budget >= the tree keeps everything.
  config.budget_tokens = budget + more
  keep_more = np.asarray(prune.prune_nodes(batch, ent, config).keep_mask)[0, :tree.n_tree]
  assert (keep_more | ~keep).all()
  config.budget_tokens = tree.n_tree + more
  assert np.asarray(prune.prune_nodes(batch, ent, config).keep_mask)[0, :tree.n_tree].all()


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(forest=st.lists(trees(), min_size=3, max_size=3),
                  seed=st.integers(0, 2 ** 31 - 1))
def test_vmap_over_batch_equals_per_tree(forest, seed):
  config = _config(budget_fraction=0.4, event_window=1)
  ent, _ = _signals(seed, len(forest))
  together = prune.prune_nodes(_batch(forest), ent, config)
  for i, tree in enumerate(forest):
    alone = prune.prune_nodes(_batch([tree]), ent[i:i + 1], config)
    np.testing.assert_array_equal(together.keep_mask[i], alone.keep_mask[0])
    for k in together.metrics:
      np.testing.assert_array_equal(together.metrics[k][i], alone.metrics[k][0])


def test_baselines_and_hook():
  trajs = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7], [1, 8, 9]]
  tags = [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2]]
  tree = build_tree(trajs, tags=tags)
  batch = _batch([tree])
  # Longest path: the 6-token trajectory first.
  config = _config(budget_tokens=6, event_window=0, event_mode="mandatory")
  keep = np.asarray(prune.prune_longest_path(batch, config).keep_mask)[0, :tree.n_tree]
  np.testing.assert_array_equal(tree.tokens[keep], [1, 2, 3, 4, 8, 9])  # 1, 8, 9 mandatory
  config = _config(budget_tokens=6, event_window=0)  # attached: the result 9 goes with its head 8
  keep = np.asarray(prune.prune_longest_path(batch, config).keep_mask)[0, :tree.n_tree]
  np.testing.assert_array_equal(tree.tokens[keep], [1, 2, 3, 4, 5, 6])
  # Random: deterministic per rng, same invariants.
  a = prune.prune_random(batch, config, jax.random.PRNGKey(3)).keep_mask
  b = prune.prune_random(batch, config, jax.random.PRNGKey(3)).keep_mask
  np.testing.assert_array_equal(a, b)
  assert int(np.asarray(a).sum()) == 6
  # Disabled: every real token kept.
  keep, metrics = prune.prune_tree_batch(batch, np.ones((1, T_MAX), np.float32),
                                         _config(enabled=False))
  np.testing.assert_array_equal(keep, batch.token_valid)
  assert int(metrics["kept_tokens"][0]) == tree.n_tree
  # Jittable end to end, the config closed over.
  jitted = jax.jit(functools.partial(prune.prune_tree_batch, config=config))
  keep_j, _ = jitted(jax.device_put(batch), jnp.ones((1, T_MAX)))
  keep_e, _ = prune.prune_tree_batch(batch, jnp.ones((1, T_MAX)), config)
  np.testing.assert_array_equal(keep_j, keep_e)


def test_config_errors():
  with pytest.raises(ValueError, match="prune.reach = 'nope' is not one of"):
    prune.settings_from_config(_config(reach="nope"))
  with pytest.raises(ValueError, match="budget_fraction = 1.5"):
    prune.settings_from_config(_config(budget_fraction=1.5))
  with pytest.raises(ValueError, match="unknown prune config fields"):
    prune.settings_from_config({"budget": 3})
  tree = build_tree([[1, 2]])
  with pytest.raises(ValueError, match="needs logprobs_bt"):
    prune.prune_nodes(_batch([tree]), np.ones((1, T_MAX)), _config(reach="policy"))
