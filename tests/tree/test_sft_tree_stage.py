"""configs/sft_tiny_tree.py end to end: trees of real rendered trajectories (shared prompt, debug
branches) train through the launcher's loop and the held-out loss falls."""
import numpy as np
import pytest

from configs import sft_tiny_tree
from kat_jax.train import loop


@pytest.mark.slow
def test_sft_tree_stage_learns(tmp_path):
  c = sft_tiny_tree.get_config()
  c.data.data_dir = str(tmp_path / "tfds")
  c.tree.max_tokens = 384
  c.mesh.update(dict(data=1, fsdp=4, tensor=2))   # 8 simulated devices; batch 4 over fsdp
  c.train.update(dict(steps=16, seq_len=384, warmup_steps=4, eval_every=16, eval_steps=2,
                      checkpoint_every=16, progress_bar=False, log_every=8))
  result = loop.train(c, str(tmp_path / "run"))
  assert result["step"] == 16
  assert result["train_data/por"] > 0.05            # trajectories really share prefixes
  assert result["eval_loss"] < np.log(c.model.vocab_size) - 2.0, result
