"""batch_trees / concat_trees: padding attends to nothing, row maps and prediction pairs line up."""
import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.model.attention import visible
from kat_jax.tree.batch import batch_trees, concat_trees, per_tree_token
from kat_jax.tree.build import build_tree, interval_mask
from tree_strategies import random_float_fields, trajectory_sets

SETTINGS = hypothesis.settings(max_examples=60, deadline=None)


@SETTINGS
@hypothesis.given(st.lists(trajectory_sets(max_traj=5), min_size=1, max_size=3),
                  st.integers(0, 7), st.integers(0, 2 ** 31 - 1))
def test_batch_padding_and_alignment(sets, extra, seed):
  trees = [build_tree(t, tags=g, fields={"adv": random_float_fields(t, seed)}) for t, g in sets]
  t_max = max(t.n_tree for t in trees) + extra
  batch = batch_trees(trees, max_tokens=t_max, max_nodes=max(t.num_nodes for t in trees) + 1,
                      max_traj=6, max_len=20)
  for i, tree in enumerate(trees):
    vis = interval_mask(batch.tin[i], batch.tout[i])[None]
    n = tree.n_tree
    np.testing.assert_array_equal(vis[0, :n, :n], interval_mask(tree.tin, tree.tout))
    assert not vis[0, n:, :].any() and not vis[0, :, n:].any()  # padding: sees none, seen by none
    np.testing.assert_array_equal(batch.token_valid[i], np.arange(t_max) < n)
    k = tree.num_traj
    assert batch.traj_valid[i].sum() == k
    tokens = np.where(batch.row_valid[i], batch.tokens[i][batch.row_map[i]], -1)
    for j in range(k):
      np.testing.assert_array_equal(tokens[j, :tree.lengths[j]], tree.trajectory_tokens(j))
      np.testing.assert_array_equal(batch.fields["adv"][i, j, :tree.lengths[j]],
                                    tree.fields["adv"][j, :tree.lengths[j]])
    assert not batch.row_valid[i, k:].any()
    assert batch.pred_valid[i].sum() == (tree.lengths - 1).sum()
    pv = batch.pred_valid[i]
    np.testing.assert_array_equal(batch.tokens[i][batch.pred_label_rows[i]][pv],
                                  batch.pred_labels[i][pv])
    np.testing.assert_array_equal(batch.parent[i][batch.pred_label_rows[i]][pv],
                                  batch.pred_rows[i][pv])
    np.testing.assert_array_equal(batch.token_node[i, n:], batch.node_size.shape[1])


@SETTINGS
@hypothesis.given(st.lists(trajectory_sets(max_traj=4), min_size=1, max_size=3))
def test_concat_trees_is_a_forest_of_disjoint_blocks(sets):
  trees = [build_tree(t, tags=g) for t, g in sets]
  forest = concat_trees(trees)
  mask = interval_mask(forest.tin, forest.tout)
  blocks = np.zeros_like(mask)
  off = 0
  for t in trees:
    blocks[off:off + t.n_tree, off:off + t.n_tree] = interval_mask(t.tin, t.tout)
    off += t.n_tree
  np.testing.assert_array_equal(mask, blocks)
  k = 0
  for t in trees:
    for j in range(t.num_traj):
      np.testing.assert_array_equal(forest.trajectory_tokens(k), t.trajectory_tokens(j))
      k += 1
  for n in range(forest.num_nodes):
    a = forest.node_start[n]
    for kk in forest.node_trajectories(n):
      assert a in forest.row_map[kk]


def test_model_visibility_on_a_padded_forest():
  """The model's mask function on a padded batch: the tree's ancestor mask, nothing for padding."""
  trees = [build_tree([[1, 2, 3], [1, 2, 4], [5]]), build_tree([[7, 8]])]
  batch = batch_trees(trees, max_tokens=8)
  vis = np.asarray(visible(jnp.asarray(batch.tin), jnp.asarray(batch.tin), jnp.asarray(batch.tout)))
  want = np.zeros((2, 8, 8), bool)
  want[0, :5, :5] = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0],
                     [0, 0, 0, 0, 1]]
  want[1, :2, :2] = [[1, 0], [1, 1]]
  np.testing.assert_array_equal(vis, want)


def test_per_tree_token_scatters_through_row_maps():
  trees = [build_tree([[1, 2, 3], [1, 2, 4], [5]]), build_tree([[7, 8]])]
  batch = batch_trees(trees, max_tokens=6, max_traj=3, max_len=4)
  # A value per (trajectory, position) that is a function of the tree token: the token id * 10.
  per_traj = np.where(batch.row_valid, batch.tokens[np.arange(2)[:, None, None], batch.row_map] * 10,
                      -1).astype(np.float32)
  got = np.asarray(per_tree_token(batch, per_traj, fill=-5.0))
  np.testing.assert_array_equal(got, np.where(batch.token_valid, batch.tokens * 10, -5))


def test_too_large_errors_name_sizes():
  tree = build_tree([[1, 2, 3, 4], [1, 2, 5]])
  with pytest.raises(ValueError, match="tree 0 has 5 tokens but the batch allows 4: raise max_tokens"):
    batch_trees([tree], max_tokens=4)
  with pytest.raises(ValueError, match="2 trajectories but the batch allows 1"):
    batch_trees([tree], max_traj=1)
  with pytest.raises(ValueError, match="longest trajectory but the batch allows 3"):
    batch_trees([tree], max_len=3)
  other = build_tree([[1]], fields={"adv": [1.0]})
  with pytest.raises(ValueError, match="carries fields"):
    batch_trees([tree, other])
