"""Tree attention kernels: key k visible to query q iff ``tin[k] <= tin[q] < tout[k]``.

Implementations with one signature ``tree_attention(q_bthd, k_bshd, v_bshd, mask) -> out_bthd``
(``mask`` is ``kat_jax.model.attention.AttentionMask``), selected by the model's config name:

* ``reference``   — plain XLA, scan over key blocks, custom VJP; visits every block (the yardstick).
* ``blocksparse`` — plain XLA, visits only key blocks listed in ``mask.blocks`` (the CPU fast path).
* ``pallas``      — Pallas kernel: TPU (``pallas_tpu``) or GPU Triton (``pallas_gpu``), interpret
                    mode on CPU.

``layout.block_layout(tin, tout, block_q, block_k)`` computes ``mask.blocks`` on the host;
``synthetic`` makes test trees.
"""
from kernels.tree_attention.layout import BlockSizes, block_layout, visited_fraction  # noqa: F401
