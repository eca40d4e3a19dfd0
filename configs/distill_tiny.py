"""Knowledge distillation of the tiny SFT model (configs/sft_tiny.py) from a wider and deeper
teacher trained on the same data with the same tokenizer (docs/DISTILL.md).

Both need the agentic SFT data and the mid-training run, whose tokenizer both use and whose tiny
model the student starts from::

  python -m experiments.main --config=configs/midtrain_tiny.py --workdir=/tmp/kat_midtrain
  python -m experiments.make_agentic_data

1. Train the teacher (``:teacher``: configs/sft_tiny.py's run on a 6-layer, d_model 256 model,
   from scratch, with the mid-training tokenizer)::

     python -m experiments.main --config=configs/distill_tiny.py:teacher \\
         --workdir=/tmp/kat_teacher --config.data.tokenizer_path=/tmp/kat_midtrain/tokenizer

2. Distill the student (the tiny model from mid-training; forward KL to the teacher run inside
   the train step, mixed half and half with the cross-entropy)::

     python -m experiments.main --config=configs/distill_tiny.py --workdir=/tmp/kat_distill \\
         --config.init_from=/tmp/kat_midtrain --config.train.distill.teacher=/tmp/kat_teacher

Or run the teacher once, storing its top-16 logits per position, and train on those (add the
same ``--config.train.distill.top_k=16 --config.train.distill.topk_data=/tmp/kat_teacher_topk``
to both commands)::

     python -m experiments.distill_topk --config=configs/distill_tiny.py \\
         --workdir=/tmp/kat_distill --config.init_from=/tmp/kat_midtrain \\
         --config.train.distill.teacher=/tmp/kat_teacher \\
         --config.train.distill.top_k=16 --config.train.distill.topk_data=/tmp/kat_teacher_topk
"""
from configs import sft_tiny


def teacher_model(c) -> None:
  """The teacher's shapes: twice as wide (d_model 256, mlp 1024, head_dim 32) and 1.5x deeper than
  the tiny preset, same vocabulary."""
  c.model.d_model = 256
  c.model.num_layers = 6
  c.model.head_dim = 32
  c.model.mlp_dim = 1024


def get_config(variant: str = "student"):
  if variant not in ("student", "teacher"):
    raise ValueError(f"configs/distill_tiny.py:{variant}: use ':student' (default) or ':teacher'")
  c = sft_tiny.get_config()
  if variant == "teacher":
    teacher_model(c)
    c.train.steps = 600                 # from scratch: twice the student's steps
    c.train.learning_rate = 1e-3        # a lower peak for the wider model (not tuned)
    c.train.warmup_steps = 40
    return c
  c.train.loss = "distill"
  c.train.distill.teacher = ""          # the teacher's workdir (step 1 above): required
  c.train.distill.divergence = "forward_kl"
  c.train.distill.alpha = 0.5
  c.train.distill.temperature = 1.0
  return c
