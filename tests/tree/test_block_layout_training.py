"""Training batches carry the tree-attention block layout: the tree-SFT iterator adds the layout
``config.model.attention_impl`` reads (blocksparse, pallas; none for xla), exact for its batch; the
block-sparse path computes exactly the (query block, key block) pairs of that layout — counted by
instrumenting the kernel's chunk map, forward and backward — and fewer than the reference path;
the Trainer's step with it equals the reference path; a tree batch without it is refused clearly."""
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sft_tiny_tree
from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
from kat_jax.train import losses
from kat_jax.train.trainer import Trainer
from kat_jax.tree import build, layout as tree_layout
from kat_jax.tree.sft_data import TreeSFTIterator, default_tree_config
from kernels.tree_attention import blocksparse, layout as kernel_layout
from configs.base import train_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "data"))
from byte_tokenizer import ByteTokenizer  # noqa: E402

T, BLOCK = 512, 64   # the CPU default block size of both implementations
NB = T // BLOCK


def _tree_cfg():
  c = default_tree_config()
  c.max_tokens, c.max_len = T, 500   # byte tokens: the direct solution and a debug trajectory
  return c


def _iterator(attention_impl, batch_size=2, split="train"):
  return TreeSFTIterator(_tree_cfg(), ByteTokenizer(), split=split, batch_size=batch_size,
                         seed=0, attention_impl=attention_impl)


def _token_block_mask(tin, tout):
  """bool [B, nq, nk] from the dense token mask: block pair holds a visible (query, key) pair."""
  vis = np.stack([build.interval_mask(a, b) for a, b in zip(tin, tout)])
  return vis.reshape(len(tin), NB, BLOCK, NB, BLOCK).any(axis=(2, 4))


def test_sft_batches_carry_the_layout_their_attention_reads():
  bs, pl, xla = _iterator("blocksparse"), _iterator("pallas"), _iterator("xla")
  capacity = 0
  for _ in range(3):
    a, b, c = next(bs), next(pl), next(xla)
    assert tree_layout.LAYOUT_KEY not in c
    for key in c:   # the layout is the only addition
      np.testing.assert_array_equal(a[key], c[key])
      np.testing.assert_array_equal(b[key], c[key])
    assert sorted(a["attention_blocks"]) == ["fwd_chunk_kv", "fwd_chunk_q", "kv_counts", "kv_ids"]
    assert sorted(b["attention_blocks"]) == sorted(kernel_layout.LIST_KEYS)
    exact = _token_block_mask(c["tin"], c["tout"])
    for blocks in (a["attention_blocks"], b["attention_blocks"]):
      assert blocks["kv_ids"].shape == (2, NB, NB)
      np.testing.assert_array_equal(blocks["kv_counts"], exact.sum(-1))
    visits = kernel_layout.chunk_visit_counts(a["attention_blocks"]["fwd_chunk_q"],
                                              a["attention_blocks"]["fwd_chunk_kv"], NB, NB)
    np.testing.assert_array_equal(visits, exact.astype(np.int32))   # each needed pair once
    assert exact.sum() < exact.size / 2   # branches and padding: well below every block pair
    # The chunk count never shrinks (the step recompiles only when more chunks are needed).
    assert a["attention_blocks"]["fwd_chunk_q"].shape[1] >= capacity
    capacity = a["attention_blocks"]["fwd_chunk_q"].shape[1]
    for impl, batch in (("blocksparse", a), ("pallas", b), ("xla", c)):
      tree_layout.check_attention_blocks(batch, impl)


def test_a_tree_batch_without_its_layout_is_refused_naming_the_fix():
  batch = next(_iterator("xla"))
  for impl in ("blocksparse", "pallas"):
    with pytest.raises(ValueError, match=rf"attention_impl='{impl}'.*no 'attention_blocks'.*"
                                         r"with_attention_blocks\(batch"):
      tree_layout.check_attention_blocks(batch, impl)
  wrong = dict(batch, attention_blocks=kernel_layout.block_layout(batch["tin"], batch["tout"],
                                                                  16, 16))
  with pytest.raises(ValueError, match="same block sizes"):
    tree_layout.check_attention_blocks(wrong, "blocksparse")
  flat = {"inputs": np.zeros((2, 8), np.int32), "segment_ids": np.ones((2, 8), np.int32)}
  tree_layout.check_attention_blocks(flat, "blocksparse")      # flat LM batches: no tree layout
  tree_layout.check_attention_blocks(batch, "reference")
  assert sorted(tree_layout.with_attention_blocks(batch, "xla")) == sorted(batch)


@pytest.fixture()
def visit_log(monkeypatch):
  """Records the forward chunk lists every block-sparse forward and backward pass computes."""
  log = []
  inner = blocksparse._map_chunks

  def recording(fn, fwd_q, fwd_kv, chunks_per_step, dummy_kv):
    jax.debug.callback(lambda q, kv: log.append((np.asarray(q), np.asarray(kv))), fwd_q, fwd_kv)
    return inner(fn, fwd_q, fwd_kv, chunks_per_step, dummy_kv)

  monkeypatch.setattr(blocksparse, "_map_chunks", recording)
  return log


def _model(attention_impl):
  c = get_preset("tiny")
  c.vocab_size, c.num_layers, c.attention_impl = 512, 1, attention_impl
  return Transformer(ModelConfig.from_config(c))


def test_blocksparse_computes_exactly_the_layout_blocks_and_the_reference_loss(visit_log):
  batch = next(_iterator("blocksparse"))
  params = nn.unbox(_model("xla").init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                       jnp.zeros((1, 8), jnp.int32),
                                       intervals_from_segment_ids(jnp.ones((1, 8))))["params"])
  loss = losses.get_loss("tree")

  def loss_and_grads(impl, b):
    ctx = losses.LossContext(apply_fn=_model(impl).apply, config=train_config(objective="nll"))
    fn = jax.value_and_grad(lambda p: loss.numerator(p, b, ctx)[0] / loss.denominator(b))
    return jax.jit(fn)(params)

  device_batch = jax.tree.map(jnp.asarray, batch)
  got, got_g = loss_and_grads("blocksparse", device_batch)
  jax.effects_barrier()
  assert len(visit_log) == 2   # one layer: its forward pass and its backward pass
  exact = _token_block_mask(batch["tin"], batch["tout"])
  blocks = batch["attention_blocks"]
  for fwd_q, fwd_kv in visit_log:
    visits = kernel_layout.chunk_visit_counts(fwd_q, fwd_kv, NB, NB)
    np.testing.assert_array_equal(visits, exact.astype(np.int32))
    assert visits.sum() == blocks["kv_counts"].sum() < batch["tin"].shape[0] * NB * NB
  del visit_log[:]
  no_layout = {k: v for k, v in device_batch.items() if k != "attention_blocks"}
  want, want_g = loss_and_grads("reference", no_layout)
  jax.effects_barrier()
  assert not visit_log
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _trainer_step(tmp_path, attention_impl, batch):
  c = sft_tiny_tree.get_config()
  c.model.update(dict(vocab_size=512, num_layers=1, attention_impl=attention_impl))
  c.tree = _tree_cfg()
  c.mesh.update(dict(data=1, fsdp=2, tensor=4))
  c.train.update(dict(batch_size=2, seq_len=T, progress_bar=False))
  trainer = Trainer(c, str(tmp_path / attention_impl))
  try:
    metrics = jax.device_get(trainer.step(batch))
    return metrics, jax.device_get(trainer.params)
  finally:
    trainer.close()


@pytest.mark.slow
def test_trainer_step_with_the_layout_equals_the_reference_path(tmp_path):
  batch = next(_iterator("blocksparse"))
  got, got_params = _trainer_step(tmp_path, "blocksparse", batch)
  want, want_params = _trainer_step(
      tmp_path, "reference", {k: v for k, v in batch.items() if k != "attention_blocks"})
  assert got["weight_sum"] == want["weight_sum"] > 0
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_padding_the_chunk_lists_changes_no_visit():
  batch = next(_iterator("xla"))
  blocks = tree_layout.attention_blocks(batch["tin"], batch["tout"], "blocksparse")
  c = blocks["fwd_chunk_q"].shape[1]
  padded = tree_layout.attention_blocks(batch["tin"], batch["tout"], "blocksparse",
                                        min_capacity=c + 5)
  assert padded["fwd_chunk_q"].shape[1] == c + 5
  np.testing.assert_array_equal(
      kernel_layout.chunk_visit_counts(padded["fwd_chunk_q"], padded["fwd_chunk_kv"], NB, NB),
      kernel_layout.chunk_visit_counts(blocks["fwd_chunk_q"], blocks["fwd_chunk_kv"], NB, NB))
  with pytest.raises(ValueError, match="cannot pad"):
    kernel_layout.pad_chunks(blocks, c - 1)
