"""LoRA and QLoRA (kat_jax.model.lora): the trainable params are exactly the adapters (count from
shapes, optimizer state for them alone); zero-initialized ``b`` gives the base's logits bitwise; a
LoRA step on a 2×4 mesh equals one device and leaves the base untouched; merged params give the
adapted model's logits, and the merged HF export loads in ``transformers`` with float32 logit parity;
the quantized base meets its stated bounds; a Trainer-driven LoRA run trains, checkpoints the adapters
only, resumes bitwise, refuses another base, and scores its reference with the adapters off."""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.base import get_base_config, train_config
from kat_jax import checkpoint as checkpoint_lib
from kat_jax import sharding as sharding_lib
from kat_jax.data.synthetic import SyntheticCopyIterator
from kat_jax.errors import ConfigError
from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids, lora
from kat_jax.train import losses, optimizer, state as state_lib, step as step_lib

VOCAB, T = 64, 16


def _cfg(rank=4, targets="q,k,v,o,mlp", quantize_base="", **model) -> ModelConfig:
  c = get_preset("tiny")
  c.update(dict(vocab_size=VOCAB, num_layers=2))
  c.update(model)
  c.lora.update(dict(rank=rank, targets=targets, quantize_base=quantize_base, alpha=8.0))
  return ModelConfig.from_config(c)


def _inputs(batch=2, seed=0):
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, T)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (batch, T))
  return tokens, positions, intervals_from_segment_ids(jnp.ones((batch, T), jnp.int32))


def _init(cfg, seed=0):
  inputs = _inputs()
  return jax.jit(lambda r: nn.unbox(Transformer(cfg).init(r, *inputs)["params"]))(
      jax.random.key(seed))


def _logits(cfg, params, seed=0):
  return jax.jit(Transformer(cfg).apply)({"params": params}, *_inputs(seed=seed)).logits


def _randomize_adapters(adapters, seed=1, scale=0.05):
  def draw(adapters):
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])
  return jax.jit(draw)(adapters)


def _size(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------ params

@pytest.mark.parametrize("targets,kernels", [
    ("q,k,v,o,mlp", ("q", "k", "v", "o", "gate", "up", "down")), ("q,v", ("q", "v")),
    ("attn,down", ("q", "k", "v", "o", "down"))])
def test_trainable_parameter_count_is_the_adapters(targets, kernels):
  r = 4
  cfg = _cfg(rank=r, targets=targets)
  d, h, hkv, hd, m = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  # Hand count: A [fan_in, r] + B [r, fan_out] per adapted kernel and layer.
  fan = {"q": (d, h * hd), "k": (d, hkv * hd), "v": (d, hkv * hd), "o": (h * hd, d),
         "gate": (d, m), "up": (d, m), "down": (m, d)}
  expected = cfg.num_layers * sum(r * (fan[k][0] + fan[k][1]) for k in kernels)
  tx, _ = optimizer.make_optimizer(train_config(steps=10))
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=4)))
  example = {"inputs": jax.ShapeDtypeStruct((8, T), np.int32)}
  abstract, _ = state_lib.abstract_state(Transformer(cfg), tx, example, mesh,
                                         sharding_lib.DEFAULT_RULES, trainable=lora.adapters_of)
  assert _size(abstract.params) == expected == lora.num_adapter_params(cfg)
  names = {k for path in jax.tree_util.tree_flatten_with_path(abstract.params)[0]
           for k in (p.key for p in path[0]) if k.endswith("_lora")}
  assert names == {f"{lora.KERNELS[k][1]}_lora" for k in kernels}
  # Optimizer state: Adam's two moments of exactly the adapters, nothing of the base.
  adam = abstract.opt_state[1][0]
  for moment in (adam.mu, adam.nu):
    assert jax.tree.structure(moment) == jax.tree.structure(abstract.params)
  float_leaves = [x for x in jax.tree.leaves(abstract.opt_state) if x.ndim > 0]
  assert _size(float_leaves) == 2 * expected
  # The base is everything else, with the plain model's tree.
  base, adapters = lora.split(_init(cfg))
  assert jax.tree.structure(base) == jax.tree.structure(_init(lora.plain_config(cfg)))
  assert _size(adapters) == expected


def test_adapters_are_sharded_by_the_kernels_logical_names():
  cfg = _cfg()
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=4)))
  abstract = lora.abstract_params(cfg, mesh, sharding_lib.DEFAULT_RULES)
  attn, mlp = abstract["layer_0"]["attn"], abstract["layer_0"]["mlp"]
  spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
  assert spec(attn["q_proj_lora"]["a"]) == ("fsdp", None)                 # embed, rank
  assert spec(attn["q_proj_lora"]["b"]) == (None, "tensor", None)         # rank, heads, head_dim
  assert spec(attn["o_proj_lora"]["a"]) == ("tensor", None, None)         # heads, head_dim, rank
  assert spec(attn["o_proj_lora"]["b"]) == (None, "fsdp")                 # rank, embed
  assert spec(mlp["down_proj_lora"]["a"]) == ("tensor", None)             # mlp, rank
  assert spec(mlp["gate_proj_lora"]["b"]) == (None, "tensor")             # rank, mlp


def test_zero_init_adapters_give_exactly_the_base_logits():
  for model in (dict(), dict(qk_norm=True, tie_embeddings=False, token_chunk=8),
                dict(remat="full")):
    cfg = _cfg(**model)
    params = _init(cfg)
    base, adapters = lora.split(params)
    plain = lora.plain_config(cfg)
    # Adapters in child scopes leave the parameter RNG alone: the base is the plain model's init.
    jax.tree.map(np.testing.assert_array_equal, base, _init(plain))
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(adapters) if x.shape[0] == 4)
    np.testing.assert_array_equal(_logits(cfg, params), _logits(plain, base))
    # Nonzero adapters change the logits (the test can fail).
    moved = _logits(cfg, lora.combine(base, _randomize_adapters(adapters)))
    assert float(jnp.abs(moved - _logits(plain, base)).max()) > 1e-2


def test_dropout_only_with_a_dropout_rng():
  cfg = dataclasses.replace(_cfg(), lora=dataclasses.replace(_cfg().lora, dropout=0.5))
  base, adapters = lora.split(_init(cfg))
  params = lora.combine(base, _randomize_adapters(adapters))
  model, inputs = Transformer(cfg), _inputs()
  det = model.apply({"params": params}, *inputs).logits
  no_dropout = model.apply({"params": params}, *inputs).logits
  np.testing.assert_array_equal(det, no_dropout)
  with_rng = model.apply({"params": params}, *inputs, rngs={"dropout": jax.random.key(0)}).logits
  assert float(jnp.abs(with_rng - det).max()) > 1e-3


def test_kv_cache_decode_of_an_adapted_quantized_model_equals_its_full_forward():
  """The sampler's path (prefill + one token at a time into a KV cache) sees the adapters too."""
  from kat_jax.model import AttentionMask, KVCache
  cfg = _cfg(quantize_base="int8")
  float_base, adapters = lora.split(_init(lora.float_base_config(cfg)))
  params = lora.combine(lora.quantize(float_base, "int8"), _randomize_adapters(adapters))
  (tokens, pos, mask), apply = _inputs(), jax.jit(Transformer(cfg).apply)
  full = apply({"params": params}, tokens, pos, mask).logits
  b, p_len = tokens.shape[0], 6
  out = apply({"params": params}, tokens[:, :p_len], pos[:, :p_len],
                    AttentionMask(tin=pos[:, :p_len], tout=jnp.full((b, p_len), T, jnp.int32)),
                    kv_cache=KVCache.empty(cfg, b, T))
  cache = out.kv_cache
  for i in range(p_len, T):
    out = apply({"params": params}, tokens[:, i:i + 1], pos[:, i:i + 1],
                      AttentionMask(tin=pos[:, i:i + 1], tout=jnp.full((b, 1), T, jnp.int32)),
                      kv_cache=cache)
    cache = out.kv_cache
    np.testing.assert_allclose(out.logits[:, 0], full[:, i], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ the step

def _step_setup(mesh, cfg):
  rules = sharding_lib.DEFAULT_RULES
  # eps=1e-4: Adam's first step is ±lr wherever |g| >> eps, which would turn float noise in a
  # near-zero gradient into a ±lr difference; with a larger eps the update is continuous in g.
  train_cfg = train_config(steps=10, warmup_steps=0, batch_size=8, seq_len=T, learning_rate=1e-2,
                           eps=1e-4)
  model = Transformer(cfg, mesh=mesh, rules=rules)
  tx, schedule = optimizer.make_optimizer(train_cfg)
  example = {"inputs": jax.ShapeDtypeStruct((8, T), np.int32)}
  state, shardings = state_lib.create_sharded_state(model, tx, example, mesh, rules,
                                                    jax.random.key(0), trainable=lora.adapters_of)
  # b != 0 so that A gets gradients too.
  state = state.replace(params=jax.device_put(_randomize_adapters(jax.device_get(state.params)),
                                              shardings.params))
  base = lora.initial_base(cfg, mesh, rules, seed=0)
  base_sh = jax.tree.map(lambda a: a.sharding, base)
  step = step_lib.make_train_step(model.apply, losses.get_loss("lm"), tx, schedule, train_cfg,
                                  shardings, mesh, rules, frozen_shardings=base_sh,
                                  combine=lora.combine)
  batch = next(SyntheticCopyIterator(vocab_size=VOCAB, batch_size=8, seq_len=T, seed=0, doc_len=8))
  return step, state, base, sharding_lib.host_to_global(batch, mesh, rules)


@pytest.mark.parametrize("quantize_base", ["", pytest.param("int8", marks=pytest.mark.slow)])
def test_lora_step_on_2x4_mesh_equals_one_device(quantize_base):
  cfg = _cfg(quantize_base=quantize_base, num_layers=1)
  results = []
  for mesh_cfg, devices in ((dict(data=1, fsdp=2, tensor=4), None),
                            (dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])):
    mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(mesh_cfg), devices)
    step, state, base, batch = _step_setup(mesh, cfg)
    before = jax.device_get(state.params)
    base_before = jax.device_get(base)
    new, metrics = step(state, batch, jax.random.key(1), base)
    assert float(metrics["finite"]) == 1.0 and float(metrics["grad_norm"]) > 0
    # The base is an input, not donated and not updated.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(base), base_before)
    after = jax.device_get(new.params)
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(after),
                                                          jax.tree.leaves(before))]
    assert min(moved) > 0        # every adapter leaf (A and B) got an update
    results.append((after, jax.device_get(new.opt_state), float(metrics["loss"])))
  (a, opt_a, loss_a), (b, opt_b, loss_b) = results
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)
  # Moments: float noise of near-zero gradient entries, relative to each leaf's scale.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      x, y, rtol=1e-4, atol=1e-5 * float(np.abs(y).max())), opt_a, opt_b)


# ------------------------------------------------------------------------------------ merge

@pytest.mark.parametrize("quantize_base", ["", "int8", "nf4"])
def test_merged_params_give_the_adapted_logits(quantize_base):
  cfg = _cfg(quantize_base=quantize_base, tie_embeddings=False)
  float_base, adapters = lora.split(_init(lora.float_base_config(cfg)))
  params = lora.combine(lora.quantize(float_base, quantize_base), _randomize_adapters(adapters))
  adapted = _logits(cfg, params)
  merged = lora.merge(params, cfg)
  plain = lora.plain_config(cfg)
  assert jax.tree.structure(merged) == jax.tree.structure(float_base)
  np.testing.assert_allclose(_logits(plain, merged), adapted, atol=1e-5, rtol=0)
  assert float(jnp.abs(adapted - _logits(plain, float_base)).max()) > 1e-2


# ------------------------------------------------------------------------------------ QLoRA

def test_quantized_base_within_the_stated_tolerance():
  cfg = _cfg()
  float_base, adapters = lora.split(_init(cfg))
  w = float_base["layer_0"]["attn"]["o_proj"]            # [h, hd, d]: two input axes
  absmax = np.abs(np.asarray(w)).max(axis=(0, 1), keepdims=True)
  codes, scale = lora.quantize_kernel(w, 2, "int8")
  assert codes.dtype == jnp.int8 and scale.shape == (1, 1, w.shape[2])
  err = np.abs(np.asarray(lora.dequantize(codes, scale)) - np.asarray(w))
  assert (err <= absmax / 254 * (1 + 1e-5)).all()                  # |W - Ŵ| ≤ scale / 2
  codes, scale = lora.quantize_kernel(w, 2, "nf4")
  assert codes.dtype == jnp.uint4
  normalized = np.asarray(w) / absmax
  nearest = np.abs(normalized[..., None] - lora.NF4_LEVELS).min(-1)
  chosen = np.abs(normalized - lora.NF4_LEVELS[np.asarray(codes, np.int32)])
  np.testing.assert_allclose(chosen, nearest, atol=1e-6)           # the nearest NF4 level
  assert (chosen <= 0.1520 + 1e-6).all()                           # half the widest gap

  # Logits of the quantized base against the float base (random tiny model, 64 tokens × 2 rows).
  plain = lora.plain_config(cfg)
  ref = _logits(plain, float_base)
  centered = float(jnp.sqrt(jnp.mean((ref - ref.mean(-1, keepdims=True)) ** 2)))
  for fmt, tolerance in (("int8", 0.05), ("nf4", 0.5)):
    qcfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, quantize_base=fmt))
    out = _logits(qcfg, lora.combine(lora.quantize(float_base, fmt), adapters))
    rel = float(jnp.sqrt(jnp.mean((out - ref) ** 2))) / centered
    assert 0 < rel <= tolerance, (fmt, rel)
  # Memory at rest: int8 codes take a quarter of the float kernels.
  q = lora.quantize(float_base, "int8")["layer_0"]["mlp"]
  assert q["up_proj"].nbytes * 4 == float_base["layer_0"]["mlp"]["up_proj"].nbytes


# ------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("lora_fields,match", [
    (dict(rank=-1), r"lora.rank=-1 must be >= 0"),
    (dict(rank=4, targets="q,x"), r"lora.targets='q,x': 'x' is not a target"),
    (dict(rank=4, quantize_base="int4"), r"quantize_base='int4': use one of"),
    (dict(rank=0, quantize_base="int8"), r"rank=0 leaves nothing to train"),
    (dict(rank=4, dropout=1.0), r"lora.dropout=1.0 must be in \[0, 1\)"),
    (dict(rank=4, alpha=0.0), r"lora.alpha=0.0 must be positive"),
    (dict(rank=4, rnak=3), r"lora has unknown field\(s\) \['rnak'\]"),
])
def test_bad_lora_config_is_a_config_error(lora_fields, match):
  c = get_preset("tiny")
  c.lora = ml_collections.ConfigDict(lora_fields)
  with pytest.raises(ConfigError, match=match):
    ModelConfig.from_config(c)


# ------------------------------------------------------------------------------------ Trainer

def _run_config(rank=4, steps=4, **lora_fields):
  c = get_base_config("tiny")
  c.stage = "synthetic"
  c.model.update(dict(vocab_size=VOCAB, num_layers=1))
  c.model.lora.update(dict(rank=rank, **lora_fields))
  c.train.update(dict(steps=steps, batch_size=8, seq_len=32, checkpoint_every=2, eval_every=0,
                      log_every=1, warmup_steps=0, learning_rate=3e-2, progress_bar=False,
                      async_checkpoint=False, use_reference=True))
  return c


@pytest.mark.slow
def test_trainer_lora_run_trains_checkpoints_adapters_and_resumes(tmp_path):
  from kat_jax.train import loop
  from kat_jax.train.trainer import Trainer
  straight = loop.train(_run_config(), str(tmp_path / "straight"))
  # Interrupted after 2 steps, then resumed in place: the same adapters bitwise.
  loop.train(_run_config(), str(tmp_path / "resumed"), max_steps=2)
  resumed = loop.train(_run_config(), str(tmp_path / "resumed"))
  assert resumed["start_step"] == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight["state"]),
               jax.device_get(resumed["state"]))

  trainer = Trainer(_run_config(), str(tmp_path / "straight"))
  assert trainer.restored_step == 4
  # The checkpoint holds the adapters (and their moments) only: no base kernel in it.
  stored = checkpoint_lib.flat_shapes(jax.device_get(trainer.state))
  assert stored and all("_lora/" in name for name in stored if name.startswith("params/"))
  state_dir = os.path.join(trainer.checkpointer.step_dir(4), "state")
  on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(state_dir) for f in fs)
  assert on_disk < sum(x.nbytes for x in jax.tree.leaves(trainer.base))
  with open(os.path.join(str(tmp_path / "straight"), lora.RUN_INFO_FILENAME)) as f:
    info = json.load(f)
  assert info["init_from"] == "" and info["seed"] == 0 and info["model"]["lora"]["rank"] == 4

  # The reference is the base with the adapters off: the plain model on the base.
  batch = next(SyntheticCopyIterator(vocab_size=VOCAB, batch_size=8, seq_len=32, seed=5))
  ref = trainer.score(batch, params=trainer.reference_params)
  out = Transformer(lora.plain_config(trainer.model_cfg)).apply(
      {"params": jax.device_get(trainer.base)}, jnp.asarray(batch["inputs"]),
      jnp.asarray(batch["positions"]), intervals_from_segment_ids(jnp.asarray(batch["segment_ids"])))
  logp, _ = losses.token_log_probs(out.logits, jnp.asarray(batch["targets"]))
  np.testing.assert_allclose(ref["logp"], logp, atol=1e-5)
  # ... sharing the base's arrays (no second copy of it).
  assert (trainer.reference_params["layer_0"]["attn"]["q_proj"]
          is trainer.base["layer_0"]["attn"]["q_proj"])
  # Four LoRA steps lowered the held-out loss of the copy task below the base's.
  trained = trainer.score(batch)
  mean_nll = lambda s: -float((s["logp"] * batch["weights"]).sum() / batch["weights"].sum())
  assert mean_nll(trained) < mean_nll(ref) - 0.01, (mean_nll(trained), mean_nll(ref))
  assert np.isfinite(straight["train_loss"])
  trainer.close()

  # Resuming on another base is refused, naming the field.
  other = _run_config()
  other.seed = 3
  with pytest.raises(ConfigError, match=r"config.seed .*0 -> 3"):
    Trainer(other, str(tmp_path / "straight"))


# ------------------------------------------------------------------------------------ HF export

@pytest.mark.parametrize("quantize_base", ["", "int8"])
def test_merged_export_of_a_lora_workdir_loads_in_transformers(tmp_path, quantize_base):
  """A LoRA run on an imported Qwen3 checkpoint (init_from = the HF folder): convert's export of
  the workdir is the merged model, and transformers computes the adapted model's logits."""
  torch = pytest.importorskip("torch", reason="extra 'hf' not installed")
  transformers = pytest.importorskip("transformers", reason="extra 'hf' not installed")
  from experiments import convert
  from kat_jax.model import hf
  from kat_jax.train.trainer import Trainer
  vocab = 256
  config = transformers.Qwen3Config(
      vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=128,
      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
  torch.manual_seed(0)
  hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
  hf_dir = str(tmp_path / "hf")
  hf_model.save_pretrained(hf_dir)

  c = get_base_config("tiny")
  c.stage = "synthetic"
  c.init_from = hf_dir
  c.model = hf.model_config_from_hf(hf.read_hf_config(hf_dir))
  c.model.lora.update(dict(rank=4, alpha=8.0, quantize_base=quantize_base))
  c.train.update(dict(steps=2, batch_size=8, seq_len=16, eval_every=0, progress_bar=False,
                      async_checkpoint=False, warmup_steps=0))
  workdir = str(tmp_path / "lora_run")
  trainer = Trainer(c, workdir)
  adapters = jax.device_put(_randomize_adapters(jax.device_get(trainer.state.params), scale=0.1),
                            trainer.shardings.params)
  trainer.state = trainer.state.replace(params=adapters)
  trainer.save(force=True)
  params = jax.device_get(trainer.params)
  model_cfg = trainer.model_cfg
  trainer.close()

  tokens = np.random.default_rng(3).integers(0, vocab, (2, 24)).astype(np.int32)
  positions = jnp.broadcast_to(jnp.arange(24), tokens.shape)
  adapted = np.asarray(Transformer(model_cfg).apply(
      {"params": params}, jnp.asarray(tokens), positions,
      intervals_from_segment_ids(jnp.ones(tokens.shape, jnp.int32))).logits)

  out = str(tmp_path / "export")
  convert.workdir_to_hf(workdir, out)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    ours = loaded(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    original = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.abs(adapted - original).max() > 0.1        # the adapters matter
  np.testing.assert_allclose(ours, adapted, atol=1e-5, rtol=0)
  # The merged model also starts a next stage: init_from the LoRA workdir gives the merged params.
  plain = lora.plain_config(model_cfg)
  merged = hf.init_params_from(workdir, hf.abstract_params(plain), plain)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(merged), jax.device_get(lora.merge(params, model_cfg)))
