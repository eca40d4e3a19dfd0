"""Knowledge distillation (kat_jax.train.distill): the divergences equal a hand-computed numpy
reference (temperature, top-k), vanish with their gradient where the student is the teacher; the
loss on a tree equals the flat batch's (value and gradients), the precomputed top-k give the
in-step teacher's loss at the same k (directly and through the stored dataset and the stage's
iterator), micro-batching is exact, a student trained by the Trainer moves toward the teacher, and
bad configs are ConfigErrors."""
import copy
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.base import get_base_config, train_config
from kat_jax import config as config_lib
from kat_jax.errors import ConfigError
from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
from kat_jax.train import distill, losses, stages
from kat_jax.train import step as step_lib
from kat_jax.tree import batch as tree_batch
from kat_jax.tree import build
from kat_jax.tree import logprobs as tree_lp

VOCAB = 64
K, L = 4, 12                     # trajectories per tree, longest trajectory


# ------------------------------------------------------------------------------ the reference

def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_divergence(student, teacher, name, temperature, top_k, beta=0.5):
  """Per row, T² · D by the formulas of docs/DISTILL.md, in float64 with explicit loops."""
  rows = student.reshape(-1, student.shape[-1]).astype(np.float64)
  trows = teacher.reshape(-1, teacher.shape[-1]).astype(np.float64)
  out = []
  for s, t in zip(rows, trows):
    ps = np.exp(_np_log_softmax(s / temperature))
    pt = np.exp(_np_log_softmax(t / temperature))
    penalty = 0.0
    if top_k:
      support = np.argsort(-t, kind="stable")[:top_k]
      pt = pt[support] / pt[support].sum()          # the teacher renormalized over its top-k
      mass = ps[support].sum()                      # the student's mass there
      if name == "forward_kl":                      # the direct formula (no renormalized student)
        out.append(temperature ** 2 * sum(
            pt[i] * (np.log(pt[i]) - np.log(ps[support][i])) for i in range(top_k)))
        continue
      ps = ps[support] / mass
      penalty = -np.log(mass)
    if name == "forward_kl":
      d = sum(pt[i] * np.log(pt[i] / ps[i]) for i in range(len(pt)))
    elif name == "reverse_kl":
      d = sum(ps[i] * np.log(ps[i] / pt[i]) for i in range(len(pt)))
    else:
      m = beta * pt + (1 - beta) * ps
      d = (beta * sum(pt[i] * np.log(pt[i] / m[i]) for i in range(len(pt))) +
           (1 - beta) * sum(ps[i] * np.log(ps[i] / m[i]) for i in range(len(pt))))
    out.append(temperature ** 2 * (d + penalty))
  return np.asarray(out).reshape(student.shape[:-1])


def _dcfg(**overrides):
  c = get_base_config().train.distill
  c.update(overrides)
  return c


@pytest.mark.parametrize("name", distill.DIVERGENCES)
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (2.0, 0), (0.5, 3), (1.5, 7)])
def test_divergence_matches_numpy_reference(name, temperature, top_k):
  rng = np.random.default_rng(0)
  student = rng.normal(size=(2, 3, 7)).astype(np.float32) * 2
  teacher = rng.normal(size=(2, 3, 7)).astype(np.float32) * 2
  cfg = _dcfg(divergence=name, temperature=temperature, top_k=top_k, jsd_beta=0.3)
  got = distill.divergence(jnp.asarray(student), distill.teacher_rows(jnp.asarray(teacher), top_k),
                           cfg)
  want = _np_divergence(student, teacher, name, temperature, top_k, beta=0.3)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)
  assert (want > 0).all()


@pytest.mark.parametrize("name", distill.DIVERGENCES)
def test_zero_with_zero_gradient_when_student_is_teacher(name):
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 11)).astype(np.float32))
  for temperature in (1.0, 2.5):
    cfg = _dcfg(divergence=name, temperature=temperature, jsd_beta=0.3)
    f = lambda s: jnp.sum(distill.divergence(s, distill.teacher_rows(logits, 0), cfg))
    for value_and_grad in (jax.value_and_grad(f), jax.jit(jax.value_and_grad(f))):
      value, grad = value_and_grad(logits)
      assert float(value) == 0.0
      assert float(jnp.max(jnp.abs(grad))) < 1e-6
    # Top-k with every id: the same distributions (renormalized in another order).
    full_k = _dcfg(divergence=name, temperature=temperature, top_k=11)
    np.testing.assert_allclose(
        distill.divergence(logits, distill.teacher_rows(logits, 11), full_k), 0.0, atol=1e-5)
    # Truncated: what is left is -T²·log of the teacher's top-3 mass, for every divergence.
    top3 = _dcfg(divergence=name, temperature=temperature, top_k=3)
    p = np.exp(_np_log_softmax(np.asarray(logits, np.float64) / temperature))
    mass = np.sort(p, axis=-1)[..., -3:].sum(-1)
    np.testing.assert_allclose(distill.divergence(logits, distill.teacher_rows(logits, 3), top3),
                               -temperature ** 2 * np.log(mass), rtol=1e-5)


# ------------------------------------------------------------------------------ models, batches

def _model(num_layers, d_model, num_heads, mlp_dim, seed):
  c = get_preset("tiny")
  c.update(dict(vocab_size=VOCAB, num_layers=num_layers, d_model=d_model, num_heads=num_heads,
                num_kv_heads=num_heads // 2, head_dim=16, mlp_dim=mlp_dim))
  model = Transformer(ModelConfig.from_config(c))
  tok = jnp.zeros((1, 8), jnp.int32)
  init = jax.jit(lambda r: nn.unbox(model.init(r, tok, tok, intervals_from_segment_ids(
      jnp.ones_like(tok)))["params"]))
  return model, init(jax.random.key(seed))


@pytest.fixture(scope="module")
def student():
  return _model(1, d_model=64, num_heads=4, mlp_dim=128, seed=0)


@pytest.fixture(scope="module")
def teacher():
  """Another size: deeper and wider, its own init."""
  return _model(2, d_model=96, num_heads=6, mlp_dim=192, seed=7)


TRAJS = [[3, 4, 5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 11, 12], [3, 4, 5, 13, 14, 15, 16, 17, 18],
         [3, 4, 20, 21]]
WEIGHTS = [np.array([0, 0, 0, 1, 1, 1, 1, 1], np.float32), np.array([0, 0, 0, 0, 1, 1], np.float32),
           np.array([0, 0, 0, 1, 1, 1, 0.5, 1, 1], np.float32), np.array([0, 1, 1, 1], np.float32)]


def _tree_batch():
  tree = build.build_tree(TRAJS, fields={"weight": WEIGHTS})
  b = tree_batch.batch_trees([tree], max_tokens=32, max_nodes=16, max_traj=K, max_len=L)
  return jax.tree.map(jnp.asarray, tree_lp.batch_to_arrays(b))


def _flat_batch():
  """The same trajectories as K separate rows: row j predicts token j + 1 with its weight."""
  t = L - 1
  out = {k: np.zeros((K, t), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
  out["weights"] = np.zeros((K, t), np.float32)
  for k, (traj, w) in enumerate(zip(TRAJS, WEIGHTS)):
    n = len(traj) - 1
    out["inputs"][k, :n], out["targets"][k, :n] = traj[:-1], traj[1:]
    out["positions"][k, :n], out["segment_ids"][k, :n] = np.arange(n), 1
    out["weights"][k, :n] = w[1:]
  return jax.tree.map(jnp.asarray, out)


def _train_cfg(**distill_fields):
  c = train_config(loss="distill", z_loss=1e-4)
  c.distill.update(dict(alpha=0.7, temperature=2.0))
  c.distill.update(distill_fields)
  return c


def _ctx(model, cfg, teacher=None):
  t = None if teacher is None else distill.Teacher(teacher[0].apply, teacher[1])
  return losses.LossContext(apply_fn=model.apply, config=cfg, teacher=t)


def _loss_fn(ctx):
  """jitted (params, batch) -> ((loss, metric sums), grads) of the distill loss under ``ctx``."""
  loss = losses.get_loss("distill")

  def f(p, batch):
    num, metrics = loss.numerator(p, batch, ctx)
    return num / loss.denominator(batch, ctx.config), metrics

  return jax.jit(jax.value_and_grad(f, has_aux=True))


def _value_and_grads(params, batch, ctx):
  (value, metrics), grads = _loss_fn(ctx)(params, batch)
  return value, metrics, grads


def _assert_grads_close(a, b, rtol=1e-4):
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(b))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=1e-5 * scale, rtol=rtol)


# ------------------------------------------------------------------------------ the loss

def test_alpha_zero_is_the_lm_loss(student, teacher):
  model, params = student
  batch = _flat_batch()
  cfg = _train_cfg(alpha=0.0)
  ctx = _ctx(model, cfg, teacher)
  num, metrics = jax.jit(lambda p: losses.get_loss("distill").numerator(p, batch, ctx))(params)
  lm_num, lm_metrics = jax.jit(lambda p: losses.get_loss("lm").numerator(p, batch, ctx))(params)
  np.testing.assert_allclose(num, lm_num, rtol=1e-6)
  for k in ("ce_sum", "z_sum", "correct_sum"):
    np.testing.assert_allclose(metrics[k], lm_metrics[k], rtol=1e-6)
  assert float(losses.get_loss("distill").denominator(batch)) == float(batch["weights"].sum())
  assert float(metrics["distill_sum"]) > 0


def test_loss_and_gradient_vanish_for_the_student_as_its_own_teacher(student):
  model, params = student
  cfg = _train_cfg(alpha=1.0, divergence="jsd")
  cfg.z_loss = 0.0
  value, _, grads = _value_and_grads(params, _flat_batch(), _ctx(model, cfg, student))
  assert abs(float(value)) < 1e-6
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-6


@pytest.mark.parametrize("divergence,top_k,chunk", [("forward_kl", 0, 0), ("jsd", 5, 7)])
def test_tree_equals_flat(student, teacher, divergence, top_k, chunk):
  """Same trajectories: value and gradients equal; a tree computes each shared row once."""
  model, params = student
  cfg = _train_cfg(divergence=divergence, top_k=top_k)
  cfg.logits_chunk = chunk
  tb, fb = _tree_batch(), _flat_batch()
  tv, tm, tg = _value_and_grads(params, tb, _ctx(model, cfg, teacher))
  fv, fm, fg = _value_and_grads(params, fb, _ctx(model, cfg, teacher))
  np.testing.assert_allclose(tv, fv, rtol=1e-5)
  np.testing.assert_allclose(tm["distill_sum"], fm["distill_sum"], rtol=1e-5)
  np.testing.assert_allclose(tm["nll_sum"], fm["ce_sum"], rtol=1e-5)
  _assert_grads_close(tg, fg)
  assert int(tb["token_valid"].sum()) < sum(len(t) for t in TRAJS)   # the prefix is shared


def test_tree_per_trajectory_normalizer(student, teacher):
  """loss_agg=seq_mean_token_mean: the mean over trajectories of each one's flat token mean."""
  model, params = student
  cfg = _train_cfg(divergence="forward_kl")
  cfg.loss_agg = "seq_mean_token_mean"
  tv, _, _ = _value_and_grads(params, _tree_batch(), _ctx(model, cfg, teacher))
  # The flat loss of trajectory k alone: the same batch with every other row's weights zeroed
  # (numerator and denominator are weighted sums), one compiled function for all k.
  fb, flat = _flat_batch(), _loss_fn(_ctx(model, cfg, teacher))
  per_traj = [flat(params, {**fb, "weights": fb["weights"] * (jnp.arange(K) == k)[:, None]})[0][0]
              for k in range(K)]
  np.testing.assert_allclose(tv, np.mean(per_traj), rtol=1e-5)


@pytest.mark.parametrize("tree,chunk", [(True, 0), (False, 5)])
def test_precomputed_topk_equals_in_step_teacher(student, teacher, tree, chunk):
  model, params = student
  cfg = _train_cfg(divergence="jsd", top_k=6)
  cfg.logits_chunk = chunk
  batch = _tree_batch() if tree else _flat_batch()
  ids, logits = jax.jit(lambda p, b: distill.teacher_topk(
      distill.Teacher(teacher[0].apply, p), b, 8, chunk))(teacher[1], batch)
  assert ids.shape == batch["tokens" if tree else "inputs"].shape + (8,)
  stored = {**batch, distill.TOPK_IDS: ids, distill.TOPK_LOGITS: logits}  # k=8 stored, 6 used
  pv, pm, pg = _value_and_grads(params, stored, _ctx(model, cfg))
  iv, im, ig = _value_and_grads(params, batch, _ctx(model, cfg, teacher))
  np.testing.assert_allclose(pv, iv, rtol=1e-6)
  np.testing.assert_allclose(pm["distill_sum"], im["distill_sum"], rtol=1e-6)
  _assert_grads_close(pg, ig, rtol=1e-5)


def test_microbatches_are_exact(student, teacher):
  """grad_accum_steps=2 (the teacher runs per micro-batch): the full batch's loss and gradients."""
  model, params = student
  cfg = _train_cfg(divergence="reverse_kl", top_k=4)
  batch = _flat_batch()
  ctx = _ctx(model, cfg, teacher)
  loss = losses.get_loss("distill")
  v1, _, _, g1 = jax.jit(lambda p: step_lib.loss_and_grads(p, batch, loss, ctx, 1))(params)
  v2, _, _, g2 = jax.jit(lambda p: step_lib.loss_and_grads(p, batch, loss, ctx, 2))(params)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  _assert_grads_close(g2, g1, rtol=1e-5)


# ------------------------------------------------------------------------------ stored top-k

def test_stored_topk_round_trip_and_iterator(tmp_path, teacher):
  batch = jax.tree.map(np.asarray, _flat_batch())
  ids, logits = jax.device_get(jax.jit(lambda p, b: distill.teacher_topk(
      distill.Teacher(teacher[0].apply, p), b, 5))(teacher[1], batch))
  keys = distill.row_keys(batch)
  assert len(set(keys)) == K
  rows = [(k, ids[i], logits[i]) for i, k in enumerate(keys)]
  path = str(tmp_path / "topk")
  distill.write_topk(path, {"train": iter(rows[:3]), "eval": iter(rows[3:])},
                     {"teacher": "/t", "top_k": 5, "vocab_size": VOCAB})
  store = distill.TopKStore(path)
  assert store.top_k == 5 and len(store) == K
  got_ids, got_logits = store.lookup("train", [keys[2], keys[0]])
  np.testing.assert_array_equal(got_ids, ids[[2, 0]])
  np.testing.assert_array_equal(got_logits, logits[[2, 0]])

  class Rows:                                     # a stage iterator yielding train rows 0..2
    def __init__(self):
      self.n = 0

    def __next__(self):
      self.n += 1
      return jax.tree.map(lambda x: x[:3], batch)

    def get_state(self):
      return {"n": self.n}

  it = distill.TeacherTopKIterator(Rows(), store, "train")
  out = next(it)
  np.testing.assert_array_equal(out[distill.TOPK_IDS], ids[:3])
  assert it.get_state() == {"n": 1}
  with pytest.raises(ConfigError, match=r"rows \[0, 1, 2\] of this 'eval' batch are not in"):
    distill.TeacherTopKIterator(Rows(), store, "heldout").__next__()
  with pytest.raises(FileExistsError):
    distill.write_topk(path, {"train": iter(rows)}, {})


# ------------------------------------------------------------------------------ Trainer, configs

def _synthetic_config(**model_overrides):
  c = get_base_config("tiny")
  c.stage = "synthetic"
  c.model.update({**dict(vocab_size=VOCAB, num_layers=1, d_model=64, num_heads=4, num_kv_heads=2,
                         mlp_dim=128), **model_overrides})
  c.train.update(dict(steps=20, batch_size=8, seq_len=32, learning_rate=1e-2, warmup_steps=0,
                      eval_every=0, checkpoint_every=1000, async_checkpoint=False,
                      progress_bar=False, log_every=1000))
  return c


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
  """A trainer workdir of a deeper, wider model: no model config recorded, shapes inferred."""
  from kat_jax.train.trainer import Trainer
  c = _synthetic_config(num_layers=2, d_model=128, num_heads=8, num_kv_heads=4, mlp_dim=256)
  workdir = str(tmp_path_factory.mktemp("teacher"))
  trainer = Trainer(c, workdir)
  trainer.save(force=True)
  params = jax.device_get(trainer.params)
  trainer.close()
  return workdir, params


def test_trainer_distills_the_student_toward_the_teacher(teacher_workdir, tmp_path):
  from kat_jax.train.trainer import Trainer
  source, teacher_params = teacher_workdir
  c = _synthetic_config()
  c.train.loss = "distill"
  c.train.distill.update(dict(teacher=source, alpha=1.0, divergence="forward_kl"))
  trainer = Trainer(c, str(tmp_path / "student"))
  assert trainer.teacher.model_cfg.num_layers == 2 and trainer.teacher.model_cfg.d_model == 128
  for got, want in zip(jax.tree.leaves(jax.device_get(trainer.teacher.params)),
                       jax.tree.leaves(teacher_params)):
    np.testing.assert_array_equal(got, want)
  it, _ = stages.get_stage("synthetic").make_data(c, str(tmp_path), split="train", batch_size=8,
                                                  seed=0, shard_index=0, shard_count=1)
  batches = [next(it) for _ in range(4)]
  kl = []
  for i in range(24):
    kl.append(float(trainer.step(batches[i % 4])["distill"]))
  ev = trainer.evaluate(lambda: iter(batches), num_batches=4)
  trainer.close()
  assert np.mean(kl[-4:]) < 0.6 * np.mean(kl[:4]), kl      # measured: 0.75 -> 0.34
  assert ev["distill"] < 0.5 * kl[0], (ev, kl)


@pytest.mark.slow
def test_precomputed_topk_through_the_stage_matches_the_in_step_teacher(teacher_workdir, tmp_path):
  """experiments.distill_topk writes the teacher's top-k of the synthetic stage's batches; a
  Trainer reading them through the stage's iterator takes the in-step teacher's first step."""
  from experiments import distill_topk
  from kat_jax.train.trainer import Trainer
  source, _ = teacher_workdir
  c = _synthetic_config()
  c.train.loss = "distill"
  c.train.distill.update(dict(teacher=source, top_k=8, divergence="reverse_kl",
                              topk_data=str(tmp_path / "topk")))
  result = distill_topk.precompute(c, str(tmp_path / "pre"), num_batches=2, eval_batches=0)
  assert result["rows"] == {"train": 16}
  metrics = {}
  for name, topk_data in (("stored", c.train.distill.topk_data), ("in_step", "")):
    cfg = copy.deepcopy(c)
    cfg.train.distill.topk_data = topk_data
    trainer = Trainer(cfg, str(tmp_path / name))
    assert (trainer.teacher is None) == (name == "stored")
    it, _ = stages.get_stage("synthetic").make_data(cfg, str(tmp_path), split="train",
                                                    batch_size=8, seed=0, shard_index=0,
                                                    shard_count=1)
    metrics[name] = [jax.device_get(trainer.step(next(it))) for _ in range(2)]
    trainer.close()
  for stored, in_step in zip(metrics["stored"], metrics["in_step"]):
    np.testing.assert_allclose(stored["loss"], in_step["loss"], rtol=1e-5)
    np.testing.assert_allclose(stored["distill"], in_step["distill"], rtol=1e-5)
  # A batch it did not precompute (the third) is refused naming the fix.
  cfg = copy.deepcopy(c)
  it, _ = stages.get_stage("synthetic").make_data(cfg, str(tmp_path), split="train", batch_size=8,
                                                  seed=0, shard_index=0, shard_count=1)
  next(it), next(it)
  with pytest.raises(ConfigError, match="rerun it with this config"):
    next(it)


def test_teacher_from_hf_dir_and_converted_workdir(teacher, tmp_path):
  """A Hugging Face checkpoint dir (config.json) and a params-only workdir (model_config.json)
  give the teacher's model and params exactly; a teacher without a tokenizer (when the student
  has one) or of another vocabulary is refused."""
  from kat_jax import sharding as sharding_lib
  from kat_jax.model import hf
  model, params = teacher
  cfg = model.cfg
  hf_dir, converted = str(tmp_path / "hf"), str(tmp_path / "converted")
  hf.export_hf(params, cfg, hf_dir)
  model_config = ml_collections.ConfigDict(dict(name="tiny", **dataclasses.asdict(cfg)))
  hf.save_params_checkpoint(converted, params, model_config)
  c = _synthetic_config()
  c.train.loss = "distill"
  mesh = sharding_lib.make_mesh(c.mesh)
  for source in (hf_dir, f"{converted}@0"):
    c.train.distill.teacher = source
    loaded = distill.load_teacher(c, mesh, sharding_lib.rules_from_config(c))
    for field in ("num_layers", "d_model", "num_heads", "mlp_dim", "vocab_size"):
      assert getattr(loaded.model_cfg, field) == getattr(cfg, field), (source, field)
    for got, want in zip(jax.tree.leaves(jax.device_get(loaded.params)), jax.tree.leaves(params)):
      np.testing.assert_array_equal(got, want)
  with pytest.raises(ConfigError, match=r"teacher=.*@0 has no tokenizer"):
    distill.attach_teacher_data(c, iter([]), _FakeTokenizer(), split="train")
  c.model.vocab_size = 96                          # a student of another vocabulary
  with pytest.raises(ConfigError, match=r"teacher=.*@0 has vocab_size=64 but the student's "
                                        r"config.model.vocab_size=96"):
    distill.load_teacher(c, mesh, sharding_lib.rules_from_config(c))


@dataclasses.dataclass
class _FakeTokenizer:
  vocab_size: int = 64
  eos_id: int = 1
  pad_id: int = 0
  shift: int = 0

  def encode(self, text):
    return [(ord(ch) + self.shift) % self.vocab_size for ch in text]

  def token_id(self, name):
    return 2 + len(name) % 7


def test_tokenizer_mismatch_names_both():
  same = distill.tokenizer_fingerprint(_FakeTokenizer())
  distill.check_tokenizer(same, _FakeTokenizer(), "the teacher")
  with pytest.raises(ConfigError, match=r"tokenizer of the teacher is not the student's "
                                        r"\(probe: teacher '[0-9a-f]+', student '[0-9a-f]+'\)"):
    distill.check_tokenizer(same, _FakeTokenizer(shift=1), "the teacher")
  with pytest.raises(ConfigError, match=r"vocab_size: teacher 64, student 80"):
    distill.check_tokenizer(same, _FakeTokenizer(vocab_size=80), "the teacher")


def _distill_config(**fields):
  c = get_base_config()
  c.train.loss = "distill"
  c.train.distill.teacher = "/some/teacher"
  for path, value in fields.items():
    node = c
    *head, last = path.split(".")
    for part in head:
      node = node[part]
    node[last] = value
  return c


@pytest.mark.parametrize("fields,match", [
    ({"train.distill.divergence": "kl"}, r"distill.divergence='kl' is not one of \['forward_kl'"),
    ({"train.distill.alpha": 1.5}, r"distill.alpha=1.5 must be in \[0, 1\]"),
    ({"train.distill.temperature": 0.0}, r"distill.temperature=0.0 must be > 0"),
    ({"train.distill.top_k": -1}, r"distill.top_k=-1 must be in \[0, config.model.vocab_size"),
    ({"train.distill.jsd_beta": 1.0}, r"distill.jsd_beta=1.0 must be in \(0, 1\)"),
    ({"train.distill.teacher": ""}, r"loss='distill' needs a teacher: set --config.train.distill."
                                    r"teacher"),
    ({"train.distill.topk_data": "/x"}, r"topk_data='/x' holds the teacher's top-k .* set "
                                        r"--config.train.distill.top_k"),
    ({"train.objective": "ppo"}, r"would ignore config.train.objective='ppo'"),
    ({"train.distill.topk_data": "/x", "train.distill.top_k": 4, "stage": "rl"},
     r"config.stage='rl' samples its own batches"),
])
def test_bad_configs_are_config_errors(fields, match):
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(_distill_config(**fields), 8)


def test_good_configs_validate_and_distill_tiny_parses():
  config_lib.validate(_distill_config(), 8)
  config_lib.validate(_distill_config(**{"train.distill.topk_data": "/x",
                                         "train.distill.top_k": 4}), 8)
  from configs import distill_tiny
  teacher = distill_tiny.get_config("teacher")
  config_lib.validate(teacher, 8)
  student = distill_tiny.get_config()
  with pytest.raises(ConfigError, match="needs a teacher"):
    config_lib.validate(student, 8)
  student.train.distill.teacher = "/tmp/kat_teacher"
  config_lib.validate(student, 8)
  assert teacher.model.vocab_size == student.model.vocab_size
  assert (teacher.model.num_layers, teacher.model.d_model) > (student.model.num_layers,
                                                             student.model.d_model)
  assert isinstance(student.train.distill, ml_collections.ConfigDict)
