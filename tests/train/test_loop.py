"""The shared loop: a non-finite loss stops the run naming the step and
the metric while the last checkpoint stays the last good state."""
import jax
import numpy as np
import pytest

from configs import synthetic_tiny
from kat_jax.data.synthetic import SyntheticCopyIterator
from kat_jax.train import loop, stages


def _config(steps, every):
  c = synthetic_tiny.get_config()
  c.train.update(dict(steps=steps, checkpoint_every=every, seq_len=64, eval_every=0,
                      warmup_steps=2, progress_bar=False, log_every=1, async_checkpoint=False))
  return c


class _PoisonedIterator(SyntheticCopyIterator):
  """Weights become NaN from batch ``poison_at`` (0-based) on."""
  poison_at = 4

  def __next__(self):
    i = self._index
    batch = super().__next__()
    if i >= self.poison_at:
      batch["weights"] = batch["weights"] * np.float32("nan")
    return batch


def _poisoned_data(config, workdir, *, split, batch_size, seed, shard_index, shard_count):
  it = _PoisonedIterator(vocab_size=config.model.vocab_size, batch_size=batch_size,
                         seq_len=config.train.seq_len, seed=seed)
  return it, None


stages.register(stages.Stage("poisoned_for_test", loss="lm", make_data=_poisoned_data))


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path):
  c = _config(steps=10, every=2)
  c.stage = "poisoned_for_test"
  with pytest.raises(FloatingPointError) as e:
    loop.train(c, str(tmp_path))
  msg = str(e.value)
  assert "non-finite loss" in msg and "at step 5" in msg and "last good checkpoint is step 4" in msg
  state, _, _, step = loop.load_state(c, str(tmp_path))
  assert step == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state)))

