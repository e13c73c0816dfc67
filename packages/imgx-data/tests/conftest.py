"""Test set-up shared by this package's tests: 2 fake CPU devices and the shared JAX
compilation cache, before jax is imported."""

import os
from pathlib import Path

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


import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def not_utf8():
    """Makes an empty file named in bytes that are not UTF-8 (``os.listdir`` gives the name
    surrogate-escaped, e.g. ``"case\\udcff.nii.gz"``) and returns its path."""

    def make(folder: Path, name: bytes) -> Path:
        if sys.getfilesystemencoding() != "utf-8":
            pytest.skip("needs a UTF-8 file system encoding with surrogate escapes (Linux)")
        try:
            with open(os.fsencode(folder) + b"/" + name, "wb"):
                pass
        except OSError:
            pytest.skip("the file system refuses names that are not UTF-8")
        return folder / os.fsdecode(name)

    return make
