"""Block layouts of tree attention: exact and conservative block masks, visit lists, chunks."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax.numpy as jnp

from kernels.tree_attention import layout, synthetic
from kernels.tree_attention.layout import PAD_INTERVAL

from kernel_cases import brute_force_visible, forest_batch, forest_intervals, intervals_from_climbs


def _token_level_block_mask(tin, tout, block_q, block_k):
  b, t = tin.shape
  nq, nk = layout.num_blocks(t, block_q), layout.num_blocks(t, block_k)
  vis = brute_force_visible(tin, tout)
  vis = np.pad(vis, ((0, 0), (0, nq * block_q - t), (0, nk * block_k - t)))
  return vis.reshape(b, nq, block_q, nk, block_k).any(axis=(2, 4))


@settings(max_examples=15, deadline=None)
@given(rows=st.lists(forest_intervals(t=45), min_size=2, max_size=2),
       block_q=st.sampled_from([4, 8, 16]), block_k=st.sampled_from([4, 8, 16]))
def test_exact_block_mask_matches_token_mask_and_bounds_are_conservative(rows, block_q, block_k):
  tin, tout = forest_batch(rows)
  exact = layout.exact_block_mask(tin, tout, block_q, block_k)
  np.testing.assert_array_equal(exact, _token_level_block_mask(tin, tout, block_q, block_k))
  bounds = np.asarray(layout.block_mask_from_bounds(jnp.asarray(tin), jnp.asarray(tout),
                                                    block_q, block_k))
  assert not np.any(exact & ~bounds), "bounds skipped a block that holds a visible pair"


@settings(max_examples=20, deadline=None)
@given(tin=st.lists(st.integers(0, 30), min_size=20, max_size=20),
       length=st.lists(st.integers(-3, 12), min_size=20, max_size=20))
def test_exact_block_mask_for_arbitrary_intervals(tin, length):
  # Not a tree, not DFS ordered: the rule alone decides, and both masks must respect it.
  tin = np.asarray([tin], np.int32)
  tout = tin + np.maximum(np.asarray([length], np.int32), 0)
  exact = layout.exact_block_mask(tin, tout, 8, 4)
  np.testing.assert_array_equal(exact, _token_level_block_mask(tin, tout, 8, 4))
  bounds = np.asarray(layout.block_mask_from_bounds(jnp.asarray(tin), jnp.asarray(tout), 8, 4))
  assert not np.any(exact & ~bounds)


@settings(max_examples=20, deadline=None)
@given(rows=st.lists(forest_intervals(t=40), min_size=1, max_size=3),
       chunk_width=st.integers(1, 5))
def test_visit_lists_and_chunks_cover_exactly_the_visited_pairs(rows, chunk_width):
  tin, tout = forest_batch(rows)
  blocks = layout.block_layout(tin, tout, 8, 8, chunk_width=chunk_width)
  exact = layout.exact_block_mask(tin, tout, 8, 8)
  b, nq, nk = exact.shape
  for key in blocks:
    assert blocks[key].dtype == np.int32, key
  for row in range(b):
    for i in range(nq):
      count = blocks["kv_counts"][row, i]
      ids = blocks["kv_ids"][row, i]
      np.testing.assert_array_equal(ids[:count], np.flatnonzero(exact[row, i]))
      assert np.all(ids[count:] == (ids[count - 1] if count else 0))  # repeat the last id
    for j in range(nk):
      count = blocks["q_counts"][row, j]
      np.testing.assert_array_equal(blocks["q_ids"][row, j, :count],
                                    np.flatnonzero(exact[row, :, j]))
    # Forward chunks: every visited (q block, kv block) pair exactly once; the rest is dummy nk.
    pairs = [(q, kv) for q, kvs in zip(blocks["fwd_chunk_q"][row], blocks["fwd_chunk_kv"][row])
             for kv in kvs if kv != nk]
    assert sorted(pairs) == sorted(zip(*np.nonzero(exact[row])))


def test_visit_lists_in_graph_equal_numpy():
  rng = np.random.default_rng(0)
  mask = rng.random((2, 5, 7)) < 0.4
  ids_np, counts_np = layout.visit_lists(mask, np)
  ids_j, counts_j = layout.visit_lists(jnp.asarray(mask))
  np.testing.assert_array_equal(ids_np, np.asarray(ids_j))
  np.testing.assert_array_equal(counts_np, np.asarray(counts_j))


def test_two_long_branches_visit_fewer_blocks_than_causal():
  # A 64-token prompt, then two 480-token branches: the second branch never looks at the first.
  paths = [list(range(544)), list(range(64)) + list(range(1000, 1480))]
  _, tin, tout = synthetic.trie_intervals(paths)
  assert tin.size == 1024
  tin, tout = tin[None], tout[None]
  blocks = layout.block_layout(tin, tout, 64, 64)
  visited = int(blocks["kv_counts"].sum())
  causal = layout.causal_visited_blocks(1024, 64, 64)
  # Blocks of 64: 0 = prompt, 1..7 = branch 1, 8 = end of branch 1 + start of branch 2,
  # 9..15 = branch 2. Query block 0 sees 1 block, i in 1..7 sees 0..i, block 8 sees 0..8, and a
  # branch-2 block i sees the prompt, block 8 and 9..i (never branch 1's blocks 1..7).
  branch_1 = sum(i + 1 for i in range(1, 8))
  branch_2 = sum(2 + (i - 9 + 1) for i in range(9, 16))
  assert visited == 1 + branch_1 + 9 + branch_2
  assert visited == 87 and causal == 136
  in_graph = np.asarray(layout.block_mask_from_bounds(jnp.asarray(tin), jnp.asarray(tout), 64, 64))
  assert in_graph.sum() < causal


def test_flat_packed_sequences_give_causal_and_segment_skipping():
  # Segments of 100 and 156 tokens, then 44 padding tokens (T = 300, blocks of 50).
  seg = np.array([1] * 100 + [2] * 156 + [0] * 44)
  idx = np.arange(300)
  tout = np.where(seg == 1, 100, np.where(seg == 2, 256, idx))
  tin = idx[None].astype(np.int32)
  tout = tout[None].astype(np.int32)
  mask = layout.exact_block_mask(tin, tout, 50, 50)[0]
  expected = np.zeros((6, 6), bool)
  for i in range(6):
    for j in range(6):
      # key block j is seen by query block i iff j <= i and some key of j shares a segment with
      # a query of i; block 5 (250..299) holds 6 tokens of segment 2 and padding.
      q_segs = set(seg[i * 50:(i + 1) * 50]) - {0}
      k_segs = set(seg[j * 50:(j + 1) * 50]) - {0}
      expected[i, j] = j <= i and bool(q_segs & k_segs)
  np.testing.assert_array_equal(mask, expected)


def test_round_capacity_policy():
  assert [layout.round_capacity(n) for n in (0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 100)] == \
      [1, 1, 7, 8, 9, 15, 16, 18, 32, 36, 104]
  for n in range(1, 2000):
    c = layout.round_capacity(n)
    assert n <= c <= n * 1.125 + 1e-9


def test_pinned_capacity_too_small_names_the_needed_value():
  tin, tout = intervals_from_climbs([0], 64, 64)
  with pytest.raises(ValueError, match="needs"):
    layout.block_layout(tin[None], tout[None], 8, 8, capacity=2)
  blocks = layout.block_layout(tin[None], tout[None], 8, 8, capacity=40)
  assert blocks["fwd_chunk_q"].shape == (1, 40)


def test_padding_sentinel_is_below_real_intervals():
  # Padded slots (PAD_INTERVAL) must neither see nor be seen by real tokens with tin >= 0.
  tin = np.array([[0, 1, 2]], np.int32)
  tout = np.array([[3, 3, 3]], np.int32)
  padded_tin, padded_tout = layout.pad_intervals(tin, tout, 8, np)
  vis = brute_force_visible(padded_tin, padded_tout)
  assert not vis[0, 3:].any() and not vis[0, :, 3:].any()
  assert padded_tin[0, 3] == PAD_INTERVAL


@settings(max_examples=20, deadline=None)
@given(paths=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1,
                      max_size=6))
def test_trie_intervals_encode_prefix_sharing(paths):
  tokens, tin, tout = synthetic.trie_intervals(paths)
  # Every path is a root-to-node chain of the trie: walking it, each token is visible to the next.
  vis = brute_force_visible(tin[None], tout[None])[0]
  unique_prefixes = {tuple(p[:i + 1]) for p in paths for i in range(len(p))}
  assert tokens.size == len(unique_prefixes)
  # A node's ancestors are exactly the prefixes of its path: count visible keys per query.
  depth = vis.sum(axis=1)
  assert sorted(depth.tolist()) == sorted(len(p) for p in unique_prefixes)
