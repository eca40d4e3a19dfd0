"""Test set-up: 8 simulated CPU devices, set before JAX initializes its backends, and one persistent
XLA compilation cache for the whole run."""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The same tiny-model programs (state init, train steps, sampler) are compiled by many tests and by
# the programs the tests launch. One cache directory for the run — created by the first pytest
# process, inherited through the environment by the xdist workers and every launched program —
# makes each compile once; a cached executable is the compiled binary itself, so results are
# unchanged. Removed when the run ends; a directory set by the caller is used and kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kat_jax_xla_cache_")
  # A size bound turns on the cache's file locks: concurrent workers never read a partial entry.
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))

import jax  # noqa: E402  (import after the flags are set)

jax.config.update("jax_enable_x64", False)


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):   # the run's first process, at its end
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
