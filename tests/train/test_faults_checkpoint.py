"""Checkpoint faults lose nothing and say what happened: an unreadable latest step (truncated or
zeroed data file, missing _METADATA) is moved aside and the previous step restored bitwise; no
readable step is one error that moves nothing; a changed model is a ConfigError naming each
parameter; keep-K keeps exactly the last K; a state saved on one mesh restores bitwise on another
mesh and on one device."""
import glob
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from configs import synthetic_tiny
from kat_jax import checkpoint as checkpoint_lib
from kat_jax.errors import CheckpointReadError, ConfigError
from kat_jax.train import stages
from kat_jax.train.trainer import Trainer

STEPS = 3


def tiny_config(**train):
  """A model small enough that a checkpoint is ~0.4 MB (fast saves, a small tmpfs fills up)."""
  c = synthetic_tiny.get_config()
  c.model.update(vocab_size=256, d_model=32, num_layers=1, num_heads=8, num_kv_heads=4,
                 head_dim=8, mlp_dim=64)
  c.train.update(dict(steps=STEPS, checkpoint_every=1, eval_every=0, progress_bar=False,
                      seq_len=16, warmup_steps=1, async_checkpoint=False, keep_checkpoints=10))
  c.train.update(train)
  return c


def train_steps(trainer, config, workdir, steps):
  it, _ = stages.get_stage(config.stage).make_data(
      config, workdir, split="train", batch_size=config.train.batch_size, seed=config.seed,
      shard_index=0, shard_count=1)
  if "train" in trainer.extra_state:
    it.set_state(trainer.extra_state["train"])
  for _ in range(steps):
    trainer.step(next(it))
    trainer.save({"train": it.get_state()})


def host_leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_bitwise(a, b):
  la, lb = host_leaves(a), host_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A workdir with steps 1..3, and the state of step 2 as restored from it intact."""
  workdir = str(tmp_path_factory.mktemp("faults") / "run")
  trainer = Trainer(tiny_config(), workdir)
  train_steps(trainer, tiny_config(), workdir, STEPS)
  trainer.close()
  step2 = Trainer(tiny_config(), workdir, restore_step=2, lock=False)
  step2.close()
  return workdir, jax.device_get(step2.state)


def _copy(saved, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(saved[0], dst)
  return dst


def _data_file(workdir, step):
  """The data file of ``step``'s state that the arrays are read from (the merged OCDBT database's;
  ``ocdbt.process_<i>/`` holds the per-process files it was merged from)."""
  files = glob.glob(f"{workdir}/checkpoints/{step}/state/d/*")
  assert len(files) == 1, files
  return files[0]


def _truncate(workdir, step):
  path = _data_file(workdir, step)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def _zero(workdir, step):
  path = _data_file(workdir, step)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.write(b"\0" * size)
  return path


def _drop_metadata(workdir, step):
  path = f"{workdir}/checkpoints/{step}/state/_METADATA"
  os.remove(path)
  return path


@pytest.mark.parametrize("corrupt, reason", [(_truncate, "out-of-range"), (_zero, "data-loss"),
                                             (_drop_metadata, "missing-metadata")])
def test_unreadable_latest_step_is_moved_aside_and_the_previous_restored(saved, tmp_path, caplog,
                                                                         corrupt, reason):
  workdir = _copy(saved, tmp_path)
  step_dir = f"{workdir}/checkpoints/{STEPS}"
  files_before = sorted(os.path.relpath(f, step_dir)
                        for f in glob.glob(f"{step_dir}/**/*", recursive=True))
  bad_file = corrupt(workdir, STEPS)
  with caplog.at_level(logging.WARNING):
    trainer = Trainer(tiny_config(), workdir)
  trainer.close()
  assert trainer.restored_step == STEPS - 1
  assert_bitwise(trainer.state, saved[1])
  moved = f"{workdir}/checkpoints/{checkpoint_lib.CORRUPT_DIR}/{STEPS}-{reason}"
  assert not os.path.exists(step_dir) and os.path.isdir(moved)
  if corrupt is not _drop_metadata:   # moved, never deleted: every file is still there
    assert sorted(os.path.relpath(f, moved)
                  for f in glob.glob(f"{moved}/**/*", recursive=True)) == files_before
  warning = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert len(warning) == 1, caplog.text
  assert f"step {STEPS} is unreadable ({reason}" in warning[0] and bad_file in warning[0]
  assert moved in warning[0]
  # The moved step is no step: the next restart restores the same good step again, silently.
  again = Trainer(tiny_config(), workdir)
  again.close()
  assert again.restored_step == STEPS - 1


def test_no_readable_step_is_one_error_and_moves_nothing(saved, tmp_path):
  workdir = _copy(saved, tmp_path)
  files = {s: _zero(workdir, s) for s in range(1, STEPS + 1)}
  with pytest.raises(CheckpointReadError) as info:
    Trainer(tiny_config(), workdir)
  message = str(info.value)
  assert message.startswith(f"no readable checkpoint in {workdir}/checkpoints")
  for step, path in files.items():
    assert f"step {step}: data-loss in {path}" in message
  assert sorted(os.listdir(f"{workdir}/checkpoints")) == ["1", "2", "3"]
  # The lock of the failed trainer was released: a fixed workdir opens at once.
  shutil.rmtree(f"{workdir}/checkpoints/3")
  shutil.copytree(f"{saved[0]}/checkpoints/3", f"{workdir}/checkpoints/3")
  trainer = Trainer(tiny_config(), workdir)
  trainer.close()
  assert trainer.restored_step == 3


def test_an_explicit_unreadable_step_is_an_error_naming_it(saved, tmp_path):
  workdir = _copy(saved, tmp_path)
  path = _truncate(workdir, 2)
  with pytest.raises(CheckpointReadError, match=f"checkpoint step 2 in .* cannot be read: "
                                                f"step 2: out-of-range in {path}"):
    Trainer(tiny_config(), workdir, restore_step=2, lock=False)
  assert os.path.isdir(f"{workdir}/checkpoints/2")


@pytest.mark.parametrize("change, expected", [
    (dict(mlp_dim=128), ["params/layer_0/mlp/gate_proj: stored (32, 64) vs requested (32, 128)",
                         "params/layer_0/mlp/down_proj: stored (64, 32) vs requested (128, 32)"]),
    (dict(num_layers=2), ["params/layer_1/mlp/gate_proj: stored absent vs requested (32, 64)"]),
])
def test_a_changed_model_is_a_config_error_naming_each_parameter(saved, change, expected):
  config = tiny_config()
  config.model.update(change)
  with pytest.raises(ConfigError) as info:
    Trainer(config, saved[0])
  message = str(info.value)
  for line in expected:
    assert line in message, message
  assert "opt_state" not in message     # the params, not their optimizer moments, are named
  assert "new --workdir" in message and f"--config.init_from={saved[0]}" in message
  assert sorted(os.listdir(f"{saved[0]}/checkpoints")) == ["1", "2", "3"]


@pytest.mark.parametrize("async_save", [False, True])
def test_keep_k_keeps_exactly_the_last_k_steps(tmp_path, async_save):
  workdir = str(tmp_path / "run")
  config = tiny_config(keep_checkpoints=2, steps=5, async_checkpoint=async_save)
  trainer = Trainer(config, workdir)
  train_steps(trainer, config, workdir, 5)
  trainer.close()
  assert sorted(os.listdir(f"{workdir}/checkpoints")) == ["4", "5"]
  assert trainer.checkpointer.all_steps() == [4, 5]
  restored = Trainer(config, workdir)
  restored.close()
  assert restored.restored_step == 5
  assert_bitwise(restored.state, trainer.state)


def _mesh_config(data, fsdp, tensor, **train):
  c = tiny_config(**train)
  c.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor))
  return c


def test_saved_on_2x4_restores_bitwise_on_4x2_and_on_one_device(tmp_path):
  workdir = str(tmp_path / "run")
  config = _mesh_config(1, 2, 4)
  trainer = Trainer(config, workdir)
  train_steps(trainer, config, workdir, 2)
  trainer.close()
  saved_state = jax.device_get(trainer.state)
  assert dict(trainer.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}

  other = Trainer(_mesh_config(1, 4, 2), workdir)
  other.close()
  assert dict(other.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert other.restored_step == 2
  sharded = [x.sharding for x in jax.tree.leaves(other.state) if x.ndim == 2]
  assert any(len(s.device_set) > 1 for s in sharded)      # really placed on the new mesh
  assert_bitwise(other.state, saved_state)

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  one_device = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            other.abstract)
  ckpt = checkpoint_lib.Checkpointer(other.checkpointer.directory, save_every=1, keep=10,
                                     cleanup_partial=False)
  state, extra, step = ckpt.restore(one_device)
  ckpt.close()
  assert step == 2 and "train" in extra
  assert all(x.sharding == device for x in jax.tree.leaves(state))
  assert_bitwise(state, saved_state)
