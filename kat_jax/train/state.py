"""Train state, created abstractly and materialized directly sharded.

``create_sharded_state`` traces ``init`` with ``jax.eval_shape`` (no FLOPs, no memory), reads the
logical axis names the model attached to every parameter (optimizer moments inherit them), maps them
through the config's rules onto the mesh, and runs ``init`` under ``jax.jit(out_shardings=...)`` so each
device only ever holds its own shards — there is never an unsharded copy on the host.

``trainable`` (a function of the params tree, e.g. ``kat_jax.model.lora.adapters_of``) makes the
state hold only that part of the params, with optimizer state for it alone; the rest (a LoRA run's
frozen base) is the caller's, and under ``jit`` the unused part of ``init`` is never computed.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

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
                   example: dict[str, jax.ShapeDtypeStruct],
                   trainable: Optional[Callable[[Any], Any]] = None
                   ) -> Callable[[jax.Array], TrainState]:
  from kat_jax.model.attention import AttentionMask

  def init(rng):
    tokens = jnp.zeros(example["inputs"].shape, jnp.int32)
    mask = AttentionMask(tin=jnp.zeros_like(tokens), tout=jnp.ones_like(tokens))
    params = model.init(rng, tokens, jnp.zeros_like(tokens), mask)["params"]
    if trainable is not None:
      params = trainable(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return init


def abstract_state(model, tx, example, mesh: Mesh, rules,
                   trainable: Optional[Callable[[Any], Any]] = None
                   ) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state with shardings attached, tree of NamedShardings)."""
  init = _boxed_init_fn(model, tx, example, trainable)
  boxed = jax.eval_shape(init, jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  shardings = sharding_lib.logical_to_mesh(specs, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def create_sharded_state(model, tx, example, mesh: Mesh, rules, rng: jax.Array,
                         trainable: Optional[Callable[[Any], Any]] = None):
  """Returns (state, shardings): the state materialized directly into its sharded layout."""
  init = _boxed_init_fn(model, tx, example, trainable)
  _, shardings = abstract_state(model, tx, example, mesh, rules, trainable)
  state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings
