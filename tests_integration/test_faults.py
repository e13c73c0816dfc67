"""Faults: SIGKILL between steps and in the middle of a checkpoint save, a full disk,
an unwritable run directory. A killed run resumes to the same parameters as a run that was
never interrupted.
"""

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import imgx_data
from imgx_train import evaluation, presets, runs, trainer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERRIDES = (
    "logging.wandb=disabled,logging.progress=false,train.steps=6,train.eval_every=100,"
    "train.checkpoint_every=2,train.max_valid_cases=2,data.eval_batch_size=2"
)

SCRIPT = textwrap.dedent(
    """
    import sys
    from imgx_train import presets, trainer
    data_dir, run_dir = sys.argv[1], sys.argv[2]
    cfg = presets.make_config(
        "phantom", task="diffusion", preset="debug",
        overrides=sys.argv[3] + f",data.data_dir={data_dir}",
    )
    trainer.train(cfg, run_dir=run_dir)
    """
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    imgx_data.build("phantom", data_dir=path, split_sizes=(8, 2, 2))
    return path


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    cfg = presets.make_config(
        "phantom", task="diffusion", preset="debug",
        overrides=f"{OVERRIDES},data.data_dir={data_dir}",
    )  # fmt: skip
    run_dir = trainer.train(cfg, run_dir=tmp_path_factory.mktemp("runs") / "straight")
    return evaluation.restore_run(run_dir, "last").params


@pytest.mark.parametrize("point", ["step:3", "save:4"])
def test_killed_run_resumes_to_the_same_parameters(data_dir, straight, tmp_path, point, capsys):
    """Checkpoints every 2 steps. `step:3` kills after step 3's update, once step 2's
    asynchronous save is committed; `save:4` kills inside the save of step 4, after its files
    are written and before orbax commits (renames) them. Either way exactly checkpoint 2 is
    complete, the resume starts from it and ends where the straight run does."""
    run_dir = tmp_path / "killed"
    env = dict(os.environ, IMGX_FAULT_INJECTION=point)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(data_dir), str(run_dir), OVERRIDES],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == -9, result.stderr[-2000:]
    checkpoints = run_dir / "checkpoints"
    logged = [r["step"] for r in runs.read_jsonl(run_dir / "metrics" / "train.jsonl")]
    if point == "save:4":
        # Killed mid-save: step 4's data was written to orbax's temporary folder, which was
        # never committed, although the log had reached step 4.
        assert not (checkpoints / "4").exists()
        partial = list(checkpoints.glob("4.orbax-checkpoint-tmp*"))
        assert len(partial) == 1 and any(f.is_file() for f in partial[0].rglob("*"))
        assert logged[:4] == [1, 2, 3, 4]
    else:
        assert logged == [1, 2, 3]
    complete = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert complete == [2]  # committed before the kill (step:3), or before the next save
    trainer.resume(run_dir)
    out = capsys.readouterr().out
    assert f"resumed {run_dir.resolve()} at step 2" in out
    resumed = evaluation.restore_run(run_dir, "last")
    assert resumed.step == 6
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [r["step"] for r in runs.read_jsonl(run_dir / "metrics" / "train.jsonl")]
    assert steps == list(range(1, 7))


def test_full_disk_is_a_clear_error(data_dir, tmp_path, monkeypatch):
    cfg = presets.make_config(
        "phantom", preset="debug", overrides=f"{OVERRIDES},data.data_dir={data_dir}"
    )

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(runs.RunError, match="disk is full"):
        trainer.train(cfg, run_dir=tmp_path / "run")


def test_unwritable_run_dir_is_a_clear_error(data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = presets.make_config(
        "phantom", preset="debug", overrides=f"{OVERRIDES},data.data_dir={data_dir}"
    )
    with pytest.raises(runs.RunError, match="cannot write the run directory"):
        trainer.train(cfg, run_dir=blocker / "run")
