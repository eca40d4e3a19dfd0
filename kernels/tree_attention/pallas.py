"""Pallas tree attention, dispatched on the JAX backend: TPU (Mosaic) or GPU (Triton) kernel.

``tree_attention(q_bthd, k_bshd, v_bshd, mask)`` runs

* on TPU: ``pallas_tpu`` compiled with Mosaic (default blocks 128 x 128),
* on GPU: ``pallas_gpu`` compiled with Triton (default blocks 64 x 64),
* on CPU: one of them in interpret mode (``variant``, default ``"tpu"``; blocks 64 x 64, the
  ``layout.block_layout`` default), so the model's tests exercise the kernel code.

Both kernels compute the mask in-kernel from the intervals and skip key blocks through visit
lists (see their module docstrings); both have a flash-attention custom VJP (forward saves the
log-sum-exp, backward computes dQ and dK/dV in two kernels). ``mask.blocks`` from
``layout.block_layout(tin, tout, block_q, block_k)`` gives exact lists; without it they are
computed in the graph from per-block interval bounds. The block sizes of the layout and of the
call must agree (an error says so). ``tree_attention_reference`` is the plain-XLA reference with
the same signature.

Keywords: ``block_sizes`` (``BlockSizes``), ``variant`` ("tpu" | "gpu"), ``interpret`` (None: only
when the variant does not match the backend; True; or ``pltpu.InterpretParams()`` for the
TPU-faithful simulator, which also catches out-of-bounds and uninitialized reads).
"""
from __future__ import annotations

from typing import Any, Optional

import jax

from kernels.tree_attention import pallas_gpu, pallas_tpu
from kernels.tree_attention.layout import BlockSizes
# The plain-XLA reference with the same signature, kept beside the kernel as in pallas/ops.
from kernels.tree_attention.reference import tree_attention as tree_attention_reference  # noqa

VARIANTS = {"tpu": pallas_tpu, "gpu": pallas_gpu}
CPU_VARIANT = "tpu"


def default_block_sizes(variant: str, backend: str) -> BlockSizes:
  """The block sizes ``tree_attention`` uses when none are given (match them in block_layout)."""
  if backend == variant:
    return VARIANTS[variant].default_block_sizes()
  return BlockSizes()


def tree_attention(q_bthd, k_bshd, v_bshd, mask, *, block_sizes: Optional[BlockSizes] = None,
                   variant: Optional[str] = None, interpret: Any = None):
  """Tree self-attention, [B, T, Hq, D] x [B, T, Hkv, D] -> [B, T, Hq, D] (dtype of q)."""
  backend = jax.default_backend()
  if variant is None:
    variant = backend if backend in VARIANTS else CPU_VARIANT
  if variant not in VARIANTS:
    raise ValueError(f"unknown Pallas variant {variant!r}: use one of {sorted(VARIANTS)}")
  if interpret is None:
    interpret = backend != variant
  block_sizes = block_sizes or default_block_sizes(variant, backend)
  return VARIANTS[variant].tree_attention(q_bthd, k_bshd, v_bshd, mask, block_sizes=block_sizes,
                                          interpret=interpret)
