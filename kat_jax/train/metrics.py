"""Training metrics: MFU as MaxText defines it, a peak-FLOP/s probe, and a writer that sends scalars
to TensorBoard (tensorboardX) and the console (tqdm progress bar + absl log lines)."""
from __future__ import annotations

import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
from absl import logging

# Dense bf16 peak FLOP/s per device by jax device_kind (vendor datasheets).
_PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
}


def measure_peak_matmul_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32,
                              device: Optional[jax.Device] = None) -> float:
  """FLOP/s of a large jitted matmul on one device: the roofline for CPU figures."""
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  b = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def peak_flops_per_device(configured: float = 0.0) -> float:
  """``configured`` if > 0, else a datasheet value for the device kind, else a measured matmul."""
  if configured > 0:
    return configured
  kind = jax.devices()[0].device_kind
  for name, flops in _PEAK_FLOPS.items():
    if kind.startswith(name):
      return flops
  return measure_peak_matmul_flops(n=1024, repeats=3)


class MetricWriter:
  """Scalars to TensorBoard under ``workdir/tb`` (process 0 only) and to the console."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0,
               progress_bar: bool = True):
    self._tb = None
    self._bar = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      if progress_bar:
        from tqdm import tqdm
        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                         dynamic_ncols=True)

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def write(self, step: int, scalars: dict, prefix: str = "train") -> None:
    if jax.process_index() != 0:
      return
    for k, v in scalars.items():
      self._tb.add_scalar(f"{prefix}/{k}", float(v), step)
    self._tb.flush()
    line = " ".join(f"{k}={float(v):.4g}" for k, v in sorted(scalars.items()))
    if self._bar is not None:
      self._bar.set_postfix_str(f"{prefix} loss={float(scalars.get('loss', float('nan'))):.4f}")
    logging.info("step %d %s: %s", step, prefix, line)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
