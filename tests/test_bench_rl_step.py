"""experiments/bench_rl_step's code path at tiny sizes: one object per mode with the issue's
fields, a real tree (POR in (0, 1)), and the pruned batches smaller than the unpruned ones."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
from byte_tokenizer import ByteTokenizer  # noqa: E402

from experiments import bench_rl_step  # noqa: E402
from kat_jax.sandbox import SandboxPool  # noqa: E402

TOKENIZER = ByteTokenizer()
FIELDS = ("case", "preset", "mode", "por", "work_bound", "tree_over_flat_speedup", "efficiency",
          "keep_fraction", "pruned_cost_ratio", "sample_s", "env_s", "score_s", "train_s")


def _shrink(c):
  c.model.update(dict(vocab_size=TOKENIZER.vocab_size, d_model=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64))
  c.tree.update(dict(max_len=512, max_tokens=600, max_nodes=16))
  c.rl.sandbox_workers = 1


@pytest.mark.slow
def test_bench_rl_step_reports_every_field(tmp_path):
  with SandboxPool(num_workers=1) as pool:
    rows = bench_rl_step.run_case("tiny", algo="grpo", tasks=8, group=2, new=12, rounds=1,
                                  keep_fraction=0.5, workdir=str(tmp_path), pool=pool,
                                  tokenizer=TOKENIZER, configure=_shrink)
  assert [r["mode"] for r in rows] == ["tree", "flat"]
  for r in rows:
    for field in FIELDS:
      assert field in r, field
    assert 0.0 < r["por"] < 1.0
    assert abs(r["work_bound"] - 1.0 / (1.0 - r["por"])) < 1e-2
    assert 0.0 < r["keep_fraction"] < 1.0
    assert r["pruned_batch_tokens"] < r["batch_tokens"]
    assert r["sample_s"] > 0 and r["train_s"] > 0 and r["score_s"] > 0
  assert rows[0]["tree_over_flat_speedup"] == rows[1]["tree_over_flat_speedup"]
