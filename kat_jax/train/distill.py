"""Knowledge distillation: the ``distill`` loss, the frozen teacher and its precomputed top-k.

The loss (``config.train.loss='distill'``, settings in ``config.train.distill``) mixes the ordinary
next-token cross-entropy with a divergence D between the teacher's and the student's next-token
distributions at every weighted position::

    loss = (1 - alpha) · CE + alpha · T² · D(p_teacher^T, p_student^T) + z_loss · log Z²

where ``p^T = softmax(logits / T)`` (``temperature``; the T² keeps the gradient scale of the soft
targets independent of T) and D is ``forward_kl`` KL(p_t ‖ p_s), ``reverse_kl`` KL(p_s ‖ p_t) or
``jsd`` β·KL(p_t ‖ M) + (1-β)·KL(p_s ‖ M) with M = β·p_t + (1-β)·p_s (``jsd_beta``). Every term is
summed with the LM loss's weights (assistant-only masks) and divided by the LM loss's denominator,
so gradient accumulation and data parallelism stay exact (``kat_jax.train.losses``). ``alpha=0``
is the ``lm`` loss exactly.

Top-k (``top_k`` = k > 0): the teacher keeps only its k most likely ids S per position, its mass
renormalized over them (p̃_t); the student's log-probs at S are taken from its full log-softmax,
log p_s(S), a sub-distribution of mass m_s = Σ_S p_s. Each divergence is then
D(p̃_t, p̃_s) - log m_s with p̃_s the student renormalized over S: for ``forward_kl`` this is
exactly Σ_S p̃_t (log p̃_t - log p_s), the cross-entropy to the truncated teacher minus its
entropy; for all three the -log m_s term (≥ 0, zero when the student puts all its mass on S)
pulls the student's mass onto the teacher's support. With k = 0 (the whole vocabulary) m_s = 1
and D is the plain divergence, exactly 0 where the student equals the teacher.

Flat batches (``inputs`` / ``targets`` / ``weights``) and tree batches (``kat_jax.tree``) share one
implementation: D depends on a row's context only, so a tree computes it once per tree token (a
prompt shared by K trajectories is distilled once) and reads it for each prediction pair; the pairs
are reduced like the ``tree`` loss's (``config.train.loss_agg``: per-trajectory normalizers), so a
tree gives the flat batch's value and gradients.

Where the teacher's distribution comes from:

* in the step (``config.train.distill.teacher``: a kat_jax workdir[@step] or a Hugging Face
  checkpoint directory, of any size, with the student's tokenizer): ``load_teacher`` restores it
  frozen, sharded by the run's rules; the train step passes its params as a non-differentiated
  argument and the loss runs it (``LossContext.teacher``) under ``stop_gradient``, per
  micro-batch;
* precomputed (``config.train.distill.topk_data``): ``python -m experiments.distill_topk`` runs the
  teacher once over the stage's batches and stores each row's top-k ids and logits as a TFDS
  dataset (array_record) keyed by the row's tokens; the stage's data iterator then carries them as
  batch fields ``distill/topk_ids`` / ``distill/topk_logits`` [B, T, k] (``TeacherTopKIterator``)
  and the loss reads them — the same values the in-step teacher computes at the same k.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import sys
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.errors import ConfigError
from kat_jax.model.attention import intervals_from_segment_ids
from kat_jax.train import losses

NAME = "distill"
TOPK_IDS = "distill/topk_ids"          # int32 [B, T, k]: the teacher's top-k ids at each row
TOPK_LOGITS = "distill/topk_logits"    # float32 [B, T, k]: their raw logits (before temperature)


# ---------------------------------------------------------------------------------------------------
# Divergences between next-token distributions.
# ---------------------------------------------------------------------------------------------------

class TeacherRows(NamedTuple):
  """The teacher at each row: full logits [..., V] (``ids`` None) or its top-k ``ids`` and their
  ``logits`` [..., k], raw (the temperature is applied by ``divergence``)."""
  ids: Optional[jax.Array]
  logits: jax.Array


def _log_mixture(t, s, beta):
  """log(β·e^t + (1-β)·e^s), elementwise: t + log1p((1-β)·expm1(s - t)) where s <= t, else
  s + log1p(β·expm1(t - s)) — exactly t where t == s (so the JSD of equal distributions is
  exactly 0), no overflow, and the exact gradient (β, 1-β) at the tie. Each branch's argument is
  clamped to <= 0 where the other is taken, so neither overflows nor sends NaN gradients."""
  a = s - t
  upper = jnp.where(a <= 0, a, 0.0)
  lower = jnp.where(a > 0, -a, 0.0)
  return jnp.where(a <= 0, t + jnp.log1p((1.0 - beta) * jnp.expm1(upper)),
                   s + jnp.log1p(beta * jnp.expm1(lower)))


def _forward_kl(t, s, beta):
  del beta
  return jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def _reverse_kl(t, s, beta):
  del beta
  return jnp.sum(jnp.exp(s) * (s - t), axis=-1)


def _jsd(t, s, beta):
  m = _log_mixture(t, s, beta)
  return (beta * jnp.sum(jnp.exp(t) * (t - m), axis=-1) +
          (1.0 - beta) * jnp.sum(jnp.exp(s) * (s - m), axis=-1))


# (teacher log-probs, student log-probs, beta) -> divergence over the last axis.
_DIVERGENCE_FNS = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "jsd": _jsd}
DIVERGENCES = tuple(_DIVERGENCE_FNS)     # config.train.distill.divergence


def divergence(student_logits: jax.Array, teacher: TeacherRows, dcfg) -> jax.Array:
  """T² · D(teacher ‖ student) per row ([...]: the leading axes of ``student_logits`` [..., V]),
  with ``dcfg`` = ``config.train.distill`` (divergence, jsd_beta, temperature); top-k teachers as
  in the module docstring. float32; the teacher is not differentiated."""
  if dcfg.divergence not in _DIVERGENCE_FNS:
    raise ValueError(f"unknown divergence {dcfg.divergence!r}: use one of {list(DIVERGENCES)} "
                     "(config.train.distill.divergence)")
  temp = float(dcfg.temperature)
  student_logits = student_logits.astype(jnp.float32)
  teacher_logits = jax.lax.stop_gradient(teacher.logits).astype(jnp.float32)
  mass_term = 0.0
  if teacher.ids is None:
    # One log-softmax over both: bitwise-equal rows where the logits are (D exactly 0 there).
    both = jax.nn.log_softmax(jnp.stack([student_logits, teacher_logits]) / temp, axis=-1)
    s_logp, t_logp = both[0], both[1]
  else:
    s_logp = jax.nn.log_softmax(student_logits / temp, axis=-1)
    t_logp = jax.nn.log_softmax(teacher_logits / temp, axis=-1)
    s_at = jnp.take_along_axis(s_logp, teacher.ids.astype(jnp.int32), axis=-1)
    log_mass = jax.nn.logsumexp(s_at, axis=-1, keepdims=True)       # log m_s
    s_logp = s_at - log_mass
    mass_term = -log_mass[..., 0]
  d = _DIVERGENCE_FNS[dcfg.divergence](t_logp, s_logp, float(dcfg.jsd_beta)) + mass_term
  return temp * temp * d


def teacher_rows(logits: jax.Array, top_k: int) -> TeacherRows:
  """The teacher at each row from its full logits: all of them (``top_k`` 0) or the top-k."""
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
  if not top_k:
    return TeacherRows(None, logits)
  values, ids = jax.lax.top_k(logits, int(top_k))
  return TeacherRows(ids.astype(jnp.int32), values)


# ---------------------------------------------------------------------------------------------------
# The teacher inside the step.
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Teacher:
  """The frozen teacher as the loss sees it (``LossContext.teacher``): its model's ``apply`` and
  its params (a step argument, never differentiated)."""
  apply_fn: Callable[..., Any]
  params: Any


def _is_tree(batch) -> bool:
  return "tin" in batch


def _forward_inputs(batch):
  """(tokens, positions, attention mask) of a flat or tree batch."""
  if _is_tree(batch):
    from kat_jax.tree.logprobs import tree_mask
    return batch["tokens"], batch["positions"], tree_mask(batch)
  return batch["inputs"], batch["positions"], intervals_from_segment_ids(batch["segment_ids"])


def _chunked_map(fn: Callable, arrays: tuple, chunk: int) -> tuple:
  """``fn(*[B, c, ...] slices) -> tuple of [B, c, ...]`` over ``chunk`` rows at a time of arrays
  [B, T, ...], in a sequential map whose steps are rematerialized in the backward pass (one
  chunk's [B, chunk, V] logits live at a time, as ``kat_jax.tree.logprobs.chunked_rows``)."""
  b, t = arrays[0].shape[:2]
  n = -(-t // chunk)

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

  out = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), tuple(split(x) for x in arrays))
  return tuple(jnp.moveaxis(y, 0, 1).reshape((b, n * chunk) + y.shape[3:])[:, :t] for y in out)


def _in_step_teacher(teacher: Teacher, batch, top_k: int, chunk: int):
  """(arrays [B, T, ...], rows_fn): ``rows_fn(*slices) -> TeacherRows`` of the teacher run on the
  batch — its logits, or with ``chunk`` its final hidden states and the head applied per chunk."""
  tokens, positions, mask = _forward_inputs(batch)
  variables = {"params": jax.lax.stop_gradient(teacher.params)}
  if not chunk:
    logits = teacher.apply_fn(variables, tokens, positions, mask).logits
    return (jax.lax.stop_gradient(logits),), lambda l: teacher_rows(l, top_k)
  hidden = teacher.apply_fn(variables, tokens, positions, mask, return_hidden=True,
                            compute_logits=False).hidden
  head = lambda h: teacher_rows(teacher.apply_fn(variables, h, method="output_head"), top_k)
  return (jax.lax.stop_gradient(hidden),), head


def _teacher_source(batch, ctx: losses.LossContext, chunk: int):
  """The teacher of this batch: its precomputed top-k fields, else the in-step teacher."""
  dcfg = ctx.config.distill
  if TOPK_IDS in batch:
    k = int(dcfg.top_k)
    stored = batch[TOPK_IDS].shape[-1]
    if not 0 < k <= stored:
      raise ValueError(f"the batch carries the teacher's top-{stored} but config.train.distill."
                       f"top_k={k}: set 1 <= top_k <= {stored}")
    ids, logits = batch[TOPK_IDS][..., :k], batch[TOPK_LOGITS][..., :k]
    return (ids, logits), lambda i, l: TeacherRows(i, jax.lax.stop_gradient(l))
  if ctx.teacher is None:
    raise ValueError("loss 'distill' needs the teacher: the batch has no precomputed top-k "
                     f"({TOPK_IDS}) and LossContext.teacher is None (the Trainer loads "
                     "config.train.distill.teacher)")
  return _in_step_teacher(ctx.teacher, batch, int(dcfg.top_k), chunk)


def teacher_topk(teacher: Teacher, batch, top_k: int, logits_chunk: int = 0):
  """The teacher's top-k (ids int32, logits float32 [B, T, k]) at every row of a flat or tree
  batch: what ``experiments.distill_topk`` stores and the in-step teacher computes."""
  if top_k <= 0:
    raise ValueError(f"teacher_topk needs top_k > 0, got {top_k}")
  arrays, rows_fn = _in_step_teacher(teacher, batch, top_k, logits_chunk)
  if logits_chunk:
    return _chunked_map(lambda *a: tuple(rows_fn(*a)), arrays, logits_chunk)
  return tuple(rows_fn(*arrays))


# ---------------------------------------------------------------------------------------------------
# The loss.
# ---------------------------------------------------------------------------------------------------

def _student_rows(params, batch, ctx: losses.LossContext):
  """The student's forward pass and per row [B, T]: T²·D to the teacher, log Z, argmax."""
  chunk = int(ctx.config.logits_chunk)
  dcfg = ctx.config.distill
  tokens, positions, mask = _forward_inputs(batch)
  t_arrays, t_rows = _teacher_source(batch, ctx, chunk)

  def stats(s_logits, *t):
    s_logits = s_logits.astype(jnp.float32)
    return (divergence(s_logits, t_rows(*t), dcfg), jax.nn.logsumexp(s_logits, axis=-1),
            jnp.argmax(s_logits, axis=-1))

  if not chunk:
    out = ctx.apply_fn({"params": params}, tokens, positions, mask)
    return out, stats(out.logits, *t_arrays)
  out = ctx.apply_fn({"params": params}, tokens, positions, mask, return_hidden=True,
                     compute_logits=False)
  head = lambda h: ctx.apply_fn({"params": params}, h, method="output_head")
  return out, _chunked_map(lambda h, *t: stats(head(h), *t), (out.hidden, *t_arrays), chunk)


def _mix(ce, d, z, cfg):
  alpha = float(cfg.distill.alpha)
  return (1.0 - alpha) * ce + alpha * d + cfg.z_loss * z


def _flat_numerator(params, batch, ctx: losses.LossContext):
  out, (d, log_z, argmax) = _student_rows(params, batch, ctx)
  targets, w = batch["targets"], batch["weights"]
  if out.logits is not None:
    label = jnp.take_along_axis(out.logits.astype(jnp.float32), targets[..., None], axis=-1)[..., 0]
  else:
    label = ctx.apply_fn({"params": params}, out.hidden, targets, method="output_head")
  sums = {"ce_sum": -jnp.sum(w * (label - log_z)), "distill_sum": jnp.sum(w * d),
          "z_sum": jnp.sum(w * jnp.square(log_z)), "correct_sum": jnp.sum(w * (argmax == targets))}
  return _mix(sums["ce_sum"], sums["distill_sum"], sums["z_sum"], ctx.config), sums


def _tree_numerator(params, batch, ctx: losses.LossContext):
  cfg = ctx.config
  out, (d, log_z, _) = _student_rows(params, batch, ctx)
  b = jnp.arange(d.shape[0])[:, None, None]
  rows = batch["pred_rows"]
  if out.logits is not None:
    label = out.logits[b, rows, batch["pred_labels"]].astype(jnp.float32)
  else:
    # One label logit per tree token, from its parent's row (as kat_jax.tree.logprobs).
    parent_hidden = jnp.take_along_axis(out.hidden, jnp.maximum(batch["parent"], 0)[..., None],
                                        axis=1)
    label_t = ctx.apply_fn({"params": params}, parent_hidden, batch["tokens"],
                           method="output_head")
    label = label_t[b, batch["pred_label_rows"]]
  nll = -(label - log_z[b, rows])
  d_pairs, z_pairs = d[b, rows], jnp.square(log_z[b, rows])
  mode, agg_constant = losses._aggregation(None, cfg)  # noqa: SLF001 - the tree losses' own mode
  w = losses.pair_weights(batch)
  reduce = lambda x: losses.reduce_pairs(x, w, mode, agg_constant)[0]
  sums = {"nll_sum": reduce(nll), "distill_sum": reduce(d_pairs), "z_sum": reduce(z_pairs)}
  return reduce(_mix(nll, d_pairs, z_pairs, cfg)), sums


_TREE_DENOMINATOR = losses.make_tree_loss().denominator


def _numerator(params, batch, ctx):
  return (_tree_numerator if _is_tree(batch) else _flat_numerator)(params, batch, ctx)


def _denominator(batch, config=None):
  """Flat: the LM loss's weight sum; tree: the ``tree`` loss's (``config.train.loss_agg``)."""
  if _is_tree(batch):
    return _TREE_DENOMINATOR(batch, config)
  return jnp.sum(batch["weights"])


# (1 - alpha)·CE + alpha·T²·D + z_loss·log Z² on flat or tree batches (module docstring).
DISTILL = losses.register(NAME, losses.Loss(numerator=_numerator, denominator=_denominator))


# ---------------------------------------------------------------------------------------------------
# Loading the teacher.
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FrozenTeacher:
  """A restored teacher: its model (config, module) and params with their shardings."""
  source: str
  model_cfg: Any            # kat_jax.model.ModelConfig
  model: Any                # kat_jax.model.Transformer
  params: Any
  shardings: Any

  def in_step(self, params: Any = None) -> Teacher:
    return Teacher(apply_fn=self.model.apply, params=self.params if params is None else params)


def split_step(source: str) -> tuple[str, Optional[int]]:
  """``DIR@STEP`` -> (DIR, STEP); ``DIR`` -> (DIR, None)."""
  head, sep, tail = source.rpartition("@")
  if sep and tail.isdigit():
    return head, int(tail)
  return source, None


def _checkpoint_param_shapes(path: str, step: Optional[int]) -> dict[tuple, tuple]:
  """Shapes of ``state.params`` in a kat_jax workdir's checkpoint (metadata only, no arrays)."""
  import orbax.checkpoint as ocp
  from flax import traverse_util
  from kat_jax import workdir as workdir_lib
  ckpt_dir = workdir_lib.checkpoints_dir(path)
  ckpt_dir = os.path.abspath(ckpt_dir if os.path.isdir(ckpt_dir) else path)
  manager = ocp.CheckpointManager(ckpt_dir)
  try:
    steps = list(manager.all_steps())
    chosen = manager.latest_step() if step is None else step
  finally:
    manager.close()
  if chosen is None or chosen not in steps:
    raise ConfigError(f"config.train.distill.teacher={path}{'' if step is None else f'@{step}'}: "
                      f"no such checkpoint in {ckpt_dir} (steps there: {steps})")
  meta = ocp.PyTreeCheckpointer().metadata(os.path.join(ckpt_dir, str(chosen), "state"))
  tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", meta)
  tree = tree.tree if hasattr(tree, "tree") else tree
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(tree)["params"]).items()}


def _runtime_fields(student) -> dict:
  """How the teacher runs: the student's dtypes, attention and token slicing; no remat (never
  differentiated), no adapters, no value head."""
  from kat_jax.model.presets import LoraConfig
  return dict(param_dtype=student.param_dtype, dtype=student.dtype, remat="none",
              attention_impl=student.attention_impl, token_chunk=student.token_chunk,
              value_head=False, lora=LoraConfig())


def _inferred_model_config(shapes: dict[tuple, tuple], student, where: str):
  """A trainer workdir records no model config: the teacher's shapes from its parameters', RoPE
  and norm constants from the student's (same family and tokenizer)."""
  from kat_jax.model.presets import ModelConfig
  try:
    vocab, d_model = shapes[("embedding",)]
    _, heads, head_dim = shapes[("layer_0", "attn", "q_proj")]
    _, kv_heads, _ = shapes[("layer_0", "attn", "k_proj")]
    _, mlp_dim = shapes[("layer_0", "mlp", "gate_proj")]
  except (KeyError, ValueError) as e:
    raise ConfigError(f"config.train.distill.teacher={where}: its checkpoint's params are not a "
                      f"kat_jax Transformer's (no {e})") from None
  layers = 1 + max(int(k[0].removeprefix("layer_")) for k in shapes if k[0].startswith("layer_"))
  return ModelConfig(
      vocab_size=vocab, d_model=d_model, num_layers=layers, num_heads=heads,
      num_kv_heads=kv_heads, head_dim=head_dim, mlp_dim=mlp_dim, rope_theta=student.rope_theta,
      rope_scaling=student.rope_scaling, rope_scaling_factor=student.rope_scaling_factor,
      rope_low_freq_factor=student.rope_low_freq_factor,
      rope_high_freq_factor=student.rope_high_freq_factor,
      rope_original_max_position=student.rope_original_max_position, norm_eps=student.norm_eps,
      qk_norm=("layer_0", "attn", "q_norm", "scale") in shapes,
      qkv_bias=("layer_0", "attn", "q_bias") in shapes,
      tie_embeddings=("lm_head",) not in shapes, **_runtime_fields(student))


def teacher_model_config(source: str, student):
  """The teacher's ``ModelConfig``: from a Hugging Face checkpoint's ``config.json``, a converted
  workdir's ``model_config.json``, a LoRA run's ``lora_run.json`` (merged), else read off a trainer
  checkpoint's parameter shapes — run with the student's dtypes (``_runtime_fields``)."""
  from kat_jax.model import hf as hf_lib
  from kat_jax.model import lora as lora_lib
  from kat_jax.model.presets import ModelConfig
  path, step = split_step(source)
  if not os.path.isdir(path):
    raise ConfigError(f"config.train.distill.teacher={source!r} is not a directory: give a kat_jax "
                      "workdir[@step] or a Hugging Face checkpoint directory")
  if hf_lib.is_hf_checkpoint(path):
    if step is not None:
      raise ConfigError(f"config.train.distill.teacher={source!r}: a Hugging Face checkpoint has "
                        "no steps; drop the @step")
    cfg = ModelConfig.from_config(hf_lib.model_config_from_hf(hf_lib.read_hf_config(path)))
  elif lora_lib.is_lora_workdir(path):
    cfg = lora_lib.run_model_config(lora_lib.read_run_info(path))
  elif hf_lib.read_model_config(path) is not None:
    cfg = ModelConfig.from_config(hf_lib.read_model_config(path))
  else:
    shapes = _checkpoint_param_shapes(path, step)
    cfg = _inferred_model_config(shapes, student, source)
    _check_shapes(cfg, shapes, source)
    return cfg
  return dataclasses.replace(cfg, **_runtime_fields(student))


def _check_shapes(cfg, shapes: dict[tuple, tuple], source: str) -> None:
  """Every parameter of ``cfg`` is in the checkpoint with its shape (an unrecognized layout would
  otherwise be restored padded or cut)."""
  from flax import traverse_util
  from kat_jax.model import hf as hf_lib
  expected = {k: tuple(v.shape)
              for k, v in traverse_util.flatten_dict(hf_lib.abstract_params(cfg)).items()}
  bad = [f"{'/'.join(k)}: {shapes.get(k)} in the checkpoint, {v} expected"
         for k, v in expected.items() if shapes.get(k) != v]
  if bad:
    raise ConfigError(f"config.train.distill.teacher={source}: the checkpoint's params do not form "
                      f"one kat_jax model ({'; '.join(bad[:4])})")


def load_teacher(config, mesh, rules) -> FrozenTeacher:
  """Restores ``config.train.distill.teacher`` frozen onto ``mesh``, sharded by ``rules`` (the
  run's); refuses a teacher whose vocabulary is not the student's."""
  from kat_jax.model import ModelConfig, Transformer
  from kat_jax.model import hf as hf_lib
  from kat_jax.train import metrics as metrics_lib
  source = config.train.distill.teacher
  if not source:
    raise ConfigError("config.train.loss='distill' runs the teacher in the step but "
                      "config.train.distill.teacher is empty: set it to a kat_jax workdir[@step] "
                      "or a Hugging Face checkpoint dir (or set config.train.distill.topk_data)")
  student = ModelConfig.from_config(config.model)
  cfg = teacher_model_config(source, student)
  check_vocab(cfg.vocab_size, student.vocab_size, f"config.train.distill.teacher={source}")
  abstract = hf_lib.abstract_params(cfg, mesh, rules)
  try:
    params = hf_lib.init_params_from(source, abstract, cfg)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"config.train.distill.teacher={source}: {e}") from e
  metrics_lib.console(
      f"distillation teacher {source}: {cfg.num_layers} layers, d_model={cfg.d_model}, "
      f"{cfg.num_params() / 1e6:.1f}M params")
  return FrozenTeacher(source=source, model_cfg=cfg, model=Transformer(cfg, mesh=mesh, rules=rules),
                       params=params, shardings=jax.tree.map(lambda a: a.sharding, abstract))


def check_vocab(teacher_vocab: int, student_vocab: int, teacher_desc: str) -> None:
  if int(teacher_vocab) != int(student_vocab):
    raise ConfigError(
        f"{teacher_desc} has vocab_size={teacher_vocab} but the student's config.model.vocab_size="
        f"{student_vocab}: distillation compares next-token distributions id by id, so teacher and "
        "student need one vocabulary and tokenizer — use a teacher trained with the student's "
        "tokenizer")


# ---------------------------------------------------------------------------------------------------
# Tokenizers: the teacher's must be the student's.
# ---------------------------------------------------------------------------------------------------

_PROBE = ("def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
          "# héllo 世界\n\tSELECT * FROM t WHERE x = 'y';\n")


def tokenizer_fingerprint(tokenizer) -> dict:
  """What must agree for two tokenizers to give the same ids: vocabulary size, special ids and the
  encoding of a probe text (its hash)."""
  from kat_jax.data import special_tokens

  def special(name):
    try:
      return int(tokenizer.token_id(name))
    except (KeyError, ValueError):
      return -1

  ids = np.asarray(tokenizer.encode(_PROBE), np.int64)
  return {"vocab_size": int(tokenizer.vocab_size), "eos_id": int(tokenizer.eos_id),
          "pad_id": int(tokenizer.pad_id),
          "specials": hashlib.sha256(str([special(s) for s in special_tokens.ALL]).encode()
                                     ).hexdigest()[:16],
          "probe": hashlib.sha256(ids.tobytes()).hexdigest()[:16]}


def check_tokenizer(teacher_fp: Mapping, student_tokenizer, teacher_desc: str) -> None:
  """ConfigError naming both tokenizers when the teacher's fingerprint is not the student's."""
  student_fp = tokenizer_fingerprint(student_tokenizer)
  diffs = [f"{k}: teacher {teacher_fp.get(k)!r}, student {v!r}" for k, v in student_fp.items()
           if teacher_fp.get(k) != v]
  if diffs:
    raise ConfigError(
        f"the tokenizer of {teacher_desc} is not the student's ({'; '.join(diffs)}): distillation "
        "compares next-token distributions id by id — train the teacher with the student's "
        "tokenizer (config.data.tokenizer_path), or distill into a student that uses the "
        "teacher's")


def teacher_tokenizer(source: str):
  """The tokenizer saved with the teacher (``WORKDIR/tokenizer`` or a Hugging Face dir's), or
  None."""
  from kat_jax import workdir as workdir_lib
  from kat_jax.data import tokenizer as tokenizer_lib
  path, _ = split_step(source)
  return (tokenizer_lib.maybe_tokenizer(workdir_lib.tokenizer_dir(path))
          or tokenizer_lib.maybe_tokenizer(path))


# ---------------------------------------------------------------------------------------------------
# Precomputed top-k: a TFDS dataset (array_record) of per-row teacher top-k, keyed by row content.
# ---------------------------------------------------------------------------------------------------

_KEY_FIELDS = {False: ("inputs", "positions", "segment_ids"),     # flat rows
               True: ("tokens", "positions", "tin", "tout")}       # tree rows
_FORMAT = "kat_jax.teacher_topk.v1"


def row_keys(batch: Mapping[str, np.ndarray]) -> list[str]:
  """One key per batch row from what the teacher's output depends on (its tokens, positions and
  attention), so a row is found again whatever batch, order or process it lands in."""
  arrays = [np.asarray(batch[name]) for name in _KEY_FIELDS[_is_tree(batch)]]
  return [hashlib.sha256(b"".join(np.ascontiguousarray(a[i], np.int32).tobytes()
                                  for a in arrays)).hexdigest()[:32]
          for i in range(arrays[0].shape[0])]


def store_split(split: str) -> str:
  """The stored split of a stage split (``heldout`` names the ``eval`` split)."""
  return "eval" if split in ("eval", "heldout") else split


@functools.cache
def _builder_class():
  """The TFDS builder of the teacher's top-k (created on first use: TFDS is imported lazily)."""
  import tensorflow_datasets as tfds

  class TeacherTopK(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Rows of (key, ids [T, k] int32, logits [T, k] float32), in generation order; metadata:
    ``keys`` per split (the index) and what they were computed with (``write_topk``)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, splits: Optional[Mapping[str, Iterable]] = None,
                 metadata: Optional[dict] = None, **kwargs):
      self._splits, self._metadata = splits, metadata
      super().__init__(**kwargs)

    def _info(self):
      tensor = lambda dtype: tfds.features.Tensor(shape=(None, None), dtype=dtype, encoding="bytes")
      return self.dataset_info_from_configs(
          description="Per-row top-k ids and logits of a distillation teacher (kat_jax).",
          features=tfds.features.FeaturesDict({"key": tfds.features.Text(),
                                               "ids": tensor(np.int32),
                                               "logits": tensor(np.float32)}),
          disable_shuffling=True, metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
      del dl_manager
      if self._splits is None:
        raise ValueError("TeacherTopK is written by experiments.distill_topk (write_topk)")
      self.info.metadata.update(self._metadata)
      keys = self.info.metadata.setdefault("keys", {})

      def generate(split, rows):
        keys[split] = []
        for key, ids, logits in rows:
          keys[split].append(key)   # filled as rows are written; saved with the info afterwards
          yield key, {"key": key, "ids": np.asarray(ids, np.int32),
                      "logits": np.asarray(logits, np.float32)}

      return {split: generate(split, rows) for split, rows in self._splits.items()}

    def _generate_examples(self):  # required by the base class; splits come from above
      raise NotImplementedError

  return TeacherTopK


def write_topk(path: str, splits: Mapping[str, Iterable[tuple[str, np.ndarray, np.ndarray]]],
               metadata: dict) -> str:
  """Writes ``splits`` (split -> iterable of (key, ids, logits) rows, unique keys) as the teacher's
  top-k dataset under ``path``; returns the dataset directory. ``metadata`` says what they were
  computed with (``teacher``, ``top_k``, ``vocab_size``, ``tokenizer`` fingerprint, ...)."""
  import tensorflow_datasets as tfds
  if os.path.isdir(path) and os.listdir(path):
    raise FileExistsError(f"{path} is not empty: write the teacher's top-k into a new directory")
  tfds.display_progress_bar(False)
  builder = _builder_class()(splits=splits, metadata={"format": _FORMAT, **metadata},
                             data_dir=path, file_format="array_record")
  with contextlib.redirect_stdout(sys.stderr):   # TFDS prints progress lines to stdout
    builder.download_and_prepare()
  return str(builder.data_dir)


class TopKStore:
  """Random access to a written top-k dataset by row key."""

  def __init__(self, path: str):
    self.path = path
    builder = _builder_class()(data_dir=path, file_format="array_record")
    if not builder.is_prepared():
      raise ConfigError(f"config.train.distill.topk_data={path} holds no teacher top-k dataset: "
                        "write it with python -m experiments.distill_topk")
    self._builder = builder
    self.metadata = dict(builder.info.metadata)
    self._index = {split: {k: i for i, k in enumerate(keys)}
                   for split, keys in self.metadata["keys"].items()}
    self._sources: dict[str, Any] = {}

  @property
  def top_k(self) -> int:
    return int(self.metadata["top_k"])

  def __len__(self) -> int:
    return sum(len(v) for v in self._index.values())

  def lookup(self, split: str, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, logits) [B, T, k] of the rows ``keys`` of ``split``; a row that was not precomputed is
    a ConfigError naming the fix."""
    split = store_split(split)
    index = self._index.get(split)
    if index is None:
      raise ConfigError(f"config.train.distill.topk_data={self.path} has no {split!r} split (it "
                        f"has {sorted(self._index)}): rerun python -m experiments.distill_topk "
                        f"with {'--eval_batches > 0' if split == 'eval' else 'this config'}")
    missing = [i for i, k in enumerate(keys) if k not in index]
    if missing:
      raise ConfigError(
          f"rows {missing[:4]} of this {split!r} batch are not in config.train.distill.topk_data="
          f"{self.path} ({len(index)} {split} rows): the batches differ from those "
          "experiments.distill_topk ran over (another data config, seq_len, seed or tokenizer, or "
          "more batches than --num_batches / --eval_batches); rerun it with this config")
    if split not in self._sources:
      self._sources[split] = self._builder.as_data_source(split)
    records = [self._sources[split][index[k]] for k in keys]
    return (np.stack([r["ids"] for r in records]).astype(np.int32),
            np.stack([r["logits"] for r in records]).astype(np.float32))


class TeacherTopKIterator:
  """A stage's data iterator whose batches also carry the precomputed teacher top-k of each row
  (``TOPK_IDS`` / ``TOPK_LOGITS`` [B, T, k]); state, metrics and the rest are the wrapped
  iterator's."""

  def __init__(self, iterator, store: TopKStore, split: str):
    self._it, self._store, self._split = iterator, store, split

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    ids, logits = self._store.lookup(self._split, row_keys(batch))
    width = np.asarray(batch["tokens" if _is_tree(batch) else "inputs"]).shape[1]
    if ids.shape[1] != width:
      raise ConfigError(f"config.train.distill.topk_data={self._store.path} holds rows of "
                        f"{ids.shape[1]} tokens but the batch has {width}: rerun "
                        "experiments.distill_topk with this config")
    return {**batch, TOPK_IDS: ids, TOPK_LOGITS: logits}

  def __getattr__(self, name):   # get_state, set_state, metrics, close, ...
    if name.startswith("_"):
      raise AttributeError(name)
    return getattr(self._it, name)


def check_topk_store(store: TopKStore, config) -> None:
  """The precomputed top-k fit this run: vocabulary, k, and the teacher if one is named."""
  meta, dcfg = store.metadata, config.train.distill
  if meta.get("format") != _FORMAT:
    raise ConfigError(f"config.train.distill.topk_data={store.path} is not a teacher top-k dataset "
                      f"(format {meta.get('format')!r}, expected {_FORMAT!r})")
  check_vocab(meta["vocab_size"], config.model.vocab_size,
              f"the teacher of config.train.distill.topk_data={store.path} ({meta['teacher']})")
  if not 0 < dcfg.top_k <= store.top_k:
    raise ConfigError(f"config.train.distill.top_k={dcfg.top_k} but topk_data={store.path} holds "
                      f"the teacher's top-{store.top_k}: set 1 <= top_k <= {store.top_k}")
  if dcfg.teacher and os.path.abspath(split_step(dcfg.teacher)[0]) != os.path.abspath(
      split_step(meta["teacher"])[0]):
    raise ConfigError(f"config.train.distill.teacher={dcfg.teacher} but topk_data={store.path} was "
                      f"computed from {meta['teacher']}: clear one of them or recompute")


def attach_teacher_data(config, iterator, tokenizer, *, split: str):
  """A stage's (iterator, tokenizer) for ``config.train.loss='distill'``: the teacher's tokenizer
  checked against the student's, and with ``topk_data`` the precomputed top-k attached."""
  dcfg = config.train.distill
  if dcfg.topk_data:
    store = TopKStore(dcfg.topk_data)
    check_topk_store(store, config)
    if tokenizer is not None and store.metadata.get("tokenizer"):
      check_tokenizer(store.metadata["tokenizer"], tokenizer,
                      f"the teacher of config.train.distill.topk_data={dcfg.topk_data}")
    return TeacherTopKIterator(iterator, store, split), tokenizer
  if tokenizer is not None and dcfg.teacher:
    teacher_tok = teacher_tokenizer(dcfg.teacher)
    if teacher_tok is None:
      raise ConfigError(
          f"config.train.distill.teacher={dcfg.teacher} has no tokenizer (neither "
          f"{split_step(dcfg.teacher)[0]}/tokenizer/ nor a Hugging Face tokenizer), so it cannot "
          "be checked to be the student's: save the teacher's tokenizer there")
    check_tokenizer(tokenizer_fingerprint(teacher_tok), tokenizer,
                    f"config.train.distill.teacher={dcfg.teacher}")
  return iterator, tokenizer


def topk_metadata(config, teacher: FrozenTeacher, tokenizer, **extra) -> dict:
  """What ``write_topk`` records about how the rows were computed."""
  cfg = teacher.model_cfg
  return {"teacher": teacher.source, "top_k": int(config.train.distill.top_k),
          "vocab_size": int(cfg.vocab_size), "stage": str(config.stage),
          "teacher_model": json.dumps({"num_layers": cfg.num_layers, "d_model": cfg.d_model}),
          "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else {}, **extra}
