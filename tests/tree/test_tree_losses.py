"""Tree training is exact: one forward pass over a serialized tree gives every trajectory's log-probs
and entropies (fork labels included), and SFT / PPO losses with token- or sequence-mean normalizers
have the flat batch's value and parameter gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
from kat_jax.train import losses
from kat_jax.tree import batch as tree_batch
from kat_jax.tree import build
from kat_jax.tree import logprobs as tree_lp
from configs.base import train_config

K, L, T = 6, 20, 96          # fixed padded sizes: one compilation for all examples
VOCAB = 64


@pytest.fixture(scope="module")
def model_and_params():
  c = get_preset("tiny")
  c.vocab_size = VOCAB
  c.num_layers = 2
  cfg = ModelConfig.from_config(c)
  model = Transformer(cfg)
  tok = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), tok, tok,
                               intervals_from_segment_ids(jnp.ones_like(tok)))["params"])
  return model, params


@st.composite
def trajectory_sets(draw):
  """Random trajectories sharing prefixes: grow each from a random earlier one's prefix."""
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  k = draw(st.integers(1, K))
  trajs = []
  for i in range(k):
    length = int(rng.integers(1, L + 1))
    if trajs and rng.random() < 0.8:
      base = trajs[int(rng.integers(len(trajs)))]
      cut = int(rng.integers(0, len(base) + 1))
      tail = rng.integers(0, 4 if rng.random() < 0.5 else VOCAB, size=max(length - cut, 0))
      t = list(base[:cut]) + list(tail)
    else:
      t = list(rng.integers(0, VOCAB, size=length))
    trajs.append([int(x) for x in (t or [int(rng.integers(VOCAB))])][:L])
  weights = [(rng.random(len(t)) < 0.7).astype(np.float32) for t in trajs]
  adv = [np.full(len(t), rng.normal(), np.float32) for t in trajs]
  old = [(rng.normal(size=len(t)) * 0.3 - 3.0).astype(np.float32) for t in trajs]
  return trajs, dict(weight=weights, advantage=adv, old_logp=old)


def _tree_arrays(trajs, fields):
  tree = build.build_tree(trajs, fields=fields)
  b = tree_batch.batch_trees([tree], max_tokens=T, max_nodes=T, max_traj=K, max_len=L)
  return tree, jax.tree.map(jnp.asarray, tree_lp.batch_to_arrays(b))


def _flat_arrays(trajs, fields):
  """The flat batch: K separate padded sequences and the same per-trajectory fields."""
  tokens = np.zeros((K, L), np.int32)
  seg = np.zeros((K, L), np.int32)
  out = {f"field/{n}": np.zeros((1, K, L), np.float32) for n in fields}
  for k, t in enumerate(trajs):
    tokens[k, :len(t)] = t
    seg[k, :len(t)] = 1
    for n, v in fields.items():
      out[f"field/{n}"][0, k, :len(t)] = v[k]
  valid = (seg[:, 1:] > 0)[None]
  out.update(tokens=tokens, segment_ids=seg, pred_labels=tokens[None, :, 1:], pred_valid=valid)
  return jax.tree.map(jnp.asarray, out)


def _flat_pairs(model, params, flat):
  pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (K, L))
  logits = model.apply({"params": params}, flat["tokens"], pos,
                       intervals_from_segment_ids(flat["segment_ids"])).logits
  logp, ent = tree_lp.pairs_from_flat(logits, flat["tokens"])
  return logp[None], ent[None]


def _loss(logp, batch, cfg, normalizer):
  w = losses.pair_weights(batch)
  per_pair, _ = losses.policy_pair_loss(logp, batch, cfg)
  num, den = losses.reduce_pairs(per_pair, w, normalizer)
  return num / den


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=trajectory_sets())
def test_tree_logprobs_equal_flat(model_and_params, data):
  model, params = model_and_params
  trajs, fields = data
  tree, tb = _tree_arrays(trajs, fields)
  flat = _flat_arrays(trajs, fields)
  out = tree_lp.tree_logprobs(model.apply, params, tb)
  flat_logp, flat_ent = _flat_pairs(model, params, flat)
  valid = np.asarray(flat["pred_valid"])
  np.testing.assert_array_equal(np.asarray(tb["pred_valid"]), valid)
  np.testing.assert_allclose(np.asarray(out["logp"])[valid], np.asarray(flat_logp)[valid], atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["entropy"])[valid], np.asarray(flat_ent)[valid],
                             atol=1e-5)
  assert valid.sum() == sum(len(t) - 1 for t in trajs)   # every (row, label) pair, forks included


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=trajectory_sets(), normalizer=st.sampled_from(["token", "sequence"]),
       objective=st.sampled_from(["nll", "ppo"]))
def test_tree_loss_and_grads_equal_flat(model_and_params, data, normalizer, objective):
  model, params = model_and_params
  trajs, fields = data
  _, tb = _tree_arrays(trajs, fields)
  flat = _flat_arrays(trajs, fields)
  cfg = train_config(objective=objective, clip_eps=0.2)
  if float(losses.pair_weights(flat).sum()) == 0:
    return

  def tree_loss(p):
    return _loss(tree_lp.tree_logprobs(model.apply, p, tb)["logp"], tb, cfg, normalizer)

  def flat_loss(p):
    return _loss(_flat_pairs(model, p, flat)[0], flat, cfg, normalizer)

  tv, tg = jax.value_and_grad(tree_loss)(params)
  fv, fg = jax.value_and_grad(flat_loss)(params)
  np.testing.assert_allclose(tv, fv, rtol=1e-5, atol=1e-6)
  gnorm = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(fg))
  for a, b in zip(jax.tree.leaves(tg), jax.tree.leaves(fg)):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(gnorm, 1e-3), rtol=1e-4)


def test_registered_tree_loss_matches_reducer(model_and_params):
  """The loss the train step uses (numerator / denominator) equals the reducer applied directly."""
  model, params = model_and_params
  trajs = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 7, 7, 7, 7]]
  fields = dict(weight=[np.ones(len(t), np.float32) for t in trajs])
  _, tb = _tree_arrays(trajs, fields)
  cfg = train_config(objective="nll")
  ctx = losses.LossContext(apply_fn=model.apply, config=cfg)
  for name, normalizer in (("tree", "token"), ("tree_sequence_mean", "sequence")):
    loss = losses.get_loss(name)
    num, _ = loss.numerator(params, tb, ctx)
    direct = _loss(tree_lp.tree_logprobs(model.apply, params, tb)["logp"], tb, cfg, normalizer)
    np.testing.assert_allclose(num / loss.denominator(tb), direct, rtol=1e-6)
  # token mean: 4 + 3 + 5 pairs, the shared prefix counted once per trajectory.
  assert float(losses.get_loss("tree").denominator(tb)) == 12.0


def test_perturbing_one_branch_leaves_others_unchanged(model_and_params):
  model, params = model_and_params
  a = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 1, 2], [5, 6, 3, 3]]
  b = [a[0], [5, 6, 7, 1, 60], [5, 6, 3, 3]]     # change the last token of branch 1
  fields = lambda ts: dict(weight=[np.ones(len(t), np.float32) for t in ts])
  _, ta = _tree_arrays(a, fields(a))
  _, tb = _tree_arrays(b, fields(b))
  la = np.asarray(tree_lp.tree_logprobs(model.apply, params, ta)["logp"])[0]
  lb = np.asarray(tree_lp.tree_logprobs(model.apply, params, tb)["logp"])[0]
  # Trees are serialized with children sorted by token, so trajectory order k is kept.
  np.testing.assert_allclose(la[0], lb[0], atol=1e-6)
  np.testing.assert_allclose(la[2], lb[2], atol=1e-6)
  np.testing.assert_allclose(la[1, :3], lb[1, :3], atol=1e-6)
  assert abs(la[1, 3] - lb[1, 3]) > 1e-4


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=trajectory_sets(), chunk=st.sampled_from([7, 32]))
def test_chunked_output_head_equals_full_logits(model_and_params, data, chunk):
  # logits_chunk never builds [T, V]: same log-probs, entropies and gradients (T = 96: chunk 7
  # leaves a ragged last chunk).
  model, params = model_and_params
  trajs, fields = data
  _, tb = _tree_arrays(trajs, fields)
  full = tree_lp.tree_logprobs(model.apply, params, tb)
  fused = tree_lp.tree_logprobs(model.apply, params, tb, logits_chunk=chunk)
  valid = np.asarray(tb["pred_valid"])
  for key in ("logp", "entropy"):
    np.testing.assert_allclose(np.asarray(fused[key])[valid], np.asarray(full[key])[valid],
                               atol=1e-5)
  np.testing.assert_allclose(fused["row_entropy"], full["row_entropy"], atol=1e-5)
  cfg = train_config(objective="ppo", clip_eps=0.2)
  if float(losses.pair_weights(tb).sum()) == 0:
    return

  def loss(p, c):
    return _loss(tree_lp.tree_logprobs(model.apply, p, tb, logits_chunk=c)["logp"], tb, cfg,
                 "token")

  fv, fg = jax.value_and_grad(loss)(params, 0)
  cv, cg = jax.value_and_grad(loss)(params, chunk)
  np.testing.assert_allclose(cv, fv, rtol=1e-5, atol=1e-6)
  gnorm = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(fg))
  for a, b in zip(jax.tree.leaves(cg), jax.tree.leaves(fg)):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(gnorm, 1e-3), rtol=1e-4)


def test_chunked_output_head_untied_and_memory():
  # An untied head takes the label's column of lm_head; with a Qwen-sized vocabulary the chunked
  # loss's compiled temp memory stays well below one [T, V] float32 array (what remains is
  # O(V x d): the head's gradient), the full one does not.
  c = get_preset("tiny")
  c.update(dict(vocab_size=151936, tie_embeddings=False, num_layers=1))
  model = Transformer(ModelConfig.from_config(c))
  rng = np.random.default_rng(0)
  prompt = list(rng.integers(0, 1000, 200))
  trajs = [prompt + list(rng.integers(0, 1000, 200)) for _ in range(4)]
  tree = build.build_tree(trajs)
  t = 1024
  tb = jax.tree.map(jnp.asarray, tree_lp.batch_to_arrays(tree_batch.batch_trees(
      [tree], max_tokens=t, max_nodes=8, max_traj=4, max_len=400)))
  tok = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), tok, tok,
                               intervals_from_segment_ids(jnp.ones_like(tok)))["params"])
  full = tree_lp.tree_logprobs(model.apply, params, tb)
  fused = tree_lp.tree_logprobs(model.apply, params, tb, logits_chunk=64)
  valid = np.asarray(tb["pred_valid"])
  np.testing.assert_allclose(np.asarray(fused["logp"])[valid], np.asarray(full["logp"])[valid],
                             atol=2e-5)

  def temp_bytes(chunk):
    fn = jax.jit(jax.grad(lambda p: jnp.sum(jnp.where(
        tb["pred_valid"], tree_lp.tree_logprobs(model.apply, p, tb, logits_chunk=chunk)["logp"],
        0.0))))
    return fn.lower(params).compile().memory_analysis().temp_size_in_bytes

  one_logits = t * c.vocab_size * 4
  assert temp_bytes(0) > one_logits
  assert temp_bytes(64) < one_logits / 2
