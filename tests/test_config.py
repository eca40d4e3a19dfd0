"""Every config validation error names the offending field and says how to fix it."""
import ml_collections
import pytest

from configs.base import get_base_config
from kat_jax import config as config_lib
from kat_jax import sharding
from kat_jax.model import ModelConfig, get_preset
from kat_jax.train import stages


def _cfg():
  return get_base_config("tiny")


@pytest.mark.parametrize("mutate,num_devices,needle", [
    (lambda c: setattr(c.model, "num_kv_heads", 3), 8, "config.model.num_heads=8 is not divisible by "
                                                        "config.model.num_kv_heads=3"),
    (lambda c: c.mesh.update(dict(data=1, fsdp=2, tensor=4)), 6, "mesh has 6 devices but config asks 1×2×4=8"),
    (lambda c: c.mesh.update(dict(data=-1, fsdp=-1, tensor=1)), 8, "config.mesh has -1 for"),
    (lambda c: c.mesh.update(dict(data=1, fsdp=-1, tensor=3)), 8, "cannot be split"),
    (lambda c: c.mesh.update(dict(data=2, fsdp=4, tensor=1)) or setattr(c.train, "batch_size", 12), 8,
     "config.train.batch_size=12 is not divisible by data×fsdp=2×4=8"),
    (lambda c: setattr(c.train, "grad_accum_steps", 3), 8, "config.train.grad_accum_steps=3"),
    (lambda c: setattr(c.model, "dtype", "float16"), 8, "config.model.dtype='float16'"),
    (lambda c: setattr(c.model, "d_model", 0), 8, "config.model.d_model=0 must be positive"),
    (lambda c: setattr(c.train, "warmup_steps", 10**6), 8, "config.train.warmup_steps=1000000"),
    (lambda c: setattr(c.train, "logits_chunk", -4), 8, "config.train.logits_chunk=-4 must be"),
    (lambda c: setattr(c.model, "token_chunk", -1), 8, "config.model.token_chunk=-1 must be"),
])
def test_validation_names_the_field(mutate, num_devices, needle):
  c = _cfg()
  mutate(c)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, num_devices)
  assert needle in str(e.value)


def test_unknown_preset():
  with pytest.raises(config_lib.ConfigError, match="unknown model preset 'qwen9'.*tiny"):
    get_preset("qwen9")


def test_unknown_model_field():
  c = _cfg().model
  with c.unlocked():
    c.hidden_sizes = 3
  with pytest.raises(config_lib.ConfigError, match=r"config.model has unknown field\(s\) \['hidden_sizes'\]"):
    ModelConfig.from_config(c)


def test_unknown_stage_and_rule_axis():
  with pytest.raises(config_lib.ConfigError, match="config.stage='pretrain' is not a known stage"):
    stages.get_stage("pretrain")
  c = _cfg()
  c.sharding_rules = [["embed", "model"]]
  with pytest.raises(config_lib.ConfigError, match="logical axis 'embed' maps to unknown mesh axis 'model'"):
    sharding.rules_from_config(c)


def test_valid_config_passes():
  config_lib.validate(_cfg(), 8)
  assert sharding.mesh_shape(ml_collections.ConfigDict(dict(data=2, fsdp=-1, tensor=2)), 8) == {
      "data": 2, "fsdp": 2, "tensor": 2}
