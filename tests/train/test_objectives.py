"""Policy objectives, KL estimators, the value loss and the aggregation modes equal independent
numpy references; the first update's ratios are exactly 1; GSPO's gradient is the sequence
objective's; dual clip bounds the loss of negative-advantage pairs; zero advantages give zero
policy gradient; the registered tree loss aggregates by config.train.loss_agg and stays exact when
the batch is split into micro-batches."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_base_config, train_config
from kat_jax import config as config_lib
from kat_jax.train import losses, objectives
from kat_jax.tree import batch as tree_batch
from kat_jax.tree import build
from kat_jax.tree.logprobs import batch_to_arrays, tree_logprobs

B, K, L = 2, 3, 7                  # pairs: [B, K, L-1]
T = 16                             # tree tokens of the keep mask


def _pad(pairs):
  """A per-pair array [.., L-1] as the per-token field [.., L] (token 0 carries junk: fields are
  read for the token each pair predicts)."""
  return np.concatenate([np.full(pairs.shape[:-1] + (1,), 7.5, np.float32), pairs], axis=-1)


def _batch(seed=0, **pairs):
  """Random pair layout: validity, loss weights and a pruning keep mask; ``pairs`` are per-pair
  fields [B, K, L-1] (numpy)."""
  rng = np.random.default_rng(seed)
  valid = np.ones((B, K, L - 1), bool)
  valid[0, 2, 4:] = False                     # a short trajectory
  valid[1, 2] = False                         # a padding trajectory
  weight = (rng.random((B, K, L - 1)) < 0.8).astype(np.float32)
  weight[0, 1] = 0.0                          # a fully masked trajectory
  weight[1, 0, 0] = 0.5                       # a fractional weight
  label_rows = rng.integers(0, T, (B, K, L - 1)).astype(np.int32)
  keep = rng.random((B, T)) < 0.85
  batch = {"pred_labels": np.zeros((B, K, L - 1), np.int32), "pred_valid": valid,
           "pred_label_rows": label_rows, "keep": keep, "field/weight": _pad(weight)}
  batch.update({f"field/{name}": _pad(np.asarray(v, np.float32)) for name, v in pairs.items()})
  w = weight * valid * keep[np.arange(B)[:, None, None], label_rows]
  return jax.tree.map(jnp.asarray, batch), w


def _rand(seed, scale=1.0, shift=0.0):
  return (np.random.default_rng(seed).normal(size=(B, K, L - 1)) * scale + shift).astype(
      np.float32)


def _ppo_reference(ratio, adv, low, high, dual=0.0):
  ratio, adv = np.asarray(ratio, np.float64), np.asarray(adv, np.float64)
  out = np.empty_like(ratio)
  for i in np.ndindex(ratio.shape):
    r, a = ratio[i], adv[i]
    surrogate = min(r * a, min(max(r, 1 - low), 1 + high) * a)
    if dual and a < 0:
      surrogate = max(surrogate, dual * a)
    out[i] = -surrogate
  return out


# ------------------------------------------------------------------------------------ registry

def test_registry_names_and_errors():
  assert {"nll", "ppo", "gspo", "decoupled_ppo"} <= set(objectives.names())
  assert objectives.get("ppo") is objectives.ppo
  with pytest.raises(ValueError, match=r"unknown objective 'ppo3'.*'decoupled_ppo'.*"
                                       r"config.train.objective"):
    objectives.get("ppo3")
  with pytest.raises(ValueError, match="'gspo' is already registered"):
    objectives.register("gspo", objectives.nll)


# ---------------------------------------------------------------------------------- objectives

def test_nll_is_negative_log_prob():
  logp = _rand(1, shift=-2.0)
  batch, _ = _batch()
  loss, terms = objectives.get("nll")(jnp.asarray(logp), batch, train_config())
  np.testing.assert_array_equal(loss, -logp)
  assert terms == {}


@pytest.mark.parametrize("high,expected_high", [(0.28, 0.28), (-1.0, 0.2)])
def test_ppo_matches_numpy(high, expected_high):
  logp, old, adv = _rand(1, 0.3, -2.0), _rand(2, 0.3, -2.0), _rand(3)
  batch, _ = _batch(old_logp=old, advantage=adv)
  cfg = train_config(objective="ppo", clip_eps=0.2, clip_eps_high=high)
  loss, terms = losses.policy_pair_loss(jnp.asarray(logp), batch, cfg)
  ratio = np.exp(logp.astype(np.float64) - old)
  np.testing.assert_allclose(loss, _ppo_reference(ratio, adv, 0.2, expected_high), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(terms["ratio"], ratio, rtol=1e-5)
  clipped = np.where(adv > 0, ratio > 1 + expected_high, ratio < 1 - 0.2)
  np.testing.assert_array_equal(terms["clipped_frac"], clipped.astype(np.float32))
  assert 0 < clipped.mean() < 1


def test_ppo_dual_clip_matches_numpy_and_bounds_negative_advantage_loss():
  logp = _rand(1, 2.0, -2.0)                   # ratios from ~e^-6 to ~e^6
  old, adv = _rand(2, 0.3, -2.0), _rand(3)
  batch, _ = _batch(old_logp=old, advantage=adv)
  c = 3.0
  cfg = train_config(objective="ppo", clip_eps=0.2, clip_eps_high=0.28, dual_clip=c)
  loss_fn = lambda lp: losses.policy_pair_loss(lp, batch, cfg)
  loss, terms = loss_fn(jnp.asarray(logp))
  ratio = np.exp(logp.astype(np.float64) - old)
  np.testing.assert_allclose(loss, _ppo_reference(ratio, adv, 0.2, 0.28, c), rtol=1e-5, atol=1e-6)
  neg = adv < 0
  assert np.all(np.asarray(loss)[neg] <= c * np.abs(adv[neg]) * (1 + 1e-6))
  plain, _ = losses.policy_pair_loss(jnp.asarray(logp), batch, train_config(
      objective="ppo", clip_eps=0.2, clip_eps_high=0.28))
  at_bound = neg & (ratio * adv < c * adv)
  assert at_bound.any() and np.all(np.asarray(plain)[at_bound] > c * np.abs(adv[at_bound]))
  np.testing.assert_array_equal(terms["dual_clip_frac"], at_bound.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(loss)[~at_bound], np.asarray(plain)[~at_bound])
  # Pairs held at the bound c·A get no gradient; the rest get PPO's.
  grad = jax.grad(lambda lp: jnp.sum(loss_fn(lp)[0]))(jnp.asarray(logp))
  plain_grad = jax.grad(lambda lp: jnp.sum(losses.policy_pair_loss(lp, batch, train_config(
      objective="ppo", clip_eps=0.2, clip_eps_high=0.28))[0]))(jnp.asarray(logp))
  np.testing.assert_array_equal(np.asarray(grad)[at_bound], 0.0)
  np.testing.assert_allclose(np.asarray(grad)[~at_bound], np.asarray(plain_grad)[~at_bound])


def _gspo_data():
  """Trajectory-constant advantages; per trajectory a mean log-ratio inside GSPO's clip range, or
  far outside it (both signs), so both branches occur and no trajectory sits on a boundary."""
  rng = np.random.default_rng(5)
  old = _rand(2, 0.3, -2.0)
  # [0, 0]: inside the range; [0, 2] (s > 1, A < 0) and [1, 2] (s < 1, A > 0): outside it but
  # unclipped (PPO clips only the improving side); [1, 0], [1, 1]: clipped.
  offsets = np.array([[1e-4, -1.5e-4, 0.03], [0.05, -0.04, -0.02]])[..., None]
  noise = rng.normal(size=(B, K, L - 1)) * 1e-5
  logp = (old + offsets + noise - noise.mean(-1, keepdims=True)).astype(np.float32)
  adv = np.broadcast_to(np.array([[1.0, -0.5, -2.0], [1.5, -0.7, 1.0]])[..., None],
                        (B, K, L - 1)).astype(np.float32)
  return logp, old, adv


def _gspo_reference(logp, old, adv, w, low=3e-4, high=4e-4):
  """Per pair: -min(s·A, clip(s)·A) with s = exp(weighted mean log-ratio of its trajectory)."""
  logp, old = np.asarray(logp, np.float64), np.asarray(old, np.float64)
  out, seq_ratio = np.zeros(logp.shape), np.ones(logp.shape)
  for b in range(B):
    for k in range(K):
      total = w[b, k].sum()
      if total == 0:
        s = 1.0
      else:
        s = np.exp(np.sum(w[b, k] * (logp[b, k] - old[b, k])) / total)
      seq_ratio[b, k] = s
      for t in range(L - 1):
        a = adv[b, k, t]
        out[b, k, t] = -min(s * a, min(max(s, 1 - low), 1 + high) * a)
  return out, seq_ratio


def test_gspo_matches_numpy():
  logp, old, adv = _gspo_data()
  batch, w = _batch(old_logp=old, advantage=adv)
  cfg = train_config(objective="gspo")
  loss, terms = losses.policy_pair_loss(jnp.asarray(logp), batch, cfg)
  expected, seq_ratio = _gspo_reference(logp, old, adv, w)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(terms["ratio"], seq_ratio, rtol=1e-6)
  clipped = np.asarray(terms["clipped_frac"])
  assert np.all(clipped == clipped[..., :1])           # one decision per trajectory
  assert 0 < clipped[..., 0].mean() < 1


def _central_differences(fn, x, h=1e-7):
  x = np.asarray(x, np.float64)
  out = np.zeros(x.shape)
  for i in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[i] += h
    down[i] -= h
    out[i] = (fn(up) - fn(down)) / (2 * h)
  return out


def _gspo_grad(logp, batch, cfg, mode):
  def aggregated(lp):
    per_pair, _ = losses.policy_pair_loss(lp, batch, cfg)
    num, den = losses.reduce_pairs(per_pair, losses.pair_weights(batch), mode)
    return num / den
  return np.asarray(jax.grad(aggregated)(jnp.asarray(logp)), np.float64)


def test_gspo_gradient_is_the_sequence_objectives():
  """With one advantage per trajectory, jax.grad of the GSPO loss aggregated by
  seq_mean_token_mean equals central finite differences of the sequence objective
  J = mean_i -min(s_i·A_i, clip(s_i)·A_i) (float64, independent), and the paper's closed form
  -s_i·A_i·w_u / Σ_t w_t / n where the unclipped branch is taken."""
  logp, old, adv = _gspo_data()
  batch, w = _batch(old_logp=old, advantage=adv)
  grad = _gspo_grad(logp, batch, train_config(objective="gspo"), "seq_mean_token_mean")
  has = w.sum(-1) > 0

  def sequence_objective(lp):
    log_s = np.sum(w * (lp - old), -1) / np.maximum(w.sum(-1), 1e-9)
    s, a = np.exp(log_s)[has], adv[..., 0][has]
    return np.mean(-np.minimum(s * a, np.clip(s, 1 - 3e-4, 1 + 4e-4) * a))

  fd = _central_differences(sequence_objective, logp)
  scale = np.abs(fd).max()
  assert scale > 0.1
  np.testing.assert_allclose(grad, fd, atol=1e-4 * scale)
  _, seq_ratio = _gspo_reference(logp, old, adv, w)
  flows = has[..., None] & np.where(adv > 0, seq_ratio <= 1 + 4e-4, seq_ratio >= 1 - 3e-4)
  closed = np.where(flows, -seq_ratio * adv * w / np.maximum(w.sum(-1, keepdims=True), 1e-9)
                    / has.sum(), 0.0)
  np.testing.assert_allclose(grad, closed, atol=1e-5 * scale)
  assert np.any(flows & (w > 0)) and np.any(has[..., None] & ~flows)


def test_gspo_gradient_with_per_pair_advantages_flows_through_the_sequence_ratio():
  """Per-pair advantages, token-mean aggregation: the gradient of every pair's loss reaches every
  token of its trajectory through s_i (no stop-gradient): jax.grad equals finite differences of
  the numpy per-pair reference, not the GSPO-token form -s_i·A_u·w_u / Σw."""
  logp, old, adv = _gspo_data()
  adv = (adv * np.random.default_rng(8).uniform(0.2, 2.0, adv.shape)).astype(np.float32)
  batch, w = _batch(old_logp=old, advantage=adv)
  grad = _gspo_grad(logp, batch, train_config(objective="gspo"), "token_mean")
  fd = _central_differences(
      lambda lp: _aggregate_reference(_gspo_reference(lp, old, adv, w)[0], w, "token_mean", None),
      logp)
  scale = np.abs(fd).max()
  assert scale > 0.01
  np.testing.assert_allclose(grad, fd, atol=1e-4 * scale)
  _, seq_ratio = _gspo_reference(logp, old, adv, w)
  token_form = -seq_ratio * adv * w / w.sum()
  assert np.abs(grad - token_form).max() > 0.1 * scale


@pytest.mark.parametrize("cap", [0.0, 1.5])
def test_decoupled_ppo_matches_numpy(cap):
  logp, behav, prox, adv = (_rand(1, 0.3, -2.0), _rand(2, 0.3, -2.0), _rand(4, 0.3, -2.0),
                            _rand(3))
  batch, _ = _batch(old_logp=behav, prox_logp=prox, advantage=adv)
  cfg = train_config(objective="decoupled_ppo", clip_eps=0.2, clip_eps_high=0.28,
                     decoupled_max_weight=cap)
  loss, terms = losses.policy_pair_loss(jnp.asarray(logp), batch, cfg)
  weight = np.exp(prox.astype(np.float64) - behav)
  if cap:
    weight = np.minimum(weight, cap)
    assert (weight == cap).any()
  ratio = np.exp(logp.astype(np.float64) - prox)
  np.testing.assert_allclose(loss, weight * _ppo_reference(ratio, adv, 0.2, 0.28), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(terms["behaviour_weight"], weight, rtol=1e-5)
  np.testing.assert_allclose(terms["ratio"], ratio, rtol=1e-5)
  # The importance weight is a constant: the gradient is the weighted PPO gradient around prox.
  ppo_batch, _ = _batch(old_logp=prox, advantage=adv)
  ppo_cfg = train_config(objective="ppo", clip_eps=0.2, clip_eps_high=0.28)
  g = jax.grad(lambda lp: jnp.sum(losses.policy_pair_loss(lp, batch, cfg)[0]))(jnp.asarray(logp))
  g_ppo = jax.grad(lambda lp: jnp.sum(losses.policy_pair_loss(lp, ppo_batch, ppo_cfg)[0]))(
      jnp.asarray(logp))
  np.testing.assert_allclose(g, weight * np.asarray(g_ppo), rtol=1e-5, atol=1e-7)


def test_decoupled_ppo_needs_its_fields():
  batch, _ = _batch(old_logp=_rand(2), advantage=_rand(3))
  with pytest.raises(ValueError, match=r"decoupled_ppo.*'field/prox_logp'"):
    losses.policy_pair_loss(jnp.asarray(_rand(1)), batch, train_config(objective="decoupled_ppo"))
  batch, _ = _batch(old_logp=_rand(2))
  with pytest.raises(ValueError, match=r"'ppo'.*'field/advantage'"):
    losses.policy_pair_loss(jnp.asarray(_rand(1)), batch, train_config(objective="ppo"))


@pytest.mark.parametrize("objective", ["ppo", "gspo", "decoupled_ppo"])
@pytest.mark.parametrize("with_old", [True, False])
def test_first_update_ratio_is_exactly_one(objective, with_old):
  logp = _rand(1, 0.5, -2.0)
  fields = {"advantage": _rand(3) * 5}
  if with_old or objective == "decoupled_ppo":
    fields.update(old_logp=logp, prox_logp=logp)
  batch, _ = _batch(**fields)
  cfg = train_config(objective=objective, clip_eps=0.01, dual_clip=3.0)
  loss, terms = losses.policy_pair_loss(jnp.asarray(logp), batch, cfg)
  np.testing.assert_array_equal(terms["ratio"], 1.0)
  np.testing.assert_array_equal(terms["clipped_frac"], 0.0)
  np.testing.assert_array_equal(terms["dual_clip_frac"], 0.0)
  np.testing.assert_allclose(loss, -fields["advantage"], rtol=1e-6)


@pytest.mark.parametrize("objective", ["ppo", "gspo", "decoupled_ppo"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                 "constant"])
def test_zero_advantages_give_zero_policy_gradient(objective, agg):
  logp = _rand(1, 0.5, -2.0)
  batch, _ = _batch(old_logp=_rand(2, 0.5, -2.0), prox_logp=_rand(4, 0.5, -2.0),
                    advantage=np.zeros((B, K, L - 1), np.float32))
  cfg = train_config(objective=objective, dual_clip=3.0, loss_agg=agg)

  def loss(lp):
    per_pair, _ = losses.policy_pair_loss(lp, batch, cfg)
    num, den = losses.reduce_pairs(per_pair, losses.pair_weights(batch), agg, cfg.agg_constant)
    return num / den

  value, grad = jax.value_and_grad(loss)(jnp.asarray(logp))
  assert float(value) == 0.0
  np.testing.assert_array_equal(grad, 0.0)


# ------------------------------------------------------------------------------ KL and values

@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_numpy(estimator):
  logp, ref = _rand(1, 0.5, -2.0), _rand(6, 0.5, -2.0)
  batch, _ = _batch(ref_logp=ref)
  cfg = train_config(objective="nll", kl_coef=0.3, kl_estimator=estimator)
  loss, terms = losses.policy_pair_loss(jnp.asarray(logp), batch, cfg)
  d = ref.astype(np.float64) - logp
  expected = {"k1": logp - ref.astype(np.float64), "k2": 0.5 * d ** 2,
              "k3": np.exp(d) - d - 1}[estimator]
  np.testing.assert_allclose(terms["kl"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, -logp + 0.3 * expected, rtol=1e-5, atol=1e-6)
  if estimator != "k1":
    assert np.all(np.asarray(terms["kl"]) >= 0)


def test_kl_errors():
  batch, _ = _batch()
  with pytest.raises(ValueError, match=r"kl_coef.*'field/ref_logp'"):
    losses.policy_pair_loss(jnp.asarray(_rand(1)), batch, train_config(kl_coef=0.1))
  batch, _ = _batch(ref_logp=_rand(2))
  with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'.*config.train.kl_estimator"):
    losses.policy_pair_loss(jnp.asarray(_rand(1)), batch,
                            train_config(kl_coef=0.1, kl_estimator="k4"))


@pytest.mark.parametrize("clip", [0.0, 0.2])
def test_value_loss_matches_numpy(clip):
  values, returns, old = _rand(1), _rand(2), _rand(3)
  batch, _ = _batch(**{"return": returns, "old_values": old})
  loss, terms = objectives.value_loss(jnp.asarray(values), batch, train_config(value_clip=clip))
  v, r, o = (x.astype(np.float64) for x in (values, returns, old))
  unclipped = (v - r) ** 2
  if clip:
    clipped = (np.clip(v, o - clip, o + clip) - r) ** 2
    expected = 0.5 * np.maximum(unclipped, clipped)
    np.testing.assert_array_equal(terms["value_clipped_frac"], (clipped > unclipped))
    assert 0 < np.mean(clipped > unclipped) < 1
  else:
    expected = 0.5 * unclipped
    assert terms == {}
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_value_loss_needs_its_fields():
  batch, _ = _batch(**{"return": _rand(2)})
  with pytest.raises(ValueError, match=r"value_clip.*'field/old_values'"):
    objectives.value_loss(jnp.asarray(_rand(1)), batch, train_config(value_clip=0.2))
  batch, _ = _batch()
  with pytest.raises(ValueError, match=r"value_coef.*'field/return'"):
    objectives.value_loss(jnp.asarray(_rand(1)), batch, train_config())


# ------------------------------------------------------------------------------ aggregation

def _aggregate_reference(loss, w, mode, constant):
  loss = np.asarray(loss, np.float64)
  total = np.sum(w * loss)
  trajs = [(b, k) for b in range(w.shape[0]) for k in range(w.shape[1]) if w[b, k].sum() > 0]
  if mode == "token_mean":
    return total / w.sum()
  if mode == "seq_mean_token_mean":
    return np.mean([np.sum(w[b, k] * loss[b, k]) / w[b, k].sum() for b, k in trajs])
  if mode == "seq_mean_token_sum":
    return np.mean([np.sum(w[b, k] * loss[b, k]) for b, k in trajs])
  return total / (constant * len(trajs))


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                  "constant"])
def test_aggregations_match_numpy(mode):
  batch, w = _batch()
  loss = _rand(7)
  num, den = losses.reduce_pairs(jnp.asarray(loss), losses.pair_weights(batch), mode, 10.0)
  np.testing.assert_allclose(losses.pair_weights(batch), w)
  assert sum(w[b, k].sum() > 0 for b in range(B) for k in range(K)) == 4   # 2 of 6 empty
  np.testing.assert_allclose(num / den, _aggregate_reference(loss, w, mode, 10.0), rtol=1e-5)
  if mode == "constant":   # Dr. GRPO: sum over all pairs / (C · number of valid trajectories)
    np.testing.assert_allclose(num, np.sum(w * loss), rtol=1e-5)
    assert float(den) == 10.0 * 4


def test_aggregation_aliases_and_errors():
  batch, _ = _batch()
  loss, w = jnp.asarray(_rand(7)), losses.pair_weights(batch)
  for old, new in (("token", "token_mean"), ("sequence", "seq_mean_token_mean")):
    np.testing.assert_array_equal(losses.reduce_pairs(loss, w, old),
                                  losses.reduce_pairs(loss, w, new))
  with pytest.raises(ValueError, match=r"unknown aggregation 'tokens'.*config.train.loss_agg"):
    losses.reduce_pairs(loss, w, "tokens")
  with pytest.raises(ValueError, match="agg_constant"):
    losses.reduce_pairs(loss, w, "constant")


# ------------------------------------------------------------------------ the registered loss

VOCAB = 11


def _fake_apply(variables, tokens, positions, mask, **kwargs):
  """A bigram 'model': logits and value depend on the current token only (enough to exercise the
  loss wiring; tree log-prob exactness is tests/tree/test_tree_losses.py's)."""
  del positions, mask, kwargs
  p = variables["params"]
  return types.SimpleNamespace(logits=p["logits"][tokens], values=p["values"][tokens])


def _tree_arrays(seed=0):
  rng = np.random.default_rng(seed)
  trees = []
  for _ in range(4):
    prompt = list(rng.integers(0, VOCAB, 4))
    trajs = [prompt + list(rng.integers(0, VOCAB, int(rng.integers(1, 6)))) for _ in range(3)]
    fields = {"weight": [(np.arange(len(t)) >= 4).astype(np.float32) for t in trajs],
              "advantage": [np.full(len(t), rng.normal(), np.float32) for t in trajs],
              "old_logp": [rng.normal(size=len(t)).astype(np.float32) * 0.2 - 2.4 for t in trajs],
              "return": [rng.normal(size=len(t)).astype(np.float32) for t in trajs],
              "old_values": [rng.normal(size=len(t)).astype(np.float32) for t in trajs]}
    trees.append(build.build_tree(trajs, fields=fields))
  arrays = batch_to_arrays(tree_batch.batch_trees(trees, max_tokens=32, max_nodes=8, max_traj=3,
                                                  max_len=10))
  return jax.tree.map(jnp.asarray, arrays)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                  "constant"])
def test_tree_loss_aggregates_by_config_and_is_exact_over_micro_batches(mode):
  rng = np.random.default_rng(3)
  params = {"logits": jnp.asarray(rng.normal(size=(VOCAB, VOCAB)), jnp.float32),
            "values": jnp.asarray(rng.normal(size=VOCAB), jnp.float32)}
  batch = _tree_arrays()
  cfg = train_config(objective="ppo", loss_agg=mode, agg_constant=8.0, value_coef=0.5,
                     value_clip=0.3, entropy_coef=0.01, dual_clip=3.0)
  ctx = losses.LossContext(apply_fn=_fake_apply, config=cfg)
  loss = losses.get_loss("tree")
  num, metrics = loss.numerator(params, batch, ctx)
  den = loss.denominator(batch, cfg)
  # The numerator is the per-pair terms reduced directly with the configured mode.
  out = tree_logprobs(_fake_apply, params, batch, return_values=True)
  w = losses.pair_weights(batch)
  reduce = lambda x: losses.reduce_pairs(x, w, mode, 8.0)
  policy, _ = losses.policy_pair_loss(out["logp"], batch, cfg)
  value, _ = objectives.value_loss(out["values"], batch, cfg)
  expected_num = reduce(policy)[0] + 0.5 * reduce(value)[0] - 0.01 * reduce(out["entropy"])[0]
  np.testing.assert_allclose(num, expected_num, rtol=1e-5)
  np.testing.assert_allclose(den, reduce(policy)[1], rtol=1e-6)
  total = np.asarray(policy) + 0.5 * np.asarray(value) - 0.01 * np.asarray(out["entropy"])
  np.testing.assert_allclose(num / den, _aggregate_reference(total, np.asarray(w), mode, 8.0),
                             rtol=1e-5)
  assert set(metrics) >= {"nll_sum", "entropy_sum", "ratio_sum", "clipped_frac_sum",
                          "dual_clip_frac_sum", "value_loss_sum", "value_clipped_frac_sum"}
  # Micro-batches (rows split in two): summed numerators over the global denominator are exact.
  halves = [jax.tree.map(lambda x, s=s: x[s], batch) for s in (slice(0, 2), slice(2, 4))]
  split = sum(loss.numerator(params, h, ctx)[0] for h in halves)
  np.testing.assert_allclose(split / den, num / den, rtol=1e-5)
  # The denominator depends on the data only: the same for any params.
  assert float(loss.denominator(batch, cfg)) == float(den)
  if mode == "constant":
    n_traj = int(np.sum(np.asarray(w).sum(-1) > 0))
    assert float(den) == 8.0 * n_traj
  # tree_sequence_mean fixes its mode whatever loss_agg says; tree without a config: token mean.
  fixed = losses.get_loss("tree_sequence_mean")
  np.testing.assert_allclose(fixed.denominator(batch, cfg),
                             losses.reduce_pairs(policy, w, "seq_mean_token_mean")[1])
  np.testing.assert_allclose(loss.denominator(batch), jnp.sum(w))


# ---------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("overrides,match", [
    ({"objective": "grpo"}, r"config.train.objective='grpo' is not one of \[.*'gspo'"),
    ({"kl_estimator": "k4"}, r"config.train.kl_estimator='k4' is not one of \['k1', 'k2', 'k3'\]"),
    ({"loss_agg": "token"}, r"config.train.loss_agg='token' is not one of"),
    ({"dual_clip": 0.5}, r"config.train.dual_clip=0.5 must be > 1"),
    ({"decoupled_max_weight": 0.5}, r"config.train.decoupled_max_weight=0.5 must be >= 1"),
    ({"agg_constant": 0.0}, r"config.train.agg_constant=0.0 must be positive"),
    ({"value_clip": -0.1}, r"config.train.value_clip=-0.1 must be >= 0"),
    ({"gspo_clip_eps": -1e-4}, r"config.train.gspo_clip_eps=-0.0001"),
    ({"gspo_clip_eps_high": -0.5}, r"gspo_clip_eps_high=-0.5 must be >= 0"),
])
def test_invalid_knobs_are_config_errors(overrides, match):
  c = get_base_config()
  c.train.update(overrides)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c, 8)


def test_new_knobs_are_declared_and_valid_by_default():
  c = get_base_config()
  for key in ("dual_clip", "gspo_clip_eps", "gspo_clip_eps_high", "decoupled_max_weight",
              "loss_agg", "agg_constant", "kl_estimator", "value_clip"):
    assert key in c.train, key
  config_lib.validate(c, 8)
  for objective in objectives.names():
    c.train.objective = objective
    config_lib.validate(c, 8)
