"""Benchmark: tree attention implementations, forward + backward, on trees and flat sequences.

    python -m experiments.bench_attention [--sizes=1024,2048] [--pors=0.5,0.75] [--repeats=5]

For each synthetic trajectory tree (about ``size`` tokens, prefix-overlap ratio ``por``) it times
``jit(value_and_grad)`` of a weighted sum of the attention output for

* ``xla``          dense masked attention (``kat_jax.model.attention.dense_attention``),
* ``reference``    blockwise scan, every key block (``kernels.tree_attention.reference``),
* ``blocksparse``  visited key blocks only (``kernels.tree_attention.blocksparse``),

on three inputs: ``tree`` (the serialized tree, one row of T tokens), ``flat_same_tokens`` (one
causal sequence of the same T tokens: what a block-skipping kernel does without a tree) and
``flat_trajectories`` (the tree's trajectories as a flat batch, one causal row each: what tree
training replaces; only the block-sparse path, which skips above the causal diagonal, is the fair
baseline there). Every (input, implementation) pair of a tree is timed in one round robin of
``--repeats`` rounds, the compared pair back to back, every other round in reverse order. Each input prints one JSON object with the fastest (``seconds``) and median
(``median_seconds``) wall time of one forward+backward and its work counted three ways
(``work_counts``: visible (query, key) pairs, visited (query block, key block) tiles, and the
key-block tile slots the block-sparse path computes, chunk padding included), then one
``tree_vs_flat_trajectories`` object per block-skipping implementation: the speedup (median of
the per-round flat/tree ratios) beside the token ratio (1 / (1 - POR)), the visible-pair ratio
and the block ratios, and ``efficiency`` = speedup / the ratio of the work that implementation
computes (slots for ``blocksparse``, visited tiles for ``pallas``). The token ratio is not a bound
on attention: a shared prompt token attends to fewer keys than the average flat token, so the
attention work shrinks by less than the token count. Efficiency above 1 means the flat side pays
more per unit of work than the tree (per-row overhead), not that the tree beat its work.

Two more implementations are meant for accelerators (``--impls=...,pallas,flash``):

* ``pallas``  the Pallas kernel of the backend (``kernels.tree_attention.pallas``: Triton on GPU,
              Mosaic on TPU); refused on CPU, where it only interprets (a correctness tool);
* ``flash``   ``jax.nn.dot_product_attention(is_causal=True)`` — the platform's causal flash
              attention (cuDNN on GPU in bfloat16), timed on the ``flat_same_tokens`` case only: a
              causal kernel over the same token count, the yardstick for the tree kernel.

On a GPU: ``python -m experiments.bench_attention --impls=xla,blocksparse,pallas,flash
--dtype=bfloat16``.
"""
from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kat_jax.model.attention import AttentionMask, dense_attention, intervals_from_segment_ids
from kernels.tree_attention import blocksparse, layout, pallas, reference, synthetic
from kernels.tree_attention.layout import BlockSizes

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  flags.DEFINE_list("sizes", ["1024", "2048", "4096"], "approximate tree sizes in tokens")
  flags.DEFINE_list("pors", ["0.5", "0.75"], "target prefix-overlap ratios")
  flags.DEFINE_integer("trajectories", 8, "trajectories per tree")
  flags.DEFINE_integer("heads", 8, "query heads")
  flags.DEFINE_integer("kv_heads", 2, "key/value heads")
  flags.DEFINE_integer("head_dim", 64, "head dimension")
  flags.DEFINE_integer("block", 64, "block size (queries and keys)")
  flags.DEFINE_integer("chunk_width", layout.DEFAULT_CHUNK_WIDTH, "key blocks per chunk")
  flags.DEFINE_integer("repeats", 5, "timed runs per case (after one warm-up)")
  flags.DEFINE_list("impls", ["xla", "reference", "blocksparse"],
                    "implementations to time: xla, reference, blocksparse, pallas, flash")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of q, k, v")
  flags.DEFINE_integer("max_dense_tokens", 4096, "skip the dense xla path above this many tokens")
  flags.DEFINE_integer("seed", 0, "tree seed")


def make_tree(rng, size: int, por: float, num_trajectories: int):
  """Trajectories whose trie has about ``size`` tokens and POR about ``por``."""
  # With K trajectories forking at a mean fraction f of their length L:
  # N_tree ~ L (1 + (K-1)(1-f)) and POR ~ f (K-1)/K.
  k = num_trajectories
  f = min(max(por * k / (k - 1), 0.05), 0.95)
  length = max(int(round(size / (1 + (k - 1) * (1 - f)))), 8)
  spread = min(0.1, f, 1 - f)
  return synthetic.random_trajectory_tree(rng, k, length, (f - spread, f + spread))


def _timed(fns, args, repeats):
  """{key: [wall seconds per round]}; one compile + warm-up run each, then round robin.

  Interleaving every (case, implementation) run by run spreads the load of a shared machine
  evenly, and lets ratios be taken round by round; every other round runs in reverse order, so
  neither side of a compared pair always goes first. Keys are run in the order given.
  """
  for key, fn in fns.items():
    jax.block_until_ready(fn(*args[key]))
  times = {key: [] for key in fns}
  order = list(fns)
  for round_index in range(repeats):
    for key in (order if round_index % 2 == 0 else order[::-1]):
      start = time.perf_counter()
      jax.block_until_ready(fns[key](*args[key]))
      times[key].append(time.perf_counter() - start)
  return times


def _fwd_bwd(attention):
  def loss(q, k, v, mask, w):
    return jnp.sum(attention(q, k, v, mask).astype(jnp.float32) * w)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def work_counts(tin, tout, blocks, chunks_per_step: int = blocksparse.CHUNKS_PER_STEP) -> dict:
  """What attention over ``tin``/``tout`` [B, T] costs, counted three ways (forward; the
  backward repeats the same visits):

  * ``visible_pairs``: (query, key) pairs with the key visible — the exact work;
  * ``visited_blocks``: (query block, key block) tiles holding a visible pair — what a
    block-skipping kernel visiting exactly those tiles computes (the Pallas kernels);
  * ``computed_block_slots``: key-block tile slots the block-sparse XLA path computes: every
    chunk of ``chunk_width`` slots (partly filled chunks included), the chunk count padded to a
    multiple of ``chunks_per_step``.
  """
  tin, tout = np.asarray(tin), np.asarray(tout)
  visible = ((tin[:, None, :] <= tin[:, :, None]) & (tin[:, :, None] < tout[:, None, :])).sum()
  b, capacity, width = blocks["fwd_chunk_kv"].shape
  return dict(tokens=int((tout > tin).sum()), visible_pairs=int(visible),
              visited_blocks=int(np.asarray(blocks["kv_counts"]).sum()),
              computed_block_slots=int(b * (-(-capacity // chunks_per_step) * chunks_per_step)
                                       * width))


def prepare_case(name, tin, tout, meta, block_sizes):
  """(record without timings, {impl: jitted fwd+bwd}, {impl: its arguments}) of one input."""
  b, t = tin.shape
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  dtype = jnp.dtype(FLAGS.dtype)
  q = jax.random.normal(keys[0], (b, t, FLAGS.heads, FLAGS.head_dim), dtype)
  k = jax.random.normal(keys[1], (b, t, FLAGS.kv_heads, FLAGS.head_dim), dtype)
  v = jax.random.normal(keys[2], (b, t, FLAGS.kv_heads, FLAGS.head_dim), dtype)
  w = jax.random.normal(keys[3], q.shape, jnp.float32)
  blocks = layout.block_layout(tin, tout, block_sizes.block_q, block_sizes.block_k,
                               chunk_width=FLAGS.chunk_width)
  work = work_counts(tin, tout, blocks)
  record = dict(case=name, **meta, batch=b, tokens_per_row=t, heads=FLAGS.heads,
                kv_heads=FLAGS.kv_heads, head_dim=FLAGS.head_dim, block=FLAGS.block,
                dtype=FLAGS.dtype,
                chunk_width=FLAGS.chunk_width,
                visited_block_fraction=round(layout.visited_fraction(blocks), 4),
                visible_pair_fraction=round(work["visible_pairs"] / (b * t * t), 4),
                **work, seconds={}, median_seconds={})
  mask_plain = AttentionMask(tin=jnp.asarray(tin), tout=jnp.asarray(tout))
  mask_blocks = mask_plain.replace(blocks=blocks)
  impls = {
      "xla": (dense_attention, mask_plain),
      "reference": (lambda *a: reference.tree_attention(*a, block_k=block_sizes.block_k),
                    mask_plain),
      "blocksparse": (lambda *a: blocksparse.tree_attention(*a, block_sizes=block_sizes),
                      mask_blocks),
      "pallas": (lambda *a: pallas.tree_attention(*a, block_sizes=block_sizes), mask_blocks),
      # Causal attention over the same tokens, ignoring the mask argument (flat_same_tokens only).
      "flash": (lambda q, k, v, mask: jax.nn.dot_product_attention(q, k, v, is_causal=True),
                mask_plain),
  }
  fns, args = {}, {}
  for impl in FLAGS.impls:
    if impl == "xla" and t > FLAGS.max_dense_tokens:
      continue
    if name == "flat_trajectories" and impl not in ("blocksparse", "pallas"):
      continue
    if impl == "flash" and name != "flat_same_tokens":
      continue
    fn, mask = impls[impl]
    fns[impl], args[impl] = _fwd_bwd(fn), (q, k, v, mask, w)
  return record, fns, args


# The work each tree-vs-flat comparison is held against: what that implementation computes.
_WORK_OF_IMPL = {"blocksparse": "computed_block_slots", "pallas": "visited_blocks"}


def compare_tree_with_flat(tree: dict, flat: dict, times: dict, meta: dict) -> list[dict]:
  """Per block-skipping implementation timed on both: the flat/tree speedup (median of the
  per-round ratios, and of the fastest runs) beside the token, visible-pair and block ratios,
  with the efficiency against each (speedup / ratio)."""
  ratios = {f"{key}_ratio": flat[key] / tree[key] for key in
            ("tokens", "visible_pairs", "visited_blocks", "computed_block_slots")}
  out = []
  for impl, work in _WORK_OF_IMPL.items():
    tree_t, flat_t = times.get(("tree", impl)), times.get(("flat_trajectories", impl))
    if not tree_t or not flat_t:
      continue
    speedup = statistics.median(f / t for f, t in zip(flat_t, tree_t))
    out.append(dict(
        case="tree_vs_flat_trajectories", impl=impl, **meta, rounds=len(tree_t),
        tree_median_s=round(statistics.median(tree_t), 6),
        flat_median_s=round(statistics.median(flat_t), 6),
        speedup=round(speedup, 3), speedup_fastest=round(min(flat_t) / min(tree_t), 3),
        **{key: round(value, 4) for key, value in ratios.items()},
        work=work, work_ratio=round(ratios[f"{work}_ratio"], 4),
        efficiency=round(speedup / ratios[f"{work}_ratio"], 3),
        pair_efficiency=round(speedup / ratios["visible_pairs_ratio"], 3),
        token_efficiency=round(speedup / ratios["tokens_ratio"], 3)))
  return out


def run_size(rng, size: int, por_target: float, block_sizes) -> list[dict]:
  """Times every (input, implementation) of one tree in one round robin; prints and returns the
  records: one per input, then the tree-vs-flat comparisons."""
  paths = make_tree(rng, size, por_target, FLAGS.trajectories)
  _, tree_tin, tree_tout = synthetic.trie_intervals(paths)
  n_tree, n_flat = tree_tin.size, sum(len(p) for p in paths)
  meta = dict(tree_tokens=n_tree, flat_tokens=n_flat, por=round(1 - n_tree / n_flat, 4),
              device=jax.devices()[0].platform)
  inputs = {}
  t = layout.num_blocks(n_tree, FLAGS.block) * FLAGS.block
  inputs["tree"] = synthetic.pack_rows([[(tree_tin, tree_tout)]], t)
  seg = np.zeros((1, t), np.int32)
  seg[0, :n_tree] = 1
  flat = intervals_from_segment_ids(jnp.asarray(seg))
  inputs["flat_same_tokens"] = np.asarray(flat.tin), np.asarray(flat.tout)
  length = layout.num_blocks(max(len(p) for p in paths), FLAGS.block) * FLAGS.block
  seg = np.zeros((len(paths), length), np.int32)
  for row, path in enumerate(paths):
    seg[row, :len(path)] = 1
  flat = intervals_from_segment_ids(jnp.asarray(seg))
  inputs["flat_trajectories"] = np.asarray(flat.tin), np.asarray(flat.tout)
  records, fns, args = {}, {}, {}
  for name, (tin, tout) in inputs.items():
    records[name], case_fns, case_args = prepare_case(name, tin, tout, meta, block_sizes)
    fns.update({(name, impl): fn for impl, fn in case_fns.items()})
    args.update({(name, impl): a for impl, a in case_args.items()})
  # By implementation, the compared pair (tree, flat_trajectories) side by side.
  cases, impls = ["tree", "flat_trajectories", "flat_same_tokens"], list(FLAGS.impls)
  order = sorted(fns, key=lambda key: (impls.index(key[1]), cases.index(key[0])))
  times = _timed({key: fns[key] for key in order}, args, FLAGS.repeats)
  for (name, impl), ts in times.items():
    records[name]["seconds"][impl] = round(min(ts), 6)
    records[name]["median_seconds"][impl] = round(statistics.median(ts), 6)
  out = list(records.values()) + compare_tree_with_flat(records["tree"],
                                                        records["flat_trajectories"], times, meta)
  for record in out:
    print(json.dumps(record), flush=True)
  return out


def main(argv):
  del argv
  unknown = set(FLAGS.impls) - {"xla", "reference", "blocksparse", "pallas", "flash"}
  if unknown:
    raise app.UsageError(f"--impls has unknown implementation(s) {sorted(unknown)}: choose among "
                         f"xla, reference, blocksparse, pallas, flash")
  if "pallas" in FLAGS.impls and jax.default_backend() == "cpu":
    raise app.UsageError("--impls=pallas needs a GPU or TPU: on CPU the Pallas kernels only run "
                         "in interpret mode (a correctness tool, not a timing); drop 'pallas'")
  block_sizes = BlockSizes(FLAGS.block, FLAGS.block)
  rng = np.random.default_rng(FLAGS.seed)
  for size in map(int, FLAGS.sizes):
    for por_target in map(float, FLAGS.pors):
      run_size(rng, size, por_target, block_sizes)


if __name__ == "__main__":
  define_flags()
  app.run(main)
