"""build_tree: serialization, intervals, positions, nodes, row maps, prediction pairs."""
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from kat_jax.tree.build import build_tree, interval_mask, prediction_index
from kat_jax.tree.reference import reference_serialization
from tree_strategies import random_float_fields, trajectory_sets

SETTINGS = hypothesis.settings(max_examples=60, deadline=None)


def _prefix_of(tree, k, j):
  return tuple(tree.trajectory_tokens(k)[:j + 1].tolist())


@SETTINGS
@hypothesis.given(trajectory_sets(), st.booleans(), st.sampled_from([None, 1, 2, 3]))
def test_serialization_matches_trie_reference(data, split_on_tags, max_node_tokens):
  trajs, tags = data
  tree = build_tree(trajs, tags=tags, split_on_tags=split_on_tags, max_node_tokens=max_node_tokens)
  tokens, positions, mask = reference_serialization(trajs)
  np.testing.assert_array_equal(tree.tokens, tokens)
  np.testing.assert_array_equal(tree.positions, positions)
  np.testing.assert_array_equal(interval_mask(tree.tin, tree.tout), mask)
  np.testing.assert_array_equal(tree.tin, np.arange(tree.n_tree))


@SETTINGS
@hypothesis.given(trajectory_sets())
def test_each_unique_prefix_once_and_row_maps_reconstruct(data):
  trajs, tags = data
  tree = build_tree(trajs, tags=tags)
  prefix_at = {}
  for k, traj in enumerate(trajs):
    np.testing.assert_array_equal(tree.trajectory_tokens(k), traj)
    assert tree.lengths[k] == len(traj)
    np.testing.assert_array_equal(tree.row_map[k, len(traj):], -1)
    rows = tree.row_map[k, :len(traj)]
    np.testing.assert_array_equal(tree.positions[rows], np.arange(len(traj)))
    np.testing.assert_array_equal(tree.parent[rows], np.concatenate([[-1], rows[:-1]]))
    np.testing.assert_array_equal(tree.tags[rows], tags[k])
    for j, r in enumerate(rows.tolist()):
      assert prefix_at.setdefault(r, tuple(traj[:j + 1])) == tuple(traj[:j + 1])
  unique_prefixes = {tuple(t[:j + 1]) for t in trajs for j in range(len(t))}
  assert len(prefix_at) == tree.n_tree == len(unique_prefixes)
  assert tree.n_flat == sum(map(len, trajs))
  assert tree.por == pytest.approx(1 - tree.n_tree / tree.n_flat)
  counts = np.zeros(tree.n_tree, int)
  for k in range(tree.num_traj):
    counts[tree.row_map[k, :tree.lengths[k]]] += 1
  np.testing.assert_array_equal(tree.token_traj_count, counts)


@SETTINGS
@hypothesis.given(trajectory_sets(), st.booleans(), st.sampled_from([None, 2]))
def test_node_invariants(data, split_on_tags, max_node_tokens):
  trajs, tags = data
  tree = build_tree(trajs, tags=tags, split_on_tags=split_on_tags, max_node_tokens=max_node_tokens)
  m = tree.num_nodes
  assert tree.node_start[0] == 0 and tree.node_size.sum() == tree.n_tree
  assert (tree.node_size > 0).all()
  np.testing.assert_array_equal(np.repeat(np.arange(m), tree.node_size), tree.token_node)
  through_token = [set() for _ in range(tree.n_tree)]
  for k in range(tree.num_traj):
    for r in tree.row_map[k, :tree.lengths[k]]:
      through_token[r].add(k)
  mask = interval_mask(tree.tin, tree.tout)
  for n in range(m):
    a, z = tree.node_start[n], tree.node_size[n]
    span = range(a, a + z)
    # A chain: each later token's parent is the previous one; one trajectory set; one tag (if split).
    for r in span[1:]:
      assert tree.parent[r] == r - 1
      assert through_token[r] == through_token[a]
    if split_on_tags:
      assert len(set(tree.tags[a:a + z].tolist())) == 1
    assert tree.node_tag_bits[n] == sum(1 << t for t in set(tree.tags[a:a + z].tolist()))
    if max_node_tokens:
      assert z <= max_node_tokens
    np.testing.assert_array_equal(tree.node_trajectories(n), sorted(through_token[a]))
    assert tree.node_traj_count[n] == len(through_token[a])
    p = tree.node_parent[n]
    if p < 0:
      assert tree.parent[a] == -1 and tree.node_depth[n] == 0
    else:
      assert tree.parent[a] == tree.node_start[p] + tree.node_size[p] - 1
      assert tree.node_depth[n] == tree.node_depth[p] + 1
    # Subtree = contiguous node range; its tokens are exactly those that see the node's first token.
    end = tree.node_subtree_end[n]
    desc_tokens = np.flatnonzero(mask[:, a])
    last = tree.n_tree if end == m else tree.node_start[end]
    np.testing.assert_array_equal(desc_tokens, np.arange(a, last))
  # Maximality without splits: a node boundary only at a fork, a trajectory end or a root.
  if not split_on_tags and not max_node_tokens:
    ends = {int(tree.row_map[k, tree.lengths[k] - 1]) for k in range(tree.num_traj)}
    for n in range(m):
      p = tree.node_parent[n]
      if p >= 0:
        last_p = tree.node_start[p] + tree.node_size[p] - 1
        forks = np.sum(tree.parent == last_p) > 1
        assert forks or last_p in ends


@SETTINGS
@hypothesis.given(trajectory_sets())
def test_prediction_pairs_complete(data):
  trajs, tags = data
  tree = build_tree(trajs, tags=tags)
  rows, label_rows, labels, valid = prediction_index(tree)
  assert valid.sum() == sum(len(t) - 1 for t in trajs)
  want = sorted((k, j, int(tree.row_map[k, j]), t[j + 1])
                for k, t in enumerate(trajs) for j in range(len(t) - 1))
  got = sorted((k, j, int(rows[k, j]), int(labels[k, j])) for k, j in zip(*np.nonzero(valid)))
  assert got == want
  np.testing.assert_array_equal(tree.tokens[label_rows][valid], labels[valid])
  np.testing.assert_array_equal(tree.parent[label_rows][valid], rows[valid])


@SETTINGS
@hypothesis.given(trajectory_sets(), st.integers(0, 2 ** 31 - 1))
def test_per_trajectory_fields_stay_per_trajectory(data, seed):
  trajs, tags = data
  adv = random_float_fields(trajs, seed)
  scalar = list(range(len(trajs)))
  tree = build_tree(trajs, tags=tags, fields={"advantage": adv, "weight": scalar},
                    traj_ids=[100 + i for i in range(len(trajs))])
  for k, t in enumerate(trajs):
    np.testing.assert_array_equal(tree.fields["advantage"][k, :len(t)], adv[k])
    np.testing.assert_array_equal(tree.fields["advantage"][k, len(t):], 0)
    np.testing.assert_array_equal(tree.fields["weight"][k, :len(t)], k)
  np.testing.assert_array_equal(tree.traj_ids, 100 + np.arange(len(trajs)))


def test_edge_cases_exact():
  # Identical trajectories share everything; a prefix ends inside the other's chain.
  tree = build_tree([[5, 6, 7], [5, 6, 7], [5, 6]])
  assert tree.n_tree == 3 and tree.n_flat == 8 and tree.por == pytest.approx(5 / 8)
  np.testing.assert_array_equal(tree.node_size, [2, 1])      # split where the prefix ends
  np.testing.assert_array_equal(tree.node_traj_count, [3, 2])
  # Branching at the first token: a forest with disjoint intervals.
  tree = build_tree([[2, 1], [1, 3], [1, 4]])
  np.testing.assert_array_equal(tree.tokens, [1, 3, 4, 2, 1])
  np.testing.assert_array_equal(tree.tout, [3, 2, 3, 5, 5])
  np.testing.assert_array_equal(tree.node_parent, [-1, 0, 0, -1])
  # One trajectory: no sharing, the flat causal case.
  tree = build_tree([[9, 8, 7, 6]])
  assert tree.por == 0.0 and tree.num_nodes == 1
  np.testing.assert_array_equal(interval_mask(tree.tin, tree.tout), np.tril(np.ones((4, 4), bool)))
  # Order of the input does not change the serialization.
  a = build_tree([[1, 2, 3], [1, 4], [0]])
  b = build_tree([[0], [1, 4], [1, 2, 3]])
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.row_map[[0, 1, 2]], b.row_map[[2, 1, 0]])


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="trajectory 1 is empty"):
    build_tree([[1], []])
  with pytest.raises(ValueError, match="at least one trajectory"):
    build_tree([])
  with pytest.raises(ValueError, match="disagree on the tag of token 1"):
    build_tree([[1, 2, 3], [1, 2, 4]], tags=[[0, 1, 0], [0, 2, 0]])
  with pytest.raises(ValueError, match=r"tags\[0\] has 2 entries but trajectory 0 has 3"):
    build_tree([[1, 2, 3]], tags=[[0, 0]])
  with pytest.raises(ValueError, match=r"field 'adv'\[0\] has shape \(2,\)"):
    build_tree([[1, 2, 3]], fields={"adv": [[1.0, 2.0]]})
  with pytest.raises(ValueError, match=r"holds the tag 31; tags are ints in \[0, 30\]"):
    build_tree([[1, 2]], tags=[[0, 31]])
  with pytest.raises(ValueError, match="must hold ints"):
    build_tree([[1.5, 2.0]])
