"""The command-line programs end a failed run with one last line stating the root cause (the file
or field), the traceback above it and no library log noise: experiments.convert's error paths,
a truncated safetensors header, experiments.main's unknown fields, bad sizes, unknown names, an
unreadable workdir and a changed model; and ``errors.root_cause`` picks our message over the
library errors it wraps."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from kat_jax import errors
from kat_jax.model.hf import safetensors_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, timeout=300):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)
  lines = proc.stderr.strip().splitlines()
  return proc.returncode, (lines[-1] if lines else ""), proc.stderr


def _write_safetensors(path, tensors):
  header = {}
  offset = 0
  for name, array in tensors.items():
    header[name] = {"dtype": "F32", "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for array in tensors.values():
      f.write(array.astype(np.float32).tobytes())


# ------------------------------------------------------------------------- safetensors

@pytest.mark.parametrize("cut, expected", [
    (lambda n_header: 8 + n_header // 2, "is truncated: its header declares"),
    (lambda n_header: 8 + n_header + 3, "is truncated: its header describes 32 bytes of tensor"),
    (lambda n_header: 5, "is not a safetensors file (shorter than its 8-byte header length)"),
])
def test_a_truncated_safetensors_file_is_named(tmp_path, cut, expected):
  path = str(tmp_path / "model.safetensors")
  _write_safetensors(path, {"w": np.arange(8, dtype=np.float32)})
  n_header = struct.unpack("<Q", open(path, "rb").read(8))[0]
  with open(path, "r+b") as f:
    f.truncate(cut(n_header))
  with pytest.raises(ValueError) as info:
    safetensors_io.read_header(path)
  assert str(info.value).startswith(path) and expected in str(info.value)


def test_an_intact_safetensors_file_still_reads(tmp_path):
  path = str(tmp_path / "model.safetensors")
  _write_safetensors(path, {"w": np.arange(8, dtype=np.float32)})
  header, start = safetensors_io.read_header(path)
  assert header["w"]["shape"] == [8] and start == 8 + struct.unpack("<Q",
                                                                      open(path, "rb").read(8))[0]


# ---------------------------------------------------------------------- root_cause

def test_root_cause_prefers_our_message_and_else_the_innermost():
  try:
    try:
      raise ValueError("DATA_LOSS: b-tree [tensorstore_spec='{...}']")
    except ValueError as inner:
      raise errors.CheckpointReadError("no readable checkpoint in /w: step 3 ...") from inner
  except errors.CheckpointReadError as e:
    assert errors.root_cause(e) == "CheckpointReadError: no readable checkpoint in /w: step 3 ..."
  try:
    try:
      raise FileNotFoundError(2, "No such file", "/x/config.json")
    except FileNotFoundError:
      raise RuntimeError("Event loop is closed")
  except RuntimeError as e:
    # No message of ours: the innermost exception is the cause.
    assert errors.root_cause(e).startswith("FileNotFoundError: [Errno 2] No such file")
  assert errors.root_cause(ValueError("a\nb [tensorstore_spec='x']")) == "ValueError: a"


# ----------------------------------------------------------------- experiments.convert

def test_convert_error_paths(tmp_path):
  # Neither direction (a usage error), and both directions at once.
  rc, last, _ = _run("experiments.convert")
  assert rc == 1 and "give either --from_hf=DIR --to=WORKDIR or --from_workdir" in last
  rc, last, _ = _run("experiments.convert", "--from_hf=/a", "--to=/b", "--from_workdir=/c",
                     "--to_hf=/d")
  assert rc == 1 and "give either" in last
  # A source directory that does not exist.
  missing = str(tmp_path / "nope")
  rc, last, stderr = _run("experiments.convert", f"--from_hf={missing}", f"--to={tmp_path}/out")
  assert rc == 1 and last.startswith("error: ") and missing in last, stderr[-2000:]
  assert "Traceback" in stderr
  # A checkpoint directory whose only safetensors file is truncated in its header.
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps(
      {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 64,
       "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
       "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 32, "rope_theta": 10000.0,
       "rms_norm_eps": 1e-6, "tie_word_embeddings": True}))
  weights = str(hf / "model.safetensors")
  _write_safetensors(weights, {"model.embed_tokens.weight": np.zeros((64, 16), np.float32)})
  with open(weights, "r+b") as f:
    f.truncate(20)
  rc, last, stderr = _run("experiments.convert", f"--from_hf={hf}", f"--to={tmp_path}/out2")
  assert rc == 1, stderr[-2000:]
  assert last.startswith(f"error: ValueError: {weights} is truncated"), last
  # Export from a workdir without model_config.json and no --config.
  empty = tmp_path / "empty_workdir"
  (empty / "checkpoints").mkdir(parents=True)
  rc, last, _ = _run("experiments.convert", f"--from_workdir={empty}", f"--to_hf={tmp_path}/o3")
  assert rc == 1 and last.startswith("error: FileNotFoundError: ") and "model_config.json" in last
  assert "--config=" in last


# -------------------------------------------------------------------- experiments.main

@pytest.mark.parametrize("override, expected", [
    ("--config.model.preset=small", "error: ConfigError: --config.model.preset: config.model has "
                                    "no field 'preset'"),
    ("--config.train.batchsize=4", "did you mean config.train.batch_size?"),
    ("--config.train.mlp_dim=4", "did you mean config.model.mlp_dim?"),
    ("--config.model.name=nope", "error: ConfigError: config.model.name='nope' is not a model "
                                 "preset"),
    ("--config.train.batch_size=-1", "error: ConfigError: config.train.batch_size=-1 must be "
                                     "positive"),
    ("--config.train.batch_size=0", "error: ConfigError: config.train.batch_size=0 must be "
                                    "positive"),
    ("--config.model.num_layers=0", "error: ConfigError: config.model.num_layers=0 must be "
                                    "positive"),
    ("--config.tree.max_len=0", "error: ConfigError: config.tree.max_len=0 must be positive"),
])
def test_main_names_the_bad_field(tmp_path, override, expected):
  rc, last, stderr = _run("experiments.main", "--config=configs/synthetic_tiny.py",
                          f"--workdir={tmp_path}/run", override)
  assert rc == 1 and expected in last, stderr[-2000:]


_TINY = [f"--config.model.{k}={v}" for k, v in dict(
    vocab_size=256, d_model=32, num_layers=1, num_heads=8, num_kv_heads=4, head_dim=8,
    mlp_dim=64).items()] + ["--config.train.steps=1", "--config.train.eval_every=0",
                            "--config.train.seq_len=16", "--config.train.warmup_steps=0",
                            "--config.train.progress_bar=False"]


def test_main_on_a_changed_model_and_on_an_unreadable_workdir(tmp_path):
  workdir = f"{tmp_path}/run"
  rc, _, stderr = _run("experiments.main", "--config=configs/synthetic_tiny.py",
                       f"--workdir={workdir}", *_TINY)
  assert rc == 0, stderr[-2000:]
  rc, last, stderr = _run("experiments.main", "--config=configs/synthetic_tiny.py",
                          f"--workdir={workdir}", *_TINY, "--config.model.mlp_dim=128")
  assert rc == 1 and last.startswith(f"error: ConfigError: checkpoint step 1 in {workdir}"), last
  assert "params/layer_0/mlp/gate_proj: stored (32, 64) vs requested (32, 128)" in last
  assert f"--config.init_from={workdir}" in last and "absl:" not in stderr
  os.remove(f"{workdir}/checkpoints/1/state/_METADATA")
  rc, last, stderr = _run("experiments.main", "--config=configs/synthetic_tiny.py",
                          f"--workdir={workdir}", *_TINY)
  assert rc == 1 and last.startswith(
      f"error: CheckpointReadError: no readable checkpoint in {workdir}/checkpoints: step 1: "
      f"missing-metadata in {workdir}/checkpoints/1/state/_METADATA"), last
  assert "Event loop is closed" not in stderr and "absl:" not in stderr
