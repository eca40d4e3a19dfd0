"""Every tree-attention implementation against a dense float32 oracle: forward and gradients.

The oracle is ``kat_jax.model.attention.dense_attention`` (materialized [T, T] mask). Gradients
are those of a random-weighted sum of the output (dq, dk, dv). Tolerances (float32): forward
1e-5, gradients 1e-4 (absolute and relative). The Pallas kernels run in interpret mode: the TPU
kernel with the HLO interpreter (``interpret=True``) and once with the TPU-faithful simulator
(``pltpu.InterpretParams``), the GPU (Triton) kernel with ``interpret=True``.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from kat_jax.model.attention import (AttentionMask, dense_attention, get_attention_fn,
                                     intervals_from_segment_ids)
from kernels.tree_attention import blocksparse, layout, pallas, pallas_gpu, pallas_tpu, reference
from kernels.tree_attention.layout import BlockSizes

from kernel_cases import forest_batch, forest_intervals, intervals_from_climbs

FWD_TOL = 1e-5
GRAD_TOL = 1e-4
BLOCKS = BlockSizes(block_q=32, block_k=16)  # unequal on purpose; T = 80 is a multiple of neither

# name -> (function, whether it reads mask.blocks built with BLOCKS)
IMPLS = {
    "reference": (functools.partial(reference.tree_attention, block_k=16), False),
    "blocksparse": (functools.partial(blocksparse.tree_attention, block_sizes=BLOCKS), True),
    "pallas_tpu": (functools.partial(pallas_tpu.tree_attention, block_sizes=BLOCKS,
                                     interpret=True), True),
    "pallas_tpu_bounds": (functools.partial(pallas_tpu.tree_attention, block_sizes=BLOCKS,
                                            interpret=True), False),
    "pallas_gpu": (functools.partial(pallas_gpu.tree_attention, block_sizes=BLOCKS,
                                     interpret=True), True),
    "pallas_gpu_bounds": (functools.partial(pallas_gpu.tree_attention, block_sizes=BLOCKS,
                                            interpret=True), False),
}


@functools.lru_cache(maxsize=None)
def _value_and_grads(name):
  fn = IMPLS[name][0] if name != "oracle" else dense_attention

  def loss(q, k, v, mask, w):
    out = fn(q, k, v, mask)
    return jnp.sum(out.astype(jnp.float32) * w), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _inputs(seed, b, t, hq, hkv, d, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (b, t, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, t, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, hkv, d), jnp.float32).astype(dtype)
  w = jax.random.normal(keys[3], (b, t, hq, d), jnp.float32)
  return q, k, v, w


def _mask(tin, tout, with_blocks, block_sizes=BLOCKS):
  # Chunk capacities pinned to the worst case: one compiled shape per test shape.
  t = tin.shape[1]
  capacity = layout.worst_case_capacity(t, block_sizes.block_q, block_sizes.block_k)
  blocks = (layout.block_layout(tin, tout, block_sizes.block_q, block_sizes.block_k,
                                capacity=capacity) if with_blocks else None)
  return AttentionMask(tin=jnp.asarray(tin, jnp.int32), tout=jnp.asarray(tout, jnp.int32),
                       blocks=blocks)


def _check_against_oracle(name, tin, tout, hq=4, hkv=2, d=8, seed=0):
  b, t = tin.shape
  q, k, v, w = _inputs(seed, b, t, hq, hkv, d)
  (_, want_out), want_grads = _value_and_grads("oracle")(q, k, v, _mask(tin, tout, False), w)
  (_, got_out), got_grads = _value_and_grads(name)(q, k, v, _mask(tin, tout, IMPLS[name][1]), w)
  np.testing.assert_allclose(got_out, want_out, atol=FWD_TOL, rtol=FWD_TOL)
  for label, got, want in zip(("dq", "dk", "dv"), got_grads, want_grads):
    np.testing.assert_allclose(got, want, atol=GRAD_TOL, rtol=GRAD_TOL, err_msg=label)
  return got_out, got_grads


XLA_IMPLS = ["reference", "blocksparse"]
PALLAS_IMPLS = ["pallas_tpu", "pallas_tpu_bounds", "pallas_gpu", "pallas_gpu_bounds"]


@pytest.mark.parametrize("name", XLA_IMPLS)
@settings(max_examples=8, deadline=None)
@given(rows=st.lists(forest_intervals(t=80), min_size=2, max_size=2), seed=st.integers(0, 3))
def test_xla_paths_match_oracle_on_random_forests(name, rows, seed):
  tin, tout = forest_batch(rows)
  _check_against_oracle(name, tin, tout, seed=seed)


@pytest.mark.parametrize("name", PALLAS_IMPLS)
@settings(max_examples=3, deadline=None)
@given(rows=st.lists(forest_intervals(t=80), min_size=2, max_size=2))
def test_pallas_kernels_match_oracle_on_random_forests(name, rows):
  tin, tout = forest_batch(rows)
  _check_against_oracle(name, tin, tout)


def _flat_packed():
  # Row 0: segments of 30, 1 and 40 tokens + 9 padding; row 1: one segment of 80.
  seg = np.zeros((2, 80), np.int32)
  seg[0, :30], seg[0, 30], seg[0, 31:71] = 1, 2, 3
  seg[1, :] = 5
  mask = intervals_from_segment_ids(jnp.asarray(seg))
  return np.asarray(mask.tin), np.asarray(mask.tout)


@pytest.mark.parametrize("name", list(IMPLS))
def test_flat_packed_sequences(name):
  tin, tout = _flat_packed()
  _check_against_oracle(name, tin, tout)


@pytest.mark.parametrize("name", list(IMPLS))
def test_padding_rows_are_exactly_zero_with_zero_gradient(name):
  # Row 0: a tree of 50 tokens then 30 padding tokens; row 1: all padding.
  tin0, tout0 = intervals_from_climbs([0, 0, 2, 0, 5, 1], 50, 80)
  tin1, tout1 = intervals_from_climbs([0], 0, 80)
  tin, tout = forest_batch([(tin0, tout0), (tin1, tout1)])
  out, (dq, dk, dv) = _check_against_oracle(name, tin, tout)
  for x in (out, dq, dk, dv):
    assert np.all(np.isfinite(np.asarray(x, np.float32)))
  assert np.all(np.asarray(out)[0, 50:] == 0) and np.all(np.asarray(out)[1] == 0)
  for g in (dq, dk, dv):  # padding queries get no gradient, padding keys/values give none
    assert np.all(np.asarray(g)[0, 50:] == 0) and np.all(np.asarray(g)[1] == 0)


@pytest.mark.parametrize("name", ["reference", "blocksparse", "pallas_tpu", "pallas_gpu"])
def test_grouped_query_attention_four_heads_per_kv_head(name):
  # The other tests use Hq = 2 x Hkv; here Hq = 4 x Hkv.
  tin, tout = forest_batch([intervals_from_climbs([0, 0, 0, 3, 0, 1, 9], 77, 80),
                            intervals_from_climbs([0, 1, 0, 0, 2], 80, 80)])
  _check_against_oracle(name, tin, tout, hq=4, hkv=1)


def test_head_dim_not_a_power_of_two_on_the_gpu_kernel():
  # Triton tiles are powers of two: the GPU path pads D = 12 to 16 (and must keep 1/sqrt(12)).
  tin, tout = forest_batch([intervals_from_climbs([0, 0, 4], 70, 80)])
  _check_against_oracle("pallas_gpu", tin, tout, hq=2, hkv=2, d=12)


def test_arbitrary_intervals_not_in_dfs_order():
  # The rule alone defines visibility; nothing may assume causal order or tree shape.
  rng = np.random.default_rng(3)
  tin = rng.integers(0, 60, size=(2, 80)).astype(np.int32)
  tout = (tin + rng.integers(-5, 40, size=(2, 80)).clip(0)).astype(np.int32)
  for name in ("reference", "blocksparse", "pallas_tpu_bounds"):
    _check_against_oracle(name, tin, tout)


@pytest.mark.parametrize("name", [
    "reference", "blocksparse",
    pytest.param("pallas_tpu", marks=pytest.mark.slow),
    pytest.param("pallas_gpu", marks=pytest.mark.slow)])
def test_bfloat16_inputs(name):
  tin, tout = forest_batch([intervals_from_climbs([0, 0, 0, 2, 0, 7], 80, 80)])
  q, k, v, w = _inputs(1, 1, 80, 4, 2, 16, jnp.bfloat16)
  up = lambda x: x.astype(jnp.float32)
  (_, want_out), want_grads = _value_and_grads("oracle")(up(q), up(k), up(v),
                                                        _mask(tin, tout, False), w)
  (_, got_out), got_grads = _value_and_grads(name)(q, k, v, _mask(tin, tout, IMPLS[name][1]), w)
  assert got_out.dtype == jnp.bfloat16
  assert all(g.dtype == jnp.bfloat16 for g in got_grads)
  np.testing.assert_allclose(up(got_out), want_out, atol=3e-2, rtol=3e-2)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(up(got), want, atol=1e-1, rtol=5e-2)


@pytest.mark.slow
def test_pallas_tpu_faithful_interpreter():
  # The TPU simulator poisons uninitialized memory with NaN and checks bounds: a small case.
  tin, tout = forest_batch([intervals_from_climbs([0, 0, 3, 0, 1], 28, 32)])
  q, k, v, w = _inputs(2, 1, 32, 2, 1, 8)
  fn = functools.partial(pallas_tpu.tree_attention, block_sizes=BlockSizes(16, 16),
                         interpret=pltpu.InterpretParams())
  mask = _mask(tin, tout, True, BlockSizes(16, 16))
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, mask) * w)
  got = jax.jit(jax.value_and_grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
  want = jax.value_and_grad(loss(dense_attention), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=1e-5)
  for g, h in zip(got[1], want[1]):
    np.testing.assert_allclose(g, h, atol=GRAD_TOL, rtol=GRAD_TOL)


def test_model_resolves_every_implementation_by_name():
  tin, tout = forest_batch([intervals_from_climbs([0, 2, 0], 60, 64)])
  q, k, v, _ = _inputs(4, 1, 64, 2, 2, 8)
  want = dense_attention(q, k, v, _mask(tin, tout, False))
  # Default block sizes on CPU are 64 x 64 for every implementation and for block_layout.
  blocks = layout.block_layout(tin, tout)
  for name in ("reference", "blocksparse", "pallas"):
    mask = AttentionMask(tin=jnp.asarray(tin), tout=jnp.asarray(tout), blocks=blocks)
    got = jax.jit(get_attention_fn(name))(q, k, v, mask)
    np.testing.assert_allclose(got, want, atol=FWD_TOL, rtol=FWD_TOL)


def test_layout_with_other_block_sizes_is_rejected_clearly():
  tin, tout = forest_batch([intervals_from_climbs([0], 64, 64)])
  q, k, v, _ = _inputs(0, 1, 64, 2, 2, 8)
  mask = _mask(tin, tout, True, BlockSizes(16, 16))
  for fn in (blocksparse.tree_attention, pallas.tree_attention):
    with pytest.raises(ValueError, match="same block sizes"):
      fn(q, k, v, mask)


def test_pallas_dispatch_picks_a_variant_per_backend():
  assert jax.default_backend() == "cpu"
  tin, tout = forest_batch([intervals_from_climbs([0, 1], 64, 64)])
  q, k, v, _ = _inputs(5, 1, 64, 2, 2, 8)
  mask = _mask(tin, tout, False)
  want = dense_attention(q, k, v, mask)
  for variant in ("tpu", "gpu"):
    got = jax.jit(functools.partial(pallas.tree_attention, variant=variant))(q, k, v, mask)
    np.testing.assert_allclose(got, want, atol=FWD_TOL, rtol=FWD_TOL)
  with pytest.raises(ValueError, match="unknown Pallas variant"):
    pallas.tree_attention(q, k, v, mask, variant="cuda")
