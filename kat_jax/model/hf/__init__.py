"""Hugging Face checkpoint interop for Qwen3, Qwen2/Qwen2.5 and Llama 3 (exact: logits match
``transformers`` in float32), plus starting a stage from an imported or previous checkpoint.

Usage::

  from kat_jax.model import hf
  model_config, params = hf.import_hf("/ckpt/Qwen3-8B", mesh=mesh, rules=rules)
  hf.export_hf(params, ModelConfig.from_config(model_config), "/out", torch_dtype="bfloat16")
  params = hf.init_params_from(config.init_from, abstract_state.params, model_cfg)

Import needs no extra package (the safetensors reader is ours); export writes with ``safetensors``
(extra ``hf``); ``transformers``/``torch`` are only for the parity tests. Command line:
``python -m experiments.convert``.
"""
from kat_jax.model.hf.config import (FAMILIES, UnsupportedCheckpointError, hf_config_from_model,
                                     model_config_from_hf, read_hf_config)
from kat_jax.model.hf.init_from import (PARAMS_ONLY_FORMAT, init_params_from, is_hf_checkpoint,
                                        read_model_config, restore_params, save_params_checkpoint)
from kat_jax.model.hf.tensors import TensorSpec, tensor_specs
from kat_jax.model.hf.weights import (abstract_params, export_hf, import_hf, load_hf_params,
                                      single_device_mesh)
