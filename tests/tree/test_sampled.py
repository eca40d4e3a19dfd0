"""kat_jax.tree.sampled: event tags of sampled tokens and trees grown by the sampler."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
from kat_jax.tree import build, sampled

VOCAB = 64


def _model_and_params():
  c = get_preset("tiny")
  c.update(dict(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                head_dim=16, mlp_dim=64))
  model = Transformer(ModelConfig.from_config(c))
  tok = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), tok, tok,
                               intervals_from_segment_ids(jnp.ones_like(tok)))["params"])
  return model, params


def test_event_tags():
  spans = {100: (101, build.TAG_TOOL_CALL), 102: (103, build.TAG_TOOL_RESULT)}
  np.testing.assert_array_equal(sampled.event_tags([5, 100, 7, 8, 101, 9, 102, 4], spans),
                                [0, 1, 1, 1, 1, 0, 2, 2])
  np.testing.assert_array_equal(sampled.event_tags([101, 103, 5], spans), [0, 0, 0])


def test_sampled_trees_shape():
  from kat_jax.sample import Sampler
  model, params = _model_and_params()
  prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
  sampler = Sampler(model, params, max_len=32, prefill_bucket=8, output_bucket=8)
  trees = sampled.sample_trees(sampler, prompts, [np.zeros(len(p), np.int32) for p in prompts],
                             jax.random.key(0), branches=(2, 3), turn_tokens=(6, 5), span_ids={})
  for p, tree in zip(prompts, trees):
    assert tree.num_traj == 6
    np.testing.assert_array_equal(tree.lengths, len(p) + 11)
    assert tree.n_tree == len(p) + 2 * 6 + 6 * 5      # prompt once, each turn once
    w, e = tree.fields["weight"], tree.fields["entropy"]
    np.testing.assert_array_equal(w[:, :len(p)], 0.0)
    np.testing.assert_array_equal(w[:, len(p):], 1.0)
    np.testing.assert_array_equal(e[:, :len(p)], 0.0)
    assert (e[:, len(p):] > 0).all() and (e <= np.log(VOCAB) + 1e-4).all()
    for k in range(tree.num_traj):
      np.testing.assert_array_equal(tree.trajectory_tokens(k)[:len(p)], p)
