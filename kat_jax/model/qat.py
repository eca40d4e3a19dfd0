"""Quantization-aware training (QAT): int8 fake quantization of the Transformer's projections with
straight-through gradients, and the export of the int8 model it trains.

``config.model.qat.enabled=True`` (``QatConfig``) is a model-config switch, so every stage that
builds ``Transformer(cfg)`` — mid-training, SFT, RL, their samplers and scorers — trains and samples
the quantized model. In the forward pass each projection kernel ``W`` [*in, *out] (``q_proj`` …
``down_proj``; with ``qat.head`` also the output head) is replaced by ``Q(W)``::

    s = absmax over the input axes / 127.5        # one scale per output channel (symmetric)
    Q(W) = clip(round(W / s), -128, 127) · s      # qwix.quantize / qwix.dequantize, int8

and with ``qat.activations='int8'`` each projection's input ``x`` by ``Q(x)``, its scale computed
from ``x`` itself at every call (dynamic) per token (``act_granularity='per_token'``: absmax over
the feature axes; a row's result never depends on the other rows, the padding or the KV-cache
chunking) or over the whole tensor (``'per_tensor'``: one scale per call — per ``token_chunk``
slice in the MLP — shared by the batch). The
tied embedding's lookup reads ``Q(E)`` when ``qat.head`` quantizes it (one int8 matrix).

Gradients are straight-through (STE): the forward computes ``W + stop_gradient(Q(W) - W)``, whose
value is ``Q(W)`` and whose derivative is the identity, so ``∂L/∂W`` is the float model's gradient
at the quantized point ``Q(W)``. The sum is exact in float32 (Sterbenz: ``Q(W)`` and ``W`` are
within a factor 2 of each other or ``Q(W) = 0``), so the fake-quant forward computes with exactly
the dequantized codes.

**Export** (``export_params``, ``export_workdir``, ``python -m experiments.convert
--from_workdir=QAT_RUN --to_int8=OUT``): the same ``qwix.quantize`` codes stored — each quantized
kernel as int8 codes ``<kernel>`` plus ``<kernel>_scale`` (float32, size 1 on the input axes), the
layout of a QLoRA base (``kat_jax.model.lora.quantized_param``) — in a params-only checkpoint with
``model_config.json`` saying ``qat.quantized_params=True``. A model of that config declares the
codes and computes with ``codes · scale``, the same float32 numbers as the fake-quant forward:
``load_export(OUT)`` gives ``(model, params)`` for the ``Sampler``. Tested equality
(tests/model/test_qat.py): logits of the export equal those of the fake-quant model to float32
rounding (bound 1e-6 relative to the logits' scale; measured 0 with float32 compute), and greedy
samples are the same tokens; with bfloat16 compute only to bfloat16 rounding (docs/DISTILL.md,
section QAT). The int8 codes take a quarter of the float32 kernels' bytes at rest; the forward
dequantizes them to the compute dtype (XLA has no int8 matmul here), so no sampling speed-up is
claimed.
``float_weights`` gives plain float params holding ``Q(W)`` (the Hugging Face export of a QAT run:
exactly the QAT model when ``activations='none'``; HF models have no activation quantization).

Why qwix (google/qwix 0.1.8, pinned in setup.py's ``test`` extra) only for the numerics: its QAT
path (``qwix.quantize_model(model, qwix.QtProvider(rules))``) intercepts ``jnp.einsum`` /
``lax.dot_general`` at trace time and tells weights from activations by looking operands up among
the module's params. On this Transformer (tried, tiny preset) it quantized the attention's
activation × activation einsums (q·k and probs·v) like projections, and did not intercept the
MLP's ``x @ w`` (``jnp.matmul``) at all, so three of the seven projections stayed float; it also
wraps one module instance, while QAT here must reach every ``Transformer(cfg)`` a stage builds.
So the projections call ``qwix.quantize`` / ``qwix.dequantize`` (calibration, rounding, the codes)
explicitly, as LoRA's adapters are explicit (kat_jax.model.lora).

Usage::

    model = Transformer(cfg)                       # cfg.qat.enabled: float params, int8 forward
    codes = qat.export_params(params, cfg)         # {kernel: int8, kernel_scale: float32, ...}
    int8_model = Transformer(qat.export_config(cfg))
    int8_model.apply({"params": codes}, ...)       # == model.apply({"params": params}, ...)
    model, params = qat.load_export(out_dir)       # Sampler(model, params, max_len=...)
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from kat_jax.model import lora as lora_lib
from kat_jax.model.presets import ModelConfig, QatConfig

SCALE_SUFFIX = lora_lib.SCALE_SUFFIX
CODE_DTYPE = jnp.int8
EXPORT_FORMAT = "kat_jax.qat_int8.v1"


def enabled(cfg: ModelConfig) -> bool:
  return cfg.qat.enabled


def stores_codes(cfg: ModelConfig) -> bool:
  """Whether ``cfg``'s params hold int8 codes + scales (an export) rather than float weights."""
  return cfg.qat.enabled and cfg.qat.quantized_params


def head_quantized(cfg: ModelConfig) -> bool:
  return cfg.qat.enabled and cfg.qat.head


def export_config(cfg: ModelConfig) -> ModelConfig:
  """The config of ``cfg``'s exported int8 model: the same function, params as codes + scales."""
  if not cfg.qat.enabled:
    raise ValueError("export_config: config.model.qat.enabled=False, there is no quantized model "
                     "to export (train with --config.model.qat.enabled=True)")
  return dataclasses.replace(cfg, qat=dataclasses.replace(cfg.qat, quantized_params=True))


def plain_config(cfg: ModelConfig) -> ModelConfig:
  """``cfg`` without QAT: the float model that ``float_weights`` params belong to."""
  return dataclasses.replace(cfg, qat=QatConfig())


# ------------------------------------------------------------------------------ fake quantization

def _qwix():
  """The qwix module (imported on first use: only QAT models need it)."""
  try:
    import qwix
  except ImportError as e:
    raise ImportError("config.model.qat needs the qwix package: pip install qwix==0.1.8 (setup.py "
                      "extra 'test')") from e
  return qwix


def _quantize(x32: jax.Array, reduced_axes: tuple[int, ...]):
  """``qwix.QArray`` (int8 ``qvalue``, float32 ``scale``) of a float32 array: symmetric, one
  absmax scale per slice over ``reduced_axes``."""
  channels = tuple(a for a in range(x32.ndim) if a not in reduced_axes)
  return _qwix().quantize(x32, CODE_DTYPE, channelwise_axes=channels)


def _dequantize(q) -> jax.Array:
  return _qwix().dequantize(q)


def fake_quant(x: jax.Array, reduced_axes: tuple[int, ...]) -> jax.Array:
  """float32 ``Q(x)`` in the forward pass (qwix int8, one scale per slice over ``reduced_axes``),
  the identity in the backward pass (straight-through)."""
  x32 = x.astype(jnp.float32)
  dq = _dequantize(_quantize(jax.lax.stop_gradient(x32), reduced_axes))
  return x32 + jax.lax.stop_gradient(dq - x32)


# kernel name -> number of leading input axes (one scale per output channel spans them)
_INPUT_AXES = {name: n for _, name, n in lora_lib.KERNELS.values()}


def kernel(w: jax.Array, name: str) -> jax.Array:
  """Projection kernel ``name`` [*in, *out] fake-quantized per output channel (float32)."""
  return fake_quant(w, tuple(range(_INPUT_AXES[name])))


def activation(x: jax.Array, num_feature_axes: int, cfg: ModelConfig) -> jax.Array:
  """A projection's input [..., *features]: ``x`` itself unless ``qat.activations='int8'``, then
  fake-quantized with dynamic scales (per token: over the feature axes; per tensor: over all),
  returned in ``x``'s dtype."""
  if not cfg.qat.enabled or cfg.qat.activations == "none":
    return x
  if cfg.qat.act_granularity == "per_token":
    reduced = tuple(range(x.ndim - num_feature_axes, x.ndim))
  else:
    reduced = tuple(range(x.ndim))
  return fake_quant(x, reduced).astype(x.dtype)


def head_name(cfg: ModelConfig) -> str:
  """The output head's matrix: the tied ``embedding`` [V, d] or ``lm_head`` [d, V]."""
  return "embedding" if cfg.tie_embeddings else "lm_head"


def head_reduced_axis(cfg: ModelConfig) -> int:
  """The axis one head scale spans (d_model): 1 of the tied embedding [V, d], 0 of lm_head
  [d, V]."""
  return 1 if cfg.tie_embeddings else 0


def head_weight(w: jax.Array, name: str, cfg: ModelConfig, d_axis: int) -> jax.Array:
  """``w`` — matrix ``name`` (embedding / lm_head) as a float array, or entries taken from it, with
  d_model on ``d_axis`` — as the model computes with it: ``Q(w)`` per vocabulary entry when a float
  QAT model quantizes the head (``qat.head``) and ``name`` is the head's matrix, else ``w`` (an
  export's codes are already dequantized by the module)."""
  if not head_quantized(cfg) or cfg.qat.quantized_params or name != head_name(cfg):
    return w
  return fake_quant(w, (d_axis % w.ndim,))


def head_params(params: Any, cfg: ModelConfig) -> Any:
  """The params ``Transformer.output_head`` reads: an export's head codes dequantized (float32),
  unchanged otherwise."""
  if not (stores_codes(cfg) and cfg.qat.head):
    return params
  name = head_name(cfg)
  return {**params, name: lora_lib.dequantize(params[name], params[name + SCALE_SUFFIX])}


# ------------------------------------------------------------------------------ export

def _quantized_leaves(cfg: ModelConfig) -> dict[tuple, tuple[int, ...]]:
  """{params path: reduced axes} of every leaf the QAT model quantizes."""
  leaves = {}
  for i in range(cfg.num_layers):
    for module, name, n in lora_lib.KERNELS.values():
      leaves[(f"layer_{i}", module, name)] = tuple(range(n))
  if cfg.qat.head:
    name = "embedding" if cfg.tie_embeddings else "lm_head"
    leaves[(name,)] = (head_reduced_axis(cfg),)
  return leaves


def export_params(params: Any, cfg: ModelConfig) -> Any:
  """The int8 model's params (``export_config(cfg)``'s tree) from a QAT model's float params:
  every quantized leaf becomes its ``qwix.quantize`` codes (int8) and ``<leaf>_scale`` (float32);
  the rest (norms, the unquantized embedding / head, a value head) is kept as it is. Jit it with
  ``out_shardings`` for big models."""
  if not cfg.qat.enabled or cfg.qat.quantized_params:
    raise ValueError(f"export_params needs a QAT model's float params (config.model.qat.enabled="
                     f"True, quantized_params=False); got qat={cfg.qat}")
  quantized = _quantized_leaves(cfg)
  flat = traverse_util.flatten_dict(params)
  missing = sorted("/".join(p) for p in quantized if p not in flat)
  if missing:
    raise ValueError(f"export_params: params lack {missing[:3]}: they do not belong to {cfg}")
  out = {}
  for path, value in flat.items():
    if path in quantized:
      q = _quantize(value.astype(jnp.float32), quantized[path])
      out[path], out[path[:-1] + (path[-1] + SCALE_SUFFIX,)] = q.qvalue, q.scale
    else:
      out[path] = value
  return traverse_util.unflatten_dict(out)


def float_weights(params: Any, cfg: ModelConfig) -> tuple[Any, ModelConfig]:
  """(plain float params, ``plain_config(cfg)``): every quantized leaf replaced by the float32
  ``Q(W)`` the QAT forward computes with, from float params or from an export's codes (stored in
  ``cfg.param_dtype``). The same function as ``cfg``'s model when ``qat.activations='none'``."""
  if not cfg.qat.enabled:
    return params, cfg
  dtype = jnp.dtype(cfg.param_dtype)
  quantized = _quantized_leaves(cfg)
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, value in flat.items():
    scale_of = path[:-1] + (path[-1][:-len(SCALE_SUFFIX)],)
    if path[-1].endswith(SCALE_SUFFIX) and scale_of in quantized:
      continue
    if path in quantized:
      if cfg.qat.quantized_params:
        value = lora_lib.dequantize(value, flat[path[:-1] + (path[-1] + SCALE_SUFFIX,)])
      else:
        value = _dequantize(_quantize(value.astype(jnp.float32), quantized[path]))
      value = value.astype(dtype)
    out[path] = value
  return traverse_util.unflatten_dict(out), plain_config(cfg)


def exported_model_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.model`` of the export of a QAT run with ``model_config`` (quantized_params=True)."""
  out = ml_collections.ConfigDict(model_config.to_dict())
  out.qat.quantized_params = True
  return out


def export_workdir(workdir: str, out_dir: str, *, model_config: Optional[
    ml_collections.ConfigDict] = None, step: Optional[int] = None, mesh=None) -> str:
  """Writes the int8 export of QAT run ``workdir`` (checkpoint ``step``, default latest) into
  ``out_dir``: a params-only checkpoint of codes + scales, ``model_config.json`` (the run's model
  with ``qat.quantized_params=True``) and the run's tokenizer. ``model_config`` (the run's
  ``config.model``) is needed when ``workdir`` has no ``model_config.json``. Returns ``out_dir``'s
  checkpoint directory. Every process of a multi-host job must call it."""
  from kat_jax import sharding as sharding_lib
  from kat_jax import workdir as workdir_lib
  from kat_jax.model import hf
  model_config = model_config if model_config is not None else hf.read_model_config(workdir)
  if model_config is None:
    raise FileNotFoundError(f"{workdir} has no {workdir_lib.MODEL_CONFIG_FILENAME}: pass the "
                            "experiment config that trained it (--config=configs/...py)")
  cfg = ModelConfig.from_config(model_config)
  if not cfg.qat.enabled or cfg.qat.quantized_params:
    raise ValueError(f"{workdir}: config.model.qat={cfg.qat} is not a QAT run's model (needs "
                     "qat.enabled=True and quantized_params=False); train with "
                     "--config.model.qat.enabled=True, or pass --config of the QAT run")
  rules = sharding_lib.DEFAULT_RULES
  params = hf.restore_params(workdir, hf.abstract_params(cfg, mesh, rules), step)
  shardings = jax.tree.map(lambda a: a.sharding,
                           hf.abstract_params(export_config(cfg), mesh, rules))
  codes = jax.jit(lambda p: export_params(p, cfg), out_shardings=shardings)(params)
  ckpt_dir = hf.save_params_checkpoint(out_dir, codes, exported_model_config(model_config),
                                       source=os.path.abspath(workdir))
  if jax.process_index() == 0:
    if os.path.exists(workdir_lib.hf_config_path(workdir)):
      shutil.copy(workdir_lib.hf_config_path(workdir), workdir_lib.hf_config_path(out_dir))
    tokenizer = workdir_lib.tokenizer_dir(workdir)
    if os.path.isdir(tokenizer):
      shutil.copytree(tokenizer, workdir_lib.tokenizer_dir(out_dir), dirs_exist_ok=True)
  return ckpt_dir


def load_export(out_dir: str, *, mesh=None, rules=None):
  """(``Transformer`` of the export's config, its params: int8 codes + scales) of an
  ``export_workdir`` directory, placed on ``mesh`` (default: one device); the model's forward
  computes with the dequantized codes. Sample with ``Sampler(model, params, max_len=...)``."""
  from kat_jax import sharding as sharding_lib
  from kat_jax import workdir as workdir_lib
  from kat_jax.model import hf
  from kat_jax.model.transformer import Transformer
  model_config = hf.read_model_config(out_dir)
  if model_config is None:
    raise FileNotFoundError(f"{out_dir} has no {workdir_lib.MODEL_CONFIG_FILENAME}: it is not a "
                            "QAT export (python -m experiments.convert --to_int8=...)")
  cfg = ModelConfig.from_config(model_config)
  if not stores_codes(cfg):
    raise ValueError(f"{out_dir}: its model_config.json has qat={cfg.qat}, not an int8 export "
                     "(qat.enabled=True, quantized_params=True)")
  rules = sharding_lib.DEFAULT_RULES if rules is None else rules
  params = hf.restore_params(out_dir, hf.abstract_params(cfg, mesh, rules))
  return Transformer(cfg, mesh=mesh, rules=tuple(rules)), params
