"""LoRA and QLoRA: low-rank adapters on the Transformer's projection kernels, a frozen (optionally
int8 / NF4-quantized) base, and the merge back into plain params for export.

``config.model.lora.rank = r > 0`` gives every targeted kernel ``W`` [*in, *out] (``q_proj`` …
``down_proj``; ``config.model.lora.targets``) a child module ``<kernel>_lora`` with params ``a``
[*in, r] and ``b`` [r, *out], and the projection becomes::

    y = x·W + (alpha / r) · (dropout(x)·a)·b          # b starts at zero: y = x·W exactly at init

``a`` keeps the logical names of W's input axes and ``b`` those of its output axes (the rank axis is
unnamed, replicated), so the config's sharding rules place adapters like their kernels. The
adapters live in child scopes, so they do not shift the parameter RNG of their module: a fresh
LoRA model's base equals the plain model's init under the same seed.

``quantize_base`` stores the seven projection kernels of the frozen base as codes plus a
per-output-channel scale (``<kernel>_scale``, absmax over the input axes) and dequantizes them in
the forward pass: ``int8`` (symmetric, codes in [-127, 127], |W - Ŵ| ≤ scale/2 = absmax/254) or
``nf4`` (the 16 NormalFloat levels of QLoRA in ``uint4``, |W - Ŵ| ≤ 0.152·absmax; per channel, not
QLoRA's 64-element blocks). The embedding, norms and output head stay float. Stated and tested
tolerance vs the float base (tests/model/test_lora.py, random-init tiny preset, RMS of the logit
error over the RMS of the centered logits): int8 ≤ 0.05 (measured 0.024; 0.035 on the small
preset), nf4 ≤ 0.5 (measured 0.35; 0.43 on small). Random-init models amplify weight noise; the
per-weight bounds above are the contract.

Usage::

    base, adapters = lora.split(params)            # frozen base / trainable adapters
    params = lora.combine(base, adapters)          # what model.apply takes
    base = lora.quantize(float_base, "int8")       # QLoRA base (codes + scales)
    plain = lora.merge(params, model_cfg)          # W + (alpha/r)·a·b, dequantized: plain params
    reference = lora.combine(base, lora.zeros_like(adapters))   # adapters off (RL reference)

A LoRA run's Trainer (kat_jax.train.trainer) optimizes the adapters only — its TrainState, optimizer
moments and checkpoints hold the adapters alone — and keeps the base beside it, re-created from
``config.init_from`` (else the seed's fresh init) on every start, never checkpointed. It writes
``WORKDIR/lora_run.json`` (``write_run_info``) naming that base, so ``load_merged`` (used by
``hf.init_params_from`` and ``experiments.convert --from_workdir``) can rebuild base + adapters and
merge them.

Why not qwix (google/qwix 0.1.8, the quantization + LoRA library of Tunix): tried on this model, its
linen path does not fit. Its LoRA einsum interceptor sets an attribute on the module
(``SetAttributeFrozenModuleError`` inside a linen ``@compact`` call), so the attention projections
(``jnp.einsum``) cannot be adapted; the MLP's ``x @ w`` (``jnp.matmul``) is not intercepted at all, so
it got no adapters; and its QLoRA replaces params by ``WithAux`` wrappers, changing the params tree
that the HF import/export, checkpoints and the shape checks read. Explicit adapters are a few lines
of linen, keep every tree plain, and the merge is exact by construction.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from kat_jax.model.presets import LoraConfig, ModelConfig

# target name -> (module, kernel, number of leading input axes of the kernel)
KERNELS: dict[str, tuple[str, str, int]] = {
    "q": ("attn", "q_proj", 1), "k": ("attn", "k_proj", 1), "v": ("attn", "v_proj", 1),
    "o": ("attn", "o_proj", 2),
    "gate": ("mlp", "gate_proj", 1), "up": ("mlp", "up_proj", 1), "down": ("mlp", "down_proj", 1),
}
_INPUT_AXES = {kernel: n for _, kernel, n in KERNELS.values()}
ADAPTER_SUFFIX = "_lora"
SCALE_SUFFIX = "_scale"
RUN_INFO_FILENAME = "lora_run.json"
RUN_INFO_FORMAT = "kat_jax.lora_run.v1"

# The 16 NormalFloat-4 levels (QLoRA, Dettmers et al. 2023), ascending in [-1, 1].
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
_CODE_DTYPES = {"int8": jnp.int8, "nf4": jnp.uint4}


def enabled(cfg: ModelConfig) -> bool:
  return cfg.lora.rank > 0


def plain_config(cfg: ModelConfig) -> ModelConfig:
  """``cfg`` without adapters or quantization: the model that merged params belong to."""
  return dataclasses.replace(cfg, lora=LoraConfig())


def float_base_config(cfg: ModelConfig) -> ModelConfig:
  """``cfg`` with the same adapters on a float base (the tree a QLoRA base is quantized from)."""
  return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, quantize_base=""))


def adapted_kernels(cfg: ModelConfig) -> frozenset[str]:
  """Kernel names (``q_proj`` …) that carry adapters under ``cfg``."""
  if not enabled(cfg):
    return frozenset()
  return frozenset(KERNELS[t][1] for t in cfg.lora.target_names())


# ------------------------------------------------------------------------------- the modules

def _uniform_fan_in(fan_in: int):
  """A's init: U(-1/√fan_in, 1/√fan_in), as PEFT's kaiming_uniform(a=√5) on a Linear."""
  limit = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


class Adapter(nn.Module):
  """The low-rank update of one kernel [*in, *out]: ``(alpha/r)·(dropout(x)·a)·b`` for x [..., *in].

  Dropout runs only when the apply has a ``dropout`` RNG (the train step passes one; scoring,
  evaluation and sampling do not), so inference is deterministic."""
  lora: LoraConfig
  kernel_shape: tuple[int, ...]
  kernel_names: tuple[Optional[str], ...]
  num_input_axes: int
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, r = self.num_input_axes, self.lora.rank
    fan_in = int(np.prod(self.kernel_shape[:n]))
    a = self.param("a", nn.with_logical_partitioning(_uniform_fan_in(fan_in),
                                                     self.kernel_names[:n] + (None,)),
                   self.kernel_shape[:n] + (r,), self.param_dtype)
    b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                     (None,) + self.kernel_names[n:]),
                   (r,) + self.kernel_shape[n:], self.param_dtype)
    if self.lora.dropout > 0 and self.has_rng("dropout"):
      x = nn.Dropout(self.lora.dropout, deterministic=False)(x)
    h = jnp.tensordot(x, a.astype(self.dtype), axes=n)             # [..., r]
    delta = jnp.tensordot(h, b.astype(self.dtype), axes=1)          # [..., *out]
    return delta * jnp.asarray(self.lora.alpha / r, self.dtype)


def adapter(cfg: ModelConfig, kernel: str, shape: tuple[int, ...], names: tuple,
            dtype: Any) -> Optional[Adapter]:
  """The ``Adapter`` child module of ``kernel`` (named ``<kernel>_lora``) if ``cfg`` adapts it, else
  None; call it inside the parent's compact method."""
  if kernel not in adapted_kernels(cfg):
    return None
  return Adapter(cfg.lora, tuple(shape), tuple(names), _INPUT_AXES[kernel],
                 param_dtype=jnp.dtype(cfg.param_dtype), dtype=dtype,
                 name=kernel + ADAPTER_SUFFIX)


def quantized_kernel(module: nn.Module, kernel: str, shape: tuple[int, ...], names: tuple,
                     fmt: str) -> jax.Array:
  """Declares ``kernel`` as codes (int8 / uint4) plus ``<kernel>_scale`` and returns the dequantized
  float32 kernel. Their initializers are placeholders: a QLoRA base is always made by ``quantize``
  from float params (a fresh init or ``init_from``)."""
  return quantized_param(module, kernel, shape, names, fmt, tuple(range(_INPUT_AXES[kernel])))


def quantized_param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple, fmt: str,
                    reduced_axes: tuple[int, ...]) -> jax.Array:
  """Declares param ``name`` as codes (int8 / uint4) of ``shape`` plus ``<name>_scale`` (size 1 on
  ``reduced_axes``, the axes one scale spans; the others keep their logical names) and returns the
  dequantized float32 array. The initializers are placeholders: the codes are always written by a
  quantizer (``quantize`` here, ``kat_jax.model.qat.export_params``)."""
  codes = module.param(name, nn.with_logical_partitioning(nn.initializers.zeros, names), shape,
                       _CODE_DTYPES[fmt])
  scale_names = tuple(None if a in reduced_axes else n for a, n in enumerate(names))
  scale_shape = tuple(1 if a in reduced_axes else d for a, d in enumerate(shape))
  scale = module.param(name + SCALE_SUFFIX, nn.with_logical_partitioning(
      nn.initializers.ones, scale_names), scale_shape, jnp.float32)
  return dequantize(codes, scale)


# ------------------------------------------------------------------------------- quantization

def quantize_kernel(w: jax.Array, num_input_axes: int, fmt: str) -> tuple[jax.Array, jax.Array]:
  """(codes, scale) of a float kernel, absmax per output channel (over the leading input axes)."""
  w = w.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(w), axis=tuple(range(num_input_axes)), keepdims=True)
  if fmt == "int8":
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale
  if fmt == "nf4":
    scale = jnp.where(absmax > 0, absmax, 1.0)
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.searchsorted(midpoints, w / scale)                # nearest level
    return codes.astype(jnp.uint4), scale
  raise ValueError(f"quantize_base={fmt!r}: use 'int8' or 'nf4'")


def dequantize(codes: jax.Array, scale: jax.Array) -> jax.Array:
  """The float32 kernel of (codes, scale); the format follows the codes' dtype."""
  if codes.dtype == jnp.int8:
    return codes.astype(jnp.float32) * scale
  if codes.dtype == jnp.uint4:
    return jnp.take(jnp.asarray(NF4_LEVELS), codes.astype(jnp.int32)) * scale
  raise ValueError(f"codes of dtype {codes.dtype}: expected int8 (int8) or uint4 (nf4)")


def _modules(flat: dict) -> dict[tuple, dict[str, Any]]:
  """{module path: {leaf name: value}} of a flattened params dict."""
  out: dict[tuple, dict[str, Any]] = {}
  for path, value in flat.items():
    out.setdefault(path[:-1], {})[path[-1]] = value
  return out


def quantize(base: Any, fmt: str) -> Any:
  """The float base with every projection kernel replaced by its codes and ``<kernel>_scale``."""
  if not fmt:
    return base
  out = {}
  for path, value in traverse_util.flatten_dict(base).items():
    if path[-1] in _INPUT_AXES and len(path) >= 2 and path[-2] in ("attn", "mlp"):
      codes, scale = quantize_kernel(value, _INPUT_AXES[path[-1]], fmt)
      out[path], out[path[:-1] + (path[-1] + SCALE_SUFFIX,)] = codes, scale
    else:
      out[path] = value
  return traverse_util.unflatten_dict(out)


# ------------------------------------------------------------------------------- param trees

def is_adapter_path(path: tuple) -> bool:
  return any(str(k).endswith(ADAPTER_SUFFIX) for k in path)


def split(params: Any) -> tuple[Any, Any]:
  """(base, adapters) of a LoRA params tree (boxed or not); ``combine`` is the inverse."""
  flat = traverse_util.flatten_dict(params)
  base = {p: v for p, v in flat.items() if not is_adapter_path(p)}
  adapters = {p: v for p, v in flat.items() if is_adapter_path(p)}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def adapters_of(params: Any) -> Any:
  return split(params)[1]


def combine(base: Any, adapters: Any) -> Any:
  """The params tree ``model.apply`` takes: base and adapters side by side (no copy of either)."""
  flat = traverse_util.flatten_dict(base)
  extra = traverse_util.flatten_dict(adapters)
  both = sorted("/".join(p) for p in set(flat) & set(extra))
  if both:
    raise ValueError(f"combine: {both[:3]} are in both the base and the adapters")
  return traverse_util.unflatten_dict({**flat, **extra})


def zeros_like(adapters: Any) -> Any:
  """Adapters that change nothing (b = 0): with them the model is its base — the RL reference."""
  return jax.tree.map(jnp.zeros_like, adapters)


def num_adapter_params(cfg: ModelConfig) -> int:
  """r · (fan_in + fan_out) per adapted kernel and layer."""
  d, h, hkv, hd, m = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  fans = {"q": (d, h * hd), "k": (d, hkv * hd), "v": (d, hkv * hd), "o": (h * hd, d),
          "gate": (d, m), "up": (d, m), "down": (m, d)}
  if not enabled(cfg):
    return 0
  per_layer = sum(cfg.lora.rank * sum(fans[t]) for t in cfg.lora.target_names())
  return cfg.num_layers * per_layer


def merge(params: Any, cfg: ModelConfig) -> Any:
  """Plain params (the tree of ``plain_config(cfg)``): each adapted kernel becomes
  ``W + (alpha/r)·a·b`` (float32 sum, stored in ``cfg.param_dtype``), each quantized kernel its
  dequantized value; adapters and scales are dropped. Jit it with ``out_shardings`` for big models."""
  alpha_over_r = cfg.lora.alpha / cfg.lora.rank if enabled(cfg) else 0.0
  dtype = jnp.dtype(cfg.param_dtype)
  flat = traverse_util.flatten_dict(params)
  out = {}
  for module_path, leaves in _modules(flat).items():
    if is_adapter_path(module_path):
      continue
    for name, value in leaves.items():
      if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in leaves:
        continue
      if name in _INPUT_AXES and name + SCALE_SUFFIX in leaves:
        value = dequantize(value, leaves[name + SCALE_SUFFIX]).astype(dtype)
      adapter_params = flat.get(module_path + (name + ADAPTER_SUFFIX, "a")), flat.get(
          module_path + (name + ADAPTER_SUFFIX, "b"))
      if adapter_params[0] is not None:
        a, b = (x.astype(jnp.float32) for x in adapter_params)
        value = (value.astype(jnp.float32) + alpha_over_r * jnp.tensordot(a, b, axes=1)
                 ).astype(dtype)
      out[module_path + (name,)] = value
  return traverse_util.unflatten_dict(out)


# ------------------------------------------------------------------------------- the base

def abstract_params(cfg: ModelConfig, mesh, rules) -> Any:
  """Abstract params (with shardings) of ``cfg``'s model: base and adapters together."""
  from kat_jax.model.hf import weights
  return weights.abstract_params(cfg, mesh, rules)


def initial_base(cfg: ModelConfig, mesh, rules, *, init_from: str = "", seed: int = 0) -> Any:
  """The frozen base of a LoRA run, sharded on ``mesh``: ``init_from`` (an HF checkpoint, a kat_jax
  workdir[@step], or a LoRA workdir, merged) if set, else the plain model's fresh init of ``seed``;
  quantized when ``cfg.lora.quantize_base``. Deterministic: every start of the run (and its export)
  gets the same base."""
  from kat_jax.model.attention import AttentionMask
  from kat_jax.model.hf import init_from as init_from_lib
  from kat_jax.model.transformer import Transformer
  float_cfg = float_base_config(cfg)
  float_base_abstract = split(abstract_params(float_cfg, mesh, rules))[0]
  if init_from:
    float_base = init_from_lib.init_params_from(init_from, float_base_abstract, plain_config(cfg))
  else:
    model = Transformer(float_cfg)

    def init(rng):
      tokens = jnp.zeros((1, 1), jnp.int32)
      mask = AttentionMask(tin=tokens, tout=jnp.ones_like(tokens))
      return split(nn.unbox(model.init(rng, tokens, tokens, mask)["params"]))[0]

    shardings = jax.tree.map(lambda a: a.sharding, float_base_abstract)
    float_base = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
  if not cfg.lora.quantize_base:
    return float_base
  base_abstract = split(abstract_params(cfg, mesh, rules))[0]
  shardings = jax.tree.map(lambda a: a.sharding, base_abstract)
  return jax.jit(lambda b: quantize(b, cfg.lora.quantize_base), out_shardings=shardings,
                 donate_argnums=0)(float_base)


# ------------------------------------------------------------------------------- LoRA workdirs

def run_info(config: ml_collections.ConfigDict) -> dict:
  """What rebuilds a LoRA run's base: its config.model, init_from (absolute) and seed."""
  init_from = str(config.init_from or "")
  if init_from:
    head, sep, tail = init_from.rpartition("@")
    init_from = (os.path.abspath(head) + sep + tail if sep and tail.isdigit()
                 else os.path.abspath(init_from))
  return {"format": RUN_INFO_FORMAT, "model": config.model.to_dict(), "init_from": init_from,
          "seed": int(config.seed)}


def read_run_info(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, RUN_INFO_FILENAME)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def is_lora_workdir(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, RUN_INFO_FILENAME))


def write_run_info(workdir: str, info: dict) -> None:
  tmp = os.path.join(workdir, RUN_INFO_FILENAME + ".tmp")
  with open(tmp, "w") as f:
    json.dump(info, f, indent=1)
  os.replace(tmp, os.path.join(workdir, RUN_INFO_FILENAME))


def base_differences(saved: dict, current: dict) -> list[str]:
  """Fields whose change would silently put a run's adapters on another base or function."""
  diffs = []
  saved_lora, current_lora = saved["model"].get("lora", {}), current["model"].get("lora", {})
  for field in ("alpha", "quantize_base"):
    if saved_lora.get(field) != current_lora.get(field):
      diffs.append(f"config.model.lora.{field}: {saved_lora.get(field)!r} -> "
                   f"{current_lora.get(field)!r}")
  if saved["init_from"] != current["init_from"]:
    diffs.append(f"config.init_from: {saved['init_from']!r} -> {current['init_from']!r}")
  elif not saved["init_from"] and saved["seed"] != current["seed"]:
    diffs.append(f"config.seed (the fresh base's seed): {saved['seed']} -> {current['seed']}")
  return diffs


def run_model_config(info: dict) -> ModelConfig:
  return ModelConfig.from_config(ml_collections.ConfigDict(info["model"]))


def load_merged(workdir: str, abstract: Any, step: Optional[int] = None) -> Any:
  """Plain params of a LoRA workdir's checkpoint ``step`` (default latest): its base rebuilt from
  ``lora_run.json``, its adapters restored, merged; shaped, typed and sharded like ``abstract``
  (plain params; a ``value_head`` the run lacks is zero-filled)."""
  from kat_jax import sharding as sharding_lib
  from kat_jax.model.hf import init_from as init_from_lib
  info = read_run_info(workdir)
  if info is None:
    raise FileNotFoundError(f"{workdir} has no {RUN_INFO_FILENAME}: it is not a LoRA run's workdir")
  cfg = run_model_config(info)
  flat_abstract = traverse_util.flatten_dict(abstract)
  mesh = next(iter(flat_abstract.values())).sharding.mesh
  rules = sharding_lib.DEFAULT_RULES
  base = initial_base(cfg, mesh, rules, init_from=info["init_from"], seed=info["seed"])
  adapters = init_from_lib.restore_params(workdir, adapters_of(abstract_params(cfg, mesh, rules)),
                                          step)
  merged_abstract = jax.eval_shape(lambda b, a: merge(combine(b, a), cfg), base, adapters)
  flat_merged = traverse_util.flatten_dict(merged_abstract)
  unknown = sorted("/".join(p) for p in flat_merged if p not in flat_abstract)
  missing = sorted("/".join(p) for p in flat_abstract
                   if p not in flat_merged and p[0] not in init_from_lib.ZERO_FILLED)
  if unknown or missing:
    raise ValueError(f"the LoRA run in {workdir} merges into a model that differs from "
                     f"config.model: params {unknown[:3]} are not in config.model, "
                     f"{missing[:3]} are not in the run's model")

  def merged_like_abstract(b, a):
    flat = traverse_util.flatten_dict(merge(combine(b, a), cfg))
    return traverse_util.unflatten_dict({
        p: flat[p].astype(leaf.dtype) if p in flat else jnp.zeros(leaf.shape, leaf.dtype)
        for p, leaf in flat_abstract.items()})

  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  return jax.jit(merged_like_abstract, out_shardings=shardings)(base, adapters)
