"""kat_jax: JAX/Flax training of agentic code models with the KAT-Coder recipe."""
