"""experiments.bench_sample_tunix at a tiny shape, against the real Tunix virtualenv: both sides
hold the same weights (equal parameter counts, logits within 1e-4, the exported checkpoint is
kat_jax's params bitwise) and the reported figures are the stated functions of the per-round
times. The Tunix virtualenv is ``KAT_TUNIX_PYTHON`` (default ``bench.DEFAULT_TUNIX_PYTHON``).
``.ci/run`` builds it and sets the variable, so CI always runs the comparison (a set variable
naming a missing interpreter fails the test); on a machine without the virtualenv and without the
variable the comparison cannot run and the test checks the documented error instead."""
import json
import os
import statistics

import jax
import numpy as np
import pytest

from experiments import bench_sample_tunix as bench
from kat_jax.errors import ConfigError

TUNIX_PYTHON = os.environ.get("KAT_TUNIX_PYTHON", bench.DEFAULT_TUNIX_PYTHON)
HAVE_TUNIX = os.path.isfile(TUNIX_PYTHON) and os.access(TUNIX_PYTHON, os.X_OK)
SHAPE = dict(vocab=256, d_model=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp_dim=128)
RUN = dict(batch=2, prompt_len=8, new_tokens=8, rounds=2)


def _expected_params(vocab, d_model, layers, heads, kv_heads, head_dim, mlp_dim) -> int:
  """Qwen3 with a tied head: attention, qk norms, MLP and two norms per layer; embedding; final
  norm."""
  per_layer = (d_model * head_dim * (2 * heads + 2 * kv_heads) + 2 * head_dim
               + 3 * d_model * mlp_dim + 2 * d_model)
  return layers * per_layer + vocab * d_model + d_model


def test_missing_tunix_python_is_a_clear_error(tmp_path):
  missing = str(tmp_path / "no_venv" / "bin" / "python")
  with pytest.raises(ConfigError) as error:
    bench.measure(**SHAPE, **RUN, tunix_python=missing)
  message = str(error.value)
  assert f"--tunix_python={missing!r}" in message
  assert "python -m venv V && V/bin/pip install google-tunix==0.1.7" in message
  assert not os.path.exists(tmp_path / "no_venv")      # refused before any work


@pytest.mark.slow
def test_kat_against_tunix_same_weights_and_consistent_figures(tmp_path):
  if not HAVE_TUNIX:
    assert "KAT_TUNIX_PYTHON" not in os.environ, (
        f"KAT_TUNIX_PYTHON={TUNIX_PYTHON!r} is not an interpreter: build it with {bench.BUILD_HINT}")
    # No Tunix virtualenv on this machine: the bench must refuse with the documented fix.
    with pytest.raises(ConfigError, match="pip install google-tunix==0.1.7"):
      bench.measure(**SHAPE, **RUN, tunix_python=TUNIX_PYTHON)
    return
  record = bench.measure(**SHAPE, **RUN, tunix_python=TUNIX_PYTHON, workdir=str(tmp_path))
  json.dumps(record)                                   # what the script prints

  # Same model on both sides.
  assert record["params"] == record["tunix"]["params"] == _expected_params(**SHAPE)
  assert record["shape"] == dict(SHAPE, tie_embeddings=True, qk_norm=True, rope_theta=1e6,
                                 dtype="float32")
  assert record["tunix"]["version"] == "0.1.7"
  assert record["tunix"]["jax_version"] == record["jax_version"] == jax.__version__
  agreement = record["agreement"]
  assert agreement["logits_max_abs"] > 1.0             # O(1) logits: the comparison has content
  assert 0.0 <= agreement["logits_max_abs_diff"] < 1e-4
  assert 0.0 <= agreement["first_token_logprob_max_abs_diff"]["kat"] < 1e-4
  assert 0.0 <= agreement["first_token_logprob_max_abs_diff"]["tunix"] < 1e-4
  # The checkpoint Tunix loaded is kat_jax's params, bitwise (kat_jax's importer reads it back).
  from kat_jax.model import ModelConfig, hf
  model_config, imported = hf.import_hf(str(tmp_path / "hf"))
  cfg = ModelConfig.from_config(model_config)
  assert (cfg.rope_theta, cfg.qk_norm, cfg.tie_embeddings) == (1e6, True, True)
  expected = bench.random_params(cfg)
  assert jax.tree.structure(imported) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(imported), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  # Figures: medians of rounds, decode step from the phases, ratios per round.
  new, rounds = RUN["new_tokens"], RUN["rounds"]
  assert (record["batch"], record["prompt_len"], record["new_tokens"], record["rounds"]) == (
      RUN["batch"], RUN["prompt_len"], new, rounds)
  assert record["cache_slots"] == RUN["prompt_len"] + new
  assert record["order_by_round"] == ["kat_first", "tunix_first"]
  for side in ("kat_s", "tunix_s"):
    s = record[side]
    prefill, total, step = s["prefill_s_by_round"], s["total_s_by_round"], \
        s["decode_step_s_by_round"]
    assert len(prefill) == len(total) == len(step) == rounds
    assert all(t > 0 for t in prefill + total)
    assert step == pytest.approx([(t - p) / (new - 1) for p, t in zip(prefill, total)])
    assert s["prefill_s"] == pytest.approx(statistics.median(prefill))
    assert s["total_s"] == pytest.approx(statistics.median(total))
    assert s["decode_step_s"] == pytest.approx(statistics.median(step))
    if s["decode_step_s"] > 0:
      assert s["decode_tokens_per_s"] == pytest.approx(RUN["batch"] / s["decode_step_s"])
    else:
      assert s["decode_tokens_per_s"] is None
  for phase in ("prefill", "decode_step", "total"):
    ratios = record["tunix_over_kat_by_round"][phase]
    assert ratios == pytest.approx([t / k for t, k in zip(
        record["tunix_s"][f"{phase}_s_by_round"], record["kat_s"][f"{phase}_s_by_round"])])
    assert record["tunix_over_kat"][phase] == pytest.approx(statistics.median(ratios))
  assert (tmp_path / "tunix.log").exists()
