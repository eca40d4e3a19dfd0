"""Defaults shared by every experiment: every config key any library code reads is declared here
(or in a block helper it calls) with its default and a one-line comment.

Experiment files call ``get_base_config(preset)`` and override what differs; any field can be set
from the command line (``--config.train.prune.enabled=True``), and an unknown key is refused. Library
code reads fields; it never invents a default. Cross-field checks live in ``kat_jax.config.validate``.
"""
import ml_collections

from kat_jax import sharding
from kat_jax.data.config import default_data_config
from kat_jax.model import get_preset
from kat_jax.rl.config import rl_defaults
from kat_jax.tree.prune import default_prune_config
from kat_jax.tree.sft_data import default_tree_config


def train_defaults() -> ml_collections.ConfigDict:
  """``config.train``: optimizer, loop, checkpoints, losses and the policy objective."""
  return ml_collections.ConfigDict(dict(
      loss="",                 # registered loss name (kat_jax.train.losses); '' = the stage's own
      steps=1000,              # optimizer steps; the LR schedule spans them
      batch_size=8,            # global, in sequences (flat) or trees (tree stages)
      seq_len=256,             # tokens per row (flat) / tree tokens per row (throughput accounting)
      grad_accum_steps=1,      # micro-batches per step (exact: one global denominator)
      learning_rate=3e-3,      # peak AdamW learning rate
      warmup_steps=50,         # linear warmup, then cosine decay
      min_lr_ratio=0.1,        # final LR / peak LR
      b1=0.9,                  # AdamW beta1
      b2=0.95,                 # AdamW beta2
      eps=1e-8,                # AdamW epsilon
      weight_decay=0.1,        # decoupled weight decay (matrices only)
      grad_clip=1.0,           # global-norm gradient clipping
      z_loss=1e-4,             # log Z^2 penalty of the lm loss
      logits_chunk=0,          # >0: output head on that many rows at a time (no [T, V])
      log_every=10,            # steps between metric lines / TensorBoard points
      eval_every=100,          # steps between held-out evaluations (0 = never)
      eval_steps=4,            # held-out batches per evaluation
      checkpoint_every=100,    # steps between checkpoints (the last step is always saved)
      keep_checkpoints=3,      # checkpoints kept (oldest deleted first)
      async_checkpoint=True,   # write checkpoints in the background
      check_finite_every=1,    # steps between finiteness checks of loss / grad norm (a host sync)
      peak_flops_per_device=0.0,   # for MFU; 0: datasheet value by device kind, or a measured matmul
      progress_bar=True,       # tqdm progress bar on the console (process 0)
      # Tree losses (``tree``, ``tree_sequence_mean``): the per-pair policy objective
      # (kat_jax.train.objectives) and its aggregation (kat_jax.train.losses.AGGREGATIONS).
      objective="nll",         # nll (SFT) | ppo | gspo | decoupled_ppo (kat_jax.train.objectives)
      clip_eps=0.2,            # PPO clip range below 1 (ratio >= 1 - clip_eps)
      clip_eps_high=-1.0,      # PPO clip range above 1 (ratio <= 1 + clip_eps_high); -1 = clip_eps
      dual_clip=0.0,           # dual-clip c > 1: loss of an A < 0 pair at most c·|A|; 0 = off
      gspo_clip_eps=3e-4,      # GSPO sequence-ratio clip range below 1
      gspo_clip_eps_high=4e-4,   # GSPO sequence-ratio clip range above 1; -1 = gspo_clip_eps
      decoupled_max_weight=0.0,  # decoupled_ppo: cap of π_prox / π_behav (>= 1); 0 = no cap
      loss_agg="token_mean",   # token_mean | seq_mean_token_mean | seq_mean_token_sum | constant
      agg_constant=1024.0,     # loss_agg=constant (Dr. GRPO): sum / (agg_constant × trajectories)
      kl_coef=0.0,             # weight of the KL to the reference in the loss (field ref_logp)
      kl_estimator="k3",       # KL estimator: k1 (log π/π_ref) | k2 (½ d²) | k3 (e^d - d - 1)
      value_coef=0.0,          # weight of the value loss (needs model.value_head=True)
      value_clip=0.0,          # > 0: clip the value to old_values ± value_clip (PPO); 0 = off
      entropy_coef=0.0,        # weight of the entropy bonus (subtracted from the loss)
      use_reference=False,     # keep a frozen copy of the starting params (Trainer.reference_params)
      prune=default_prune_config(),   # entropy-budget pruning of tree batches (docs/PRUNING.md)
      distill=distill_defaults(),     # the distill loss's teacher and divergence (docs/DISTILL.md)
  ))


def distill_defaults() -> ml_collections.ConfigDict:
  """``config.train.distill``: knowledge distillation (loss 'distill', kat_jax.train.distill)."""
  return ml_collections.ConfigDict(dict(
      teacher="",              # frozen teacher: kat_jax workdir[@step] or HF checkpoint dir
      topk_data="",            # its top-k precomputed by experiments.distill_topk; '' = in-step
      divergence="forward_kl",   # forward_kl KL(t‖s) | reverse_kl KL(s‖t) | jsd (generalized JSD)
      jsd_beta=0.5,            # jsd: β·KL(t‖M) + (1-β)·KL(s‖M), M = β·t + (1-β)·s; 0 < β < 1
      alpha=0.5,               # loss = (1 - alpha)·CE + alpha·T²·divergence
      temperature=1.0,         # T > 0: both distributions are softmax(logits / T)
      top_k=0,                 # > 0: the teacher's top-k ids only (renormalized); 0 = full vocab
  ))


def train_config(**overrides) -> ml_collections.ConfigDict:
  """``train_defaults()`` with ``overrides`` (an unknown field is refused): for code that builds a
  step without a whole experiment config (benchmarks, tests)."""
  c = train_defaults()
  unknown = sorted(set(overrides) - set(c.keys()))
  if unknown:
    raise KeyError(f"unknown config.train fields {unknown}; known: {sorted(c.keys())}")
  c.update(overrides)
  return c


def get_base_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "midtrain"        # registered stage (kat_jax.train.stages): data source + default loss
  c.seed = 0                  # init and data seed (the step RNG uses seed + 1)
  c.init_from = ""   # HF checkpoint dir or kat_jax workdir[@step] to start from (see experiments.convert)
  c.model = get_preset(preset)   # ModelConfig fields, blocks .lora and .qat (kat_jax.model.presets)
  c.mesh = sharding.default_mesh_config()           # data / fsdp / tensor sizes (-1 = fill)
  c.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]   # logical name -> mesh axes
  c.train = train_defaults()
  c.tree = default_tree_config()                    # static tree-batch limits (tree stages)
  c.data = default_data_config()                    # corpora, tokenizer, packing, mixture
  c.rl = rl_defaults()                              # the RL stage (kat_jax.rl.loop)
  return c
