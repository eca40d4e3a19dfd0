"""experiments.bench_prune_signal on a tiny random model: fractions lie in [0, 1], the full budget
keeps exactly everything (every fraction, the gradient norm ratio and cosine are exactly 1), an
empty budget keeps nothing, keep masks respect the per-tree budget, the entropy fraction equals a
per-trajectory recount, and sampled trees have the requested shape and fields."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_prune_signal as bench
from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
from kat_jax.tree import batch as batch_lib
from kat_jax.tree import build
from kat_jax.tree.logprobs import batch_to_arrays

VOCAB = 64
PROMPT = 6


@pytest.fixture(scope="module")
def model_and_params():
  c = get_preset("tiny")
  c.update(dict(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                head_dim=16, mlp_dim=64))
  model = Transformer(ModelConfig.from_config(c))
  tok = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), tok, tok,
                               intervals_from_segment_ids(jnp.ones_like(tok)))["params"])
  return model, params, bench.make_grad_fn(model.apply)


def _trees(seed=0):
  """Two-level trees like the benchmark's: prompt (weight 0, entropy 0), then 3 × 2 branches."""
  rng = np.random.default_rng(seed)
  trees = []
  for _ in range(2):
    prompt = list(rng.integers(0, VOCAB, PROMPT))
    trajs, ents = [], []
    for _ in range(3):
      first, e1 = list(rng.integers(0, VOCAB, 5)), rng.uniform(0.1, 3.0, 5)
      for _ in range(2):
        n2 = int(rng.integers(2, 6))
        trajs.append(prompt + first + list(rng.integers(0, VOCAB, n2)))
        ents.append(np.concatenate([np.zeros(PROMPT), e1, rng.uniform(0.1, 3.0, n2)]))
    weight = [np.concatenate([np.zeros(PROMPT), np.ones(len(t) - PROMPT)]) for t in trajs]
    trees.append(build.build_tree(trajs, fields={"weight": weight, "entropy": ents}))
  return trees


FRACTIONS = ("kept_token_fraction", "kept_pair_fraction", "entropy_fraction")


def test_retention_records(model_and_params):
  model, params, grad_fn = model_and_params
  trees = _trees()
  records = bench.signal_retention(model.apply, params, trees, budgets=(0.0, 0.4, 1.0),
                                   random_seeds=2, grad_fn=grad_fn)
  assert {(r["method"], r["budget_fraction"]) for r in records} == {
      (m, f) for m in bench.METHODS for f in (0.0, 0.4, 1.0)}
  for r in records:
    for key in FRACTIONS:
      assert 0.0 <= r[key] <= 1.0, r
    assert r["grad_norm_ratio"] >= 0.0 and -1.0 <= r["grad_cosine"] <= 1.0, r
    if r["budget_fraction"] == 1.0:   # everything kept: exactly the unpruned values
      for key in FRACTIONS + ("grad_norm_ratio", "grad_cosine"):
        assert r[key] == 1.0, (key, r)
    if r["budget_fraction"] == 0.0:   # nothing kept (no events, so nothing mandatory)
      for key in FRACTIONS + ("grad_norm_ratio", "grad_cosine"):
        assert r[key] == 0.0, (key, r)
  mid = [r for r in records if r["budget_fraction"] == 0.4]
  assert all(0.0 < r["kept_token_fraction"] <= 0.4 for r in mid)
  assert all(r["grad_norm_ratio"] > 0.0 for r in mid)


def test_keep_masks_respect_budget_and_entropy_recount(model_and_params):
  model, params, grad_fn = model_and_params
  trees = _trees()
  batch = jax.tree.map(jnp.asarray, batch_to_arrays(batch_lib.batch_trees(trees)))
  ent_bt = batch_lib.per_tree_token(batch, batch["field/entropy"])
  budgets = (0.2, 0.5, 0.8)
  records = bench.signal_retention(model.apply, params, trees, budgets=budgets, random_seeds=1,
                                   methods=("entropy",), grad_fn=grad_fn)
  for f, record in zip(budgets, records):
    for method in bench.METHODS:
      keep = np.asarray(bench.keep_mask(batch, ent_bt, method, f, seed=3).keep_mask)
      kept_e, total_e = 0.0, 0.0
      for b, tree in enumerate(trees):
        assert not keep[b, tree.n_tree:].any()
        assert keep[b].sum() <= np.floor(np.float32(f) * np.float32(tree.n_tree)), (method, f)
        for k in range(tree.num_traj):      # recount over trajectories (flat-loss weighting)
          for j in range(PROMPT, tree.lengths[k]):
            e = tree.fields["entropy"][k, j]
            total_e += e
            kept_e += e * keep[b, tree.row_map[k, j]]
      if method == "entropy":   # the benchmark's pair-array count of the same quantity
        np.testing.assert_allclose(record["entropy_fraction"], kept_e / total_e, rtol=1e-6)
