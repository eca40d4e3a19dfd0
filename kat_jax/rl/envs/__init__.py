"""Agentic environments by name: ``envs.make(name, config, pool=...)`` (see ``base``)."""
from kat_jax.rl.envs.base import (Environment, Grade, Observation, StepResult, make, names,
                                  register)
