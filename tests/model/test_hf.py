"""Hugging Face interop against ``transformers`` itself: tiny random Qwen3 / Qwen2 / Llama models
(GQA, explicit head_dim, q/k/v biases, tied and untied heads, perturbed norms and biases) are saved
with ``save_pretrained``, imported, and must give the same logits (float32, ≤ 1e-4) and the same greedy
generations; export → import is bitwise, ``transformers`` loads the export, a 2×4 mesh import equals
a single-device one, bad checkpoints fail naming the tensor, and the importer streams (peak host
memory of a few-hundred-MB import stays under 1.3× the checkpoint)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch", reason="extra 'hf' (torch CPU + transformers) not installed")
transformers = pytest.importorskip("transformers", reason="extra 'hf' not installed")
safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="extra 'hf' not installed")
load_file, save_file = safetensors_numpy.load_file, safetensors_numpy.save_file

from kat_jax import sharding as sharding_lib  # noqa: E402
from kat_jax.model import ModelConfig, Transformer, hf, intervals_from_segment_ids  # noqa: E402
from kat_jax import checkpoint as checkpoint_lib  # noqa: E402
from kat_jax.train import state as state_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 256

# Each family with its quirks on: Qwen3 QK-norm + explicit head_dim (≠ hidden/heads) + untied head
# saved as several shards; Qwen2 q/k/v biases + tied embeddings; Llama 3 untied, theta 5e5, eps 1e-5.
FAMILIES = {
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16, tie_word_embeddings=False,
                                             rope_theta=1_000_000.0, rms_norm_eps=1e-6), "40KB"),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True, rope_theta=1_000_000.0,
                                             rms_norm_eps=1e-6), None),
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False, rope_theta=500_000.0,
                                             rms_norm_eps=1e-5), None),
    # Llama 3.1 / 3.2: 'llama3' RoPE frequency scaling (a short original context so that every band
    # of the rule — divided, smoothed, kept — holds some of the test model's frequencies).
    "llama31": (transformers.LlamaConfig, dict(
        tie_word_embeddings=False, rope_theta=500_000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 512}), None),
}


def _randomize(model, seed):
  """HF initializes biases to 0 and norms to 1; perturb everything so every mapping is exercised."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


def _make_hf_model(family, seed=0):
  config_cls, quirks, _ = FAMILIES[family]
  config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None, **quirks)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  _randomize(model, seed)
  return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """family -> (transformers model, checkpoint dir)."""
  out = {}
  for i, family in enumerate(FAMILIES):
    model = _make_hf_model(family, seed=i)
    path = str(tmp_path_factory.mktemp(family))
    max_shard = FAMILIES[family][2]
    model.save_pretrained(path, **({"max_shard_size": max_shard} if max_shard else {}))
    out[family] = (model, path)
  assert os.path.exists(os.path.join(out["qwen3"][1], "model.safetensors.index.json"))
  return out


def _forward_fn(model_cfg):
  model = Transformer(model_cfg)

  @jax.jit
  def forward(params, tokens_bt, length):
    b, t = tokens_bt.shape
    segments = jnp.broadcast_to((jnp.arange(t) < length).astype(jnp.int32), (b, t))
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return model.apply({"params": params}, tokens_bt, positions,
                       intervals_from_segment_ids(segments)).logits
  return forward


def _greedy(forward, params, prompt, new_tokens):
  """Greedy decoding with a full recompute per token over a fixed-size buffer (one compile)."""
  buf = np.zeros((1, len(prompt) + new_tokens), np.int32)
  buf[0, :len(prompt)] = prompt
  for n in range(len(prompt), buf.shape[1]):
    buf[0, n] = int(jnp.argmax(forward(params, jnp.asarray(buf), n)[0, n - 1]))
  return buf[0]


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_generation_match_transformers(hf_models, family):
  hf_model, path = hf_models[family]
  model_config, params = hf.import_hf(path)
  cfg = ModelConfig.from_config(model_config)
  assert (cfg.qk_norm, cfg.qkv_bias) == {"qwen3": (True, False), "qwen2": (False, True),
                                         "llama": (False, False), "llama31": (False, False)}[family]
  assert cfg.tie_embeddings == (family == "qwen2") and ("lm_head" in params) != cfg.tie_embeddings
  assert cfg.head_dim == (16 if family == "qwen3" else 8)
  assert cfg.rope_theta == FAMILIES[family][1]["rope_theta"]
  assert cfg.norm_eps == FAMILIES[family][1]["rms_norm_eps"]
  assert cfg.rope_scaling == ("llama3" if family == "llama31" else "")

  tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 24))
  forward = _forward_fn(cfg)
  ours = np.asarray(forward(params, jnp.asarray(tokens, jnp.int32), tokens.shape[1]))
  ref = _hf_logits(hf_model, tokens)
  assert np.abs(ref).max() > 1.0     # not a degenerate near-zero model
  assert np.abs(ours - ref).max() <= 1e-4

  prompt = np.random.default_rng(2).integers(0, VOCAB, 6)
  with torch.no_grad():
    hf_gen = hf_model.generate(torch.tensor(prompt[None]), max_new_tokens=14, do_sample=False,
                               min_new_tokens=14, pad_token_id=0)[0].numpy()
  np.testing.assert_array_equal(_greedy(forward, params, prompt, 14), hf_gen)


def _read_all(path):
  tensors = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      tensors.update(load_file(os.path.join(path, f)))
  return tensors


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_is_bitwise_and_loads_in_transformers(hf_models, family, tmp_path):
  hf_model, path = hf_models[family]
  model_config, params = hf.import_hf(path)
  cfg = ModelConfig.from_config(model_config)
  out = str(tmp_path / "export")
  names = hf.export_hf(params, cfg, out, base_hf_config=hf.read_hf_config(path),
                       max_shard_bytes=60_000)
  assert len(names) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  # Same tensor names and bytes as save_pretrained wrote.
  source, exported = _read_all(path), _read_all(out)
  assert sorted(source) == sorted(exported)
  for name, value in source.items():
    assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
  # Re-import is bitwise.
  _, again = hf.import_hf(out)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, again)
  # transformers loads the export and computes the original model's logits.
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(loaded) is type(hf_model)
  tokens = np.random.default_rng(3).integers(0, VOCAB, (1, 16))
  np.testing.assert_allclose(_hf_logits(loaded, tokens), _hf_logits(hf_model, tokens), atol=1e-6)


def test_import_onto_2x4_mesh_equals_single_device(hf_models):
  _, path = hf_models["qwen3"]
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=4)))
  rules = sharding_lib.DEFAULT_RULES
  model_config, sharded = hf.import_hf(path, mesh=mesh, rules=rules)
  _, single = hf.import_hf(path)
  cfg = ModelConfig.from_config(model_config)
  abstract = hf.abstract_params(cfg, mesh, rules)
  specs = {"embedding": ("tensor", "fsdp"), "q_proj": ("fsdp", "tensor", None),
           "o_proj": ("tensor", None, "fsdp"), "down_proj": ("tensor", "fsdp"), "scale": (None,)}

  def check(path_keys, a, b, want):
    name = path_keys[-1].key
    assert a.sharding == want.sharding and len(a.sharding.device_set) == 8
    if name in specs:
      assert tuple(a.sharding.spec) == specs[name], name
    for shard in a.addressable_shards:
      assert shard.data.shape == a.sharding.shard_shape(a.shape)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jax.tree_util.tree_map_with_path(check, sharded, single, abstract)

  tokens = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (2, 16)), jnp.int32)
  forward = _forward_fn(cfg)
  np.testing.assert_allclose(forward(sharded, tokens, 16), forward(single, tokens, 16), atol=1e-5)


def test_bfloat16_checkpoint_converts_exactly(tmp_path):
  model = _make_hf_model("qwen2", seed=5).to(torch.bfloat16)
  path = str(tmp_path / "bf16")
  model.save_pretrained(path)
  source = _read_all(path)
  assert source["model.embed_tokens.weight"].dtype.name == "bfloat16"
  model_config, params32 = hf.import_hf(path, param_dtype="float32")
  _, params16 = hf.import_hf(path, param_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(params32)} == {jnp.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype("bfloat16")}
  # bf16 -> f32 is exact: casting back gives the checkpoint bits.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)),
                                                          np.asarray(b)), params32, params16)
  np.testing.assert_array_equal(np.asarray(params32["layer_1"]["attn"]["k_bias"]).reshape(-1),
                                source["model.layers.1.self_attn.k_proj.bias"].astype(np.float32))
  out = str(tmp_path / "export")
  hf.export_hf(params16, ModelConfig.from_config(model_config), out, torch_dtype="bfloat16")
  exported = _read_all(out)
  assert sorted(exported) == sorted(source)
  for name, value in source.items():
    assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name


def _write_tampered(src, dst, edit):
  shutil.copytree(src, dst)
  tensors = _read_all(dst)
  for f in os.listdir(dst):
    if f.endswith(".safetensors") or f.endswith(".index.json"):
      os.remove(os.path.join(dst, f))
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  return dst


def test_bad_checkpoints_fail_naming_the_tensor(hf_models, tmp_path):
  _, path = hf_models["llama"]

  def wrong_shape(t):
    t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:16]
  with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(16, 64\)"
                     r".*\(32, 64\)"):
    hf.import_hf(_write_tampered(path, str(tmp_path / "shape"), wrong_shape))

  def extra_bias(t):
    t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  with pytest.raises(ValueError, match=r"o_proj\.bias.*no place"):
    hf.import_hf(_write_tampered(path, str(tmp_path / "bias"), extra_bias))

  with pytest.raises(ValueError, match=r"lm_head\.weight.*tie_word_embeddings"):
    hf.import_hf(_write_tampered(path, str(tmp_path / "head"), lambda t: t.pop("lm_head.weight")))

  base = hf.read_hf_config(path)
  with pytest.raises(hf.UnsupportedCheckpointError, match="gemma2"):
    hf.model_config_from_hf({**base, "model_type": "gemma2"})
  yarn = {**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
  with pytest.raises(hf.UnsupportedCheckpointError, match="yarn"):
    hf.model_config_from_hf(yarn)
  with pytest.raises(hf.UnsupportedCheckpointError, match="attention_bias"):
    hf.model_config_from_hf({**base, "attention_bias": True})
  with pytest.raises(hf.UnsupportedCheckpointError, match="use_sliding_window"):
    hf.model_config_from_hf({**hf.read_hf_config(hf_models["qwen2"][1]), "use_sliding_window": True})
  # init_from into a differently configured model names the config field to change.
  cfg = ModelConfig.from_config(hf.model_config_from_hf(base))
  other = ModelConfig.from_config(ml_collections.ConfigDict(
      {**hf.model_config_from_hf(base).to_dict(), "rope_theta": 10_000.0}))
  with pytest.raises(ValueError, match=r"config\.model\.rope_theta=10000\.0.*500000\.0"):
    hf.init_params_from(path, hf.abstract_params(cfg), other)


def test_convert_workdir_round_trip_and_init_from(hf_models, tmp_path):
  from experiments import convert
  from kat_jax.data.hf_tokenizer import HFTokenizer
  _, path = hf_models["qwen3"]
  src = str(tmp_path / "hf_with_tokenizer")
  shutil.copytree(path, src)
  tok = HFTokenizer.train(["def add(a, b):\n    return a + b\n"] * 20, vocab_size=300,
                          tokenizer_config={"eos_token": "<|im_end|>"})
  tok.save(src)

  workdir = str(tmp_path / "workdir")
  model_config = convert.hf_to_workdir(src, workdir)
  cfg = ModelConfig.from_config(model_config)
  assert hf.read_model_config(workdir).to_dict() == model_config.to_dict()
  _, imported = hf.import_hf(src)
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  abstract = hf.abstract_params(cfg, mesh, sharding_lib.DEFAULT_RULES)
  for source in (workdir, src):
    restored = hf.init_params_from(source, abstract, cfg)
    jax.tree.map(lambda a, b, s: (np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                                  (a.sharding == s.sharding) or pytest.fail(str(a.sharding))),
                 restored, imported, abstract)

  as_saved = hf.restore_params(workdir)      # no target given: the saved tree on one device
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               as_saved, imported)

  out = str(tmp_path / "exported")
  convert.workdir_to_hf(workdir, out, max_shard_bytes=100_000)
  source, exported = _read_all(src), _read_all(out)
  assert sorted(source) == sorted(exported)
  assert all(np.array_equal(source[k], exported[k]) for k in source)
  assert HFTokenizer.load(out).encode("return a + b") == tok.encode("return a + b")
  exported_config = hf.read_hf_config(out)
  assert exported_config["max_position_embeddings"] == 128   # kept from the source config.json


def test_init_from_a_trainer_checkpoint_and_the_loop_hook(hf_models, tmp_path):
  """A full TrainState checkpoint (params + AdamW moments) gives its params back; and the hook the
  loop runs for ``config.init_from`` builds a step-0 TrainState around the imported params."""
  _, path = hf_models["qwen2"]
  model_config, params = hf.import_hf(path)
  cfg = ModelConfig.from_config(model_config)
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)))
  rules = sharding_lib.DEFAULT_RULES
  tx = optax.adamw(1e-3)
  example = {"inputs": jax.ShapeDtypeStruct((2, 8), np.int32)}
  abstract, shardings = state_lib.abstract_state(Transformer(cfg), tx, example, mesh, rules)

  # The hook (loop.train, when no checkpoint exists and config.init_from is set).
  loaded = hf.init_params_from(path, abstract.params, cfg)
  state = jax.jit(lambda p: state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                 opt_state=tx.init(p)),
                  out_shardings=shardings, donate_argnums=0)(loaded)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state.params, params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state.opt_state[0].mu))

  state = state.replace(step=jnp.asarray(7, jnp.int32), opt_state=jax.tree.map(
      lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state.opt_state))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "run" / "checkpoints"), save_every=1, keep=3,
                                     async_save=False)
  ckpt.save(7, state, {"train": {}})
  ckpt.wait()
  ckpt.close()
  for source in (str(tmp_path / "run"), str(tmp_path / "run") + "@7"):
    restored = hf.init_params_from(source, abstract.params, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored, params)
  with pytest.raises(FileNotFoundError, match="step 3"):
    hf.init_params_from(str(tmp_path / "run") + "@3", abstract.params, cfg)

  # A PPO critic starts from the same checkpoint: its value head (absent in HF) is zero-initialized.
  critic_cfg = ModelConfig.from_config(ml_collections.ConfigDict(
      {**model_config.to_dict(), "value_head": True}))
  critic = hf.init_params_from(path, hf.abstract_params(critic_cfg, mesh, rules), critic_cfg)
  np.testing.assert_array_equal(np.asarray(critic.pop("value_head")), 0.0)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               critic, params)


def test_convert_command_line(hf_models, tmp_path):
  _, path = hf_models["llama"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  workdir, out = str(tmp_path / "wd"), str(tmp_path / "out")
  for args in ([f"--from_hf={path}", f"--to={workdir}"], [f"--from_workdir={workdir}", f"--to_hf={out}"]):
    run = subprocess.run([sys.executable, "-m", "experiments.convert", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
  source, exported = _read_all(path), _read_all(out)
  assert sorted(source) == sorted(exported)
  assert all(np.array_equal(source[k], exported[k]) for k in source)


# Peak = VmHWM of this process's address space. (ru_maxrss is not usable here: Linux carries the
# parent's high-water mark over fork + exec, so a child of a big pytest process reports the parent's.)
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from kat_jax.model import hf

    def status_bytes(field):
      with open("/proc/self/status") as f:
        for line in f:
          if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
      raise KeyError(field)

    jax.numpy.zeros(1).block_until_ready()
    before = status_bytes("VmRSS")
    _, params = hf.import_hf(sys.argv[1])
    jax.block_until_ready(params)
    peak = status_bytes("VmHWM")
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    print(json.dumps({"before": before, "peak": peak, "params_bytes": params_bytes}))
""")


@pytest.mark.slow
def test_import_peak_host_memory_is_streaming(tmp_path):
  """~320 MB float32 checkpoint in 3 shards; peak RSS growth (params included) < 1.3× its size."""
  from kat_jax.model.hf import safetensors_io
  base = dict(vocab_size=8192, d_model=512, num_layers=24, num_heads=8, num_kv_heads=4, head_dim=64,
              mlp_dim=1408, rope_theta=500_000.0, norm_eps=1e-5, tie_embeddings=False)
  cfg = ModelConfig(**base)
  path = str(tmp_path / "big")
  writer = safetensors_io.ShardedWriter(path, max_shard_bytes=120 << 20)
  rng = np.random.default_rng(0)
  for spec in hf.tensor_specs(cfg):
    writer.add(spec.hf_name, rng.standard_normal(spec.hf_shape, dtype=np.float32))
  writer.close()
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf.hf_config_from_model(cfg), f)
  size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
             if f.endswith(".safetensors"))
  assert size > 300e6
  run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, path], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stderr[-3000:]
  stats = json.loads(run.stdout.strip().splitlines()[-1])
  assert abs(stats["params_bytes"] - size) < 1e6      # the params themselves live in host memory
  growth = stats["peak"] - stats["before"]
  print(f"checkpoint {size / 1e6:.1f} MB, peak RSS growth {growth / 1e6:.1f} MB "
        f"({growth / size:.3f}x)")
  assert growth < 1.3 * size
