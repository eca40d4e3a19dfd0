"""Advantage estimators: gae against rlax, every estimator against NumPy references written here
(independently of the implementation), padding, exact zeros, jit, registry and config errors."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import rlax

from kat_jax.errors import ConfigError
from kat_jax.rl import advantages

N, L = 8, 14
GROUPS = np.array([0, 0, 0, 1, 1, 2, 3, 3], np.int32)
VALID = np.array([True, True, True, True, True, True, True, False])


def _cfg(**overrides):
  """The default config with ``field=value`` / ``section__field=value`` overrides, any type."""
  cfg = ml_collections.ConfigDict(advantages.default_advantage_config().to_dict(),
                                  type_safe=False)
  for key, value in overrides.items():
    section, _, field = key.rpartition("__")
    (cfg[section] if section else cfg)[field] = value
  return cfg


def _batch(seed, *, group_ids=GROUPS, valid=VALID, binary=False, nan_padding=True):
  """Random inputs: prompt tokens, then action tokens interleaved with observation tokens; row 5
  (a single-member group) and the padding row carry NaN where nothing may read them."""
  rng = np.random.default_rng(seed)
  n = len(group_ids)
  mask = np.zeros((n, L), bool)
  for i in range(n):
    start = rng.integers(1, 4)
    mask[i, start:] = rng.random(L - start) < 0.6
    mask[i, rng.integers(start, L)] = True                      # at least one action token
  mask[2, :] = False
  mask[2, [4, 5, 6, 11, 12]] = True                            # two turns, observation between
  rewards = (rng.random(n) < 0.5).astype(np.float32) if binary else rng.normal(size=n)
  values = rng.normal(size=(n, L)).astype(np.float32)
  kl = (0.1 * rng.normal(size=(n, L))).astype(np.float32)
  entropy = rng.uniform(0.0, 3.0, size=(n, L)).astype(np.float32)
  values[~mask] = np.nan                                        # non-action tokens are skipped
  kl[~mask] = np.nan
  entropy[~mask] = np.nan
  if nan_padding:
    for i in np.flatnonzero(~valid):
      rewards[i], values[i], kl[i], entropy[i] = np.nan, np.nan, np.nan, np.nan
  return dict(rewards=rewards.astype(np.float32), group_ids=np.asarray(group_ids, np.int32),
              mask=mask, values=values, kl=kl, valid=np.asarray(valid), entropy=entropy)


def _inputs(batch, with_entropy=True):
  fields = {k: jnp.asarray(v) for k, v in batch.items() if k != "entropy" or with_entropy}
  return advantages.AdvantageInputs(**fields)


# --------------------------------------------------------------------------------------------------
# NumPy references (float64, loops over rows, steps and groups).
# --------------------------------------------------------------------------------------------------

def np_token_rewards(b, kl_coef):
  r = np.zeros((len(b["rewards"]), L))
  for i in np.flatnonzero(b["valid"]):
    steps = np.flatnonzero(b["mask"][i])
    if len(steps):
      r[i, steps[-1]] += b["rewards"][i]
      r[i, steps] -= kl_coef * b["kl"][i, steps]
  return r


def np_gae(b, gamma, lam, kl_coef):
  r = np_token_rewards(b, kl_coef)
  adv, ret = np.zeros_like(r), np.zeros_like(r)
  for i in np.flatnonzero(b["valid"]):
    next_v = next_a = 0.0
    for t in reversed(np.flatnonzero(b["mask"][i])):
      v = float(b["values"][i, t])
      next_a = r[i, t] + gamma * next_v - v + gamma * lam * next_a
      next_v = v
      adv[i, t], ret[i, t] = next_a, next_a + v
  return adv, ret


def _members(b, i):
  return [j for j in range(len(b["rewards"]))
          if b["valid"][j] and b["group_ids"][j] == b["group_ids"][i]]


def np_per_trajectory(b, per_row):
  """[N] -> [N, L] on action tokens of valid rows."""
  out = np.zeros((len(b["rewards"]), L))
  for i in np.flatnonzero(b["valid"]):
    out[i, b["mask"][i]] = per_row(i)
  return out


def np_grpo(b, std_normalize=True, ddof=1, eps=1e-6):
  def row(i):
    rs = np.array([b["rewards"][j] for j in _members(b, i)], np.float64)
    if len(rs) == 1:
      return 0.0
    a = b["rewards"][i] - rs.mean()
    return a / (rs.std(ddof=ddof) + eps) if std_normalize else a
  return np_per_trajectory(b, row)


def np_rloo(b):
  def row(i):
    others = [b["rewards"][j] for j in _members(b, i) if j != i]
    return b["rewards"][i] - np.mean(others) if others else 0.0
  return np_per_trajectory(b, row)


def np_reinforce_pp(b, gamma, kl_coef, eps):
  r = np_token_rewards(b, kl_coef)
  g = np.zeros_like(r)
  for i in np.flatnonzero(b["valid"]):
    running = 0.0
    for t in reversed(np.flatnonzero(b["mask"][i])):
      running = r[i, t] + gamma * running
      g[i, t] = running
  sel = b["mask"] & b["valid"][:, None]
  out = np.zeros_like(g)
  out[sel] = (g[sel] - g[sel].mean()) / (g[sel].std() + eps)
  return out


def np_entropy_scale(b, alpha, beta, lo, hi):
  n = len(b["rewards"])
  b = dict(b, entropy=b["entropy"].astype(np.float64), rewards=b["rewards"].astype(np.float64))
  h = {i: np.mean(b["entropy"][i, b["mask"][i]]) for i in range(n)
       if b["valid"][i] and b["mask"][i].any()}
  h_batch = np.mean(list(h.values()))
  p = {i: np.clip(np.mean([b["rewards"][j] for j in _members(b, i)]), 0, 1)
       for i in range(n) if b["valid"][i]}
  u = {i: 4 * p[i] * (1 - p[i]) for i in p}
  u_batch = np.mean(list(u.values()))
  scale = np.ones(n)
  for i in p:
    h_group = np.mean([h[j] for j in _members(b, i) if j in h])
    rel = (h_group - h_batch) / h_batch if h_batch > 0 else 0.0
    scale[i] = np.clip(1 + alpha * rel + beta * (u[i] - u_batch), lo, hi)
  return scale


def _close(actual, expected, tol=1e-5):
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------------
# gae.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_gae_equals_rlax_per_trajectory_and_across_episode_ends(seed):
  b = _batch(seed)
  gamma, lam, kl_coef = 0.97, 0.9, 0.3
  adv, ret = advantages.compute("gae", _inputs(b),
                                _cfg(gamma=gamma, lam=lam, kl_in_reward=kl_coef))
  adv, ret = np.asarray(adv), np.asarray(ret)
  r_tok = np_token_rewards(b, kl_coef)
  rng = np.random.default_rng(seed + 100)
  flat = {"r": [], "d": [], "v": [], "i": [], "t": []}
  for i in np.flatnonzero(b["valid"]):
    steps = np.flatnonzero(b["mask"][i])
    r_c = jnp.asarray(r_tok[i, steps], jnp.float32)
    discount = np.full(len(steps), gamma, np.float32)
    discount[-1] = 0.0                                         # the episode ends
    v_c = b["values"][i, steps]
    bootstrap = np.float32(rng.normal())                       # ignored: discount 0 at the end
    expected = rlax.truncated_generalized_advantage_estimation(
        r_c, jnp.asarray(discount), lam, jnp.asarray(np.append(v_c, bootstrap)))
    _close(adv[i, steps], np.asarray(expected))
    _close(ret[i, steps], np.asarray(expected) + v_c)
    for k, v in zip("rdvit", (r_tok[i, steps], discount, v_c, [i] * len(steps), steps)):
      flat[k].extend(v)
  # All trajectories as one stream of steps, discount 0 at each episode end.
  stream = rlax.truncated_generalized_advantage_estimation(
      jnp.asarray(flat["r"], jnp.float32), jnp.asarray(flat["d"], jnp.float32), lam,
      jnp.asarray(np.append(flat["v"], 0.0), jnp.float32))
  _close(adv[flat["i"], flat["t"]], np.asarray(stream))
  outside = ~(b["mask"] & b["valid"][:, None])
  assert not adv[outside].any() and not ret[outside].any()


@pytest.mark.parametrize("gamma,lam,kl_coef", [(1.0, 0.95, 0.0), (0.9, 1.0, 0.5), (0.8, 0.0, 0.1)])
def test_gae_matches_numpy_with_interleaved_observations(gamma, lam, kl_coef):
  b = _batch(3)
  adv, ret = advantages.compute("gae", _inputs(b), _cfg(gamma=gamma, lam=lam,
                                                        kl_in_reward=kl_coef))
  expected_adv, expected_ret = np_gae(b, gamma, lam, kl_coef)
  _close(adv, expected_adv)
  _close(ret, expected_ret)


def test_gae_skips_non_action_tokens_exactly():
  """Inserting observation tokens between the action steps changes nothing: the same steps laid
  out contiguously and interleaved give the same advantages at the same steps."""
  rng = np.random.default_rng(7)
  steps = 6
  v, r = rng.normal(size=steps).astype(np.float32), np.float32(1.5)
  contiguous = np.zeros((1, L), bool)
  contiguous[0, :steps] = True
  interleaved = np.zeros((1, L), bool)
  interleaved[0, [1, 2, 5, 8, 9, 13]] = True
  out = []
  for m in (contiguous, interleaved):
    values = np.full((1, L), 1e3, np.float32)                  # never read off the action tokens
    values[m] = v
    inputs = advantages.AdvantageInputs(
        rewards=jnp.array([r]), group_ids=jnp.zeros(1, jnp.int32), mask=jnp.asarray(m),
        values=jnp.asarray(values), kl=jnp.zeros((1, L)), valid=jnp.array([True]))
    adv, _ = advantages.compute("gae", inputs, _cfg(gamma=0.99, lam=0.9))
    out.append(np.asarray(adv)[m])
  np.testing.assert_array_equal(out[0], out[1])
  assert np.all(out[0] != 0)


# --------------------------------------------------------------------------------------------------
# Group estimators and REINFORCE++.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [False, True])
def test_group_estimators_match_numpy(binary):
  b = _batch(4, binary=binary)
  inputs = _inputs(b)
  cases = {
      ("grpo", ()): np_grpo(b),
      ("grpo", (("std_ddof", 0), ("eps", 1e-3))): np_grpo(b, ddof=0, eps=1e-3),
      ("grpo", (("std_normalize", False),)): np_grpo(b, std_normalize=False),
      ("drgrpo", ()): np_grpo(b, std_normalize=False),
      ("rloo", ()): np_rloo(b),
  }
  for (name, overrides), expected in cases.items():
    adv, ret = advantages.compute(name, inputs, _cfg(**dict(overrides)))
    _close(adv, expected)
    assert ret is adv or np.array_equal(np.asarray(ret), np.asarray(adv))
  assert np.any(cases[("rloo", ())] != 0)


@pytest.mark.parametrize("gamma,kl_coef,eps", [(1.0, 0.0, 1e-6), (0.9, 0.2, 1e-2)])
def test_reinforce_pp_matches_numpy(gamma, kl_coef, eps):
  b = _batch(5)
  adv, ret = advantages.compute("reinforce_pp", _inputs(b),
                                _cfg(gamma=gamma, kl_in_reward=kl_coef, eps=eps))
  expected = np_reinforce_pp(b, gamma, kl_coef, eps)
  _close(adv, expected)
  np.testing.assert_array_equal(np.asarray(ret), np.asarray(adv))
  sel = b["mask"] & b["valid"][:, None]
  if eps < 1e-5:                                              # whitened: mean 0, std ~1
    assert abs(np.asarray(adv)[sel].mean()) < 1e-5
    assert abs(np.asarray(adv)[sel].std() - 1) < 1e-3


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("value", [0.1, 1 / 3, 0.7, -2.9])
def test_equal_rewards_in_a_group_give_exactly_zero(name, value):
  group_ids = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1], np.int32)   # 7 equal, then 3 varied
  valid = np.ones(10, bool)
  b = _batch(6, group_ids=group_ids, valid=valid)
  b["rewards"][:7] = value
  adv, _ = advantages.compute(name, _inputs(b), _cfg())
  adv = np.asarray(adv)
  assert np.all(adv[:7] == 0.0)
  assert np.any(adv[7:] != 0.0)


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
def test_single_member_groups_give_zero(name):
  b = _batch(8, group_ids=np.arange(N, dtype=np.int32), valid=np.ones(N, bool))
  adv, _ = advantages.compute(name, _inputs(b), _cfg())
  assert not np.asarray(adv).any()


@pytest.mark.parametrize("name", ["gae", "grpo", "drgrpo", "rloo", "reinforce_pp"])
def test_padding_rows_are_zero_and_take_no_part(name):
  """A padding row full of NaN, in a real group, gets 0 and changes nothing for the others:
  the valid rows equal the same batch without the padding row."""
  b = _batch(9)
  cfg = _cfg(kl_in_reward=0.1)
  adv, ret = map(np.asarray, advantages.compute(name, _inputs(b), cfg))
  pad = ~b["valid"]
  assert not adv[pad].any() and not ret[pad].any()
  assert np.all(np.isfinite(adv)) and np.all(np.isfinite(ret))
  kept = {k: v[b["valid"]] for k, v in b.items()}
  adv_kept, ret_kept = map(np.asarray, advantages.compute(name, _inputs(kept), cfg))
  _close(adv[b["valid"]], adv_kept, 1e-6)
  _close(ret[b["valid"]], ret_kept, 1e-6)


def test_group_ids_may_be_any_integers():
  b = _batch(10)
  relabeled = dict(b, group_ids=np.array([1000, 1000, 1000, -5, -5, 77, 3, 3], np.int32))
  for name in ("grpo", "rloo"):
    _close(advantages.compute(name, _inputs(relabeled), _cfg())[0],
           np.asarray(advantages.compute(name, _inputs(b), _cfg())[0]), 0)


# --------------------------------------------------------------------------------------------------
# Entropy scaling.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["grpo", "gae"])
def test_entropy_scaling_matches_numpy(name):
  b = _batch(11)
  b["rewards"] = np.clip(b["rewards"] * 0.3 + 0.5, 0, 1).astype(np.float32)
  b["rewards"][-1] = np.nan                                    # padding stays ignored
  b["entropy"][0] *= 4.0                                       # a high-entropy group (group 0)
  knobs = dict(alpha=1.0, beta=0.8, lo=0.7, hi=1.3)
  cfg = _cfg(**{f"entropy_scaling__{k}": v for k, v in knobs.items()},
             entropy_scaling__enabled=True)
  scale = np_entropy_scale(b, **knobs)
  assert np.any(scale == knobs["hi"]) and np.any(scale == knobs["lo"])   # clipping exercised
  assert np.any((scale > knobs["lo"]) & (scale < knobs["hi"]))
  _close(advantages.entropy_scale(_inputs(b), cfg), scale)
  base_adv, base_ret = advantages.compute(name, _inputs(b), _cfg())
  adv, ret = advantages.compute(name, _inputs(b), cfg)
  _close(adv, np.asarray(base_adv) * scale[:, None])
  np.testing.assert_array_equal(np.asarray(ret), np.asarray(base_ret))   # returns unscaled


def test_entropy_scaling_is_identity_on_uniform_entropy_and_zero_beta():
  b = _batch(12)
  b["entropy"] = np.where(b["mask"], 1.7, np.nan).astype(np.float32)
  cfg = _cfg(entropy_scaling__enabled=True, entropy_scaling__beta=0.0)
  np.testing.assert_array_equal(np.asarray(advantages.entropy_scale(_inputs(b), cfg)), 1.0)
  b["entropy"] = np.zeros((N, L), np.float32)                  # H_batch = 0: no entropy term
  np.testing.assert_array_equal(np.asarray(advantages.entropy_scale(_inputs(b), cfg)), 1.0)


def test_entropy_scaling_without_entropy_is_an_error():
  with pytest.raises(ValueError, match="inputs.entropy"):
    advantages.compute("grpo", _inputs(_batch(13), with_entropy=False),
                       _cfg(entropy_scaling__enabled=True))


# --------------------------------------------------------------------------------------------------
# jit, registry, config and input errors.
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gae", "grpo", "drgrpo", "rloo", "reinforce_pp"])
def test_estimators_work_under_jit(name):
  b = _batch(14)
  inputs = _inputs(b)
  cfg = _cfg(entropy_scaling__enabled=True, kl_in_reward=0.05)
  expected = advantages.compute(name, inputs, cfg)
  inside = jax.jit(lambda x: advantages.compute(name, x, cfg))(inputs)   # inside a caller's jit
  frozen = ml_collections.FrozenConfigDict(cfg)
  direct = jax.jit(functools.partial(advantages.entropy_scaled(advantages.get(name)),
                                     cfg=frozen))(inputs)
  for got in (inside, direct):
    for a, e in zip(got, expected):
      np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=1e-6)


def test_compute_compiles_once_per_config(monkeypatch):
  traces = []

  def probe(inputs, cfg):
    traces.append(cfg.gamma)
    return advantages.grpo(inputs, cfg)

  monkeypatch.setitem(advantages._ESTIMATORS, "probe_for_test", probe)
  inputs = _inputs(_batch(15))
  for gamma in (0.5, 0.5, 0.25, 0.5):
    advantages.compute("probe_for_test", inputs, _cfg(gamma=gamma))   # fresh, equal ConfigDicts
  assert traces == [0.5, 0.25]


def test_unknown_name_names_it_and_the_registered_ones():
  with pytest.raises(ValueError) as e:
    advantages.compute("ppo_magic", _inputs(_batch(16)), _cfg())
  message = str(e.value)
  assert "'ppo_magic'" in message and "config.rl.advantage.name" in message
  for name in ("gae", "grpo", "drgrpo", "rloo", "reinforce_pp"):
    assert name in message
  with pytest.raises(ConfigError, match="config.rl.advantage.name='ppo_magic'"):
    advantages.validate_config(_cfg(name="ppo_magic"))


def test_registry():
  assert set(advantages.names()) >= {"gae", "grpo", "drgrpo", "rloo", "reinforce_pp"}
  assert advantages.get("rloo") is advantages.rloo
  with pytest.raises(ValueError, match="already registered"):
    advantages.register("grpo", advantages.grpo)


@pytest.mark.parametrize("overrides,field", [
    (dict(gamma=1.5), "gamma"), (dict(lam=-0.1), "lam"), (dict(kl_in_reward=-1.0), "kl_in_reward"),
    (dict(eps=float("nan")), "eps"), (dict(std_ddof=2), "std_ddof"),
    (dict(std_normalize=1), "std_normalize"), (dict(entropy_scaling__lo=0.0), "lo"),
    (dict(entropy_scaling__hi=0.9), "hi"), (dict(entropy_scaling__alpha=-1.0), "alpha"),
    (dict(entropy_scaling__enabled="yes"), "enabled"),
])
def test_bad_config_is_refused_naming_the_field(overrides, field):
  with pytest.raises(ConfigError, match=f"config.rl.advantage.*{field}"):
    advantages.validate_config(_cfg(**overrides))
  with pytest.raises(ConfigError, match=field):
    advantages.compute("grpo", _inputs(_batch(17)), _cfg(**overrides))


def test_default_config_is_valid():
  advantages.validate_config(advantages.default_advantage_config())


@pytest.mark.parametrize("field,value,needle", [
    ("mask", lambda b: b["mask"].astype(np.float32), "inputs.mask has dtype float32"),
    ("valid", lambda b: b["valid"].astype(np.int32), "inputs.valid has dtype int32"),
    ("values", lambda b: b["values"][:, :-1], "inputs.values has shape"),
    ("rewards", lambda b: b["rewards"][:, None], "inputs.rewards has shape"),
    ("group_ids", lambda b: b["group_ids"].astype(np.float32), "inputs.group_ids has dtype"),
    ("entropy", lambda b: b["entropy"][:-1], "inputs.entropy has shape"),
])
def test_bad_inputs_are_refused_naming_the_field(field, value, needle):
  b = _batch(18)
  b[field] = value(b)
  with pytest.raises(ValueError, match=needle):
    advantages.compute("grpo", _inputs(b), _cfg())
