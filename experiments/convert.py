"""Hugging Face checkpoint ↔ kat_jax workdir.

  python -m experiments.convert --from_hf=/ckpt/Qwen3-8B --to=/runs/qwen3_8b_base
  python -m experiments.convert --from_workdir=/runs/sft --to_hf=/out/qwen3_8b_sft [--hf_dtype=bfloat16]
  python -m experiments.convert --from_workdir=/runs/sft_qat --to_int8=/out/sft_int8

Import writes a params-only checkpoint in the trainer's Orbax layout (``WORKDIR/checkpoints/0``,
items ``state`` = {"params"} and ``data``), ``model_config.json`` (use it as ``config.model``),
``hf_config.json`` (the source config.json) and, when the source has one, the HF tokenizer in
``WORKDIR/tokenizer``. Train from it with ``--config.init_from=WORKDIR`` in a fresh workdir (or point
``init_from`` at the HF folder directly and skip this step).

Export reads ``state.params`` of any kat_jax checkpoint (a converted one or a trainer's full
TrainState; ``--step`` picks one, default latest) with the model config from
``WORKDIR/model_config.json`` or ``--config`` (an experiment file; its ``config.model``), and writes
``config.json`` + safetensors (+ the tokenizer) that ``transformers`` loads. A LoRA run's workdir
(``lora_run.json``, checkpoints holding adapters only) exports its merged weights: the base rebuilt
from the run's ``init_from`` (else its seed), dequantized for QLoRA, plus ``(alpha/r)·A·B``.

A QAT run (``config.model.qat.enabled``, kat_jax.model.qat) exports to Hugging Face the weights its
forward computes with, the dequantized int8 ``Q(W)`` (the QAT model itself when
``qat.activations='none'``; HF has no activation quantization). ``--to_int8=OUT`` writes its int8
model instead: codes + scales in a params-only checkpoint, ``model_config.json`` with
``qat.quantized_params=True`` and the tokenizer; ``kat_jax.model.qat.load_export(OUT)`` gives the
model and params for the ``Sampler``.

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

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  flags.DEFINE_string("from_hf", None, "Hugging Face checkpoint directory to import.")
  flags.DEFINE_string("to", None, "kat_jax workdir to write the imported checkpoint into.")
  flags.DEFINE_string("from_workdir", None, "kat_jax workdir to export.")
  flags.DEFINE_string("to_hf", None, "Directory to write the Hugging Face checkpoint into.")
  flags.DEFINE_string("to_int8", None, "Directory to write a QAT run's int8 model into (codes + "
                      "scales, kat_jax.model.qat.export_workdir).")
  flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                    "Import: dtype of the kat_jax params.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "Import: compute dtype recorded in model_config.json.")
  flags.DEFINE_string("hf_dtype", "", "Export: float32 | bfloat16 | float16; default: the "
                      "source checkpoint's dtype from hf_config.json, else float32.")
  flags.DEFINE_integer("step", None, "Export: checkpoint step (default: latest).")
  flags.DEFINE_string("model_type", None, "Export: qwen3 | qwen2 | llama (default: "
                      "inferred from qk_norm / qkv_bias).")
  flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,tensor sizes (-1: all remaining devices).")
  flags.DEFINE_float("max_shard_gb", 2.0, "Export: safetensors shard size in GB.")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
  config_flags.DEFINE_config_file("config", None, "Export: experiment config whose "
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


def _lora_base_source(lora_run: Optional[dict]) -> Optional[str]:
  """The directory a LoRA run's base came from (its init_from without @STEP), if any."""
  if not lora_run or not lora_run["init_from"]:
    return None
  head, sep, tail = lora_run["init_from"].rpartition("@")
  return head if sep and tail.isdigit() else lora_run["init_from"]


def _base_hf_config(workdir: str, lora_run: Optional[dict]) -> Optional[dict]:
  """The source ``config.json`` to keep token ids and context length from: the workdir's
  ``hf_config.json``, else (a LoRA run) that of its base's source."""
  import json
  from kat_jax.model import hf
  source = _lora_base_source(lora_run)
  for path in [workdir_lib.hf_config_path(workdir)] + (
      [workdir_lib.hf_config_path(source)] if source else []):
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
  if source and hf.is_hf_checkpoint(source):
    return hf.read_hf_config(source)
  return None


def workdir_to_hf(workdir: str, out_dir: str, *, model_config=None, step: Optional[int] = None,
                  torch_dtype: str = "", model_type: Optional[str] = None, mesh=None,
                  max_shard_bytes: int = 2 << 30) -> list[str]:
  """Exports ``state.params`` of ``workdir``'s checkpoint to ``out_dir`` (a LoRA run's merged
  weights); returns shard names."""
  import jax
  import ml_collections
  from kat_jax import sharding
  from kat_jax.model import ModelConfig, hf, lora, qat
  lora_run = lora.read_run_info(workdir)
  if model_config is None and lora_run is not None:
    model_config = ml_collections.ConfigDict(lora_run["model"])
  model_config = model_config or hf.read_model_config(workdir)
  if model_config is None:
    raise FileNotFoundError(f"{workdir} has no {workdir_lib.MODEL_CONFIG_FILENAME}: pass the "
                            "experiment config that trained it (--config=configs/...py)")
  model_cfg = ModelConfig.from_config(model_config)
  base = _base_hf_config(workdir, lora_run)
  torch_dtype = torch_dtype or (base or {}).get("torch_dtype") or (base or {}).get("dtype") \
      or "float32"
  if lora_run is not None or lora.enabled(model_cfg):
    model_cfg = lora.plain_config(model_cfg)        # the merged model has no adapters
    abstract = hf.abstract_params(model_cfg, mesh, sharding.DEFAULT_RULES)
    params = lora.load_merged(workdir, abstract, step)
  else:
    abstract = hf.abstract_params(model_cfg, mesh, sharding.DEFAULT_RULES)
    params = hf.restore_params(workdir, abstract, step)
  if qat.enabled(model_cfg):
    if model_cfg.qat.activations != "none":
      logging.warning("%s quantizes activations (config.model.qat.activations=%r); the Hugging "
                      "Face export has its int8 weights only", workdir, model_cfg.qat.activations)
    params, model_cfg = qat.float_weights(params, model_cfg)   # the forward's Q(W), as floats
  names = hf.export_hf(params, model_cfg, out_dir, torch_dtype=torch_dtype, model_type=model_type,
                       base_hf_config=base, max_shard_bytes=max_shard_bytes)
  tokenizer_dir = workdir_lib.tokenizer_dir(workdir)
  source = _lora_base_source(lora_run)
  if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")) and source:
    # A LoRA run that saved no tokenizer uses its base's (an HF folder or a converted workdir).
    for candidate in (workdir_lib.tokenizer_dir(source), source):
      if os.path.exists(os.path.join(candidate, "tokenizer.json")):
        tokenizer_dir = candidate
        break
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


def workdir_to_int8(workdir: str, out_dir: str, *, model_config=None, step: Optional[int] = None,
                    mesh=None) -> str:
  """Writes the int8 model of QAT run ``workdir`` into ``out_dir``
  (``kat_jax.model.qat.export_workdir``); returns its checkpoint directory."""
  from kat_jax.model import qat
  return qat.export_workdir(workdir, out_dir, model_config=model_config, step=step, mesh=mesh)


def main(argv):
  del argv
  errors.quiet_library_noise(bool(flags.FLAGS["verbosity"].present))
  import jax
  if FLAGS.multihost:
    jax.distributed.initialize()
  importing = FLAGS.from_hf is not None or FLAGS.to is not None
  exporting = (FLAGS.from_workdir is not None or FLAGS.to_hf is not None
               or FLAGS.to_int8 is not None)
  if importing == exporting or (importing and not (FLAGS.from_hf and FLAGS.to)) or (
      exporting and not (FLAGS.from_workdir and bool(FLAGS.to_hf) != bool(FLAGS.to_int8))):
    raise app.UsageError("give either --from_hf=DIR --to=WORKDIR or --from_workdir=DIR with one "
                         "of --to_hf=OUT, --to_int8=OUT")
  mesh = _mesh(FLAGS.mesh)
  if importing:
    model_config = hf_to_workdir(FLAGS.from_hf, FLAGS.to, mesh=mesh,
                                 param_dtype=FLAGS.param_dtype, dtype=FLAGS.dtype)
    logging.info("imported %s into %s: %s", FLAGS.from_hf, FLAGS.to, model_config.to_dict())
    print(f"wrote {FLAGS.to} (model {model_config.name}: {model_config.num_layers} layers, "
          f"d_model={model_config.d_model}); train from it with --config.init_from={FLAGS.to}")
  elif FLAGS.to_int8:
    model_config = FLAGS.config.model if FLAGS.config is not None else None
    workdir_to_int8(FLAGS.from_workdir, FLAGS.to_int8, model_config=model_config,
                    step=FLAGS.step, mesh=mesh)
    print(f"wrote {FLAGS.to_int8}: int8 codes + scales; sample with "
          "kat_jax.model.qat.load_export")
  else:
    model_config = FLAGS.config.model if FLAGS.config is not None else None
    names = workdir_to_hf(FLAGS.from_workdir, FLAGS.to_hf, model_config=model_config,
                          step=FLAGS.step, torch_dtype=FLAGS.hf_dtype,
                          model_type=FLAGS.model_type, mesh=mesh,
                          max_shard_bytes=int(FLAGS.max_shard_gb * (1 << 30)))
    print(f"wrote {FLAGS.to_hf}: config.json + {len(names)} safetensors file(s)")


if __name__ == "__main__":
  define_flags()
  app.run(errors.run_main(main), flags_parser=config_lib.parse_flags)
