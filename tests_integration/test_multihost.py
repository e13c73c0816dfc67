"""Two real processes (CPU collectives, coordinator on 127.0.0.1) train in lockstep.

Each process has one CPU device and loads its own half of every global batch; the result
must equal one process with two devices and the same global batch.
"""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import imgx_data
from imgx_train import evaluation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = textwrap.dedent(
    """
    import sys
    from imgx_train import presets, trainer
    data_dir, run_dir = sys.argv[1], sys.argv[2]
    cfg = presets.make_config(
        "phantom", task="seg", preset="debug",
        overrides=f"logging.wandb=disabled,logging.progress=false,logging.compilation_cache=false,"
        f"data.data_dir={data_dir},train.steps=3,train.eval_every=100,"
        f"train.checkpoint_every=100,train.max_valid_cases=2,data.eval_batch_size=2",
    )
    trainer.train(cfg, run_dir=run_dir)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGX_")}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        **extra,
    )
    return env


def test_two_processes_match_one(tmp_path):
    data_dir = tmp_path / "data"
    imgx_data.build("phantom", data_dir=data_dir, split_sizes=(8, 2, 2))
    single = tmp_path / "single"
    subprocess.run(
        [sys.executable, "-c", SCRIPT, str(data_dir), str(single)],
        env=_env(2),
        check=True,
        timeout=600,
    )
    multi = tmp_path / "multi"
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(data_dir), str(multi)],
            env=_env(
                1,
                IMGX_COORDINATOR_ADDRESS=address,
                IMGX_NUM_PROCESSES="2",
                IMGX_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    a = evaluation.restore_run(single, "last")
    b = evaluation.restore_run(multi, "last")
    assert a.step == b.step == 3
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    # Only process 0 wrote the logs: one line per step.
    lines = (multi / "metrics" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 3
