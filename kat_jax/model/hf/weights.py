"""Import a Hugging Face checkpoint into sharded kat_jax params, and export params back.

Import streams the checkpoint tensor by tensor: read one tensor from its safetensors file, convert
its layout and dtype on the host (one copy; none when only the shape changes), place it with
``jax.make_array_from_callback`` straight into the ``NamedSharding`` that the model's logical axis
names and the rules give on the mesh, wait for the transfer, drop the host copies, next tensor. Host
memory beyond the placed params is bounded by about two copies of the largest tensor, never by the
checkpoint (a 317 MB float32 import peaks at 1.14x its size on CPU, where the params themselves live
in host memory); on multi-host meshes every process reads each tensor and keeps only its shards.

Usage::

  model_config, params = import_hf("/ckpt/Qwen3-8B", mesh=mesh, rules=rules)   # ConfigDict, params
  export_hf(params, ModelConfig.from_config(model_config), "/out/hf", torch_dtype="bfloat16")

Every mismatch is an error naming the tensor and what was expected: an unsupported config (see
``hf.config``), a tensor whose shape disagrees with config.json, a tensor the model has no place for
(an o_proj bias, say), or a parameter the checkpoint lacks.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from absl import logging
from flax import traverse_util
from jax.sharding import Mesh

from kat_jax import sharding as sharding_lib
from kat_jax.model.attention import AttentionMask
from kat_jax.model.hf import config as config_lib
from kat_jax.model.hf import safetensors_io
from kat_jax.model.hf import tensors as tensors_lib
from kat_jax.model.presets import ModelConfig
from kat_jax.model.transformer import Transformer

_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}
# Parameters kat_jax has and HF causal LMs do not; filled with their (zero) initializer on import.
_KAT_ONLY = ("value_head",)


def single_device_mesh() -> Mesh:
  return sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                                devices=jax.devices()[:1])


def abstract_params(model_cfg: ModelConfig, mesh: Optional[Mesh] = None,
                    rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES) -> Any:
  """Params tree of ``jax.ShapeDtypeStruct`` with each leaf's ``NamedSharding`` on ``mesh`` (from
  the model's logical axis names and ``rules``); no FLOPs, no memory. Default mesh: one device."""
  mesh = single_device_mesh() if mesh is None else mesh
  model = Transformer(model_cfg)

  def init(rng):
    tokens = jnp.zeros((1, 1), jnp.int32)
    mask = AttentionMask(tin=tokens, tout=jnp.ones_like(tokens))
    return model.init(rng, tokens, tokens, mask)["params"]

  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding_lib.logical_to_mesh(nn.get_partition_spec(boxed), mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.unbox(boxed), shardings)


def _describe(cfg: ModelConfig) -> str:
  return (f"vocab_size={cfg.vocab_size}, d_model={cfg.d_model}, num_heads={cfg.num_heads}, "
          f"num_kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}, mlp_dim={cfg.mlp_dim}")


def _place(host_array: np.ndarray, leaf: jax.ShapeDtypeStruct) -> jax.Array:
  """Copies this process's shards of ``host_array`` onto their devices and waits until the copies
  are done: transfers are asynchronous and would otherwise keep every host array alive while the
  reader races ahead (observed: 2.3x the checkpoint in host memory under CPU contention)."""
  array = jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda idx: host_array[idx])
  return array.block_until_ready()


def load_hf_params(hf_dir: str, abstract: Any, *,
                   hf_model_cfg: Optional[ModelConfig] = None) -> Any:
  """Reads the checkpoint in ``hf_dir`` into a params tree shaped, typed and sharded like
  ``abstract`` (a tree of ShapeDtypeStruct with shardings, e.g. from ``abstract_params``)."""
  if hf_model_cfg is None:
    hf_model_cfg = ModelConfig.from_config(
        config_lib.model_config_from_hf(config_lib.read_hf_config(hf_dir)))
  reader = safetensors_io.SafetensorsReader(hf_dir)
  specs = tensors_lib.tensor_specs(hf_model_cfg)
  flat_abstract = traverse_util.flatten_dict(abstract)
  available = set(reader.names())

  missing = [s.hf_name for s in specs if s.hf_name not in available]
  if missing:
    raise ValueError(
        f"{hf_dir}: checkpoint lacks {len(missing)} tensor(s) that its config.json implies, e.g. "
        f"{missing[:3]}" + (" (tie_word_embeddings=false needs lm_head.weight; set it true if the "
                            "output projection is the embedding)" if "lm_head.weight" in missing
                            else ""))
  expected = {s.hf_name for s in specs}
  ignored = {n for n in available - expected
             if n.endswith(tensors_lib.IGNORED_SUFFIXES)
             or (n == "lm_head.weight" and hf_model_cfg.tie_embeddings)}
  unexpected = sorted(available - expected - ignored)
  if unexpected:
    raise ValueError(
        f"{hf_dir}: checkpoint tensor(s) {unexpected[:5]}{' …' if len(unexpected) > 5 else ''} have "
        "no place in the kat_jax model (e.g. an o_proj or MLP bias, or a layer beyond "
        f"num_hidden_layers={hf_model_cfg.num_layers}); importing without them would change the model")
  unknown = [s.kat_name for s in specs if s.path not in flat_abstract]
  if unknown:
    raise ValueError(
        f"{hf_dir}: tensor(s) for {unknown[:3]} have no parameter in the target params tree: "
        "config.model differs from the checkpoint's config.json (qk_norm / qkv_bias / "
        "tie_embeddings / num_layers); use hf.model_config_from_hf(read_hf_config(dir)) as config.model")

  flat_params = {}
  for n, spec in enumerate(specs):
    shape, st_dtype = reader.shape_and_dtype(spec.hf_name)
    if shape != spec.hf_shape:
      raise ValueError(
          f"tensor {spec.hf_name!r} in {reader.file_of[spec.hf_name]} has shape {shape}, but "
          f"config.json ({_describe(hf_model_cfg)}) implies {spec.hf_shape}")
    leaf = flat_abstract[spec.path]
    if tuple(leaf.shape) != spec.kat_shape:
      raise ValueError(
          f"parameter {spec.kat_name} expects shape {tuple(leaf.shape)} from config.model, but "
          f"tensor {spec.hf_name!r} gives {spec.kat_shape} ({_describe(hf_model_cfg)}): set "
          "config.model from the checkpoint's config.json")
    hf_array = reader.read(spec.hf_name)
    host = tensors_lib.to_kat(spec, hf_array, leaf.dtype)
    del hf_array
    flat_params[spec.path] = _place(host, leaf)
    del host
    if (n + 1) % 50 == 0:
      logging.info("imported %d/%d tensors from %s", n + 1, len(specs), hf_dir)

  for path, leaf in flat_abstract.items():
    if path in flat_params:
      continue
    if path[0] in _KAT_ONLY:
      flat_params[path] = _place(np.zeros(leaf.shape, leaf.dtype), leaf)
      continue
    raise ValueError(f"parameter {'/'.join(path)} of config.model has no tensor in {hf_dir}: "
                     "config.model differs from the checkpoint's config.json")
  return traverse_util.unflatten_dict(flat_params)


def import_hf(hf_dir: str, *, mesh: Optional[Mesh] = None,
              rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES, param_dtype: str = "float32",
              dtype: str = "float32") -> tuple[ml_collections.ConfigDict, Any]:
  """(config.model ConfigDict, params sharded on ``mesh``) of the HF checkpoint in ``hf_dir``;
  weights are converted to ``param_dtype`` (e.g. a bf16 checkpoint into float32 params)."""
  model_config = config_lib.model_config_from_hf(config_lib.read_hf_config(hf_dir),
                                                 param_dtype=param_dtype, dtype=dtype)
  model_cfg = ModelConfig.from_config(model_config)
  params = load_hf_params(hf_dir, abstract_params(model_cfg, mesh, rules), hf_model_cfg=model_cfg)
  return model_config, params


def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def export_hf(params: Any, model_cfg: ModelConfig, out_dir: str, *, torch_dtype: str = "float32",
              model_type: Optional[str] = None, base_hf_config: Optional[dict] = None,
              max_shard_bytes: int = 2 << 30) -> list[str]:
  """Writes ``config.json`` and safetensors shards that ``transformers`` loads (AutoModelForCausalLM)
  to ``out_dir``; returns the shard file names. Multi-host: every process must call it (shards are
  gathered tensor by tensor); process 0 writes. A value head is not exported (HF has none)."""
  if torch_dtype not in _NP_DTYPES:
    raise ValueError(f"torch_dtype={torch_dtype!r}: use one of {sorted(_NP_DTYPES)}")
  np_dtype = _NP_DTYPES[torch_dtype]
  hf_config = config_lib.hf_config_from_model(model_cfg, torch_dtype=torch_dtype,
                                              model_type=model_type, base=base_hf_config)
  flat = traverse_util.flatten_dict(params)
  specs = tensors_lib.tensor_specs(model_cfg)
  covered = {s.path for s in specs}
  extra = sorted("/".join(p) for p in flat if p not in covered and p[0] not in _KAT_ONLY)
  if extra:
    lora_hint = (" (LoRA adapters or quantized kernels: export kat_jax.model.lora.merge(params, "
                 "cfg) with the plain config, lora.plain_config(cfg))"
                 if any(p.endswith(("_lora/a", "_lora/b", "_scale")) for p in extra) else "")
    raise ValueError(f"params {extra[:5]} have no Hugging Face counterpart for {model_cfg}; "
                     f"they do not belong to the model config given{lora_hint}")
  writer = (safetensors_io.ShardedWriter(out_dir, max_shard_bytes)
            if jax.process_index() == 0 else None)
  for spec in specs:
    if spec.path not in flat:
      raise ValueError(f"params lack {spec.kat_name} (HF {spec.hf_name}) that the model config "
                       "implies; the params and config.model do not match")
    value = flat[spec.path]
    if tuple(value.shape) != spec.kat_shape:
      raise ValueError(f"parameter {spec.kat_name} has shape {tuple(value.shape)}, config.model "
                       f"implies {spec.kat_shape} ({_describe(model_cfg)})")
    host = _to_host(value)
    if writer is not None:
      writer.add(spec.hf_name, tensors_lib.to_hf(spec, host, np_dtype))
    del host
  if writer is None:
    return []
  names = writer.close()
  with open(os.path.join(out_dir, config_lib.CONFIG_FILENAME), "w") as f:
    json.dump(hf_config, f, indent=2)
  return names
