"""Decoder-only Transformer (Flax linen): RMSNorm, RoPE, GQA attention (optional QK-norm / qkv bias),
SwiGLU MLP, tied or untied output embedding, optional value head.

Usage::

  model = Transformer(ModelConfig(...))
  params = model.init(rng, tokens, positions, mask)["params"]
  out = model.apply({"params": params}, tokens, positions, mask)   # out.logits [B, T, V]

``mask`` is an ``AttentionMask`` of DFS intervals (``intervals_from_segment_ids`` for packed sequences,
tree batches carry their own). The attention implementation is chosen by ``config.attention_impl``.
With ``kv_cache`` the call writes the new keys/values at cache slots ``mask.tin`` and attends over the
whole cache with the same interval rule (cache slots keep their own tin/tout) — prefill and decode are
one code path.

Every parameter carries logical axis names (see kat_jax.sharding); pass ``mesh`` and ``rules`` to also
constrain the main activations. ``config.model.lora`` adds low-rank adapters to the projection kernels
and optionally stores the frozen ones quantized (kat_jax.model.lora); ``config.model.qat`` computes
with int8 fake-quantized projections, or with an export's int8 codes (kat_jax.model.qat).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from kat_jax import sharding as sharding_lib
from kat_jax.model import attention as attention_lib
from kat_jax.model import lora as lora_lib
from kat_jax.model import qat as qat_lib
from kat_jax.model.presets import ModelConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class KVCache:
  """Keys/values of every layer at S slots, with each slot's interval (tout == tin: empty slot)."""
  k: jax.Array      # [L, B, Hkv, S, D] (heads-major: the layout the attention dots read, so a
  v: jax.Array      # [L, B, Hkv, S, D]  decode step never transposes the cache)
  tin: jax.Array    # [B, S] int32
  tout: jax.Array   # [B, S] int32

  @classmethod
  def empty(cls, cfg: ModelConfig, batch: int, slots: int) -> "KVCache":
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
    dtype = _DTYPES[cfg.dtype]
    idx = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (batch, slots))
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), tin=idx, tout=idx)


@flax.struct.dataclass
class ModelOutput:
  logits: Optional[jax.Array]            # [B, T, V] float32 ([B, N, V] with ``logits_at``)
  values: Optional[jax.Array] = None     # [B, T] float32 (value head; [B, N] with ``logits_at``)
  hidden: Optional[jax.Array] = None     # [B, T, d] final normed hidden states
  kv_cache: Optional[KVCache] = None


def _param(module: nn.Module, name: str, shape, names, cfg: ModelConfig, init=None):
  init = init or nn.initializers.normal(stddev=shape[0] ** -0.5 if len(shape) > 1 else 1.0)
  return module.param(name, nn.with_logical_partitioning(init, names), shape,
                      _DTYPES[cfg.param_dtype])


def _kernel(module: nn.Module, name: str, shape, names, cfg: ModelConfig, init=None):
  """A projection kernel [*in, *out]: the float param, or with ``config.model.lora.quantize_base``
  its int8 / NF4 codes dequantized in the forward pass (QLoRA); with ``config.model.qat`` the float
  param fake-quantized to int8 (straight-through gradient), or an export's int8 codes
  dequantized."""
  if cfg.lora.quantize_base:
    return lora_lib.quantized_kernel(module, name, shape, names, cfg.lora.quantize_base)
  if qat_lib.stores_codes(cfg):
    return lora_lib.quantized_kernel(module, name, shape, names, "int8")
  w = _param(module, name, shape, names, cfg, init)
  return qat_lib.kernel(w, name) if qat_lib.enabled(cfg) else w


def _head_param(module: nn.Module, name: str, shape, names, cfg: ModelConfig, init=None):
  """The embedding [V, d] or ``lm_head`` [d, V] as a float matrix: the param, or (``qat.head`` in
  an int8 export) its codes and ``<name>_scale`` dequantized. A float QAT model fake-quantizes it
  where it is used (``qat.head_weight``)."""
  if qat_lib.stores_codes(cfg) and qat_lib.head_quantized(cfg) and name == qat_lib.head_name(cfg):
    return lora_lib.quantized_param(module, name, shape, names, "int8",
                                    (qat_lib.head_reduced_axis(cfg),))
  return _param(module, name, shape, names, cfg, init)


def _adapted(y, x, adapter):
  """``y`` plus the low-rank update of ``x`` when the kernel has an adapter."""
  return y if adapter is None else y + adapter(x)


class RMSNorm(nn.Module):
  cfg: ModelConfig
  dim: int
  names: tuple = ("norm",)

  @nn.compact
  def __call__(self, x):
    scale = _param(self, "scale", (self.dim,), self.names, self.cfg, nn.initializers.ones)
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.cfg.norm_eps) * scale.astype(jnp.float32)
    return y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse RoPE frequencies [head_dim / 2]; with ``rope_scaling='llama3'`` the Llama 3.1 rule:
  low frequencies (wavelength > original context / low_freq_factor) divided by the factor, high ones
  kept, the band between interpolated smoothly."""
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  if cfg.rope_scaling != "llama3":
    return inv
  factor, lo, hi = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  ctx = float(cfg.rope_original_max_position)
  wavelen = 2.0 * jnp.pi / inv
  scaled = jnp.where(wavelen > ctx / lo, inv / factor, inv)
  smooth = (ctx / wavelen - lo) / (hi - lo)
  smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= ctx / hi) & (wavelen <= ctx / lo)
  return jnp.where(medium, smoothed, scaled)


def rope(x_bthd: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, rotate-half convention (as Llama/Qwen checkpoints use)."""
  angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq          # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]       # [B, T, 1, D]
  x = x_bthd.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x_bthd.dtype)


class Attention(nn.Module):
  cfg: ModelConfig
  mesh: Optional[Mesh] = None
  rules: Any = sharding_lib.DEFAULT_RULES

  @nn.compact
  def __call__(self, x, positions, mask: attention_lib.AttentionMask, layer_cache=None):
    cfg, dtype = self.cfg, _DTYPES[self.cfg.dtype]
    d, h, hkv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {"q_proj": ((d, h, hd), ("embed", "heads", "head_dim")),
              "k_proj": ((d, hkv, hd), ("embed", "kv_heads", "head_dim")),
              "v_proj": ((d, hkv, hd), ("embed", "kv_heads", "head_dim")),
              "o_proj": ((h, hd, d), ("heads", "head_dim", "embed"))}
    wq = _kernel(self, "q_proj", *shapes["q_proj"], cfg)
    wk = _kernel(self, "k_proj", *shapes["k_proj"], cfg)
    wv = _kernel(self, "v_proj", *shapes["v_proj"], cfg)
    wo = _kernel(self, "o_proj", *shapes["o_proj"], cfg,
                 nn.initializers.normal(stddev=(h * hd) ** -0.5))
    adapters = {n: lora_lib.adapter(cfg, n, *shapes[n], dtype) for n in shapes}
    xq = qat_lib.activation(x, 1, cfg)          # x itself unless qat.activations='int8'
    q = _adapted(jnp.einsum("btd,dhk->bthk", xq, wq.astype(dtype)), x, adapters["q_proj"])
    k = _adapted(jnp.einsum("btd,dhk->bthk", xq, wk.astype(dtype)), x, adapters["k_proj"])
    v = _adapted(jnp.einsum("btd,dhk->bthk", xq, wv.astype(dtype)), x, adapters["v_proj"])
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q = q + _param(self, "q_bias", (h, hd), ("heads", "head_dim"), cfg, zeros).astype(dtype)
      k = k + _param(self, "k_bias", (hkv, hd), ("kv_heads", "head_dim"), cfg, zeros).astype(dtype)
      v = v + _param(self, "v_bias", (hkv, hd), ("kv_heads", "head_dim"), cfg, zeros).astype(dtype)
    if cfg.qk_norm:
      q = RMSNorm(cfg, hd, ("head_dim",), name="q_norm")(q)
      k = RMSNorm(cfg, hd, ("head_dim",), name="k_norm")(k)
    inv_freq = rope_inv_freq(cfg)
    q = rope(q, positions, inv_freq)
    k = rope(k, positions, inv_freq)
    q = sharding_lib.constrain(q, ("act_batch", "act_length", "act_heads", None), self.mesh,
                               self.rules)

    if layer_cache is None:
      out = attention_lib.get_attention_fn(cfg.attention_impl)(q, k, v, mask)
      new_cache = None
    else:
      # The stacked [L, B, Hkv, S, D] cache is updated in place at this layer's slots (no per-step
      # slice/stack copy of the whole cache inside a decode loop). Index arrays split by the head
      # slice put their [B, T] dims first, so the update is k's own [B, T, Hkv, D].
      layer, cache_k, cache_v, cache_tin, cache_tout = layer_cache
      rows = jnp.arange(x.shape[0])[:, None]
      cache_k = cache_k.at[layer, rows, :, mask.tin].set(k.astype(cache_k.dtype))
      cache_v = cache_v.at[layer, rows, :, mask.tin].set(v.astype(cache_v.dtype))
      out = attention_lib.dense_attention_general(q, cache_k[layer], cache_v[layer], mask.tin,
                                                  cache_tin, cache_tout, kv_heads_major=True)
      new_cache = (cache_k, cache_v)
    y = _adapted(jnp.einsum("bthk,hkd->btd", qat_lib.activation(out, 2, cfg), wo.astype(dtype)),
                 out, adapters["o_proj"])
    return y, new_cache


def _head_logits(hidden_btd, params, cfg: ModelConfig, labels_bt=None):
  """float32 logits of the output head (tied embedding or ``lm_head``) from unboxed params: all of
  them [B, T, V], or with ``labels_bt`` only each row's logit of its label [B, T] (the label's
  weight row dotted with the hidden state: no [B, T, V])."""
  dtype = _DTYPES[cfg.dtype]
  # Tied: the embedding [V, d]; untied: lm_head stored [d, V] (indexed in place: a transposed copy
  # of a 152k-row matrix per chunk costs memory).
  if cfg.tie_embeddings:
    name, vocab_axis, w_spec, label_spec = "embedding", 0, "vd", "btd"
  else:
    name, vocab_axis, w_spec, label_spec = "lm_head", 1, "dv", "dbt"
  w = params[name]
  if qat_lib.head_quantized(cfg):
    hidden_btd = qat_lib.activation(hidden_btd, 1, cfg)
  if labels_bt is None:
    w = qat_lib.head_weight(w, name, cfg, 1 - vocab_axis)
    return jnp.einsum(f"btd,{w_spec}->btv", hidden_btd, w.astype(dtype),
                      preferred_element_type=jnp.float32)
  # Q(W) per vocab entry commutes with taking entries: quantize only the labels' rows.
  w_labels = qat_lib.head_weight(jnp.take(w, labels_bt, axis=vocab_axis), name, cfg,
                                 -1 if cfg.tie_embeddings else 0).astype(dtype)
  return jnp.einsum(f"btd,{label_spec}->bt", hidden_btd.astype(dtype), w_labels,
                    preferred_element_type=jnp.float32)


def token_slices(fn, x_btd, chunk: int):
  """``fn`` (token-wise) applied to slices of ``chunk`` tokens along the sequence axis, concatenated:
  the same result as ``fn(x_btd)``, as separate smaller matmuls (``ModelConfig.token_chunk``)."""
  t = x_btd.shape[1]
  if not chunk or t <= chunk:
    return fn(x_btd)
  return jnp.concatenate([fn(x_btd[:, s:s + chunk]) for s in range(0, t, chunk)], axis=1)


class Mlp(nn.Module):
  cfg: ModelConfig
  mesh: Optional[Mesh] = None
  rules: Any = sharding_lib.DEFAULT_RULES

  @nn.compact
  def __call__(self, x):
    cfg, dtype = self.cfg, _DTYPES[self.cfg.dtype]
    shapes = {"gate_proj": ((cfg.d_model, cfg.mlp_dim), ("embed", "mlp")),
              "up_proj": ((cfg.d_model, cfg.mlp_dim), ("embed", "mlp")),
              "down_proj": ((cfg.mlp_dim, cfg.d_model), ("mlp", "embed"))}
    wg = _kernel(self, "gate_proj", *shapes["gate_proj"], cfg)
    wu = _kernel(self, "up_proj", *shapes["up_proj"], cfg)
    wd = _kernel(self, "down_proj", *shapes["down_proj"], cfg)
    adapters = {n: lora_lib.adapter(cfg, n, *shapes[n], dtype) for n in shapes}

    def mlp(x):
      xq = qat_lib.activation(x, 1, cfg)        # x itself unless qat.activations='int8'
      gate = _adapted(xq @ wg.astype(dtype), x, adapters["gate_proj"])
      hidden = nn.silu(gate) * _adapted(xq @ wu.astype(dtype), x, adapters["up_proj"])
      hidden = sharding_lib.constrain(hidden, ("act_batch", "act_length", "act_mlp"), self.mesh,
                                      self.rules)
      return _adapted(qat_lib.activation(hidden, 1, cfg) @ wd.astype(dtype), hidden,
                      adapters["down_proj"])

    return token_slices(mlp, x, cfg.token_chunk)


class Block(nn.Module):
  cfg: ModelConfig
  mesh: Optional[Mesh] = None
  rules: Any = sharding_lib.DEFAULT_RULES

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache=None):
    cfg = self.cfg
    y, new_cache = Attention(cfg, self.mesh, self.rules, name="attn")(
        RMSNorm(cfg, cfg.d_model, name="attn_norm")(x), positions, mask, layer_cache)
    x = x + y
    x = x + Mlp(cfg, self.mesh, self.rules, name="mlp")(RMSNorm(cfg, cfg.d_model, name="mlp_norm")(x))
    x = sharding_lib.constrain(x, ("act_batch", "act_length", "act_embed"), self.mesh, self.rules)
    return x, new_cache


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
  cfg: ModelConfig
  mesh: Optional[Mesh] = None
  rules: Any = sharding_lib.DEFAULT_RULES

  @nn.compact
  def __call__(self, tokens_bt, positions_bt, mask: attention_lib.AttentionMask,
               kv_cache: Optional[KVCache] = None, return_hidden: bool = False,
               logits_at: Optional[jax.Array] = None,
               compute_logits: bool = True) -> ModelOutput:
    """Forward pass. ``logits_at`` (int32 [B, N], optional): sequence positions at which to
    compute the output head (logits and values, [B, N, ...]) instead of at every position — a
    prefill needs only each prompt's last position, and [B, P, V] logits are large for a 152k
    vocabulary. ``compute_logits=False`` skips the head (logits None; use with
    ``return_hidden`` and ``output_head`` to apply it chunk by chunk)."""
    cfg, dtype = self.cfg, _DTYPES[self.cfg.dtype]
    embedding = _head_param(self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                            cfg, nn.initializers.normal(stddev=cfg.d_model ** -0.5))
    x = qat_lib.head_weight(jnp.take(embedding, tokens_bt, axis=0), "embedding", cfg, -1)
    x = x.astype(dtype)
    x = sharding_lib.constrain(x, ("act_batch", "act_length", "act_embed"), self.mesh, self.rules)

    block_cls = Block
    if cfg.remat != "none" and kv_cache is None:
      block_cls = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=True)

    if kv_cache is not None:
      # Slots written by this call take the new tokens' intervals.
      rows = jnp.arange(tokens_bt.shape[0])[:, None]
      cache_tin = kv_cache.tin.at[rows, mask.tin].set(mask.tin)
      cache_tout = kv_cache.tout.at[rows, mask.tin].set(mask.tout)
      cache_k, cache_v = kv_cache.k, kv_cache.v
    for i in range(cfg.num_layers):
      layer_cache = None
      if kv_cache is not None:
        layer_cache = (i, cache_k, cache_v, cache_tin, cache_tout)
      x, c = block_cls(cfg, self.mesh, self.rules, name=f"layer_{i}")(x, positions_bt, mask,
                                                                      layer_cache)
      if c is not None:
        cache_k, cache_v = c

    hidden = RMSNorm(cfg, cfg.d_model, name="final_norm")(x)
    head_in = hidden
    if logits_at is not None:
      head_in = jnp.take_along_axis(hidden, logits_at[..., None].astype(jnp.int32), axis=1)
    head_params = {"embedding": embedding}
    if not cfg.tie_embeddings:
      head_params["lm_head"] = _head_param(self, "lm_head", (cfg.d_model, cfg.vocab_size),
                                           ("embed", "vocab"), cfg)
    logits = None
    if compute_logits:
      logits = token_slices(lambda h: _head_logits(h, head_params, cfg), head_in, cfg.token_chunk)
      logits = sharding_lib.constrain(logits, ("act_batch", "act_length", "act_vocab"), self.mesh,
                                      self.rules).astype(jnp.float32)
    values = None
    if cfg.value_head:
      w = _param(self, "value_head", (cfg.d_model, 1), ("embed", None), cfg,
                 nn.initializers.zeros)
      values = jnp.einsum("btd,do->bto", head_in.astype(jnp.float32), w.astype(jnp.float32))[..., 0]
    new_cache = None
    if kv_cache is not None:
      new_cache = KVCache(k=cache_k, v=cache_v, tin=cache_tin, tout=cache_tout)
    return ModelOutput(logits=logits, values=values,
                       hidden=hidden if return_hidden else None, kv_cache=new_cache)

  def output_head(self, hidden_btd: jax.Array, labels_bt: Optional[jax.Array] = None) -> jax.Array:
    """The output head alone, on final hidden states (``hidden``): float32 logits [B, T, V], or
    with ``labels_bt`` only each row's logit of its label, [B, T] (see ``_head_logits``).

    ``model.apply(variables, hidden, method="output_head")``: with ``compute_logits=False`` this
    lets a loss apply the head to a few rows at a time (``kat_jax.tree.logprobs``)."""
    return _head_logits(hidden_btd, qat_lib.head_params(nn.unbox(self.variables["params"]),
                                                        self.cfg), self.cfg, labels_bt)
