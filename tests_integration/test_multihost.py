"""Two real processes (CPU collectives, coordinator on 127.0.0.1) train in lockstep.

Each process has one CPU device and loads its own half of every global batch; the result
must equal one process with two devices and the same global batch.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import imgx_data
from imgx_train import evaluation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERRIDES = (
    "logging.wandb=disabled,logging.progress=false,logging.compilation_cache=false,"
    "data.data_dir={data_dir},train.steps=3,train.eval_every=100,"
    "train.checkpoint_every=100,train.max_valid_cases=2,data.eval_batch_size=2"
)

SINGLE = textwrap.dedent(
    """
    import sys
    from imgx_train import presets, trainer
    data_dir, run_dir, overrides = sys.argv[1:]
    cfg = presets.make_config("phantom", task="seg", preset="debug", overrides=overrides)
    trainer.train(cfg, run_dir=run_dir)
    """
)

# Each process of the multi-host run: a new run (no folder given: process 0 names it),
# a Ctrl-C on process 1 only after step 2, resume to step 3, then a test evaluation. On
# process 1 every writer of test outputs and plots fails: only process 0 may write them.
MULTI = textwrap.dedent(
    """
    import os, signal, sys, time
    import jax
    import imgx_data
    from imgx_train import devices, evaluation, presets, reports, trainer
    data_dir, root, overrides = sys.argv[1:]
    os.chdir(root)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # not ignored as in a background job
    cfg = presets.make_config("phantom", task="seg", preset="debug", overrides=overrides)
    devices.setup(cfg)
    if jax.process_index() == 1:
        time.sleep(1.5)  # another second on this host's clock: another default run name
        def refuse(*args, **kwargs):
            raise AssertionError("process 1 wrote a file that only process 0 writes")
        imgx_data.write_image = refuse
        for name in ("write_per_case_csv", "write_summary_json", "save_overlay", "plot_curves"):
            setattr(reports, name, refuse)
    try:
        trainer.train(cfg)
        raise SystemExit("not interrupted")
    except trainer.TrainingInterrupted as e:
        print(f"INTERRUPTED {e.step} {e.run_dir}", flush=True)
        run_dir = e.run_dir
    os.environ.pop("IMGX_FAULT_INJECTION", None)
    trainer.resume(run_dir)
    summary = evaluation.evaluate(run_dir, split="test", checkpoint="last")
    print(f"EVALUATED {summary['checkpoint']} {summary['output_dir']}", flush=True)
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


def test_two_processes_match_one_and_agree(tmp_path):
    """Two processes train, stop, resume and evaluate as one; the run equals one process
    with two devices. They agree on the run folder (named by process 0 although process
    1's clock is a second later), stop after the same step when only process 1 gets a
    Ctrl-C, resume the same step, and only process 0 writes test outputs and plots."""
    data_dir = tmp_path / "data"
    imgx_data.build("phantom", data_dir=data_dir, split_sizes=(8, 2, 2))
    overrides = OVERRIDES.format(data_dir=data_dir)
    single = tmp_path / "single"
    subprocess.run(
        [sys.executable, "-c", SINGLE, str(data_dir), str(single), overrides],
        env=_env(2),
        check=True,
        timeout=600,
    )
    root = tmp_path / "multi"
    root.mkdir()
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MULTI, str(data_dir), str(root), overrides],
            env=_env(
                1,
                IMGX_COORDINATOR_ADDRESS=address,
                IMGX_NUM_PROCESSES="2",
                IMGX_PROCESS_ID=str(i),
                **({"IMGX_FAULT_INJECTION": "interrupt:2"} if i == 1 else {}),
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
    (multi,) = [p for p in (root / "runs").iterdir() if p.name != "latest"]
    for out in outputs:
        interrupted = [line.split() for line in out.splitlines() if line.startswith("INTERRUPTED")]
        evaluated = [line.split() for line in out.splitlines() if line.startswith("EVALUATED")]
        assert [(step, Path(path).name) for _, step, path in interrupted] == [("2", multi.name)]
        assert [(step, multi.name in Path(path).parts) for _, step, path in evaluated] == [
            ("3", True)
        ], out[-3000:]
    a = evaluation.restore_run(single, "last")
    b = evaluation.restore_run(multi, "last")
    assert a.step == b.step == 3
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    # Only process 0 wrote the logs: one line per step, the resumed step once.
    lines = (multi / "metrics" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert [p.parent.name for p in (multi / "test").glob("*/summary.json")] == ["step_3"]
    assert (multi / "plots" / "curves.png").exists()
    # The write probe is named by host and pid, so hosts sharing the folder never clash.
    assert not list(multi.glob(".write_test*"))
