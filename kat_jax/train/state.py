"""Train state, created abstractly and materialized directly sharded.

``create_sharded_state`` traces ``init`` with ``jax.eval_shape`` (no FLOPs, no memory), reads the
logical axis names the model attached to every parameter (optimizer moments inherit them), maps them
through the config's rules onto the mesh, and runs ``init`` under ``jax.jit(out_shardings=...)`` so each
device only ever holds its own shards — there is never an unsharded copy on the host.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from kat_jax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def _boxed_init_fn(model: nn.Module, tx: optax.GradientTransformation,
                   example: dict[str, jax.ShapeDtypeStruct]) -> Callable[[jax.Array], TrainState]:
  from kat_jax.model.attention import AttentionMask

  def init(rng):
    tokens = jnp.zeros(example["inputs"].shape, jnp.int32)
    mask = AttentionMask(tin=jnp.zeros_like(tokens), tout=jnp.ones_like(tokens))
    params = model.init(rng, tokens, jnp.zeros_like(tokens), mask)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return init


def abstract_state(model, tx, example, mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state with shardings attached, tree of NamedShardings)."""
  init = _boxed_init_fn(model, tx, example)
  boxed = jax.eval_shape(init, jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  shardings = sharding_lib.logical_to_mesh(specs, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def create_sharded_state(model, tx, example, mesh: Mesh, rules, rng: jax.Array):
  """Returns (state, shardings): the state materialized directly into its sharded layout."""
  init = _boxed_init_fn(model, tx, example)
  _, shardings = abstract_state(model, tx, example, mesh, rules)
  state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings
