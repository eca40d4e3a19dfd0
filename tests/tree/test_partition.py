"""A tree split into parts at node boundaries (K/V relayed forward, their gradients back) has the
whole tree's loss and parameter gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
from kat_jax.train import losses
from kat_jax.tree import batch as tree_batch, build, partition
from kat_jax.tree import logprobs as tree_lp


@pytest.fixture(scope="module")
def model_and_params():
  c = get_preset("tiny")
  c.vocab_size, c.num_layers = 64, 2
  cfg = ModelConfig.from_config(c)
  model = Transformer(cfg)
  tok = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), tok, tok,
                               intervals_from_segment_ids(jnp.ones_like(tok)))["params"])
  return cfg, model, params


def _tree(seed):
  rng = np.random.default_rng(seed)
  prompt = list(rng.integers(0, 64, 9))
  trajs = []
  for _ in range(4):
    mid = list(rng.integers(0, 64, int(rng.integers(1, 6))))
    for _ in range(2):
      trajs.append(prompt + mid + list(rng.integers(0, 64, int(rng.integers(1, 7)))))
  adv = [np.full(len(t), rng.normal(), np.float32) for t in trajs]
  return build.build_tree(trajs, fields=dict(advantage=adv))


@pytest.mark.parametrize("budget", [6, 1000])
def test_partitioned_equals_whole(model_and_params, budget):
  cfg, model, params = model_and_params
  tree = _tree(budget)
  parts = partition.partition_nodes(tree, budget)
  assert parts[0][0] == 0 and parts[-1][1] == tree.n_tree
  assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
  if budget == 6:
    assert len(parts) > 3
  node_bounds = set(tree.node_start.tolist()) | {tree.n_tree}
  assert all(s in node_bounds and e in node_bounds for s, e in parts)   # cuts at node boundaries

  rows, _, labels, valid = build.prediction_index(tree)
  adv = tree.fields["advantage"][:, 1:]
  w = valid.astype(np.float32) * adv / valid.sum()       # token-mean advantage-weighted NLL
  loss_fn = lambda logp: -logp

  tb = jax.tree.map(jnp.asarray, tree_lp.batch_to_arrays(tree_batch.batch_trees([tree])))

  def whole(p):
    logp = tree_lp.tree_logprobs(model.apply, p, tb)["logp"][0]
    return jnp.sum(jnp.asarray(w) * loss_fn(logp))

  ref_v, ref_g = jax.value_and_grad(whole)(params)
  v, g = partition.partitioned_value_and_grad(
      model.apply, cfg, params, tree, parts, loss_fn, dict(rows=rows, labels=labels, weights=w))
  np.testing.assert_allclose(v, ref_v, rtol=1e-5, atol=1e-6)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref_g))
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(a, b, atol=2e-5 * scale, rtol=1e-4)
