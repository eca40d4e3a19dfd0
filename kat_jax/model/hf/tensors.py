"""Which Hugging Face tensor is which kat_jax parameter, and how its layout changes.

``tensor_specs(model_cfg)`` lists one ``TensorSpec`` per kat_jax parameter: its path in the params
tree, the HF tensor name, both shapes, and whether the HF matrix is transposed (``nn.Linear`` stores
``[out, in]``; kat_jax stores ``[in, out]`` with the head axes split out, e.g. q_proj ``[d, H, Dh]``).
``to_kat`` / ``to_hf`` convert one numpy array in either direction; both are exact (a copy with at most
one dtype conversion), so an export → import round trip is bitwise.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from kat_jax.model.hf.safetensors_io import empty_host_array
from kat_jax.model.presets import ModelConfig

# Buffers some checkpoints carry that are recomputed from the config, not parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  path: tuple[str, ...]          # kat_jax params path, e.g. ("layer_0", "attn", "q_proj")
  hf_name: str                   # e.g. "model.layers.0.self_attn.q_proj.weight"
  hf_shape: tuple[int, ...]
  kat_shape: tuple[int, ...]
  transpose: bool                # HF [out, in] matrix vs kat_jax [in, ...out]

  @property
  def kat_name(self) -> str:
    return "/".join(self.path)


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  d, h, hkv, hd, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                         cfg.vocab_size)
  specs = [TensorSpec(("embedding",), "model.embed_tokens.weight", (v, d), (v, d), False)]
  for i in range(cfg.num_layers):
    hf, kat = f"model.layers.{i}", f"layer_{i}"
    specs += [
        TensorSpec((kat, "attn", "q_proj"), f"{hf}.self_attn.q_proj.weight", (h * hd, d),
                   (d, h, hd), True),
        TensorSpec((kat, "attn", "k_proj"), f"{hf}.self_attn.k_proj.weight", (hkv * hd, d),
                   (d, hkv, hd), True),
        TensorSpec((kat, "attn", "v_proj"), f"{hf}.self_attn.v_proj.weight", (hkv * hd, d),
                   (d, hkv, hd), True),
        TensorSpec((kat, "attn", "o_proj"), f"{hf}.self_attn.o_proj.weight", (d, h * hd),
                   (h, hd, d), True),
    ]
    if cfg.qkv_bias:
      specs += [
          TensorSpec((kat, "attn", "q_bias"), f"{hf}.self_attn.q_proj.bias", (h * hd,), (h, hd),
                     False),
          TensorSpec((kat, "attn", "k_bias"), f"{hf}.self_attn.k_proj.bias", (hkv * hd,),
                     (hkv, hd), False),
          TensorSpec((kat, "attn", "v_bias"), f"{hf}.self_attn.v_proj.bias", (hkv * hd,),
                     (hkv, hd), False),
      ]
    if cfg.qk_norm:
      specs += [
          TensorSpec((kat, "attn", "q_norm", "scale"), f"{hf}.self_attn.q_norm.weight", (hd,),
                     (hd,), False),
          TensorSpec((kat, "attn", "k_norm", "scale"), f"{hf}.self_attn.k_norm.weight", (hd,),
                     (hd,), False),
      ]
    specs += [
        TensorSpec((kat, "attn_norm", "scale"), f"{hf}.input_layernorm.weight", (d,), (d,), False),
        TensorSpec((kat, "mlp_norm", "scale"), f"{hf}.post_attention_layernorm.weight", (d,), (d,),
                   False),
        TensorSpec((kat, "mlp", "gate_proj"), f"{hf}.mlp.gate_proj.weight", (f, d), (d, f), True),
        TensorSpec((kat, "mlp", "up_proj"), f"{hf}.mlp.up_proj.weight", (f, d), (d, f), True),
        TensorSpec((kat, "mlp", "down_proj"), f"{hf}.mlp.down_proj.weight", (d, f), (f, d), True),
    ]
  specs.append(TensorSpec(("final_norm", "scale"), "model.norm.weight", (d,), (d,), False))
  if not cfg.tie_embeddings:
    specs.append(TensorSpec(("lm_head",), "lm_head.weight", (v, d), (d, v), True))
  return specs


def to_kat(spec: TensorSpec, hf_array: np.ndarray, dtype) -> np.ndarray:
  """HF layout → kat_jax layout in ``dtype``: a view when only the shape changes, else one copy
  (converting while copying)."""
  if not spec.transpose and hf_array.dtype == np.dtype(dtype):
    return hf_array.reshape(spec.kat_shape)
  src = hf_array.T if spec.transpose else hf_array
  out = empty_host_array(src.shape, dtype)
  np.copyto(out, src, casting="unsafe")
  return out.reshape(spec.kat_shape)


def to_hf(spec: TensorSpec, kat_array: np.ndarray, dtype) -> np.ndarray:
  """kat_jax layout → HF layout in ``dtype``, C-contiguous (what safetensors writes)."""
  if spec.transpose:
    src = kat_array.reshape(spec.hf_shape[::-1]).T
  else:
    src = kat_array.reshape(spec.hf_shape)
  out = np.empty(src.shape, dtype)
  np.copyto(out, src, casting="unsafe")
  return out
