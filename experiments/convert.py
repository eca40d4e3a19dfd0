"""Hugging Face checkpoint ↔ kat_jax workdir.

  python -m experiments.convert --from_hf=/ckpt/Qwen3-8B --to=/runs/qwen3_8b_base
  python -m experiments.convert --from_workdir=/runs/sft --to_hf=/out/qwen3_8b_sft [--hf_dtype=bfloat16]

Import writes a params-only checkpoint in the trainer's Orbax layout (``WORKDIR/checkpoints/0``,
items ``state`` = {"params"} and ``data``), ``model_config.json`` (use it as ``config.model``),
``hf_config.json`` (the source config.json) and, when the source has one, the HF tokenizer in
``WORKDIR/tokenizer``. Train from it with ``--config.init_from=WORKDIR`` in a fresh workdir (or point
``init_from`` at the HF folder directly and skip this step).

Export reads ``state.params`` of any kat_jax checkpoint (a converted one or a trainer's full
TrainState; ``--step`` picks one, default latest) with the model config from
``WORKDIR/model_config.json`` or ``--config`` (an experiment file; its ``config.model``), and writes
``config.json`` + safetensors (+ the tokenizer) that ``transformers`` loads.

Params are placed on a mesh of all devices (``--mesh=data,fsdp,tensor``, default ``1,-1,1``), so a
32B model converts on an accelerator host without one device holding it; on a multi-host pod pass
``--multihost`` and run the same command on every host. A failed conversion ends with one last
line ``error: <root cause>`` naming the file or flag (``errors.run_main``).
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

from absl import app, flags, logging
from ml_collections import config_flags

from kat_jax import config as config_lib
from kat_jax import errors
from kat_jax import workdir as workdir_lib

_FROM_HF = flags.DEFINE_string("from_hf", None, "Hugging Face checkpoint directory to import.")
_TO = flags.DEFINE_string("to", None, "kat_jax workdir to write the imported checkpoint into.")
_FROM_WORKDIR = flags.DEFINE_string("from_workdir", None, "kat_jax workdir to export.")
_TO_HF = flags.DEFINE_string("to_hf", None, "Directory to write the Hugging Face checkpoint into.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "Import: dtype of the kat_jax params.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Import: compute dtype recorded in model_config.json.")
_HF_DTYPE = flags.DEFINE_string("hf_dtype", "", "Export: float32 | bfloat16 | float16; default: the "
                                "source checkpoint's dtype from hf_config.json, else float32.")
_STEP = flags.DEFINE_integer("step", None, "Export: checkpoint step (default: latest).")
_MODEL_TYPE = flags.DEFINE_string("model_type", None, "Export: qwen3 | qwen2 | llama (default: "
                                  "inferred from qk_norm / qkv_bias).")
_MESH = flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,tensor sizes (-1: all remaining devices).")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 2.0, "Export: safetensors shard size in GB.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Export: experiment config whose "
                                          "config.model describes the params (when the workdir has "
                                          "no model_config.json).")

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _mesh(spec: str):
  import ml_collections
  from kat_jax import sharding
  sizes = [int(s) for s in spec.split(",")]
  if len(sizes) != 3:
    raise ValueError(f"--mesh={spec!r}: give three sizes data,fsdp,tensor such as 1,-1,1")
  return sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, sizes))))


def hf_to_workdir(hf_dir: str, workdir: str, *, mesh=None, param_dtype: str = "float32",
                  dtype: str = "float32"):
  """Imports ``hf_dir`` into ``workdir``; returns the model ConfigDict."""
  import jax
  from kat_jax import sharding
  from kat_jax.model import hf
  model_config, params = hf.import_hf(hf_dir, mesh=mesh, rules=sharding.DEFAULT_RULES,
                                      param_dtype=param_dtype, dtype=dtype)
  os.makedirs(workdir, exist_ok=True)
  hf.save_params_checkpoint(workdir, params, model_config, hf_config=hf.read_hf_config(hf_dir),
                            source=os.path.abspath(hf_dir))
  if jax.process_index() == 0 and os.path.exists(os.path.join(hf_dir, "tokenizer.json")):
    from kat_jax.data.hf_tokenizer import HFTokenizer
    HFTokenizer.load(hf_dir).save(workdir_lib.tokenizer_dir(workdir))
  return model_config


def workdir_to_hf(workdir: str, out_dir: str, *, model_config=None, step: Optional[int] = None,
                  torch_dtype: str = "", model_type: Optional[str] = None, mesh=None,
                  max_shard_bytes: int = 2 << 30) -> list[str]:
  """Exports ``state.params`` of ``workdir``'s checkpoint to ``out_dir``; returns shard names."""
  import json
  import jax
  from kat_jax import sharding
  from kat_jax.model import ModelConfig, hf
  model_config = model_config or hf.read_model_config(workdir)
  if model_config is None:
    raise FileNotFoundError(f"{workdir} has no {workdir_lib.MODEL_CONFIG_FILENAME}: pass the "
                            "experiment config that trained it (--config=configs/...py)")
  model_cfg = ModelConfig.from_config(model_config)
  base = None
  base_path = workdir_lib.hf_config_path(workdir)
  if os.path.exists(base_path):
    with open(base_path) as f:
      base = json.load(f)
  torch_dtype = torch_dtype or (base or {}).get("torch_dtype") or (base or {}).get("dtype") \
      or "float32"
  abstract = hf.abstract_params(model_cfg, mesh, sharding.DEFAULT_RULES)
  params = hf.restore_params(workdir, abstract, step)
  names = hf.export_hf(params, model_cfg, out_dir, torch_dtype=torch_dtype, model_type=model_type,
                       base_hf_config=base, max_shard_bytes=max_shard_bytes)
  tokenizer_dir = workdir_lib.tokenizer_dir(workdir)
  if jax.process_index() == 0 and os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
    from kat_jax.data.hf_tokenizer import is_hf_tokenizer_dir
    if is_hf_tokenizer_dir(tokenizer_dir):
      for fname in _HF_TOKENIZER_FILES:
        if os.path.exists(os.path.join(tokenizer_dir, fname)):
          shutil.copy(os.path.join(tokenizer_dir, fname), os.path.join(out_dir, fname))
    else:
      logging.warning("%s holds a SentencePiece tokenizer; transformers cannot load it, so it was "
                      "not exported", tokenizer_dir)
  return names


def main(argv):
  del argv
  errors.quiet_library_noise(bool(flags.FLAGS["verbosity"].present))
  import jax
  if _MULTIHOST.value:
    jax.distributed.initialize()
  importing = _FROM_HF.value is not None or _TO.value is not None
  exporting = _FROM_WORKDIR.value is not None or _TO_HF.value is not None
  if importing == exporting or (importing and not (_FROM_HF.value and _TO.value)) or (
      exporting and not (_FROM_WORKDIR.value and _TO_HF.value)):
    raise app.UsageError("give either --from_hf=DIR --to=WORKDIR or --from_workdir=DIR --to_hf=OUT")
  mesh = _mesh(_MESH.value)
  if importing:
    model_config = hf_to_workdir(_FROM_HF.value, _TO.value, mesh=mesh,
                                 param_dtype=_PARAM_DTYPE.value, dtype=_DTYPE.value)
    logging.info("imported %s into %s: %s", _FROM_HF.value, _TO.value, model_config.to_dict())
    print(f"wrote {_TO.value} (model {model_config.name}: {model_config.num_layers} layers, "
          f"d_model={model_config.d_model}); train from it with --config.init_from={_TO.value}")
  else:
    model_config = _CONFIG.value.model if _CONFIG.value is not None else None
    names = workdir_to_hf(_FROM_WORKDIR.value, _TO_HF.value, model_config=model_config,
                          step=_STEP.value, torch_dtype=_HF_DTYPE.value,
                          model_type=_MODEL_TYPE.value, mesh=mesh,
                          max_shard_bytes=int(_MAX_SHARD_GB.value * (1 << 30)))
    print(f"wrote {_TO_HF.value}: config.json + {len(names)} safetensors file(s)")


if __name__ == "__main__":
  app.run(errors.run_main(main), flags_parser=config_lib.parse_flags)
