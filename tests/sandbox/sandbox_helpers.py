"""Shared pieces of the sandbox tests: tight limits (the machine is shared), a pool fixture, and
host-side probes (processes left under a job's uid)."""
import os

import pytest

from kat_jax.sandbox import Limits, SandboxPool

# Tight enough that a hostile program cannot hurt a small shared machine (aggregate memory is
# bounded by max_processes × memory_bytes = 2 GiB per job).
TIGHT_LIMITS = Limits(wall_time_s=3.0, cpu_time_s=2, memory_bytes=256 << 20, max_processes=8,
                      file_size_bytes=1 << 20, disk_bytes=4 << 20, disk_inodes=128,
                      open_files=64, output_bytes=1 << 20, capture_bytes=4096)


def processes_of_uid(uid: int) -> list[int]:
  """Host pids whose real or effective uid is ``uid``."""
  found = []
  for entry in os.scandir("/proc"):
    if entry.name.isdigit():
      try:
        with open(f"/proc/{entry.name}/status") as status:
          for line in status:
            if line.startswith("Uid:"):
              if str(uid) in line.split()[1:3]:
                found.append(int(entry.name))
              break
      except OSError:
        continue
  return found


@pytest.fixture(scope="module")
def pool():
  with SandboxPool(num_workers=2, limits=TIGHT_LIMITS) as sandbox_pool:
    yield sandbox_pool
