"""Benchmark: how much training signal entropy-budget pruning keeps, on trees sampled from a model.

    python -m experiments.bench_prune_signal [--workdir=DIR] [--budgets=0.1,0.2,...,1.0]
        [--random_seeds=8] [--num_tasks=4] [--branches=4,4] [--turn_tokens=24,24]

``--workdir`` is a trained tree-SFT workdir (checkpoints/ and tokenizer/, see
``configs/sft_tiny_tree.py``); without it the script first trains ``--config`` (default
``configs/sft_tiny_tree.py``) for ``--train_steps`` steps into a temporary workdir (corpus and
tokenizer built there too).

**Trees.** For ``--num_tasks`` held-out procedural task prompts (``chat.render_prompt`` of the spec,
ending ``<|im_start|>assistant\\n``), the model's KV-cache sampler at temperature 1 grows a
multi-level tree: ``branches[0]`` continuations of ``turn_tokens[0]`` tokens from the prompt, then
``branches[1]`` continuations of ``turn_tokens[1]`` tokens from each, ... (no stop tokens: every
turn has exactly its length). One tree per prompt (``build_tree``), with per-trajectory fields
``weight`` (0 on prompt tokens, 1 on sampled tokens: the trained pairs) and ``entropy`` (the
sampler's entropy of the distribution each token was drawn from; 0 on prompt tokens). Sampled
tokens between ``<tool_call>``/``</tool_call>``, ``<tool_response>``/``</tool_response>`` and
``<memory>``/``</memory>`` (inclusive) are tagged as events, as ``chat.render`` tags them; the
prompt keeps its rendered tags.

**Pruning.** At each budget fraction f (tokens per tree = floor(f · tree tokens), prompt tokens
included) three keep masks: ``entropy`` (``prune_nodes`` with ``default_prune_config()``),
``random`` (``prune_random``: i.i.d. node scores, same units / closure / budget; mean over
``--random_seeds`` seeds) and ``longest_path`` (``prune_longest_path``).

**Measured** (over the whole batch of trees; a pair = one trajectory's next-token prediction of a
sampled token, so a token shared by n trajectories counts n times, exactly as in the flat loss):

* ``kept_token_fraction``  kept tree tokens / tree tokens;
* ``kept_pair_fraction``   kept trained pairs / trained pairs;
* ``entropy_fraction``     Σ over kept trained pairs of the predicted token's sampling entropy / the
                           same sum over all trained pairs;
* ``grad_norm_ratio``      ‖∇θ N_keep‖ / ‖∇θ N_full‖ and ``grad_cosine`` cos(∇θ N_keep, ∇θ N_full),
                           where N is the numerator of the ``tree`` loss (objective ``nll``: the
                           summed NLL of the pairs, gated by the ``keep`` mask in the batch) and θ
                           all model parameters (float64 dot products of the float32 gradients).

One JSON object per (method, budget) on stdout; with ``--write_docs`` the table goes to
``docs/prune_signal.md`` (the text under its ``## Interpretation`` heading is kept across runs) and
the plot to ``docs/prune_signal.png``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kat_jax.tree import batch as batch_lib
from kat_jax.tree import prune
from kat_jax.tree.sampled import event_span_ids, sample_trees
from kat_jax.tree.logprobs import batch_to_arrays
from configs.base import train_config

METHODS = ("entropy", "random", "longest_path")
DEFAULT_BUDGETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
INTERPRETATION_HEADING = "## Interpretation"


# ------------------------------------------------------------------------------------ trees

def level_mean_entropies(trees: Sequence, prompt_lengths: Sequence[int],
                         turn_tokens: Sequence[int]) -> list:
  """Mean sampling entropy of each level's tokens, over trajectories (a token shared by n
  trajectories counts n times, as the trained pairs do)."""
  edges = np.cumsum([0] + list(turn_tokens))
  out = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    values = np.concatenate([t.fields["entropy"][:, p + lo:p + hi].ravel()
                             for t, p in zip(trees, prompt_lengths)])
    out.append(float(np.mean(values)))
  return out


# ------------------------------------------------------------------------- pruning + signal

def prune_config(budget_fraction: float) -> ml_collections.ConfigDict:
  """``default_prune_config()`` switched on at ``budget_fraction`` of each tree's tokens."""
  c = prune.default_prune_config()
  c.enabled = True
  c.budget_fraction = float(budget_fraction)
  return c


def keep_mask(batch: dict, entropies_bt: jax.Array, method: str, budget_fraction: float,
              seed: int = 0) -> prune.PruneResult:
  """The keep mask (and metrics) of ``method`` at ``budget_fraction`` (see ``METHODS``)."""
  config = prune_config(budget_fraction)
  if method == "entropy":
    return prune.prune_nodes(batch, entropies_bt, config)
  if method == "random":
    return prune.prune_random(batch, config, jax.random.PRNGKey(seed), entropies_bt)
  if method == "longest_path":
    return prune.prune_longest_path(batch, config, entropies_bt)
  raise ValueError(f"unknown method {method!r}: use one of {METHODS}")


def make_grad_fn(apply_fn: Callable) -> Callable:
  """jitted ``(params, batch, keep_bt) -> float32 [P]``: gradient of the ``tree`` loss numerator
  (objective nll: summed NLL of the trained pairs whose predicted token is kept), flattened."""
  from jax.flatten_util import ravel_pytree
  from kat_jax.train import losses
  loss = losses.get_loss("tree")
  train_cfg = train_config(objective="nll")
  ctx = losses.LossContext(apply_fn=apply_fn, config=train_cfg)

  @jax.jit
  def grad_fn(params, batch, keep_bt):
    numerator = lambda p: loss.numerator(p, {**batch, "keep": keep_bt}, ctx)[0]
    return ravel_pytree(jax.grad(numerator)(params))[0]

  return grad_fn


def signal_retention(apply_fn: Callable, params, trees: Sequence, *,
                     budgets: Sequence[float] = DEFAULT_BUDGETS, random_seeds: int = 8,
                     methods: Sequence[str] = METHODS, grad_fn: Optional[Callable] = None) -> list:
  """One record per (method, budget): kept token / pair / entropy fractions and the gradient's
  norm ratio and cosine against the unpruned gradient (module docstring). Random: mean over
  ``random_seeds`` seeds, with ``*_std`` (population std) beside each mean. ``grad_fn``: a
  ``make_grad_fn(apply_fn)`` to reuse (one compilation across calls)."""
  tb = batch_lib.batch_trees(trees)
  batch = jax.tree.map(jnp.asarray, batch_to_arrays(tb))
  entropies_bt = batch_lib.per_tree_token(batch, batch["field/entropy"])  # shared tokens share it
  host = jax.device_get(batch)
  pair_w = host["field/weight"][..., 1:] * host["pred_valid"]           # trained pairs [B, K, L-1]
  pair_e = host["field/entropy"][..., 1:].astype(np.float64)
  bidx = np.arange(pair_w.shape[0])[:, None, None]
  label_rows = host["pred_label_rows"]
  total_w = float(np.sum(pair_w, dtype=np.float64))
  total_e = float(np.sum(pair_w * pair_e))
  if total_w <= 0 or total_e <= 0:
    raise ValueError(f"the trees have {total_w} trained pairs with total entropy {total_e}: need "
                     "sampled tokens (weight 1) with positive entropy")
  valid_bt = batch["token_valid"]
  n_tokens = float(np.sum(host["token_valid"]))
  grad_fn = grad_fn or make_grad_fn(apply_fn)
  full = np.asarray(grad_fn(params, batch, valid_bt), np.float64)
  full_sq = float(full @ full)

  def measure(keep_bt) -> dict:
    keep_np = np.asarray(keep_bt)
    kept_pairs = keep_np[bidx, label_rows]
    g = np.asarray(grad_fn(params, batch, keep_bt), np.float64)
    g_sq, dot = float(g @ g), float(g @ full)
    return {
        "kept_token_fraction": float(np.sum(keep_np & host["token_valid"])) / n_tokens,
        "kept_pair_fraction": float(np.sum(pair_w * kept_pairs, dtype=np.float64)) / total_w,
        "entropy_fraction": float(np.sum(pair_w * pair_e * kept_pairs)) / total_e,
        "grad_norm_ratio": float(np.sqrt(g_sq / full_sq)),
        "grad_cosine": dot / float(np.sqrt(g_sq * full_sq)) if g_sq > 0 else 0.0,
    }

  common = {"trees": len(trees), "tree_tokens": int(n_tokens), "trained_pairs": int(total_w),
            "flat_tokens": int(sum(t.n_flat for t in trees))}
  records = []
  for method in methods:
    for f in budgets:
      seeds = range(random_seeds) if method == "random" else (0,)
      runs = []
      for seed in seeds:
        result = keep_mask(batch, entropies_bt, method, f, seed)
        runs.append(measure(result.keep_mask))
      record = {"case": "prune_signal", "method": method, "budget_fraction": float(f)}
      for key in runs[0]:
        values = [r[key] for r in runs]
        record[key] = statistics.fmean(values) if len(values) > 1 else values[0]
        if method == "random":
          record[f"{key}_std"] = statistics.pstdev(values)
      record["seeds"] = len(runs)
      record.update(common)
      records.append(record)
  return records


# ----------------------------------------------------------------------------------- docs

def plot(records: Sequence[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = (("entropy_fraction", "retained entropy fraction (trained pairs)"),
            ("grad_cosine", "cos(pruned grad, full grad)"),
            ("kept_pair_fraction", "kept fraction of trained pairs"),
            ("grad_norm_ratio", "‖pruned grad‖ / ‖full grad‖"))
  styles = {"entropy": dict(color="C0", marker="o"), "random": dict(color="C1", marker="s"),
            "longest_path": dict(color="C2", marker="^")}
  fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
  axes = axes.ravel()
  for ax, (key, title) in zip(axes, panels):
    for method in METHODS:
      rows = [r for r in records if r["method"] == method]
      if not rows:
        continue
      x = [r["budget_fraction"] for r in rows]
      y = np.array([r[key] for r in rows])
      label = method + (f" (mean of {rows[0]['seeds']} seeds ±1 std)" if method == "random" else "")
      ax.plot(x, y, label=label, **styles[method])
      if f"{key}_std" in rows[0]:
        s = np.array([r[f"{key}_std"] for r in rows])
        ax.fill_between(x, y - s, y + s, color=styles[method]["color"], alpha=0.2)
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="y = budget")
    ax.set_xlabel("token budget (fraction of tree tokens)")
    ax.set_title(title)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
  axes[0].legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt(r: Optional[dict], key: str) -> str:
  if r is None:
    return "—"
  if f"{key}_std" in r:
    return f"{r[key]:.3f} ± {r[key + '_std']:.3f}"
  return f"{r[key]:.3f}"


def markdown_tables(records: Sequence[dict]) -> str:
  """Two markdown tables (token / pair / entropy fractions; gradient cosine and norm ratio), one
  row per budget, one column per method (E / R / L)."""
  by = {(r["method"], r["budget_fraction"]): r for r in records}
  budgets = sorted({r["budget_fraction"] for r in records})
  methods = [m for m in METHODS if any(r["method"] == m for r in records)]
  letters = {"entropy": "E", "random": "R", "longest_path": "L"}
  same_tokens = all(len({round(by[(m, f)]["kept_token_fraction"], 12) for m in methods}) == 1
                    for f in budgets)
  groups = [
      [("kept_token_fraction", "kept tokens" + (" (all)" if same_tokens else ""))],
      [("kept_pair_fraction", "kept pairs"), ("entropy_fraction", "entropy retained")],
      [("grad_cosine", "grad cosine"), ("grad_norm_ratio", "grad norm ratio")],
  ]
  tables = []
  for cols in (groups[0] + groups[1], groups[2]):
    head, keys = ["budget"], []
    for key, name in cols:
      ms = methods[:1] if key == "kept_token_fraction" and same_tokens else methods
      head += [name if len(ms) == 1 else f"{name}: {letters[m]}" for m in ms]
      keys += [(key, m) for m in ms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in budgets:
      lines.append("| " + " | ".join([f"{f:.1f}"] + [_fmt(by.get((m, f)), key)
                                                     for key, m in keys]) + " |")
    tables.append("\n".join(lines))
  return "\n\n".join(tables)


def write_markdown(path: str, records: Sequence[dict], setup: dict, command: str,
                   png_name: str) -> None:
  """Writes the measured part; keeps the existing text under ``## Interpretation``."""
  kept = ""
  if os.path.exists(path):
    text = open(path).read()
    if INTERPRETATION_HEADING in text:
      kept = text[text.index(INTERPRETATION_HEADING):].rstrip() + "\n"
  r0 = records[0]
  body = f"""# Signal retained by entropy-budget pruning (sampled trees, tiny model)

Written by `experiments/bench_prune_signal.py` (see its module docstring). Command:

```
{command}
```

**Setup.** {setup['description']} In all: {r0['trees']} trees, {r0['tree_tokens']} tree tokens
({setup['prompt_tokens']} of them prompt tokens, never trained), {r0['flat_tokens']} flat tokens
(POR {setup['por']:.3f}), {r0['trained_pairs']} trained pairs, {setup['event_tokens']} sampled
tokens tagged as events. Mean sampling entropy of the trained pairs {setup['mean_entropy']:.3f}
nats (by level: {setup['level_entropy']}). {setup['timing']}

**Methods** at the same per-tree token budget floor(f · tree tokens) (prompt tokens count):
E = `entropy` (`prune_nodes`, `default_prune_config()`), R = `random` (`prune_random`, mean ± std
over {setup['random_seeds']} seeds, population std), L = `longest_path` (`prune_longest_path`).

**Measured** (whole batch; a pair is one trajectory's prediction of one sampled token, so a token
shared by n trajectories counts n times, as in the flat loss):
- *kept pairs*: kept trained pairs / trained pairs;
- *entropy retained*: Σ over kept trained pairs of the predicted token's sampling entropy /
  the same sum over all trained pairs;
- *grad cosine*, *grad norm ratio*: cos(g_keep, g_full) and ‖g_keep‖ / ‖g_full‖, where g is the
  gradient over all model parameters of the `tree` loss numerator (objective `nll`: summed NLL of
  the trained pairs whose predicted token is kept; `keep` in the batch), at the sampled model.

![retained entropy fraction, gradient cosine and norm ratio vs budget](./{png_name})

{markdown_tables(records)}

"""
  with open(path, "w") as f:
    f.write(body + (kept or f"{INTERPRETATION_HEADING}\n\n(to be written)\n"))


# ------------------------------------------------------------------------------------ CLI

def _define_flags() -> dict:
  """The CLI flags, defined only when run as a program (importing the module defines none)."""
  from absl import flags
  from ml_collections import config_flags
  return {
      "config": config_flags.DEFINE_config_file(
          "config", "configs/sft_tiny_tree.py", "Tree-SFT experiment config (as trained)."),
      "workdir": flags.DEFINE_string(
          "workdir", None, "Trained workdir (checkpoints/, tokenizer/); default: train --config "
          "for --train_steps steps into a temporary workdir first."),
      "train_steps": flags.DEFINE_integer("train_steps", 60, "Steps when training first."),
      "num_tasks": flags.DEFINE_integer("num_tasks", 4, "Prompts = trees."),
      "split": flags.DEFINE_string("split", "heldout", "Procedural split of the prompts."),
      "branches": flags.DEFINE_list("branches", ["4", "4"], "Continuations per node, per level."),
      "turn_tokens": flags.DEFINE_list("turn_tokens", ["24", "24"], "Tokens per turn, per level."),
      "budgets": flags.DEFINE_list("budgets", [str(b) for b in DEFAULT_BUDGETS],
                                   "Budget fractions."),
      "random_seeds": flags.DEFINE_integer("random_seeds", 8, "Seeds of the random baseline."),
      "seed": flags.DEFINE_integer("seed", 0, "Task and sampling seed."),
      "write_docs": flags.DEFINE_bool("write_docs", True,
                                      "Write docs/prune_signal.md and docs/prune_signal.png."),
      "docs_dir": flags.DEFINE_string("docs_dir", "docs", "Where the .md and .png go."),
  }


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def run(config, workdir: Optional[str], args) -> list:
  from kat_jax.data import chat, tokenizer as tokenizer_lib
  from kat_jax.data.procedural import generate
  from kat_jax.sample import Sampler
  from kat_jax.train import loop
  from kat_jax.workdir import find_tokenizer_dir

  start = time.perf_counter()
  train_s = 0.0
  if workdir is None:
    workdir = tempfile.mkdtemp(prefix="kat_prune_signal_")
    config.data.data_dir = os.path.join(workdir, "tfds")
    config.train.update(dict(steps=args["train_steps"], warmup_steps=min(
        config.train.warmup_steps, max(args["train_steps"] // 4, 1)), eval_every=0,
        checkpoint_every=args["train_steps"], progress_bar=False,
        log_every=max(args["train_steps"] // 3, 1)))
    _log(f"training {config.stage} for {args['train_steps']} steps in {workdir} (kept; reuse it "
         f"with --workdir={workdir})")
    result = loop.train(config, workdir)
    train_s = time.perf_counter() - start
    _log(f"trained: step {result['step']}, loss {result.get('train_loss', float('nan')):.3f} "
         f"({train_s:.0f}s)")
  tokenizer = tokenizer_lib.load_tokenizer(find_tokenizer_dir(workdir, config))
  state, model, _, step = loop.load_state(config, workdir)
  tasks = generate.generate_tasks(args["seed"], args["num_tasks"], split=args["split"])
  rendered = [chat.render_prompt(generate.task_to_conversation(t).prefix(1), tokenizer)
              for t in tasks]
  prompts = [r.tokens.tolist() for r in rendered]
  branches = [int(b) for b in args["branches"]]
  turn_tokens = [int(n) for n in args["turn_tokens"]]
  sampler = Sampler(model, state.params, max_len=max(map(len, prompts)) + sum(turn_tokens) + 1)
  vocab_limit = tokenizer.vocab_size if tokenizer.vocab_size < model.cfg.vocab_size else 0
  t0 = time.perf_counter()
  trees = sample_trees(sampler, prompts, [r.event_tags for r in rendered],
                       jax.random.key(args["seed"]), branches=branches, turn_tokens=turn_tokens,
                       span_ids=event_span_ids(tokenizer), vocab_limit=vocab_limit)
  _log(f"sampled {len(trees)} trees in {time.perf_counter() - t0:.1f}s")
  budgets = [float(b) for b in args["budgets"]]
  t0 = time.perf_counter()
  records = signal_retention(model.apply, state.params, trees, budgets=budgets,
                             random_seeds=args["random_seeds"])
  _log(f"measured {len(records)} cases in {time.perf_counter() - t0:.1f}s")
  for r in records:
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}),
          flush=True)
  if args["write_docs"]:
    sampled = np.concatenate([t.fields["entropy"][t.fields["weight"] > 0] for t in trees])  # pairs
    n_prompt = sum(len(p) for p in prompts)
    event_tokens = sum(int(np.sum(t.tags[t.positions >= len(p)] > 0))
                       for t, p in zip(trees, prompts))
    setup = {
        "description": (
            f"Checkpoint step {step} of `{config.stage}` (tiny preset). {len(prompts)} "
            f"{args['split']} procedural task prompts (seed {args['seed']}); per prompt the "
            f"KV-cache sampler at temperature 1 (no top-k/top-p, no stop tokens) grows a tree of "
            f"{' × '.join(map(str, branches))} continuations of "
            f"{' + '.join(map(str, turn_tokens))} tokens ({int(np.prod(branches))} trajectories "
            f"per tree); per-token entropies are the sampler's."),
        "prompt_tokens": n_prompt,
        "por": 1.0 - sum(t.n_tree for t in trees) / sum(t.n_flat for t in trees),
        "event_tokens": event_tokens,
        "mean_entropy": float(np.mean(sampled)),
        "level_entropy": " / ".join(f"{e:.3f}" for e in level_mean_entropies(
            trees, [len(p) for p in prompts], turn_tokens)),
        "random_seeds": args["random_seeds"],
    }
    setup["timing"] = (f"Wall time {time.perf_counter() - start:.0f} s on a shared 2-core CPU"
                       + (f" ({train_s:.0f} s of it training)." if train_s else "."))
    os.makedirs(args["docs_dir"], exist_ok=True)
    png = os.path.join(args["docs_dir"], "prune_signal.png")
    plot(records, png)
    command = "python -m experiments.bench_prune_signal " + " ".join(sys.argv[1:])
    write_markdown(os.path.join(args["docs_dir"], "prune_signal.md"), records, setup,
                   command.strip(), os.path.basename(png))
    _log(f"wrote {png} and prune_signal.md ({time.perf_counter() - start:.0f}s in all)")
  return records


def main(argv):
  del argv
  args = {name: flag.value for name, flag in _FLAGS.items()}
  run(args.pop("config"), args.pop("workdir"), args)


if __name__ == "__main__":
  from absl import app
  _FLAGS = _define_flags()
  app.run(main)
