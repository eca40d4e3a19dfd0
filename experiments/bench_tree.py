"""Tree training vs the flat batch: forward+backward of the small preset over agentic-shaped
trajectory sets, same loss code, same block-skipping attention, timed side by side in one run.

  python -m experiments.bench_tree [--preset=small --attention_impl=blocksparse --repeats=5]

Trajectory sets: a long shared prompt, then branching multi-turn continuations (a first turn per
branch, optionally forking again into second turns), sized for POR ≈ 0.5, 0.75 and 0.875.
The flat baseline is the strongest fair one: every trajectory its own row of a [K, L] batch, the
`tree` loss (identical code) over singleton trees, attention that skips key blocks above the causal
diagonal (the same block-sparse implementation, fed flat intervals), and its best batching: the K
rows are run as micro-batches of r rows for every r in --flat_rows that divides K (gradients
summed), and the fastest total is the baseline. Both sides also try every ``--token_chunks`` value
(``config.model.token_chunk``: the MLP and output head run on slices of that many tokens; exact)
and keep their fastest. Neither side is padded beyond its longest row. Each variant is timed in a
round-robin sweep (``--sweep_rounds``); the fastest flat and tree variants then alternate for
``--repeats`` rounds (fastest kept, and the median of the per-round ratios beside it), so that
drifts in the machine's load hit both alike.

One JSON object per case: por, bound (= 1/(1-POR)), flat_s, tree_s, speedup, efficiency
(= speedup / bound), median_speedup, median_efficiency, attention_impl, plus the token counts, the
visited-block fraction of both layouts, every variant's sweep time, and ``work_bound``: the
flat/tree ratio of model FLOPs counted exactly (6·params per token + 12·layers·heads·head_dim per
visible (query, key) pair, the MaxText count), which is below ``bound`` because a shared prefix
token sees fewer keys than an average one.
"""
import json
import time

import numpy as np
from absl import app, flags
from configs.base import train_config

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  flags.DEFINE_string("preset", "small", "Model preset.")
  flags.DEFINE_string("attention_impl", "blocksparse", "config.model.attention_impl")
  flags.DEFINE_integer("repeats", 5, "Rounds of the two winners, alternating (fastest kept).")
  flags.DEFINE_integer("sweep_rounds", 2, "Round-robin rounds of the variant sweep.")
  flags.DEFINE_string("cases", "0.5,0.75,0.875", "Comma-separated POR targets.")
  flags.DEFINE_string(
      "flat_rows", "1,2,4,8", "Flat micro-batch sizes (rows) to try; the fastest is the baseline.")
  flags.DEFINE_string(
      "token_chunks", "0,256,384",
      "config.model.token_chunk values to try (both sides keep their fastest); 0 = no slicing.")

# prompt tokens, first-level branches, first-turn tokens, second-level branches, second-turn tokens
SHAPES = {
    "0.5": (256, 4, 128, 1, 0),
    "0.75": (384, 8, 64, 1, 0),
    "0.875": (384, 2, 64, 8, 32),
}


def agentic_trajectories(rng, vocab, prompt, b1, c1, b2, c2):
  """Shared prompt → b1 first turns → each forking into b2 second turns (K = b1·b2)."""
  p = list(rng.integers(0, vocab, prompt))
  out = []
  for _ in range(b1):
    first = list(rng.integers(0, vocab, c1))
    for _ in range(b2):
      out.append(p + first + list(rng.integers(0, vocab, c2)))
  return out


def visible_pairs(tree) -> int:
  """(query, key) pairs the attention mask allows: each token sees its root path (depth + 1)."""
  return int(np.sum(tree.positions.astype(np.int64) + 1))


def main(argv):
  del argv
  import jax
  import flax.linen as nn
  import jax.numpy as jnp
  from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
  from kat_jax.train import losses
  from kat_jax.tree import batch as tree_batch, build
  from kat_jax.tree.logprobs import batch_to_arrays
  from kernels.tree_attention.layout import block_layout, visited_fraction

  loss = losses.get_loss("tree")
  ctx_cfg = train_config(objective="nll")
  chunk_values = sorted({int(c) for c in FLAGS.token_chunks.split(",")})
  grad_fns, params = {}, None
  for chunk in chunk_values:
    c = get_preset(FLAGS.preset)
    c.attention_impl = FLAGS.attention_impl
    c.token_chunk = chunk
    cfg = ModelConfig.from_config(c)
    model = Transformer(cfg)
    if params is None:
      tok = jnp.zeros((1, 8), jnp.int32)
      params = nn.unbox(model.init(jax.random.key(0), tok, tok,
                                   intervals_from_segment_ids(jnp.ones_like(tok)))["params"])
    ctx = losses.LossContext(apply_fn=model.apply, config=ctx_cfg)
    grad_fns[chunk] = jax.jit(jax.value_and_grad(
        lambda p, b, ctx=ctx: loss.numerator(p, b, ctx)[0]))
  flops_per_token = 6 * cfg.num_params()
  flops_per_pair = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim

  def prepare(trees, t):
    arrays = batch_to_arrays(tree_batch.batch_trees(
        trees, max_tokens=t, max_nodes=max(x.num_nodes for x in trees),
        max_traj=max(x.num_traj for x in trees), max_len=max(x.max_len for x in trees)))
    arrays["attention_blocks"] = block_layout(arrays["tin"], arrays["tout"])
    return jax.tree.map(jnp.asarray, arrays), visited_fraction(arrays["attention_blocks"])

  def run(chunk, batches):
    """One training batch = the forward+backward of every micro-batch (gradients summed), all
    dispatched before waiting (measured no slower than waiting for each in turn)."""
    return jax.block_until_ready([grad_fns[chunk](params, b) for b in batches])

  def timed(key, batches):
    t0 = time.perf_counter()
    jax.block_until_ready(run(key[-1], batches))
    return time.perf_counter() - t0

  rng = np.random.default_rng(0)
  for case in FLAGS.cases.split(","):
    trajs = agentic_trajectories(rng, cfg.vocab_size, *SHAPES[case])
    fields = dict(weight=[np.ones(len(t), np.float32) for t in trajs])
    tree = build.build_tree(trajs, fields=fields)
    singles = [build.build_tree([t], fields=dict(weight=[w]))
               for t, w in zip(trajs, fields["weight"])]
    tree_arrays, tree_visited = prepare([tree], tree.n_tree)
    flat_len = max(len(t) for t in trajs)  # no padding beyond the longest trajectory
    variants = {("tree", chunk): [tree_arrays] for chunk in chunk_values}
    for rows in sorted({int(r) for r in FLAGS.flat_rows.split(",")}):
      if rows > len(singles) or len(singles) % rows:
        continue
      chunks = [prepare(singles[i:i + rows], flat_len) for i in range(0, len(singles), rows)]
      flat_visited = chunks[0][1]
      for chunk in chunk_values:
        variants[("flat", rows, chunk)] = [arrays for arrays, _ in chunks]
    # Sweep: every variant compiled, warmed up and timed --sweep_rounds times round-robin (the
    # fastest of each side wins; the flat side has more variants, so selection noise favours the
    # baseline). Then the two winners alternate for --repeats rounds: the figures are their fastest
    # times, and the median of the per-round ratios is reported beside them (robust to load
    # drifting during the run).
    for key, batches in variants.items():
      run(key[-1], batches)  # compile + warm up
    sweep = {key: float("inf") for key in variants}
    for _ in range(FLAGS.sweep_rounds):
      for key, batches in variants.items():
        sweep[key] = min(sweep[key], timed(key, batches))
    flat_key = min((k for k in sweep if k[0] == "flat"), key=sweep.get)
    tree_key = min((k for k in sweep if k[0] == "tree"), key=sweep.get)
    flat_runs, tree_runs = [], []
    for _ in range(FLAGS.repeats):
      flat_runs.append(timed(flat_key, variants[flat_key]))
      tree_runs.append(timed(tree_key, variants[tree_key]))
    flat_s, tree_s = min(flat_runs), min(tree_runs)
    median_speedup = float(np.median(np.array(flat_runs) / np.array(tree_runs)))
    bound = 1.0 / (1.0 - tree.por)
    flat_work = sum(flops_per_token * len(s.tokens) + flops_per_pair * visible_pairs(s)
                    for s in singles)
    tree_work = flops_per_token * tree.n_tree + flops_per_pair * visible_pairs(tree)
    work_bound = flat_work / tree_work
    print(json.dumps(dict(
        case=case, por=tree.por, bound=bound, flat_s=flat_s, tree_s=tree_s,
        speedup=flat_s / tree_s, efficiency=flat_s / tree_s / bound, work_bound=work_bound,
        median_speedup=median_speedup, median_efficiency=median_speedup / bound,
        work_efficiency=flat_s / tree_s / work_bound, attention_impl=FLAGS.attention_impl,
        preset=FLAGS.preset, n_flat=tree.n_flat, n_tree=tree.n_tree,
        num_trajectories=len(trajs), flat_best_rows=flat_key[1], flat_best_token_chunk=flat_key[2],
        tree_best_token_chunk=tree_key[1],
        sweep_flat_s_by_rows_and_chunk={f"{k[1]}/{k[2]}": v for k, v in sweep.items()
                                        if k[0] == "flat"},
        sweep_tree_s_by_chunk={str(k[1]): v for k, v in sweep.items() if k[0] == "tree"},
        flat_visited_block_fraction=flat_visited, tree_visited_block_fraction=tree_visited,
        device=str(jax.devices()[0].device_kind))), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
