"""Decoder Transformer, attention dispatch, presets."""
from kat_jax.model.attention import AttentionMask, intervals_from_segment_ids
from kat_jax.model.presets import ModelConfig, get_preset, preset_names
from kat_jax.model.transformer import KVCache, ModelOutput, Transformer
