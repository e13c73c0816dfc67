"""Test set-up shared by this package's tests: 2 fake CPU devices and the shared JAX
compilation cache, before jax is imported."""

import gc
import os
from pathlib import Path

import pytest

_FLAG = "--xla_force_host_platform_device_count=2"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole suite, inside the clone (git ignores
# .pytest_cache/), not in ~/.cache: a step compiled by one test module (or an earlier run)
# is loaded by the next. JAX_* for every jit of the tests, IMGX_* for imgx_train runs.
os.environ.setdefault(
    "IMGX_COMPILATION_CACHE_DIR",
    str(Path(__file__).resolve().parents[3] / ".pytest_cache" / "jax-compilation-cache"),
)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["IMGX_COMPILATION_CACHE_DIR"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(autouse=True)
def _collect_garbage_between_tests():
    """Runs the finalizers of what a test left (e.g. an orbax CheckpointManager a test
    never closed) here, between tests, rather than whenever the collector next runs: inside
    CPython 3.11's thread bootstrap such a finalizer deadlocks the next thread start
    (seen once in CI: orbax's `_AsyncManager.__del__` under `_maintain_shutdown_locks`)."""
    yield
    gc.collect()
