"""AdamW with linear warmup + cosine decay and global-norm clipping, from ``config.train``."""
from __future__ import annotations

import jax
import ml_collections
import optax


def make_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` × peak by
  ``steps``; ``warmup_steps=0`` starts at the peak (step 0 trains at the full learning rate)."""
  if int(train_cfg.warmup_steps) == 0:
    return optax.cosine_decay_schedule(train_cfg.learning_rate, max(int(train_cfg.steps), 1),
                                       alpha=train_cfg.min_lr_ratio)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=train_cfg.learning_rate,
      warmup_steps=max(int(train_cfg.warmup_steps), 1),
      decay_steps=max(int(train_cfg.steps), int(train_cfg.warmup_steps) + 1),
      end_value=train_cfg.learning_rate * train_cfg.min_lr_ratio,
  )


def _decay_mask(params):
  """Weight decay on matrices only (not norms, biases, scalars)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(train_cfg: ml_collections.ConfigDict):
  """Returns (optax transform, schedule)."""
  schedule = make_schedule(train_cfg)
  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                  weight_decay=train_cfg.weight_decay,
                  mask=_decay_mask),
  )
  return tx, schedule
