"""Quantization-aware SFT of the tiny model: configs/sft_tiny.py with ``config.model.qat`` on —
every projection kernel and the tied output head fake-quantized to int8 (per output channel /
vocabulary entry), the projections' inputs to per-token dynamic int8, straight-through gradients
(kat_jax.model.qat)::

  python -m experiments.make_agentic_data          # writes ~/.cache/kat_jax/agentic/*.jsonl
  python -m experiments.main --config=configs/qat_tiny.py --workdir=/tmp/kat_sft_qat \\
      --config.init_from=/tmp/kat_sft              # a float configs/sft_tiny.py workdir
  python -m experiments.convert --from_workdir=/tmp/kat_sft_qat --config=configs/qat_tiny.py \\
      --to_int8=/tmp/kat_sft_int8                  # int8 codes + scales, model_config.json
  python -m experiments.eval --config=configs/qat_tiny.py --workdir=/tmp/kat_sft_qat \\
      --suites=procedural                          # the int8 model's pass@k (same forward)

Sampling from the export::

  from kat_jax.model import qat
  from kat_jax.sample import Sampler, SamplingConfig
  model, params = qat.load_export("/tmp/kat_sft_int8")
  out = Sampler(model, params, max_len=1024).generate(prompts, rng, SamplingConfig(...))

The fake-quant forward of the QAT workdir equals the export's forward (tests/model/test_qat.py), so
evaluating the QAT workdir scores the int8 model. ``qat.activations='none'`` quantizes weights only
(then the Hugging Face export, ``--to_hf``, is the same model); any stage takes the same switch
(``--config.model.qat.enabled=True`` on a mid-training or RL config). See docs/DISTILL.md, section
QAT.
"""
from configs.sft_tiny import get_config as sft_tiny_config


def get_config():
  c = sft_tiny_config()
  c.init_from = ""                      # a float SFT workdir (configs/sft_tiny.py) to fine-tune
  c.model.qat.enabled = True
  c.model.qat.activations = "int8"      # per-token dynamic int8 inputs of every projection
  c.model.qat.act_granularity = "per_token"
  c.model.qat.head = True               # the tied embedding / output head in int8 too
  c.train.steps = 100                   # a short fine-tune of a trained float model
  c.train.learning_rate = 1e-3          # below SFT's 3e-3: the float weights are already trained
  c.train.warmup_steps = 10
  c.train.checkpoint_every = 50
  c.train.eval_every = 50
  return c
