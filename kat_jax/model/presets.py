"""Model shapes by name, and the typed ``ModelConfig`` the Flax module is built from.

``get_preset("tiny")`` returns an ml_collections ConfigDict (so experiment configs can override any field
from the command line); ``ModelConfig.from_config(cfg)`` turns it into a frozen, validated dataclass.
``config.model.lora`` (``LoraConfig``) turns on low-rank adapters and a quantized frozen base
(kat_jax.model.lora); ``config.model.qat`` (``QatConfig``) quantization-aware training
(kat_jax.model.qat).
"""
from __future__ import annotations

import dataclasses

import ml_collections

from kat_jax.errors import ConfigError


# Projection kernels LoRA can adapt, by target name; "attn", "mlp" and "all" name groups of them.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_TARGET_GROUPS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"),
                      "all": LORA_TARGETS}
LORA_QUANTIZE = ("", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """``config.model.lora``: low-rank adapters on the projection kernels (kat_jax.model.lora)."""
  rank: int = 0                  # adapter rank r; 0 = no adapters (full fine-tuning)
  alpha: float = 16.0            # the update is (alpha / rank) · A·B
  targets: str = "q,k,v,o,mlp"   # comma-separated LORA_TARGETS or groups (attn, mlp, all)
  dropout: float = 0.0           # dropout on the adapters' input, training steps only
  quantize_base: str = ""        # QLoRA: frozen projection kernels stored '' (float) | int8 | nf4

  @classmethod
  def from_config(cls, cfg) -> "LoraConfig":
    if isinstance(cfg, LoraConfig):
      return cfg
    values = dict(cfg.items()) if cfg is not None else {}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields
    if unknown:
      raise ConfigError(f"config.model.lora has unknown field(s) {sorted(unknown)}; known fields: "
                        f"{sorted(fields)}")
    return cls(**values)

  def target_names(self) -> tuple[str, ...]:
    """The adapted kernels' target names in LORA_TARGETS order ("q,mlp" -> q, gate, up, down)."""
    chosen = set()
    for part in (p.strip() for p in self.targets.split(",")):
      if part in LORA_TARGET_GROUPS:
        chosen.update(LORA_TARGET_GROUPS[part])
      elif part in LORA_TARGETS:
        chosen.add(part)
      else:
        raise ConfigError(
            f"config.model.lora.targets={self.targets!r}: {part!r} is not a target; use a "
            f"comma-separated list of {list(LORA_TARGETS)} or the groups "
            f"{sorted(LORA_TARGET_GROUPS)}, e.g. 'q,k,v,o,mlp'")
    return tuple(t for t in LORA_TARGETS if t in chosen)

  def validate(self) -> None:
    if self.rank < 0:
      raise ConfigError(f"config.model.lora.rank={self.rank} must be >= 0 (0 = no adapters)")
    if self.quantize_base not in LORA_QUANTIZE:
      raise ConfigError(f"config.model.lora.quantize_base={self.quantize_base!r}: use one of "
                        f"{list(LORA_QUANTIZE)} ('' = float base)")
    if not self.target_names():
      raise ConfigError(f"config.model.lora.targets={self.targets!r} names no kernel: use e.g. "
                        "'q,k,v,o,mlp'")
    if self.alpha <= 0:
      raise ConfigError(f"config.model.lora.alpha={self.alpha} must be positive (the update is "
                        "alpha/rank · A·B)")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"config.model.lora.dropout={self.dropout} must be in [0, 1)")
    if self.rank == 0 and self.quantize_base:
      raise ConfigError(
          f"config.model.lora.quantize_base={self.quantize_base!r} freezes a quantized base but "
          "config.model.lora.rank=0 leaves nothing to train: set --config.model.lora.rank "
          "(e.g. 16) or quantize_base=''")


QAT_ACTIVATIONS = ("none", "int8")
QAT_GRANULARITIES = ("per_token", "per_tensor")


@dataclasses.dataclass(frozen=True)
class QatConfig:
  """``config.model.qat``: fake-quantized int8 projections with straight-through gradients
  (kat_jax.model.qat)."""
  enabled: bool = False          # fake-quantize every projection kernel in the forward pass
  weight_bits: int = 8           # weight code width: 8 (symmetric int8, one scale per out channel)
  activations: str = "none"      # inputs of the projections: none | int8 (dynamic, per call)
  act_granularity: str = "per_token"   # int8 activation scales: per_token | per_tensor
  head: bool = False             # also the output head (tied: the embedding, lookup included)
  quantized_params: bool = False   # params hold int8 codes + scales (a qat.export), not floats

  @classmethod
  def from_config(cls, cfg) -> "QatConfig":
    if isinstance(cfg, QatConfig):
      return cfg
    values = dict(cfg.items()) if cfg is not None else {}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields
    if unknown:
      raise ConfigError(f"config.model.qat has unknown field(s) {sorted(unknown)}; known fields: "
                        f"{sorted(fields)}")
    return cls(**values)

  def validate(self) -> None:
    if self.weight_bits != 8:
      raise ConfigError(f"config.model.qat.weight_bits={self.weight_bits}: only 8 (int8 weights) "
                        "is implemented; set --config.model.qat.weight_bits=8")
    if self.activations not in QAT_ACTIVATIONS:
      raise ConfigError(f"config.model.qat.activations={self.activations!r}: use one of "
                        f"{list(QAT_ACTIVATIONS)} ('none' = float activations)")
    if self.act_granularity not in QAT_GRANULARITIES:
      raise ConfigError(f"config.model.qat.act_granularity={self.act_granularity!r}: use one of "
                        f"{list(QAT_GRANULARITIES)}")
    if self.quantized_params and not self.enabled:
      raise ConfigError("config.model.qat.quantized_params=True (int8 codes in the params) needs "
                        "config.model.qat.enabled=True: set both, or quantized_params=False")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  # Llama 3.1-style RoPE frequency scaling ("" = none, "llama3"); see transformer.rope_inv_freq.
  rope_scaling: str = ""
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  norm_eps: float = 1e-6
  qk_norm: bool = False          # Qwen3
  qkv_bias: bool = False         # Qwen2 / Qwen2.5
  tie_embeddings: bool = True
  param_dtype: str = "float32"
  dtype: str = "float32"         # compute dtype
  remat: str = "none"            # none | full | dots (save matmul outputs) | dots_no_batch
  attention_impl: str = "xla"    # see kat_jax.model.attention
  value_head: bool = False       # scalar head over final hidden states (PPO critic)
  # Tokens per slice of the sequence for the token-wise MLP and output head (0 = the whole
  # sequence at once). Exact (same math, separate matmuls per slice). On CPU, slices of a few
  # hundred tokens keep each matmul's operands in cache (docs/PERFORMANCE.md, bench_tree); on
  # accelerators leave it at 0.
  token_chunk: int = 0
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  qat: QatConfig = dataclasses.field(default_factory=QatConfig)

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in cfg.items() if k in fields}
    unknown = set(cfg.keys()) - fields - {"name"}
    if unknown:
      raise ConfigError(
          f"config.model has unknown field(s) {sorted(unknown)}; known fields: {sorted(fields)}")
    if "lora" in values:
      values["lora"] = LoraConfig.from_config(values["lora"])
    if "qat" in values:
      values["qat"] = QatConfig.from_config(values["qat"])
    out = cls(**values)
    out.validate()
    return out

  def validate(self) -> None:
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "mlp_dim"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"config.model.{name}={getattr(self, name)} must be positive")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"config.model.num_heads={self.num_heads} is not divisible by "
          f"config.model.num_kv_heads={self.num_kv_heads}: choose num_kv_heads among the divisors "
          f"of num_heads")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in ("float32", "bfloat16"):
        raise ConfigError(
            f"config.model.{name}={getattr(self, name)!r}: use 'float32' or 'bfloat16'")
    if self.rope_scaling not in ("", "llama3"):
      raise ConfigError(
          f"config.model.rope_scaling={self.rope_scaling!r}: use '' (none) or 'llama3'")
    if self.token_chunk < 0:
      raise ConfigError(
          f"config.model.token_chunk={self.token_chunk} must be >= 0 (0 = no slicing)")
    if self.remat not in ("none", "full", "dots", "dots_no_batch"):
      raise ConfigError(
          f"config.model.remat={self.remat!r}: use one of none, full, dots, dots_no_batch")
    if not isinstance(self.lora, LoraConfig):
      raise ConfigError(f"config.model.lora={self.lora!r} must be a LoraConfig block")
    self.lora.validate()
    if not isinstance(self.qat, QatConfig):
      raise ConfigError(f"config.model.qat={self.qat!r} must be a QatConfig block")
    self.qat.validate()
    if self.qat.enabled and (self.lora.rank > 0 or self.lora.quantize_base):
      raise ConfigError(
          f"config.model.qat.enabled=True with config.model.lora.rank={self.lora.rank} "
          f"(quantize_base={self.lora.quantize_base!r}): QAT trains the projection kernels that "
          "LoRA freezes; use one of them (--config.model.lora.rank=0 or "
          "--config.model.qat.enabled=False)")

  def num_params(self, include_embedding: bool = True) -> int:
    attn = self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * self.d_model * self.mlp_dim
    layer = attn + mlp
    emb = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
    return self.num_layers * layer + (emb if include_embedding else 0)

  def matmul_flops_per_token(self, seq_len: int, causal: bool = True) -> float:
    """Forward+backward matmul FLOPs per token, as MaxText counts them (causal attention halved)."""
    attn_proj = self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * self.d_model * self.mlp_dim
    lm_head = self.vocab_size * self.d_model
    weights = 6 * (self.num_layers * (attn_proj + mlp) + lm_head)
    attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
    if causal:
      attention /= 2
    return float(weights + attention)


_PRESETS = {
    # A few seconds per step on a 2-core CPU. Heads/dims divisible by 8 so every mesh of 8 shards it.
    "tiny": dict(vocab_size=2048, d_model=128, num_layers=4, num_heads=8, num_kv_heads=4,
                 head_dim=16, mlp_dim=512, rope_theta=10_000.0),
    # CPU benchmarks: large enough that matmuls dominate.
    "small": dict(vocab_size=8192, d_model=512, num_layers=6, num_heads=8, num_kv_heads=4,
                  head_dim=64, mlp_dim=2048, rope_theta=10_000.0),
    # Shapes of the Qwen3 family (config.json of the public checkpoints).
    "qwen3_0p6b": dict(vocab_size=151936, d_model=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                       head_dim=128, mlp_dim=3072, rope_theta=1_000_000.0, norm_eps=1e-6,
                       qk_norm=True, tie_embeddings=True, dtype="bfloat16", param_dtype="float32",
                       remat="full"),
    "qwen3_8b": dict(vocab_size=151936, d_model=4096, num_layers=36, num_heads=32, num_kv_heads=8,
                     head_dim=128, mlp_dim=12288, rope_theta=1_000_000.0, norm_eps=1e-6,
                     qk_norm=True, tie_embeddings=False, dtype="bfloat16", param_dtype="float32",
                     remat="full"),
    "qwen3_32b": dict(vocab_size=151936, d_model=5120, num_layers=64, num_heads=64, num_kv_heads=8,
                      head_dim=128, mlp_dim=25600, rope_theta=1_000_000.0, norm_eps=1e-6,
                      qk_norm=True, tie_embeddings=False, dtype="bfloat16", param_dtype="float32",
                      remat="full"),
}


def preset_names() -> list[str]:
  return sorted(_PRESETS)


def get_preset(name: str) -> ml_collections.ConfigDict:
  if name not in _PRESETS:
    raise ConfigError(
        f"unknown model preset {name!r}: choose one of {preset_names()}")
  base = dataclasses.asdict(ModelConfig(**_PRESETS[name]))
  return ml_collections.ConfigDict(dict(name=name, **base))
