"""Benchmark: entropy-budget pruning, jitted (vectorized) vs the plain-Python heap reference.

    python -m experiments.bench_prune [--sizes=10000,100000,1000000] [--budget_fraction=0.6]

For each size it grows a synthetic agentic tree (``kat_jax.tree.synthetic``: long shared prompt,
multi-turn branching continuations with tool calls / results / memory events) of about ``size``
unique tokens, builds and batches it, draws synthetic per-token entropies, and times

* ``jit_s``        ``prune_nodes`` on the [1, T] batch after compilation (median of ``repeats``),
* ``reference_s``  ``kat_jax.tree.reference.reference_prune`` (Python: scores, mandatory part,
                   heap expansion — the same rule),

checks that both keep exactly the same tokens (``match``; for this check the reference is fed the
jitted node scores, so float32-vs-float64 rounding cannot reorder near-ties), and reports how much of the
flat-loss entropy mass is kept at the same budget by the entropy rule and by the random and
keep-longest-path baselines (synthetic entropies: a sanity check of the rule, not the model-based
signal-retention table). One JSON object per size on stdout.

With ``--retention`` it also prints, per size and per budget fraction in ``--retention_budgets``, one
``retention_synthetic`` object: the kept flat-loss entropy fraction of each entropy-score variant
(aggregation × scope, reach = fraction), of the random baseline (mean over 5 seeds) and of
keep-longest-path, all at the same budget — the measurement behind the default in docs/PRUNING.md.
"""
from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from kat_jax.tree import batch_trees, build_tree, prune
from kat_jax.tree.reference import reference_prune
from kat_jax.tree.synthetic import agentic_trajectories, synthetic_entropies

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  flags.DEFINE_list("sizes", ["10000", "100000", "1000000"], "target tree sizes (unique tokens)")
  flags.DEFINE_float("budget_fraction", 0.6, "token budget as a fraction of each tree")
  flags.DEFINE_integer("event_window", 16, "tokens kept after each event node")
  flags.DEFINE_enum("event_mode", "attached", ["attached", "mandatory"], "prune.event_mode")
  flags.DEFINE_integer("repeats", 5, "timed jitted runs per size (after one compile run)")
  flags.DEFINE_integer("seed", 0, "tree and entropy seed")
  flags.DEFINE_bool("reference", True, "also time the Python reference")
  flags.DEFINE_bool("retention", False, "also print the synthetic retention table per budget")
  flags.DEFINE_list("retention_budgets", ["0.2", "0.4", "0.6", "0.8"], "budget fractions")


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return out, time.perf_counter() - start


def run_size(size: int) -> dict:
  rng = np.random.default_rng(FLAGS.seed + size)
  trajs, tags = agentic_trajectories(rng, size)
  tree, build_s = _timed(lambda: build_tree(trajs, tags=tags))
  batch, batch_s = _timed(lambda: jax.device_put(batch_trees([tree])))
  ent = synthetic_entropies(rng, tree)[None]
  ent_dev = jax.device_put(ent)
  config = prune.default_prune_config()
  config.enabled = True
  config.budget_fraction = FLAGS.budget_fraction
  config.event_window = FLAGS.event_window
  config.event_mode = FLAGS.event_mode

  run = lambda: prune.prune_nodes(batch, ent_dev, config)
  result, compile_s = _timed(run)
  times = [_timed(run)[1] for _ in range(FLAGS.repeats)]
  jit_s = statistics.median(times)
  metrics = {k: np.asarray(v)[0].item() for k, v in result.metrics.items()}
  record = {
      "case": "prune_entropy",
      "target_tokens": size,
      "n_tree": tree.n_tree,
      "n_flat": tree.n_flat,
      "por": round(tree.por, 4),
      "num_nodes": tree.num_nodes,
      "num_traj": tree.num_traj,
      "max_len": tree.max_len,
      "budget_fraction": FLAGS.budget_fraction,
      "event_mode": FLAGS.event_mode,
      "build_s": round(build_s, 4),
      "batch_s": round(batch_s, 4),
      "jit_compile_s": round(compile_s, 3),
      "jit_s": round(jit_s, 5),
      "jit_s_min": round(min(times), 5),
      "kept_fraction": round(metrics["kept_fraction"], 4),
      "mandatory_fraction": round(metrics["mandatory_tokens"] / tree.n_tree, 4),
      "mandatory_exceeds_budget": bool(metrics["mandatory_exceeds_budget"]),
      "kept_entropy_fraction": round(metrics["kept_entropy_fraction"], 4),
      "kept_trajectories": metrics["kept_trajectories"],
  }
  random = prune.prune_random(batch, config, jax.random.PRNGKey(FLAGS.seed), ent_dev)
  longest = prune.prune_longest_path(batch, config, ent_dev)
  record["random_kept_entropy_fraction"] = round(
      float(random.metrics["kept_entropy_fraction"][0]), 4)
  record["longest_path_kept_entropy_fraction"] = round(
      float(longest.metrics["kept_entropy_fraction"][0]), 4)
  if FLAGS.reference:
    _, ref_s = _timed(lambda: reference_prune(tree, ent[0], config))  # the whole rule
    scores = np.asarray(result.node_scores)[0, :tree.num_nodes]
    keep_ref, _, _ = reference_prune(tree, ent[0], config, node_scores=scores)
    record["reference_s"] = round(ref_s, 4)
    record["speedup_vs_reference"] = round(ref_s / jit_s, 1)
    record["match"] = bool(np.array_equal(np.asarray(result.keep_mask)[0, :tree.n_tree], keep_ref))
  record["device"] = jax.devices()[0].platform
  records = [record]
  if FLAGS.retention:
    records += retention_table(size, batch, ent_dev)
  return records


def retention_table(size, batch, ent) -> list:
  out = []
  for fraction in FLAGS.retention_budgets:
    config = prune.default_prune_config()
    config.enabled = True
    config.budget_fraction = float(fraction)
    config.event_window = FLAGS.event_window
    config.event_mode = FLAGS.event_mode
    row = {"case": "retention_synthetic", "target_tokens": size, "budget_fraction": float(fraction)}
    for agg in prune.ENTROPY_AGGS:
      for scope in prune.ENTROPY_SCOPES:
        config.entropy_agg, config.entropy_scope = agg, scope
        res = prune.prune_nodes(batch, ent, config)
        row[f"entropy_{agg}_{scope}"] = round(float(res.metrics["kept_entropy_fraction"][0]), 4)
    random = [float(prune.prune_random(batch, config, jax.random.PRNGKey(i), ent)
                    .metrics["kept_entropy_fraction"][0]) for i in range(5)]
    row["random_mean5"] = round(statistics.mean(random), 4)
    row["longest_path"] = round(
        float(prune.prune_longest_path(batch, config, ent).metrics["kept_entropy_fraction"][0]), 4)
    out.append(row)
  return out


def main(argv):
  del argv
  for size in FLAGS.sizes:
    for record in run_size(int(float(size))):
      print(json.dumps(record), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
