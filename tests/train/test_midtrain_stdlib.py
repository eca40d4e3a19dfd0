"""The tiny model learns real code: mid-training on the Python standard library's sources (with a
sentencepiece model trained from them, FIM on, mixed with procedural instruction data) lowers the
held-out loss within a few dozen steps; the agentic streams (tool use, multi-turn, instruction
following, from real tool executions) are in the mixture."""
import numpy as np

from configs import midtrain_tiny
from kat_jax.train import loop


def test_tiny_loss_decreases_on_stdlib(tmp_path):
  c = midtrain_tiny.get_config()
  c.data.data_dir = str(tmp_path / "tfds")
  c.train.update(dict(steps=40, seq_len=128, batch_size=8, warmup_steps=5, eval_every=40,
                      eval_steps=16, checkpoint_every=40, progress_bar=False, log_every=10))
  result = loop.train(c, str(tmp_path / "run"))
  initial = np.log(c.model.vocab_size)   # a freshly initialized model predicts ~uniformly
  assert result["step"] == 40
  assert result["eval_loss"] < initial - 1.0, result
  # Every stream of the mixture feeds the run (exact long-run proportions: tests/data/test_mixture.py;
  # over 40 short steps the shares lag, since a drawn document is counted whole) and FIM is on.
  assert result["train_data/token_fraction/code"] > 0.35, result
  assert result["train_data/token_fraction/procedural"] > 0.1, result
  for stream in ("tool_use", "multi_turn", "instruction_following"):
    assert result[f"train_data/token_fraction/{stream}"] > 0.03, (stream, result)
  assert result["train_data/fim_token_fraction"] > 0.1, result
