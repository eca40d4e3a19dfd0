"""experiments.bench_data at tiny sizes: every case uses the tokenizer of the model it is compared
with (the preset's vocab_size), loader_vs_step reports the stated ratio, and a tokenizer of another
vocabulary is refused with the fix."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from kat_jax.data.corpora import source_code
from kat_jax.model import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  stdlib = sysconfig.get_paths()["stdlib"]
  code = tmp_path_factory.mktemp("code")
  files = [rel for rel in source_code.list_source_files(stdlib, (".py",),
                                                        ("test", "tests", "site-packages"))
           if 2000 < os.path.getsize(os.path.join(stdlib, rel)) < 20000][:120]
  for rel in files:
    shutil.copy(os.path.join(stdlib, rel), code / rel.replace("/", "_"))
  work = tmp_path_factory.mktemp("bench_data")
  cmd = [sys.executable, "-m", "experiments.bench_data", "--cases=kat_fim_off,loader_vs_step",
         "--preset=tiny", f"--code_root={code}", f"--data_dir={work / 'tfds'}",
         f"--workdir={work / 'wd'}", "--batch_size=2", "--seq_len=128", "--num_batches=3",
         "--step_batch_size=2", "--step_seq_len=64", "--step_steps=1", "--step_rounds=1"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=True)
  return {r["case"]: r for r in map(json.loads, out.stdout.splitlines()) if "case" in r}


def test_every_case_uses_the_models_tokenizer(records):
  vocab = get_preset("tiny").vocab_size
  assert set(records) == {"kat_fim_off", "loader_vs_step"}
  for record in records.values():
    assert record["preset"] == "tiny"
    assert record["vocab_size"] == record["model_vocab_size"] == vocab
  fim_off = records["kat_fim_off"]
  assert fim_off["tokens_per_s"] > 0 and 0 <= fim_off["padding_fraction"] < 1
  assert (fim_off["batch_size"], fim_off["seq_len"]) == (2, 128)


def test_loader_vs_step_ratio(records):
  r = records["loader_vs_step"]
  assert r["step"]["preset"] == "tiny" and (r["batch_size"], r["seq_len"]) == (2, 64)
  assert (r["step"]["batch_size"], r["step"]["seq_len"]) == (2, 64)
  assert r["loader_tokens_per_s"] == r["loader"]["tokens_per_s"]
  assert r["ratio"] == pytest.approx(r["loader_tokens_per_s"] / r["step_tokens_per_s"], abs=0.1)
  assert r["goal_met"] == (r["ratio"] >= r["goal_ratio"])
  assert r["loader"]["metrics"]["fim_token_fraction"] > 0     # the FIM-on loader


def test_a_tokenizer_of_another_vocabulary_is_refused():
  code = ("import types; from experiments import bench_data; "
          "bench_data.compare_loader_with_step(None, types.SimpleNamespace(vocab_size=2048), "
          "preset='small', batch_size=2, seq_len=8, num_batches=1, steps=1, rounds=1)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("ValueError: the loader's tokenizer has vocab_size 2048 but preset "
                         "'small' has 8192"), last
  assert "data_config.vocab_size=8192" in last
