"""Compacting a pruned tree is exact: the ``tree`` losses (nll and ppo, token and sequence means) of
the compacted tree and their gradients equal those of the uncompacted tree with the keep mask,
because exactly the pairs whose predicted token is kept survive, with the same weights; the
compacted tree is the kept sub-tree (same tokens, positions, tags and visibility) in fewer tokens;
the host pruning route keeps what the train step keeps; a compacted batch trains like the pruned
one (same loss, gradient norm and update)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from configs.base import train_config
from kat_jax import sharding
from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
from kat_jax.train import losses, optimizer, state as state_lib, step as step_lib
from kat_jax.tree import batch as tree_batch, build, compact
from kat_jax.tree.logprobs import batch_to_arrays
from kat_jax.tree.prune import default_prune_config

K, L, VOCAB = 5, 16, 64
T_FULL = K * L           # any tree of K trajectories of <= L tokens fits
T_COMPACT = 48           # compacted trees: <= KEEP_CAP kept tokens + <= K re-added roots
KEEP_CAP = 40


@pytest.fixture(scope="module")
def model_and_params():
  c = get_preset("tiny")
  c.vocab_size = VOCAB
  c.num_layers = 1
  model = Transformer(ModelConfig.from_config(c))
  tok = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), tok, tok,
                               intervals_from_segment_ids(jnp.ones_like(tok)))["params"])
  return model, params


def random_tree(rng, with_entropy=False):
  """Trajectories sharing prefixes (a random earlier one's prefix + a tail), tags a function of
  the token (consistent on shared prefixes), per-trajectory loss masks, advantages, old
  log-probs (and rollout entropies)."""
  trajs = []
  for _ in range(int(rng.integers(1, K + 1))):
    length = int(rng.integers(1, L + 1))
    if trajs and rng.random() < 0.8:
      base = trajs[int(rng.integers(len(trajs)))]
      cut = int(rng.integers(0, len(base) + 1))
      t = base[:cut] + [int(x) for x in rng.integers(0, 4 if rng.random() < 0.5 else VOCAB,
                                                     size=max(length - cut, 0))]
    else:
      t = [int(x) for x in rng.integers(0, VOCAB, size=length)]
    trajs.append((t or [int(rng.integers(VOCAB))])[:L])
  tag_of = rng.integers(0, 4, size=VOCAB)
  fields = dict(weight=[(rng.random(len(t)) < 0.7).astype(np.float32) for t in trajs],
                advantage=[np.full(len(t), rng.normal(), np.float32) for t in trajs],
                old_logp=[(rng.normal(size=len(t)) * 0.3 - 3.0).astype(np.float32) for t in trajs])
  if with_entropy:
    fields["entropy"] = [np.asarray([(7 * x) % 5 * 0.3 for x in t], np.float32) for t in trajs]
  return build.build_tree(trajs, tags=[tag_of[t] for t in trajs], fields=fields)


def random_keep(rng, tree, cap=KEEP_CAP):
  """A random mask closed under ancestors (pre-order: a parent precedes its children): each token
  is kept with probability p if its parent is; then only the first ``cap`` kept tokens in
  pre-order (a pre-order prefix of a closed set is closed)."""
  p = rng.choice([0.5, 0.85, 1.0])
  keep = np.zeros(tree.n_tree, bool)
  for t in range(tree.n_tree):
    up = tree.parent[t] < 0 or keep[tree.parent[t]]
    keep[t] = up and rng.random() < p
  keep[np.flatnonzero(keep)[cap:]] = False
  return keep


def _arrays(tree, t, keep=None):
  b = batch_to_arrays(tree_batch.batch_trees([tree], max_tokens=t, max_nodes=t, max_traj=K,
                                             max_len=L))
  if keep is not None:
    b["keep"] = np.pad(keep, (0, t - keep.size))[None]
  return b


_COMBOS = [(o, n) for o in ("nll", "ppo") for n in ("token", "sequence")]
_LOSS_FNS = {}


def _losses_and_grads(model, params, batch):
  """For every (objective, normalizer): the step's reduction, numerator / denominator of the
  registered tree loss, its gradient and its denominator (one compilation per batch shape)."""
  if "fn" not in _LOSS_FNS:
    def values(p, b):
      out = []
      for objective, normalizer in _COMBOS:
        loss = losses.get_loss("tree" if normalizer == "token" else "tree_sequence_mean")
        ctx = losses.LossContext(apply_fn=model.apply,
                                 config=train_config(objective=objective, clip_eps=0.2))
        out.append(loss.numerator(p, b, ctx)[0] / jnp.maximum(loss.denominator(b), 1e-9))
      return jnp.stack(out)

    def denominators(b):
      return jnp.stack([losses.get_loss(name).denominator(b)
                        for name in ("tree", "tree_sequence_mean")])

    _LOSS_FNS["fn"] = (jax.jit(values), jax.jit(jax.jacrev(values)), jax.jit(denominators))
  values, grads, dens = _LOSS_FNS["fn"]
  b = jax.tree.map(jnp.asarray, batch)
  return np.asarray(values(params, b)), grads(params, b), np.asarray(dens(b))


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_compacted_tree_has_the_masked_loss_and_gradients(model_and_params, seed):
  # nll and ppo (per-trajectory advantages, old log-probs), token and sequence means.
  model, params = model_and_params
  rng = np.random.default_rng(seed)
  tree = random_tree(rng)
  keep = random_keep(rng, tree)
  out = compact.compact_tree(tree, keep)
  masked = _arrays(tree, T_FULL, keep)
  small = _arrays(out.tree, T_COMPACT)
  # The kept pairs: pair (k, j) survives iff its predicted token is kept, same label and weight.
  w_masked = np.asarray(losses.pair_weights(jax.tree.map(jnp.asarray, masked)))[0]
  w_small = np.asarray(losses.pair_weights(jax.tree.map(jnp.asarray, small)))[0]
  kept_pair = masked["pred_valid"][0] & keep[masked["pred_label_rows"][0]]
  np.testing.assert_array_equal(small["pred_valid"][0], kept_pair)
  np.testing.assert_array_equal(w_small, w_masked)
  np.testing.assert_array_equal(np.where(kept_pair, small["pred_labels"][0], 0),
                                np.where(kept_pair, masked["pred_labels"][0], 0))
  want, want_g, want_den = _losses_and_grads(model, params, masked)
  got, got_g, got_den = _losses_and_grads(model, params, small)
  np.testing.assert_array_equal(got_den, want_den)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for i, combo in enumerate(_COMBOS):
    scale = max(float(jnp.max(jnp.abs(x[i]))) for x in jax.tree.leaves(want_g))
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
      np.testing.assert_allclose(a[i], b[i], atol=1e-5 * max(scale, 1e-3), rtol=1e-4,
                                 err_msg=str(combo))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_compacted_tree_is_the_kept_subtree(seed):
  rng = np.random.default_rng(seed)
  tree = random_tree(rng)
  keep = random_keep(rng, tree, cap=tree.n_tree)
  out = compact.compact_tree(tree, keep)
  new, idx = out.tree, out.token_index
  m = np.array([keep[tree.row_map[k, :tree.lengths[k]]].sum() for k in range(tree.num_traj)])
  np.testing.assert_array_equal(out.kept_lengths, m)
  # Trajectory k is its kept prefix (at least its first token), same id and fields.
  np.testing.assert_array_equal(new.lengths, np.maximum(m, 1))
  np.testing.assert_array_equal(new.traj_ids, tree.traj_ids)
  for k in range(tree.num_traj):
    n = new.lengths[k]
    np.testing.assert_array_equal(idx[new.row_map[k, :n]], tree.row_map[k, :n])
    for name in tree.fields:
      np.testing.assert_array_equal(new.fields[name][k, :n], tree.fields[name][k, :n])
  # Every kept token once, plus the first token of each trajectory whose root was pruned.
  readded = {int(tree.row_map[k, 0]) for k in range(tree.num_traj) if m[k] == 0}
  assert sorted(idx.tolist()) == sorted(np.flatnonzero(keep).tolist() + sorted(readded))
  for name in ("tokens", "positions", "tags"):
    np.testing.assert_array_equal(getattr(new, name), getattr(tree, name)[idx])
  # Visibility between compacted tokens is the original visibility between their tokens.
  np.testing.assert_array_equal(build.interval_mask(new.tin, new.tout),
                                build.interval_mask(tree.tin, tree.tout)[np.ix_(idx, idx)])
  assert new.n_tree <= tree.n_tree and new.num_nodes <= tree.num_nodes


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_keeping_everything_gives_the_same_tree(seed):
  tree = random_tree(np.random.default_rng(seed))
  new = compact.compact_tree(tree, np.ones(tree.n_tree, bool)).tree
  for name in ("tokens", "positions", "tin", "tout", "tags", "parent", "token_node",
               "token_traj_count", "node_start", "node_size", "node_parent", "node_depth",
               "node_subtree_end", "node_traj_count", "node_tag_bits", "node_traj_ptr",
               "node_traj_index", "row_map", "lengths", "traj_ids"):
    np.testing.assert_array_equal(getattr(new, name), getattr(tree, name), err_msg=name)


def test_pruning_to_the_prompt_keeps_the_prompt_pairs_and_every_trajectory():
  prompt = [5, 6, 7, 8]
  trajs = [prompt + [1, 2, 3], prompt + [9, 9], prompt + [1, 4]]
  weight = [np.r_[np.zeros(4), np.ones(len(t) - 4)].astype(np.float32) for t in trajs]
  tree = build.build_tree(trajs, fields=dict(weight=weight))
  keep = np.zeros(tree.n_tree, bool)
  keep[tree.row_map[0, :5]] = True            # the prompt and trajectory 0's first answer token
  new = compact.compact_tree(tree, keep).tree
  assert new.n_tree == 5 and new.num_traj == 3
  np.testing.assert_array_equal(new.lengths, [5, 4, 5])   # [1, 4] shares the kept token 1
  # Trajectory 1 keeps only prompt pairs (weight 0); 0 and 2 keep the pair predicting token 1.
  _, _, labels, valid = build.prediction_index(new)
  assert valid.sum() == 4 + 3 + 4
  np.testing.assert_array_equal(labels[0, :4], [6, 7, 8, 1])


def test_bad_keep_masks_are_refused_clearly():
  tree = build.build_tree([[1, 2, 3], [1, 4]])
  keep = np.ones(tree.n_tree, bool)
  keep[1] = False                              # token 2 dropped, its child 3 kept
  with pytest.raises(ValueError, match="keeps token 2 but not its parent 1.*closed under"):
    compact.compact_tree(tree, keep)
  with pytest.raises(ValueError, match=r"shape \(7,\); expected \(4,\)"):
    compact.compact_tree(tree, np.ones(7, bool))
  batch = batch_to_arrays(tree_batch.batch_trees([tree]))
  with pytest.raises(ValueError, match=r"cannot remap batch keys \['rewards'\]"):
    compact.compact_batch({**batch, "rewards": np.zeros((1, 2))}, np.ones((1, 4), bool))


def test_compact_batch_equals_compacting_each_tree():
  rng = np.random.default_rng(7)
  trees = [random_tree(rng) for _ in range(3)]
  keeps = [random_keep(rng, t, cap=t.n_tree) for t in trees]
  batch = batch_to_arrays(tree_batch.batch_trees(trees, max_tokens=T_FULL, max_traj=K,
                                                 max_len=L))
  keep_bt = np.stack([np.pad(k, (0, T_FULL - k.size)) for k in keeps])
  batch["attention_blocks"] = {"stale": np.zeros((3, 1))}   # dropped: intervals change
  got = compact.compact_batch(batch, keep_bt, max_tokens=T_COMPACT + 20, max_len=L)
  want = batch_to_arrays(tree_batch.batch_trees(
      [compact.compact_tree(t, k).tree for t, k in zip(trees, keeps)],
      max_tokens=T_COMPACT + 20, max_traj=K, max_len=L))
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_host_pruning_keeps_what_the_train_step_keeps():
  rng = np.random.default_rng(3)
  trees = [random_tree(rng, with_entropy=True) for _ in range(4)]
  cfg = default_prune_config()
  cfg.enabled, cfg.budget_fraction = True, 0.4
  keeps, metrics = compact.prune_keep_masks(trees, cfg)
  # In the step: a batch padded wider, entropies scattered from the rollout field.
  host = batch_to_arrays(tree_batch.batch_trees(trees, max_tokens=T_FULL + 16, max_nodes=T_FULL,
                                                max_traj=K + 1, max_len=L + 2))
  pruned, _ = step_lib.maybe_prune(None, None, jax.tree.map(jnp.asarray, host),
                                   train_config(prune=cfg))
  keep_bt, _ = compact.batch_keep_masks(host, cfg)     # the host route on that batch
  np.testing.assert_array_equal(keep_bt, np.asarray(pruned["keep"]))
  for i, (tree, keep) in enumerate(zip(trees, keeps)):
    assert keep.shape == (tree.n_tree,)
    np.testing.assert_array_equal(keep, np.asarray(pruned["keep"][i, :tree.n_tree]))
    assert not np.asarray(pruned["keep"][i, tree.n_tree:]).any()
  np.testing.assert_array_equal(metrics["kept_tokens"], [k.sum() for k in keeps])
  assert np.all((metrics["kept_tokens"] <= metrics["budget"]) | metrics["mandatory_exceeds_budget"])
  assert any(k.sum() < t.n_tree for k, t in zip(keeps, trees))   # something was pruned


def _train_step(batch, prune_cfg):
  c = get_preset("tiny")
  c.vocab_size, c.num_layers = VOCAB, 1
  cfg = ModelConfig.from_config(c)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                            jax.devices()[:1])
  model = Transformer(cfg, mesh=mesh)
  train_cfg = train_config(steps=5, warmup_steps=1, learning_rate=1e-3, objective="ppo",
                           clip_eps=0.2, prune=prune_cfg)
  tx, schedule = optimizer.make_optimizer(train_cfg)
  example = {"inputs": jax.ShapeDtypeStruct(batch["tokens"].shape, np.int32)}
  state, shardings = state_lib.create_sharded_state(model, tx, example, mesh,
                                                    sharding.DEFAULT_RULES, jax.random.key(0))
  step = step_lib.make_train_step(model.apply, losses.get_loss("tree"), tx, schedule, train_cfg,
                                  shardings, mesh, sharding.DEFAULT_RULES)
  new, metrics = step(state, sharding.host_to_global(batch, mesh, sharding.DEFAULT_RULES),
                      jax.random.key(1))
  return jax.device_get(new.params), jax.device_get(metrics)


@pytest.mark.slow
def test_training_on_compacted_trees_equals_training_with_in_step_pruning():
  rng = np.random.default_rng(11)
  trees = [random_tree(rng, with_entropy=True) for _ in range(2)]
  prune = default_prune_config()
  prune.enabled, prune.budget_fraction = True, 0.5
  full = batch_to_arrays(tree_batch.batch_trees(trees, max_tokens=T_FULL, max_nodes=T_FULL,
                                                max_traj=K, max_len=L))
  keeps, _ = compact.prune_keep_masks(trees, prune)
  small = batch_to_arrays(tree_batch.batch_trees(
      [compact.compact_tree(t, k).tree for t, k in zip(trees, keeps)], max_tokens=T_COMPACT,
      max_nodes=T_COMPACT, max_traj=K, max_len=L))
  off = default_prune_config()                 # compacted batches are not pruned again
  want_params, want = _train_step(full, prune)
  got_params, got = _train_step(small, off)
  assert got["weight_sum"] == want["weight_sum"] > 0
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
