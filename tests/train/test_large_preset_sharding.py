"""qwen3_32b: the sharded train state on an abstract 256-device (fsdp=64, tensor=4) mesh fits one
TPU v5p chip and every large tensor is really sharded (per-device bytes ≈ total / 256)."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from kat_jax import sharding
from kat_jax.model import ModelConfig, Transformer, get_preset
from kat_jax.train import optimizer, state as state_lib
from configs.base import train_config


def test_qwen3_32b_state_is_fully_sharded():
  cfg = ModelConfig.from_config(get_preset("qwen3_32b"))
  mesh = AbstractMesh((1, 64, 4), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  model = Transformer(cfg)
  train_cfg = train_config(steps=100, warmup_steps=10, learning_rate=1e-4)
  tx, _ = optimizer.make_optimizer(train_cfg)
  example = {"inputs": jax.ShapeDtypeStruct((256, 4096), jnp.int32)}
  abstract, shardings = state_lib.abstract_state(model, tx, example, mesh, sharding.DEFAULT_RULES)

  total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  per_device = sharding.per_device_bytes(abstract, shardings)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  print(f"qwen3_32b: {n_params / 1e9:.2f}B params, state {total / 2**30:.1f} GiB in total, "
        f"{per_device / 2**30:.2f} GiB per device on 256 devices")
  assert abs(n_params - cfg.num_params()) / cfg.num_params() < 0.01
  assert 32e9 < n_params < 34e9
  assert abs(per_device - total / 256) <= 0.10 * total / 256
  assert per_device < 95 * 2**30
