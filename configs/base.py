"""Defaults shared by every experiment: mesh, sharding rules, train loop, checkpoints, data.

Experiment files call ``get_base_config(preset)`` and override what differs.
"""
import ml_collections

from kat_jax import sharding
from kat_jax.model import get_preset


def _data_defaults() -> ml_collections.ConfigDict:
  try:
    from kat_jax.data.config import default_data_config
  except ImportError:  # the data pipeline is optional for synthetic runs
    return ml_collections.ConfigDict()
  return default_data_config()


def get_base_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "midtrain"
  c.seed = 0
  c.init_from = ""   # HF checkpoint dir or kat_jax workdir[@step] to start from (see experiments.convert)
  c.model = get_preset(preset)
  c.mesh = sharding.default_mesh_config()
  c.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]
  c.train = ml_collections.ConfigDict(dict(
      loss="",                 # empty: the stage's default loss
      steps=1000,
      batch_size=8,            # global, in sequences
      seq_len=256,
      grad_accum_steps=1,
      learning_rate=3e-3,
      warmup_steps=50,
      min_lr_ratio=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      grad_clip=1.0,
      z_loss=1e-4,
      logits_chunk=0,          # >0: output head on that many rows at a time (no [T, V])
      log_every=10,
      eval_every=100,
      eval_steps=4,
      checkpoint_every=100,
      keep_checkpoints=3,
      async_checkpoint=True,
      check_finite_every=1,
      peak_flops_per_device=0.0,   # 0: datasheet value by device kind, or a measured matmul on CPU
      progress_bar=True,
  ))
  c.data = _data_defaults()
  return c
