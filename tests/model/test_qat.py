"""Quantization-aware training (kat_jax.model.qat): with QAT off the model is the plain one bitwise;
the fake-quant forward equals the exported int8 model's forward (codes + scales) to float32
rounding, and the codes meet the int8 bound; straight-through gradients reach every weight and
equal the float model's gradient at the quantized point; a QAT train step on the 8-device mesh
equals one device; greedy sampling from the export (written and loaded back as a workdir) gives
the fake-quant model's tokens; configs/qat_tiny.py is a valid run; bad QAT configs are ConfigErrors
naming the field.

Tolerance of export vs fake-quant (derived): both forwards compute with the same float32 numbers —
the fake-quant ``W + stop_gradient(Q(W) - W)`` is exactly ``Q(W)`` (Sterbenz: ``Q(W)`` and ``W``
are within a factor 2, or ``Q(W) = 0``) and ``Q(W)`` is ``codes · scale`` in both — so the logits
can differ only by float32 reassociation between two compiled programs: bound 1e-6 × max|logits|
(measured: 0, bitwise).

int8 activations are a step function of the activations: two different programs on the same
inputs (jit vs eager, a sharded step vs one device) differ by float rounding, which can flip a
code and move a logit by ~1e-2. So comparisons across programs use weight quantization, or hold
within one program per model; the mesh step is tested with int8 weights and head (with per-token
int8 activations the tiny step measured a 2.5e-4 relative loss difference between the meshes)."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.base import get_base_config, train_config
from kat_jax import config as config_lib
from kat_jax import sharding as sharding_lib
from kat_jax.data.synthetic import SyntheticCopyIterator
from kat_jax.errors import ConfigError
from kat_jax.model import (ModelConfig, Transformer, get_preset, intervals_from_segment_ids, lora,
                           qat)
from kat_jax.model.presets import QatConfig
from kat_jax.train import losses, optimizer, state as state_lib, step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, T = 64, 16
# QAT variants: weights only; + per-token int8 activations and the tied head (embedding lookup
# included); + per-tensor activations and an untied head, bfloat16 params, QK-norm. (bfloat16
# compute: XLA may keep float32 precision across a bfloat16 cast, differently in two programs
# (xla_allow_excess_precision), so the export matches only to bfloat16 rounding there.)
VARIANTS = {
    "weights": dict(),
    "act_head": dict(activations="int8", head=True),
    "tensor_untied_bf16": dict(activations="int8", act_granularity="per_tensor", head=True),
}


def _cfg(qat_fields=None, **model) -> ModelConfig:
  c = get_preset("tiny")
  c.update(dict(vocab_size=VOCAB, num_layers=1))
  if qat_fields is not None:
    c.qat.update(dict(enabled=True, **qat_fields))
  c.update(model)
  return ModelConfig.from_config(c)


def _variant(name: str) -> ModelConfig:
  if name == "tensor_untied_bf16":
    return _cfg(VARIANTS[name], tie_embeddings=False, param_dtype="bfloat16", qk_norm=True)
  return _cfg(VARIANTS[name])


def _inputs(batch=2, seed=0):
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, T)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (batch, T))
  return tokens, positions, intervals_from_segment_ids(jnp.ones((batch, T), jnp.int32))


def _init(cfg, seed=0):
  return jax.jit(lambda r: nn.unbox(Transformer(cfg).init(r, *_inputs())["params"]))(
      jax.random.key(seed))


def _logits(cfg, params):
  return jax.jit(Transformer(cfg).apply)({"params": params}, *_inputs()).logits


def _lm_loss(cfg):
  tokens, positions, mask = _inputs()

  def loss(params):
    logits = Transformer(cfg).apply({"params": params}, tokens, positions, mask).logits
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
  return jax.jit(jax.grad(loss))


def _leaves(tree):
  return {"/".join(str(k.key) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------------------ forward

def test_qat_off_is_the_plain_model_bitwise():
  plain = _cfg()
  params = _init(plain)
  # Every other QAT field set, enabled=False: the plain model (same params, same logits bitwise).
  off = _cfg(dict(activations="int8", head=True), qat={"enabled": False})
  assert not off.qat.enabled
  jax.tree.map(np.testing.assert_array_equal, _init(off), params)
  np.testing.assert_array_equal(_logits(off, params), _logits(plain, params))
  # QAT adds no params and does not shift the init RNG: the plain init, leaf for leaf.
  for name in VARIANTS:
    cfg = _variant(name)
    reference = params if name != "tensor_untied_bf16" else _init(qat.plain_config(cfg))
    jax.tree.map(np.testing.assert_array_equal, _init(cfg), reference)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fake_quant_forward_equals_the_exported_int8_forward(name):
  cfg = _variant(name)
  params = _init(cfg)
  codes = qat.export_params(params, cfg)
  fake = _logits(cfg, params)
  exported = _logits(qat.export_config(cfg), codes)
  bound = 1e-6 * float(jnp.abs(fake).max())
  assert float(jnp.abs(fake - exported).max()) <= bound
  # QAT is not a no-op: the float model's logits differ by far more than the bound.
  assert float(jnp.abs(fake - _logits(qat.plain_config(cfg), params)).max()) > 1e-2
  # The codes: int8 in [-128, 127], one float32 scale per output channel (the vocabulary entry of
  # the head), |W - Q(W)| <= scale / 2.
  flat, flat_codes = _leaves(params), _leaves(codes)
  head = qat.head_name(cfg)
  quantized = [p for p in flat if p.rsplit("/", 1)[-1] in {k for _, k, _ in lora.KERNELS.values()}]
  quantized += [head] if cfg.qat.head else []
  assert len(quantized) == 7 * cfg.num_layers + cfg.qat.head
  for path in quantized:
    c, s = flat_codes[path], flat_codes[path + "_scale"]
    assert c.dtype == np.int8 and s.dtype == np.float32 and c.shape == flat[path].shape
    assert -128 <= c.min() and c.max() <= 127
    assert c.nbytes * flat[path].itemsize == flat[path].nbytes      # 1 byte per weight
    inputs = {k: n for _, k, n in lora.KERNELS.values()}.get(path.rsplit("/", 1)[-1])
    assert s.size == (VOCAB if inputs is None else int(np.prod(flat[path].shape[inputs:])))
    err = np.abs(c.astype(np.float32) * s - flat[path].astype(np.float32))
    assert (err <= s / 2 + 1e-6 * 127.5 * s).all(), path     # s / 2, up to rounding of W / s
  assert set(flat_codes) == set(flat) | {p + "_scale" for p in quantized}
  # The head's label path (losses read it) equals the full logits at the labels, for both models,
  # and the export's equals the fake-quant model's (the same program for both: int8 activations
  # turn float noise between different programs into code flips).
  tokens = _inputs()[0]
  results = []
  for c_, p_ in ((cfg, params), (qat.export_config(cfg), codes)):
    def label_and_full(p, c_=c_):
      out = Transformer(c_).apply({"params": p}, *_inputs(), return_hidden=True)
      return (Transformer(c_).apply({"params": p}, out.hidden, tokens, method="output_head"),
              out.logits)
    label, full = jax.jit(label_and_full)(p_)
    np.testing.assert_allclose(label, jnp.take_along_axis(full, tokens[..., None], -1)[..., 0],
                               atol=1e-5)
    results.append((label, full))
  for fake_out, exported_out in zip(*results):
    np.testing.assert_allclose(exported_out, fake_out, atol=bound, rtol=0)


def test_float_weights_export_is_the_weights_only_qat_model(tmp_path):
  """The Hugging Face export of a QAT run holds Q(W) as floats: the same logits (weights-only)."""
  from experiments import convert
  from kat_jax.model import hf
  cfg = _variant("weights")
  params = _init(cfg)
  exported = (qat.export_params(params, cfg), qat.export_config(cfg))
  for source, source_cfg in ((params, cfg), exported):
    weights, plain = qat.float_weights(source, source_cfg)
    assert not plain.qat.enabled and jax.tree.structure(weights) == jax.tree.structure(params)
    np.testing.assert_allclose(_logits(plain, weights), _logits(cfg, params), atol=1e-5, rtol=0)
  # experiments.convert --to_hf of a QAT run writes exactly those Q(W).
  model_config = get_preset("tiny")
  model_config.update(dict(vocab_size=VOCAB, num_layers=1))
  model_config.qat.enabled = True
  hf.save_params_checkpoint(str(tmp_path / "run"), params, model_config)
  convert.workdir_to_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
  _, imported = hf.import_hf(str(tmp_path / "hf"))
  jax.tree.map(np.testing.assert_array_equal, imported, weights)


# ------------------------------------------------------------------------------------ gradients

def test_straight_through_gradients_reach_every_weight():
  for name in VARIANTS:
    cfg = _variant(name)
    params = _init(cfg)
    grads = _leaves(_lm_loss(cfg)(params))
    assert set(grads) == set(_leaves(params))
    for path, g in grads.items():
      assert np.isfinite(g).all() and np.abs(g).max() > 0, (name, path)
    if cfg.qat.activations == "none":
      # STE: dL/dW of the QAT model is the float model's gradient at the quantized point Q(W), for
      # every leaf (kernels, embedding, norms).
      weights, plain = qat.float_weights(params, cfg)
      expected = _leaves(_lm_loss(plain)(weights))
      for path, g in grads.items():
        np.testing.assert_allclose(g, expected[path], rtol=1e-4,
                                   atol=1e-6 * np.abs(expected[path]).max(), err_msg=path)


def test_fake_quant_is_round_to_nearest_with_identity_gradient():
  w = jax.random.normal(jax.random.key(3), (32, 4, 8))
  q = qat.kernel(w, "q_proj")                  # one scale per (head, head_dim) output channel
  absmax = jnp.abs(w).max(axis=0, keepdims=True)
  scale = absmax / 127.5
  np.testing.assert_array_equal(q, jnp.clip(jnp.round(w / scale), -128, 127) * scale)
  g = jax.grad(lambda w: jnp.sum(qat.kernel(w, "q_proj") * jnp.arange(w.size).reshape(w.shape)))(w)
  np.testing.assert_array_equal(g, jnp.arange(w.size, dtype=jnp.float32).reshape(w.shape))


# ------------------------------------------------------------------------------------ the step

def _step(mesh, cfg):
  rules = sharding_lib.DEFAULT_RULES
  train_cfg = train_config(steps=10, warmup_steps=0, batch_size=8, seq_len=T, learning_rate=1e-2,
                           eps=1e-4)
  model = Transformer(cfg, mesh=mesh, rules=rules)
  tx, schedule = optimizer.make_optimizer(train_cfg)
  example = {"inputs": jax.ShapeDtypeStruct((8, T), np.int32)}
  state, shardings = state_lib.create_sharded_state(model, tx, example, mesh, rules,
                                                    jax.random.key(0))
  step = step_lib.make_train_step(model.apply, losses.get_loss("lm"), tx, schedule, train_cfg,
                                  shardings, mesh, rules)
  batch = next(SyntheticCopyIterator(vocab_size=VOCAB, batch_size=8, seq_len=T, seed=0, doc_len=8))
  before = jax.device_get(state.params)
  new, metrics = step(state, sharding_lib.host_to_global(batch, mesh, rules), jax.random.key(1))
  return before, jax.device_get(new.params), metrics


def test_qat_train_step_on_8_devices_equals_one_device():
  cfg = _cfg(dict(head=True))
  results = []
  for mesh_cfg, devices in ((dict(data=2, fsdp=2, tensor=2), None),
                            (dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])):
    mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(mesh_cfg), devices)
    before, after, metrics = _step(mesh, cfg)
    assert float(metrics["finite"]) == 1.0
    moved = {p: float(np.abs(a - before_leaf).max())
             for (p, a), before_leaf in zip(_leaves(after).items(), _leaves(before).values())}
    assert min(moved.values()) > 0, moved     # every weight took a step
    results.append((after, float(metrics["loss"])))
  (a, loss_a), (b, loss_b) = results
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)


# ------------------------------------------------------------------------------------ sampling

def test_sampling_from_the_export_equals_greedy_sampling_of_the_fake_quant_model(tmp_path):
  from kat_jax.model import hf
  from kat_jax.sample import Sampler, SamplingConfig
  cfg = _variant("act_head")
  model_config = get_preset("tiny")
  model_config.update(dict(vocab_size=VOCAB, num_layers=1))
  model_config.qat.update(dict(enabled=True, **VARIANTS["act_head"]))
  assert ModelConfig.from_config(model_config) == cfg
  params = _init(cfg)
  run = str(tmp_path / "run")
  hf.save_params_checkpoint(run, params, model_config)      # a QAT run's float params
  # The command line writes the export (kat_jax.model.qat.export_workdir).
  cli = subprocess.run([sys.executable, "-m", "experiments.convert", f"--from_workdir={run}",
                        f"--to_int8={tmp_path / 'int8'}"], cwd=REPO,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                       timeout=300)
  assert cli.returncode == 0, cli.stderr[-3000:]
  model, codes = qat.load_export(str(tmp_path / "int8"))
  assert model.cfg == qat.export_config(cfg)
  assert jax.tree.map(lambda x: x.dtype, codes)["layer_0"]["mlp"]["up_proj"] == jnp.int8
  prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
  config = SamplingConfig(temperature=0.0, max_new_tokens=12)
  outs = [Sampler(m, p, max_len=32, prefill_bucket=8, output_bucket=8).generate(
              prompts, jax.random.key(0), config)
          for m, p in ((Transformer(cfg), params), (model, codes))]
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  np.testing.assert_allclose(outs[0].logprobs_policy, outs[1].logprobs_policy, atol=1e-5)
  assert outs[0].lengths.tolist() == [12] * 3
  # The float model samples something else from the same params (QAT changed the function).
  plain = Sampler(Transformer(qat.plain_config(cfg)), params, max_len=32, prefill_bucket=8,
                  output_bucket=8).generate(prompts, jax.random.key(0), config)
  assert not np.allclose(plain.logprobs_policy, outs[0].logprobs_policy, atol=1e-3)


# ------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("qat_fields,lora_fields,match", [
    (dict(enabled=True, weight_bits=4), {}, r"qat.weight_bits=4: only 8"),
    (dict(enabled=True, activations="fp8"), {}, r"qat.activations='fp8': use one of"),
    (dict(enabled=True, act_granularity="per_channel"), {},
     r"qat.act_granularity='per_channel': use one of"),
    (dict(quantized_params=True), {}, r"quantized_params=True .* needs config.model.qat.enabled"),
    (dict(enabled=True), dict(rank=4), r"qat.enabled=True with config.model.lora.rank=4"),
    (dict(enabled=True, bits=8), {}, r"qat has unknown field\(s\) \['bits'\]"),
])
def test_bad_qat_config_is_a_config_error(qat_fields, lora_fields, match):
  c = get_preset("tiny")
  c.qat = ml_collections.ConfigDict(qat_fields)
  c.lora.update(lora_fields)
  with pytest.raises(ConfigError, match=match):
    ModelConfig.from_config(c)


def test_a_training_config_of_the_int8_export_is_refused():
  c = get_base_config("tiny")
  c.model.qat.update(dict(enabled=True, quantized_params=True))
  with pytest.raises(ConfigError, match=r"quantized_params=True is the int8 export's model"):
    config_lib.validate(c, 8)
  c.model.qat.quantized_params = False
  config_lib.validate(c, 8)


def test_the_qat_tiny_config_is_a_valid_qat_sft_run():
  import test_config_contract as config_contract  # tests/ is on sys.path (rootdir conftest)
  c = config_contract._parse("configs/qat_tiny.py", "--config.model.qat.act_granularity=per_tensor")
  config_lib.validate(c, 8)
  assert c.stage == "sft"
  assert ModelConfig.from_config(c.model).qat == QatConfig(
      enabled=True, activations="int8", act_granularity="per_tensor", head=True)
