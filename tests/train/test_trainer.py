"""The Trainer seam: a loop driven through it equals ``loop.train`` bitwise; kill -9 and restart gives
back its extra state and bitwise params; ``score`` equals the plain model on each trajectory alone
and the train step's own log-probs (PPO ratio exactly 1 at the scored params); the reference copy
stays frozen; ``init_from`` into a value-head config zero-fills the missing head."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic_tiny
from configs.base import get_base_config
from kat_jax.model import ModelConfig, Transformer, intervals_from_segment_ids
from kat_jax.train import loop
from kat_jax.train.trainer import Trainer
from kat_jax.tree import batch as tree_batch, build
from kat_jax.tree.logprobs import batch_to_arrays, pairs_from_flat

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trainer_driver  # noqa: E402
from kill_helpers import kill_after_checkpoint  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, EVERY, KILL_AFTER = 12, 4, 8
OVERRIDES = dict(steps=STEPS, checkpoint_every=EVERY, eval_every=0, progress_bar=False,
                 seq_len=64, log_every=1, warmup_steps=2)


def _config():
  c = synthetic_tiny.get_config()
  c.train.update(OVERRIDES)
  return c


def _launch(workdir):
  flags = [f"--config.train.{k}={v}" for k, v in OVERRIDES.items()]
  return subprocess.Popen([sys.executable, "tests/train/trainer_driver.py", workdir, *flags],
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_trainer_loop_equals_loop_train_and_survives_kill(tmp_path):
  # loop.train, in process.
  reference = loop.train(_config(), str(tmp_path / "loop"))["state"]
  # The same steps driven through the Trainer by a separate program, straight...
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  p = _launch(straight)
  _, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]
  # ... and killed with SIGKILL after checkpoint KILL_AFTER, then restarted.
  kill_after_checkpoint(_launch(killed), killed, KILL_AFTER, STEPS)
  p = _launch(killed)
  _, err = p.communicate(timeout=600)
  assert p.returncode == 0, err[-3000:]

  a, b = Trainer(_config(), straight), Trainer(_config(), killed)
  a.close(), b.close()
  assert a.restored_step == b.restored_step == STEPS
  _assert_trees_equal(a.state, reference)
  _assert_trees_equal(b.state, reference)
  # The loop's own state came back exactly, and equals replaying it from the start.
  expected = trainer_driver.initial_extra()
  for step in range(1, STEPS + 1):
    expected = trainer_driver.advance(expected, step)
  for extra in (a.extra_state["loop"], b.extra_state["loop"]):
    assert extra["curriculum"] == expected["curriculum"]
    np.testing.assert_array_equal(extra["returns"], expected["returns"])
    assert extra["returns"].dtype == np.float32
    np.testing.assert_array_equal(jax.random.key_data(extra["rng"]),
                                  jax.random.key_data(expected["rng"]))


# ------------------------------------------------------------------------------------ score

VOCAB, PROMPT = 64, 10


def _tree_config(tmp_path):
  c = get_base_config("tiny")
  c.stage = "sft_tree"
  c.model.update(dict(vocab_size=VOCAB, value_head=True))
  c.train.update(dict(loss="tree", objective="ppo", value_coef=0.5, batch_size=8, seq_len=48,
                      steps=4, warmup_steps=0, progress_bar=False, use_reference=True,
                      learning_rate=1e-2))
  return c


def _tree_batch(seed=0):
  rng = np.random.default_rng(seed)
  trees = []
  for _ in range(8):
    prompt = list(rng.integers(0, VOCAB, PROMPT))
    trajs = [prompt + list(rng.integers(0, VOCAB, int(rng.integers(2, 10)))) for _ in range(3)]
    fields = dict(weight=[(np.arange(len(t)) >= PROMPT).astype(np.float32) for t in trajs],
                  advantage=[np.full(len(t), rng.normal(), np.float32) for t in trajs],
                  **{"return": [rng.normal(size=len(t)).astype(np.float32) for t in trajs]})
    trees.append(build.build_tree(trajs, fields=fields))
  return trees, batch_to_arrays(tree_batch.batch_trees(trees, max_tokens=48, max_nodes=8,
                                                       max_traj=4, max_len=24))


def test_score_equals_plain_model_and_first_ratio_is_one(tmp_path):
  config = _tree_config(tmp_path)
  trainer = Trainer(config, str(tmp_path / "run"))
  trees, batch = _tree_batch()
  scores = trainer.score(batch)
  plain = Transformer(ModelConfig.from_config(config.model))
  params = jax.device_get(trainer.params)
  # Every trajectory alone, as a row of one causal batch (zero-padded at the end, which no earlier
  # position sees): one compiled forward instead of an eager one per trajectory.
  trajs = [(b, k, tree.trajectory_tokens(k)) for b, tree in enumerate(trees)
           for k in range(tree.num_traj)]
  width = max(len(t) for _, _, t in trajs)
  tokens = jnp.asarray([list(t) + [0] * (width - len(t)) for _, _, t in trajs], jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(width), tokens.shape)
  out = jax.jit(plain.apply)({"params": params}, tokens, positions,
                             intervals_from_segment_ids(jnp.ones_like(tokens)))
  logp, ent = pairs_from_flat(out.logits, tokens)
  for row, (b, k, t) in enumerate(trajs):
    n = len(t) - 1
    np.testing.assert_allclose(scores["logp"][b, k, :n], logp[row, :n], atol=1e-5)
    np.testing.assert_allclose(scores["entropy"][b, k, :n], ent[row, :n], atol=1e-5)
    np.testing.assert_allclose(scores["values"][b, k, :n], out.values[row, :n], atol=1e-5)

  # The step's own log-probs equal the scored ones: with old_logp = score, every ratio is 1.
  old = np.zeros(batch["field/weight"].shape, np.float32)
  old[..., 1:] = scores["logp"]
  metrics = jax.device_get(trainer.step({**batch, "field/old_logp": old}))
  np.testing.assert_allclose(metrics["ratio"], 1.0, atol=1e-6)
  assert metrics["clipped_frac"] == 0.0
  # The reference stayed where training started; the params moved.
  ref_scores = trainer.score(batch, params=trainer.reference_params)
  np.testing.assert_array_equal(ref_scores["logp"], scores["logp"])
  assert np.abs(trainer.score(batch)["logp"] - scores["logp"]).max() > 1e-4
  trainer.close()


def test_score_flat_batch(tmp_path):
  config = _tree_config(tmp_path)
  trainer = Trainer(config, str(tmp_path / "run"))
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, VOCAB, (8, 17)).astype(np.int32)
  seg = np.ones((8, 16), np.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg,
               positions=np.broadcast_to(np.arange(16), (8, 16)).astype(np.int32))
  scores = trainer.score(batch)
  out = Transformer(ModelConfig.from_config(config.model)).apply(
      {"params": jax.device_get(trainer.params)}, jnp.asarray(tokens), jnp.arange(17)[None],
      intervals_from_segment_ids(jnp.ones((8, 17), jnp.int32)))
  logp, ent = pairs_from_flat(out.logits, jnp.asarray(tokens))
  np.testing.assert_allclose(scores["logp"], logp, atol=1e-5)
  np.testing.assert_allclose(scores["entropy"], ent, atol=1e-5)
  np.testing.assert_allclose(scores["values"], out.values[:, :16], atol=1e-5)
  trainer.close()


def test_init_from_zero_fills_a_missing_value_head(tmp_path):
  src = _tree_config(tmp_path)
  src.model.value_head = False
  src.train.update(dict(value_coef=0.0, objective="nll", use_reference=False))
  source = Trainer(src, str(tmp_path / "sft"))
  source.save(force=True)
  source.close()
  dst = _tree_config(tmp_path)
  dst.init_from = str(tmp_path / "sft")
  trainer = Trainer(dst, str(tmp_path / "rl"))
  params = jax.device_get(trainer.params)
  assert isinstance(trainer.params["value_head"], jax.Array)
  np.testing.assert_array_equal(params.pop("value_head"), 0.0)
  _assert_trees_equal(params, source.state.params)
  trainer.close()
