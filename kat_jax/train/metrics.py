"""Training metrics: MFU as MaxText defines it, a peak-FLOP/s probe, and a writer that sends scalars
to TensorBoard (tensorboardX) and the console (tqdm progress bar + absl log lines)."""
from __future__ import annotations

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


def console(text: str) -> None:
  """A line for the person watching (process 0 only), kept clear of an active progress bar."""
  if jax.process_index() != 0:
    return
  from tqdm import tqdm
  tqdm.write(text)


def format_scalars(scalars: dict) -> str:
  return " ".join(f"{k}={float(v):.4g}" for k, v in sorted(scalars.items()))


class MetricWriter:
  """Scalars to TensorBoard under ``log_dir`` (process 0 only) and to the console: a tqdm progress
  bar and one line per written step (plus the absl log at INFO)."""

  def __init__(self, log_dir: str, total_steps: int, initial_step: int = 0,
               progress_bar: bool = True):
    self.log_dir = log_dir
    self._tb = None
    self._bar = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(log_dir)
      if progress_bar:
        from tqdm import tqdm
        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                         dynamic_ncols=True, leave=False)

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def write(self, step: int, scalars: dict, prefix: str = "train") -> None:
    if jax.process_index() != 0:
      return
    for k, v in scalars.items():
      self._tb.add_scalar(f"{prefix}/{k}", float(v), step)
    self._tb.flush()
    if self._bar is not None:
      self._bar.set_postfix_str(f"{prefix} loss={float(scalars.get('loss', float('nan'))):.4f}")
    # The console shows the top-level scalars; grouped ones (data/..., status/...) go to
    # TensorBoard and the absl log.
    console(f"step {step} {prefix}: "
            f"{format_scalars({k: v for k, v in scalars.items() if '/' not in k})}")
    logging.info("step %d %s: %s", step, prefix, format_scalars(scalars))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()


def run_summary(result: dict) -> str:
  """A few lines a person reads at the end of a run: steps, final losses, throughput, wall time,
  where the checkpoints and TensorBoard logs are."""
  lines = [f"finished: step {result.get('step')} (started at {result.get('start_step', 0)}) in "
           f"{result.get('wall_time_s', float('nan')):.1f} s"]
  losses = [f"{name} loss {result[key]:.4f}" for name, key in (("train", "train_loss"),
                                                                ("eval", "eval_loss"))
            if key in result]
  if losses:
    lines.append("  final " + ", ".join(losses))
  if "train_tokens_per_s" in result:
    lines.append(f"  throughput {result['train_tokens_per_s']:.0f} tokens/s, "
                 f"MFU {result.get('train_mfu', float('nan')):.3f}")
  for name, key in (("checkpoints", "checkpoint_dir"), ("TensorBoard", "tensorboard_dir")):
    if key in result:
      lines.append(f"  {name}: {result[key]}")
  return "\n".join(lines)
