"""Starting points for training: params from a Hugging Face checkpoint or from any kat_jax workdir.

``init_params_from(path, abstract_params, model_cfg)`` returns params shaped, typed and sharded like
``abstract_params`` (the ``params`` of ``train.state.abstract_state``) from either

* a Hugging Face checkpoint directory (``config.json`` + safetensors): streamed import, or
* a kat_jax workdir (``WORKDIR/checkpoints/<step>/``): only ``state.params`` is restored, whether the
  checkpoint is a full trainer ``TrainState`` (the previous stage of a chain) or the params-only
  checkpoint that ``experiments.convert`` writes. Append ``@STEP`` to pick a step (default: latest).
  A LoRA run's workdir (``lora_run.json``) gives its base with its adapters merged in
  (``kat_jax.model.lora.load_merged``).

Params-only checkpoints use the trainer's layout (``Checkpointer``: items ``state`` and ``data``) with
``state = {"params": params}`` and ``data = {"format": PARAMS_ONLY_FORMAT, ...}`` at step 0, beside
``model_config.json`` (the ``config.model`` dict) and, for imports, ``hf_config.json`` (the source
``config.json``, kept so an export restores token ids and context length). They carry no optimizer
state: train from them with ``config.init_from=WORKDIR`` in a fresh workdir.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import jax.numpy as jnp
import orbax.checkpoint as ocp

from kat_jax import checkpoint as checkpoint_lib
from kat_jax import workdir as workdir_lib
from kat_jax.model import lora as lora_lib
from kat_jax.model.hf import config as config_lib
from kat_jax.model.hf import weights
from kat_jax.model.presets import ModelConfig

PARAMS_ONLY_FORMAT = "kat_jax.params_only.v1"
# Fields that must agree between config.model and the checkpoint's model for the params to mean
# the same function (the dtypes, remat and attention implementation may differ).
_FUNCTIONAL_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                      "mlp_dim", "rope_theta", "norm_eps", "qk_norm", "qkv_bias", "tie_embeddings")


def is_hf_checkpoint(path: str) -> bool:
  return os.path.exists(os.path.join(path, config_lib.CONFIG_FILENAME)) and any(
      f.endswith(".safetensors") for f in os.listdir(path))


def _split_step(path: str) -> tuple[str, Optional[int]]:
  head, sep, tail = path.rpartition("@")
  if sep and tail.isdigit():
    return head, int(tail)
  return path, None


def _checkpoints_dir(workdir: str) -> str:
  sub = workdir_lib.checkpoints_dir(workdir)
  return sub if os.path.isdir(sub) else workdir


def save_params_checkpoint(workdir: str, params: Any, model_config: ml_collections.ConfigDict, *,
                           hf_config: Optional[dict] = None, source: str = "") -> str:
  """Writes a params-only checkpoint (step 0) plus ``model_config.json`` into ``workdir``; returns
  the checkpoint directory. Every process of a multi-host job must call it."""
  ckpt_dir = workdir_lib.checkpoints_dir(workdir)
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, save_every=1, keep=1, async_save=False)
  if ckpt.latest_step() is not None:
    ckpt.close()
    raise FileExistsError(f"{ckpt_dir} already holds checkpoint step {ckpt.latest_step()}; convert "
                          "into an empty workdir")
  try:
    ckpt.save(0, {"params": params}, {"format": PARAMS_ONLY_FORMAT, "source": source}, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  if jax.process_index() == 0:
    with open(workdir_lib.model_config_path(workdir), "w") as f:
      json.dump(model_config.to_dict(), f, indent=1)
    if hf_config is not None:
      with open(workdir_lib.hf_config_path(workdir), "w") as f:
        json.dump(hf_config, f, indent=1)
  return ckpt_dir


def read_model_config(workdir: str) -> Optional[ml_collections.ConfigDict]:
  path = workdir_lib.model_config_path(workdir)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _latest_step(manager: ocp.CheckpointManager, step: Optional[int], where: str) -> int:
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} in {where} "
                            f"(steps there: {list(manager.all_steps())})")
  return step


def restore_params(workdir: str, abstract: Optional[Any] = None, step: Optional[int] = None) -> Any:
  """``state.params`` of the checkpoint at ``step`` (default latest) in ``workdir`` (or in its
  ``checkpoints/``), restored into ``abstract``'s shapes, dtypes and shardings — optimizer state is
  not read. Without ``abstract``: the saved tree as-is, on one device."""
  ckpt_dir = _checkpoints_dir(os.path.abspath(workdir))
  manager = ocp.CheckpointManager(ckpt_dir)
  try:
    step = _latest_step(manager, step, ckpt_dir)
    if abstract is None:
      meta = ocp.PyTreeCheckpointer().metadata(os.path.join(ckpt_dir, str(step), "state"))
      tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", meta)
      tree = tree.tree if hasattr(tree, "tree") else tree
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              dict(tree)["params"])
    target = {"params": abstract}
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        target)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))
  finally:
    manager.close()
  return _fill_missing(restored.state["params"], target["params"], f"{ckpt_dir}/{step}")


# Parameters a kat_jax model may have that its source checkpoint lacks (a critic added for PPO to
# an SFT checkpoint trained without one); filled with their initializer's value, zeros.
ZERO_FILLED = ("value_head",)


def _fill_missing(restored: Any, abstract: Any, where: str) -> Any:
  """Partial restore leaves a ``ShapeDtypeStruct`` where the checkpoint has no array: zeros for
  ``ZERO_FILLED`` params (sharded like the target), an error naming the param otherwise."""
  def fill(path, leaf, target):
    if not isinstance(leaf, jax.ShapeDtypeStruct):
      return leaf
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if not name.split("/")[0] in ZERO_FILLED:
      raise ValueError(f"parameter {name} of config.model is not in the checkpoint {where}: "
                       "config.model differs from the checkpoint's model")
    return jax.jit(lambda: jnp.zeros(target.shape, target.dtype), out_shardings=target.sharding)()
  return jax.tree_util.tree_map_with_path(fill, restored, abstract)


def check_same_model(model_cfg: ModelConfig, source_model_config: ml_collections.ConfigDict,
                     source: str) -> None:
  """Raises naming every field where ``config.model`` and the source's model disagree."""
  diffs = [f"config.model.{k}={getattr(model_cfg, k)!r} but {source} has {source_model_config[k]!r}"
           for k in _FUNCTIONAL_FIELDS
           if k in source_model_config and getattr(model_cfg, k) != source_model_config[k]]
  if diffs:
    raise ValueError("init_from: the model differs from the checkpoint's: " + "; ".join(diffs) +
                     " — set those config.model fields (--config.model.<field>=...) to the "
                     "checkpoint's values")


def init_params_from(path: str, abstract: Any, model_cfg: Optional[ModelConfig] = None) -> Any:
  """Params for ``abstract`` (shapes, dtypes, shardings) from an HF checkpoint directory or a kat_jax
  workdir (``DIR`` or ``DIR@STEP``). With ``model_cfg`` (the stage's ``config.model``), the source's
  model is checked field by field first, so a mismatch names the config field to change."""
  path, step = _split_step(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"init_from={path!r} is not a directory: give a Hugging Face checkpoint "
                            "directory or a kat_jax workdir")
  if is_hf_checkpoint(path):
    if step is not None:
      raise ValueError(f"init_from={path}@{step}: a Hugging Face checkpoint has no steps")
    hf_model = config_lib.model_config_from_hf(config_lib.read_hf_config(path))
    if model_cfg is not None:
      check_same_model(model_cfg, hf_model, f"{path}/config.json")
    return weights.load_hf_params(path, abstract, hf_model_cfg=ModelConfig.from_config(hf_model))
  if lora_lib.is_lora_workdir(path):
    if model_cfg is not None:
      check_same_model(model_cfg, ml_collections.ConfigDict(
          lora_lib.read_run_info(path)["model"]), f"{path}/{lora_lib.RUN_INFO_FILENAME}")
    return lora_lib.load_merged(path, abstract, step)
  saved = read_model_config(path)
  if model_cfg is not None and saved is not None:
    check_same_model(model_cfg, saved, f"{path}/{workdir_lib.MODEL_CONFIG_FILENAME}")
  if not os.path.isdir(_checkpoints_dir(path)):
    raise FileNotFoundError(f"init_from={path!r} has neither config.json + *.safetensors nor "
                            f"{workdir_lib.CHECKPOINTS}/")
  return restore_params(path, abstract, step)
