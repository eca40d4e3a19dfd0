"""The config contract: every key library code reads is declared in configs/base.py; each declared
scalar can be set from the command line through experiments.main's flag parsing (an unknown key is
refused naming it); the knobs that once were code-only defaults reach the code that uses them;
contradictions are ConfigErrors naming the fields; library code never invents a config default."""
import ast
import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs.base import get_base_config
from kat_jax import config as config_lib
from kat_jax.model import ModelConfig
from kat_jax.train import losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = ("configs/midtrain_tiny.py", "configs/sft_tiny_tree.py", "configs/synthetic_tiny.py",
               "configs/sft_tiny.py", "configs/rl_tiny.py", "configs/rft_tiny.py")


def _parse(config_file: str, *overrides: str) -> ml_collections.ConfigDict:
  """What experiments.main does with its argv: the config file, locked, plus --config.x=y."""
  argv = ["main", f"--config={os.path.join(REPO, config_file)}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def _scalar_leaves(cfg, prefix=""):
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from _scalar_leaves(value, path + ".")
    elif isinstance(value, (bool, int, float, str)):
      yield path, value


def _other_value(value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 3
  if isinstance(value, float):
    return value + 0.25
  return value + "_x"


def _get(cfg, path):
  for part in path.split("."):
    cfg = cfg[part]
  return cfg


@pytest.mark.parametrize("config_file", EXPERIMENTS)
def test_every_declared_scalar_is_settable_from_the_command_line(config_file):
  base = _parse(config_file)
  leaves = list(_scalar_leaves(base))
  assert len(leaves) > 80
  overrides = {path: _other_value(value) for path, value in leaves}
  parsed = _parse(config_file, *(f"--config.{p}={v}" for p, v in overrides.items()))
  for path, value in overrides.items():
    got = _get(parsed, path)
    assert got == value and type(got) is type(value), (path, got, value)


def test_knobs_that_were_code_only_defaults_are_declared():
  train = get_base_config().train
  for key in ("objective", "clip_eps", "clip_eps_high", "kl_coef", "value_coef", "entropy_coef",
              "use_reference", "logits_chunk", "keep_checkpoints", "async_checkpoint",
              "progress_bar", "check_finite_every", "peak_flops_per_device"):
    assert key in train, key
  assert "enabled" in train.prune and "budget_fraction" in train.prune
  assert "token_chunk" in get_base_config().model
  assert {"max_tokens", "max_nodes", "max_traj", "max_len"} <= set(get_base_config().tree)


def test_unknown_key_is_refused_naming_it():
  with pytest.raises((AttributeError, KeyError), match='"enabled" instead of "enabeld"'):
    _parse("configs/sft_tiny_tree.py", "--config.train.prune.enabeld=True")


def test_cli_overrides_reach_the_code_that_reads_them(tmp_path):
  c = _parse("configs/sft_tiny_tree.py", "--config.train.prune.enabled=True",
             "--config.train.prune.budget_fraction=0.3", "--config.model.token_chunk=16",
             "--config.train.objective=ppo", "--config.train.clip_eps=0.1",
             "--config.train.clip_eps_high=0.3", "--config.train.kl_coef=0.5",
             "--config.train.use_reference=True", "--config.train.keep_checkpoints=7",
             "--config.train.async_checkpoint=False", "--config.train.progress_bar=False",
             "--config.train.batch_size=8")
  config_lib.validate(c, jax.device_count())
  from kat_jax.tree.prune import settings_from_config
  settings = settings_from_config(c.train.prune)
  assert settings.enabled and settings.budget_fraction == pytest.approx(0.3)
  assert ModelConfig.from_config(c.model).token_chunk == 16
  # The objective: ratio clipped to [1 - 0.1, 1 + 0.3], k3 KL weighted by 0.5.
  logp = jnp.log(jnp.asarray([[[0.5, 0.5, 0.5]]]))
  old = jnp.log(jnp.asarray([[[0.5, 0.8, 0.3]]]))
  ref = jnp.log(jnp.asarray([[[0.4, 0.4, 0.4]]]))
  batch = {"pred_labels": jnp.zeros((1, 1, 3), jnp.int32),
           "field/advantage": jnp.ones((1, 1, 4)), "field/old_logp": jnp.pad(old, ((0, 0),) * 2 +
                                                                              ((1, 0),)),
           "field/ref_logp": jnp.pad(ref, ((0, 0),) * 2 + ((1, 0),))}
  loss, terms = losses.policy_pair_loss(logp, batch, c.train)
  ratio = np.array([1.0, 0.625, 5 / 3])
  clipped = np.minimum(ratio, np.clip(ratio, 0.9, 1.3))
  d = np.log(0.4) - np.log(0.5)
  np.testing.assert_allclose(loss[0, 0], -clipped + 0.5 * (np.exp(d) - d - 1), rtol=1e-5)
  # Checkpointing and console knobs reach the Trainer.
  from kat_jax.train.trainer import Trainer
  c.train.prune.enabled = False
  trainer = Trainer(c, str(tmp_path))
  assert trainer.checkpointer._manager._options.max_to_keep == 7
  assert not trainer.checkpointer._manager._options.enable_async_checkpointing
  assert trainer.writer._bar is None
  assert trainer.reference_params is not None
  trainer.close()


@pytest.mark.parametrize("overrides,match", [
    ({"train.value_coef": 0.5}, r"config.train.value_coef=0.5 .*config.model.value_head=False"),
    ({"train.kl_coef": 0.1}, r"config.train.kl_coef=0.1 .*use_reference=True"),
    ({"train.objective": "ppo2"}, r"config.train.objective='ppo2' is not one of"),
    ({"train.batch_size": 0}, r"config.train.batch_size=0 must be positive"),
    ({"train.prune.budget_fraction": 1.5, "train.prune.budget_tokens": -1},
     r"config.train.prune.budget_fraction = 1.5"),
    ({"train.clip_eps": -0.1}, r"clip_eps=-0.1"),
])
def test_contradictions_are_config_errors(overrides, match):
  c = get_base_config()
  for path, value in overrides.items():
    node = c
    *head, last = path.split(".")
    for part in head:
      node = node[part]
    node[last] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c, 8)


_CONFIG_NAMES = ("config", "cfg", "train_cfg", "prune_cfg", "data_config", "mesh_cfg", "section",
                 "train", "model_cfg", "tree_cfg")


def test_library_code_never_invents_config_defaults():
  """No ``<config>.get("key", default)`` in the library: fields are read, defaults live in
  configs/base.py."""
  offenders = []
  for path in glob.glob(os.path.join(REPO, "kat_jax", "**", "*.py"), recursive=True):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "get" and node.args
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        receiver = ast.unparse(node.func.value)
        if receiver.split(".")[-1] in _CONFIG_NAMES:
          offenders.append(f"{os.path.relpath(path, REPO)}:{node.lineno}: {ast.unparse(node)}")
  assert not offenders, "\n".join(offenders)
