"""Hugging Face ``config.json`` ↔ kat_jax model config, for the Qwen3, Qwen2/Qwen2.5 and Llama families.

``model_config_from_hf(json.load(open(".../config.json")))`` returns an ml_collections ConfigDict that
``ModelConfig.from_config`` accepts (so it can be ``config.model`` of any stage); ``hf_config_from_model``
writes the inverse, a ``config.json`` that ``transformers`` loads. Everything the kat_jax Transformer
cannot represent exactly is refused with an error naming the field and the value, never approximated:
RoPE scaling (Llama 3.1 ``llama3``, YaRN, …), sliding-window attention, biases other than Qwen2's
q/k/v biases, activations other than SiLU.

Family quirks: Qwen3 has per-head RMSNorm on q and k (``qk_norm``) and an explicit ``head_dim``;
Qwen2/Qwen2.5 has biases on q/k/v (``qkv_bias``); Llama 3 has neither. All three may tie the output
projection to the embedding (``tie_word_embeddings``, default False in ``transformers`` for each).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import ml_collections

from kat_jax.model.presets import ModelConfig

# model_type -> (architecture class name, qk_norm, qkv_bias)
FAMILIES: dict[str, tuple[str, bool, bool]] = {
    "qwen3": ("Qwen3ForCausalLM", True, False),
    "qwen2": ("Qwen2ForCausalLM", False, True),
    "llama": ("LlamaForCausalLM", False, False),
}
_DEFAULT_ROPE_THETA = 10_000.0
_DEFAULT_RMS_EPS = 1e-6
CONFIG_FILENAME = "config.json"


class UnsupportedCheckpointError(ValueError):
  """The checkpoint uses a feature the kat_jax Transformer does not implement."""


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  """The parsed ``config.json`` of a Hugging Face checkpoint directory."""
  path = os.path.join(hf_dir, CONFIG_FILENAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {CONFIG_FILENAME} in {hf_dir!r}: point at a Hugging Face checkpoint "
                            "directory (config.json + *.safetensors), e.g. the folder "
                            "save_pretrained() wrote")
  with open(path) as f:
    return json.load(f)


def _rope_theta_and_scaling(hf: dict) -> tuple[float, Optional[dict]]:
  """(theta, scaling dict or None) from either the transformers<5 keys (``rope_theta``,
  ``rope_scaling``) or the transformers>=5 ``rope_parameters`` dict."""
  params = hf.get("rope_parameters") or {}
  theta = hf.get("rope_theta", params.get("rope_theta", _DEFAULT_ROPE_THETA))
  scaling = hf.get("rope_scaling")
  if scaling is None and params:
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
  if scaling:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default") and set(scaling) <= {"rope_type", "type"}:
      scaling = None
  return float(theta), (scaling or None)


def model_config_from_hf(hf: dict[str, Any], *, param_dtype: str = "float32",
                         dtype: str = "float32") -> ml_collections.ConfigDict:
  """kat_jax ``config.model`` for a parsed HF ``config.json``; raises ``UnsupportedCheckpointError``
  naming the field when the checkpoint needs something the model does not implement."""
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    archs = hf.get("architectures")
    raise UnsupportedCheckpointError(
        f"config.json model_type={model_type!r} (architectures={archs}) is not supported: kat_jax "
        f"imports {sorted(FAMILIES)} ({', '.join(a for a, _, _ in FAMILIES.values())})")
  _, qk_norm, qkv_bias = FAMILIES[model_type]
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedCheckpointError(
        f"config.json hidden_act={act!r}: the kat_jax MLP is SwiGLU with SiLU only")
  theta, scaling = _rope_theta_and_scaling(hf)
  rope_fields = {}
  if scaling is not None:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
      raise UnsupportedCheckpointError(
          f"config.json rope scaling {scaling} is not supported: kat_jax.model.transformer.rope "
          "implements plain rotate-half RoPE and Llama 3.1's 'llama3' frequency scaling only")
    rope_fields = dict(
        rope_scaling="llama3", rope_scaling_factor=float(scaling["factor"]),
        rope_low_freq_factor=float(scaling["low_freq_factor"]),
        rope_high_freq_factor=float(scaling["high_freq_factor"]),
        rope_original_max_position=int(scaling["original_max_position_embeddings"]))
  if hf.get("use_sliding_window", False):
    raise UnsupportedCheckpointError(
        f"config.json use_sliding_window=True (sliding_window={hf.get('sliding_window')}): kat_jax "
        "attends to the full context; set use_sliding_window=false if the checkpoint was trained "
        "without it")
  layer_types = hf.get("layer_types") or []
  other = sorted({t for t in layer_types if t != "full_attention"})
  if other:
    raise UnsupportedCheckpointError(
        f"config.json layer_types contains {other}: kat_jax supports full_attention layers only")
  if model_type != "qwen2" and hf.get("attention_bias", False):
    raise UnsupportedCheckpointError(
        f"config.json attention_bias=True ({model_type}): kat_jax has no o_proj bias; only Qwen2's "
        "q/k/v biases are supported")
  if hf.get("mlp_bias", False):
    raise UnsupportedCheckpointError("config.json mlp_bias=True: the kat_jax MLP has no biases")

  num_heads = int(hf["num_attention_heads"])
  head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // num_heads
  model = ModelConfig(
      vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]), num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads), head_dim=int(head_dim),
      mlp_dim=int(hf["intermediate_size"]), rope_theta=theta,
      norm_eps=float(hf.get("rms_norm_eps", _DEFAULT_RMS_EPS)), qk_norm=qk_norm, qkv_bias=qkv_bias,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), param_dtype=param_dtype,
      dtype=dtype, **rope_fields)
  model.validate()
  return ml_collections.ConfigDict(dict(name=f"hf_{model_type}", **dataclasses.asdict(model)))


def family_of(model: ModelConfig, model_type: Optional[str] = None) -> str:
  """The HF family that represents ``model`` exactly (``model_type`` checks an explicit choice)."""
  matches = [t for t, (_, qk, bias) in FAMILIES.items()
             if (qk, bias) == (model.qk_norm, model.qkv_bias)]
  if not matches:
    raise UnsupportedCheckpointError(
        f"no Hugging Face family has qk_norm={model.qk_norm} and qkv_bias={model.qkv_bias} together; "
        "export supports qwen3 (qk_norm), qwen2 (qkv_bias) and llama (neither)")
  if model_type is not None and model_type not in matches:
    raise UnsupportedCheckpointError(
        f"model_type={model_type!r} cannot represent a model with qk_norm={model.qk_norm}, "
        f"qkv_bias={model.qkv_bias}: use model_type={matches[0]!r}")
  return matches[0]


def hf_config_from_model(model: ModelConfig, *, torch_dtype: str = "float32",
                         model_type: Optional[str] = None,
                         base: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """A ``config.json`` dict for ``model``. ``base`` (e.g. the imported checkpoint's config) keeps
  fields kat_jax does not model (token ids, max_position_embeddings, …); shape fields are overwritten."""
  model_type = family_of(model, model_type or (base or {}).get("model_type"))
  out = {k: v for k, v in (base or {}).items()
         if k not in ("rope_parameters", "rope_scaling", "dtype", "torch_dtype")}
  out.update(
      architectures=[FAMILIES[model_type][0]], model_type=model_type, vocab_size=model.vocab_size,
      hidden_size=model.d_model, num_hidden_layers=model.num_layers,
      num_attention_heads=model.num_heads, num_key_value_heads=model.num_kv_heads,
      head_dim=model.head_dim, intermediate_size=model.mlp_dim, hidden_act="silu",
      rms_norm_eps=model.norm_eps, rope_theta=model.rope_theta, rope_scaling=None,
      tie_word_embeddings=model.tie_embeddings, torch_dtype=torch_dtype)
  if model.rope_scaling == "llama3":
    out["rope_scaling"] = dict(
        rope_type="llama3", factor=model.rope_scaling_factor,
        low_freq_factor=model.rope_low_freq_factor, high_freq_factor=model.rope_high_freq_factor,
        original_max_position_embeddings=model.rope_original_max_position)
  out.setdefault("max_position_embeddings", 32768)
  if model_type == "qwen2" or model_type == "qwen3":
    out.update(use_sliding_window=False)
    out.pop("layer_types", None)
  if model_type != "qwen2":
    out.update(attention_bias=False)
  if model_type == "llama":
    out.update(mlp_bias=False)
  return out
