"""Devices: multi-host start-up, the data-parallel mesh, precision, compilation cache."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from imgx_train import config as config_lib

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """Joins a multi-host run when the environment describes one.

    `IMGX_COORDINATOR_ADDRESS` (host:port), `IMGX_NUM_PROCESSES` and `IMGX_PROCESS_ID`
    set the three values explicitly (e.g. two processes on one machine); on Cloud TPU pods
    and SLURM, `IMGX_DISTRIBUTED=1` lets jax discover them. Without either, one process.
    """
    if jax.distributed.is_initialized():
        return
    address = os.environ.get("IMGX_COORDINATOR_ADDRESS")
    if address or os.environ.get("IMGX_DISTRIBUTED") == "1":
        # Collectives between CPU processes (ignored by GPU/TPU backends).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["IMGX_NUM_PROCESSES"]),
            process_id=int(os.environ["IMGX_PROCESS_ID"]),
        )
    elif os.environ.get("IMGX_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def enable_compilation_cache(enabled: bool) -> None:
    """JAX's persistent compilation cache under the user's cache dir.

    A second run with the same shapes loads its compiled steps instead of compiling them.
    `IMGX_COMPILATION_CACHE_DIR` moves it; `logging.compilation_cache=false` turns it off.
    """
    if not enabled:
        return
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imgx" / "jax"
    directory = Path(os.environ.get("IMGX_COMPILATION_CACHE_DIR", default))
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def setup(cfg: config_lib.Config) -> None:
    initialize_distributed()
    enable_compilation_cache(cfg.logging.compilation_cache)


def data_mesh() -> Mesh:
    """All devices of all hosts on one `data` axis (parameters replicated, batch sharded)."""
    return jax.make_mesh(
        (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def host_local(tree):
    """A replicated pytree as arrays of this process's first device.

    Evaluation runs per process on host data; its inputs are local, so the parameters
    must be local too (a global array spans devices of other hosts).
    """
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def is_main_process() -> bool:
    """Process 0 writes the run's files (logs, config, plots); all processes train."""
    return jax.process_index() == 0


def compute_dtype(name: str) -> jnp.dtype:
    """`auto`: bfloat16 on GPU/TPU, float32 on CPU."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)
