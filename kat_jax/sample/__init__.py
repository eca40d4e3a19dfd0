"""KV-cache sampler: batched, jitted, sharded generation with per-token log-probs and entropies.

    from kat_jax.sample import Sampler, SamplingConfig
    out = Sampler(model, params, max_len=512).generate(prompts, jax.random.key(0),
                                                       SamplingConfig(temperature=0.7))

``distribution`` defines the sampling distribution (temperature, top-k, top-p, greedy), ``decode``
the pure prefill + decode-loop core (for RL rollouts), ``sampler`` the host-side driver (padding,
sharding, stop strings, results as numpy), ``beam`` beam search on the same core
(``Sampler.beam_search``).
"""
from kat_jax.sample.beam import BeamOutput, beam_search
from kat_jax.sample.decode import DecodeState, decode_steps, generate_ids, prefill
from kat_jax.sample.distribution import (SamplingConfig, entropy, filtered_logits,
                                         policy_log_probs, sample_tokens, sampling_log_probs)
from kat_jax.sample.sampler import Episode, SampleOutput, Sampler, cut_at_stop_string

__all__ = ["BeamOutput", "DecodeState", "Episode", "SampleOutput", "Sampler", "SamplingConfig",
           "beam_search", "cut_at_stop_string", "decode_steps", "entropy", "filtered_logits",
           "generate_ids", "policy_log_probs", "prefill", "sample_tokens", "sampling_log_probs"]
