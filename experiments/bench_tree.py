"""Tree training vs the flat batch: forward+backward of the small preset over agentic-shaped
trajectory sets, same loss code, same block-skipping attention, timed side by side in one run.

  python -m experiments.bench_tree [--preset=small --attention_impl=blocksparse --repeats=2]

Trajectory sets: a long shared prompt, then branching multi-turn continuations (a first turn per
branch, optionally forking again into second turns), sized for POR ≈ 0.5, 0.75 and 0.875.
The flat baseline is the strongest fair one: every trajectory its own row of a [K, L] batch, the
`tree` loss (identical code) over singleton trees, attention that skips key blocks above the causal
diagonal (the same block-sparse implementation, fed flat intervals), and its best batching: the K rows
are run as micro-batches of r rows for every r in --flat_rows (a power of two ≤ K; gradients summed),
and the fastest total is the baseline. One JSON object per case:
por, bound (= 1/(1-POR)), flat_s, tree_s, speedup, efficiency (= speedup / bound), attention_impl,
plus the token counts and the visited-block fraction of both layouts.
"""
import json
import time

import numpy as np
from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "small", "Model preset.")
_ATTN = flags.DEFINE_string("attention_impl", "blocksparse", "config.model.attention_impl")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repeats per case (best is kept).")
_CASES = flags.DEFINE_string("cases", "0.5,0.75,0.875", "Comma-separated POR targets.")
_FLAT_ROWS = flags.DEFINE_string("flat_rows", "1,2,4,8,16",
                                 "Flat micro-batch sizes (rows) to try; the fastest is the baseline.")

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


def _round(n, m=64):
  return -(-n // m) * m


def main(argv):
  del argv
  import jax
  import flax.linen as nn
  import jax.numpy as jnp
  import ml_collections
  from kat_jax.model import ModelConfig, Transformer, get_preset
  from kat_jax.train import losses
  from kat_jax.tree import batch as tree_batch, build
  from kat_jax.tree.logprobs import batch_to_arrays
  from kernels.tree_attention.layout import block_layout, visited_fraction

  c = get_preset(_PRESET.value)
  c.attention_impl = _ATTN.value
  cfg = ModelConfig.from_config(c)
  model = Transformer(cfg)
  tok = jnp.zeros((1, 8), jnp.int32)
  from kat_jax.model import intervals_from_segment_ids
  params = nn.unbox(model.init(jax.random.key(0), tok, tok,
                               intervals_from_segment_ids(jnp.ones_like(tok)))["params"])
  loss = losses.get_loss("tree")
  ctx = losses.LossContext(apply_fn=model.apply,
                           config=ml_collections.ConfigDict(dict(objective="nll")))
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss.numerator(p, b, ctx)[0]))

  def prepare(trees, t):
    arrays = batch_to_arrays(tree_batch.batch_trees(
        trees, max_tokens=t, max_nodes=max(x.num_nodes for x in trees),
        max_traj=max(x.num_traj for x in trees), max_len=max(x.max_len for x in trees)))
    arrays["attention_blocks"] = block_layout(arrays["tin"], arrays["tout"])
    return jax.tree.map(jnp.asarray, arrays), visited_fraction(arrays["attention_blocks"])

  def timed(batch):
    jax.block_until_ready(grad_fn(params, batch))        # compile + warm up
    best = float("inf")
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      jax.block_until_ready(grad_fn(params, batch))
      best = min(best, time.perf_counter() - t0)
    return best

  rng = np.random.default_rng(0)
  for case in _CASES.value.split(","):
    trajs = agentic_trajectories(rng, cfg.vocab_size, *SHAPES[case])
    fields = dict(weight=[np.ones(len(t), np.float32) for t in trajs])
    tree = build.build_tree(trajs, fields=fields)
    singles = [build.build_tree([t], fields=dict(weight=[w]))
               for t, w in zip(trajs, fields["weight"])]
    tree_arrays, tree_visited = prepare([tree], _round(tree.n_tree))
    flat_len = _round(max(len(t) for t in trajs))
    flat_times = {}
    for rows in sorted({int(r) for r in _FLAT_ROWS.value.split(",")}):
      if rows > len(singles) or len(singles) % rows:
        continue
      chunks = [prepare(singles[i:i + rows], flat_len) for i in range(0, len(singles), rows)]
      flat_visited = chunks[0][1]
      flat_times[rows] = sum(timed(arrays) for arrays, _ in chunks)
    best_rows = min(flat_times, key=flat_times.get)
    flat_s, tree_s = flat_times[best_rows], timed(tree_arrays)
    por = tree.por
    bound = 1.0 / (1.0 - por)
    print(json.dumps(dict(
        case=case, por=por, bound=bound, flat_s=flat_s, tree_s=tree_s, speedup=flat_s / tree_s,
        efficiency=flat_s / tree_s / bound, attention_impl=_ATTN.value, preset=_PRESET.value,
        n_flat=tree.n_flat, n_tree=tree.n_tree, num_trajectories=len(trajs),
        flat_best_rows=best_rows, flat_s_by_rows={str(k): v for k, v in flat_times.items()},
        flat_visited_block_fraction=flat_visited, tree_visited_block_fraction=tree_visited,
        device=str(jax.devices()[0].device_kind))), flush=True)


if __name__ == "__main__":
  app.run(main)
