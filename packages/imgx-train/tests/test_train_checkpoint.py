"""Checkpoints without training: which ones are kept, which one is `best`, a full disk.

A two-leaf state stands in for the train state, so nothing is compiled.
"""

import builtins
import errno

import jax.numpy as jnp
import numpy as np
import pytest

from imgx_train import checkpoint as ckpt_lib
from imgx_train import runs


def _state(value: float) -> dict:
    return {"params": {"w": jnp.full((3,), value, jnp.float32)}, "step": jnp.asarray(0)}


def test_best_survives_past_the_last_n_and_ties_go_to_the_earliest(tmp_path):
    """keep=2 over dice 0.2, 0.9, 0.9, 0.5, 0.1: steps 4, 5 (last two) and 2 (best) remain.

    Step 3 ties step 2; `valid.jsonl` readers (`evaluation.restore_run`) take the first
    maximum, so the preservation policy must keep step 2, not step 3.
    """
    dice = {1: 0.2, 2: 0.9, 3: 0.9, 4: 0.5, 5: 0.1}
    mngr = ckpt_lib.manager(tmp_path, keep=2)
    best = None
    for step, value in dice.items():
        if best is None or value > best["valid_dice"]:
            best = {"step": step, "valid_dice": value}
        ckpt_lib.save(mngr, step, _state(step), {"best": best}, valid_dice=value)
        ckpt_lib.wait(mngr)
    mngr.close()

    reader = ckpt_lib.manager(tmp_path, read_only=True)
    assert sorted(reader.all_steps()) == [2, 4, 5]
    first_max = max(dice, key=lambda s: (dice[s], -s))  # what restore_run computes
    assert ckpt_lib.select_step(reader, "best", best_step=first_max) == 2
    assert ckpt_lib.select_step(reader, "last", best_step=first_max) == 5
    assert ckpt_lib.read_meta(reader, 5)["best"] == {"step": 2, "valid_dice": 0.9}
    step, state, meta = ckpt_lib.restore(reader, 2, _state(0.0))
    assert (step, meta["best"]) == (2, {"step": 2, "valid_dice": 0.9})
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), 2.0)


def test_best_falls_back_to_the_last_and_unvalidated_steps_are_not_best(tmp_path):
    mngr = ckpt_lib.manager(tmp_path, keep=1)
    for step in (1, 2, 3):
        ckpt_lib.save(mngr, step, _state(step), {}, valid_dice=float("nan"))
        ckpt_lib.wait(mngr)
    mngr.close()
    reader = ckpt_lib.manager(tmp_path, read_only=True)
    assert sorted(reader.all_steps()) == [3]  # a NaN Dice never ranks as the best
    assert ckpt_lib.select_step(reader, "best", best_step=None) == 3
    assert ckpt_lib.select_step(reader, "best", best_step=1) == 3
    with pytest.raises(ckpt_lib.CheckpointError, match="available"):
        ckpt_lib.select_step(reader, 7, best_step=None)


# orbax's background threads outlive the failed save and complain when their loop closes.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_full_disk_during_a_save_is_a_clear_error(tmp_path, monkeypatch):
    """ENOSPC while orbax writes checkpoint 2 in the background: a RunError on waiting."""
    run_dir = tmp_path / "run"
    mngr = ckpt_lib.manager(run_dir, keep=3)
    ckpt_lib.save(mngr, 1, _state(1.0), {})
    ckpt_lib.wait(mngr)
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and str(run_dir) in str(file):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    with pytest.raises(runs.RunError, match="the disk is full") as info:
        ckpt_lib.save(mngr, 2, _state(2.0), {})
        ckpt_lib.wait(mngr)
    message = str(info.value)
    assert str(run_dir / "checkpoints") in message
    assert f"imgx train --resume {run_dir}" in message
    # Nothing but the complete checkpoint is one that a resume would pick.
    reader = ckpt_lib.manager(run_dir, read_only=True)
    assert sorted(reader.all_steps()) == [1]
    assert not (run_dir / "checkpoints" / "2").exists()


def _two_steps(run_dir):
    mngr = ckpt_lib.manager(run_dir, keep=3)
    for step in (1, 2):
        ckpt_lib.save(mngr, step, _state(step), {"at": step})
        ckpt_lib.wait(mngr)
    mngr.close()
    return run_dir / "checkpoints"


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.EIO, "Input/output error"),
        OSError(errno.ESTALE, "Stale file handle"),
        RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.0GiB"),
        TimeoutError("barrier timed out after 300 s"),
        ValueError("DEADLINE_EXCEEDED: Error reading local file"),
    ],
    ids=["EIO", "ESTALE", "OOM", "timeout", "ts-deadline"],
)
def test_a_read_error_that_proves_nothing_stops_and_changes_nothing(tmp_path, monkeypatch, error):
    checkpoints = _two_steps(tmp_path)
    before = _files(checkpoints)
    real_restore = ckpt_lib.ocp.CheckpointManager.restore

    def flaky(self, step, *args, **kwargs):
        if step == 2:
            raise error
        return real_restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "restore", flaky)
    mngr = ckpt_lib.manager(tmp_path, keep=3)
    with pytest.raises(ckpt_lib.CheckpointReadError, match="checkpoints/2") as info:
        ckpt_lib.restore_latest(mngr, _state(0.0))
    assert info.value.__cause__ is error and "resume again" in str(info.value)
    assert ckpt_lib.corruption_reason(error) is None
    mngr.close()
    assert _files(checkpoints) == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_corrupt_step_is_passed_over_kept_and_set_aside_before_it_is_written_again(
    tmp_path, caplog
):
    """Step 2's metadata garbled: restore falls back to 1 naming step 2 and why, with step 2
    untouched; set aside, step 2 can be saved again and the corrupt files are still there."""
    checkpoints = _two_steps(tmp_path)
    (checkpoints / "2" / "meta" / "metadata").write_text("{not json")
    before = _files(checkpoints / "2")
    mngr = ckpt_lib.manager(tmp_path, keep=3)
    with caplog.at_level("WARNING", logger="imgx_train.checkpoint"):
        step, state, meta, skipped = ckpt_lib.restore_latest(mngr, _state(0.0))
    assert (step, meta, list(skipped)) == (1, {"at": 1}, [2])
    assert "not valid JSON" in skipped[2]
    assert f"{checkpoints}/2 is corrupt (a metadata file is not valid JSON" in caplog.text
    assert _files(checkpoints / "2") == before

    moved = ckpt_lib.set_aside(mngr, 2, skipped[2])
    assert moved.parent == checkpoints and moved.name.startswith("corrupt-2-")
    assert _files(moved) == before
    ckpt_lib.save(mngr, 2, _state(2.0), {"at": 2})
    ckpt_lib.wait(mngr)
    mngr.close()
    reader = ckpt_lib.manager(tmp_path, read_only=True)
    assert sorted(reader.all_steps()) == [1, 2]
    assert ckpt_lib.restore(reader, 2, _state(0.0))[2] == {"at": 2}
    assert _files(moved) == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["missing-item", "missing-data", "garbled-manifest"])
def test_provable_corruption(tmp_path, damage):
    checkpoints = _two_steps(tmp_path)
    state_dir = checkpoints / "2" / "state"
    if damage == "missing-item":
        for f in sorted(state_dir.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        state_dir.rmdir()
    elif damage == "missing-data":
        for f in (state_dir / "d").iterdir():
            f.unlink()
    else:
        (state_dir / "manifest.ocdbt").write_bytes(b"garbage")
    mngr = ckpt_lib.manager(tmp_path, read_only=True)
    step, _, _, skipped = ckpt_lib.restore_latest(mngr, _state(0.0))
    assert step == 1 and list(skipped) == [2]
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="checkpoints/2 is corrupt"):
        ckpt_lib.restore(mngr, 2, _state(0.0))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_full_disk_inside_tensorstore_s_array_write_is_a_clear_error(tmp_path, monkeypatch):
    """tensorstore reports ENOSPC as a ValueError without an errno, from inside orbax's array
    write (after the run's write probe passed): a RunError, and step 2 is not a checkpoint."""
    from orbax.checkpoint._src.serialization import serialization

    run_dir = tmp_path / "run"
    mngr = ckpt_lib.manager(run_dir, keep=3)
    ckpt_lib.save(mngr, 1, _state(1.0), {})
    ckpt_lib.wait(mngr)
    calls = []

    async def full_disk(*args, **kwargs):
        calls.append(1)
        raise ValueError(
            f'UNKNOWN: Error writing local file "{run_dir}/checkpoints/2.orbax-checkpoint-tmp/'
            'state/d/5934cf17": [OS error 28: No space left on device] '
            "[source locations='tensorstore/internal/os/file_util_posix.cc:310']"
        )

    monkeypatch.setattr(serialization, "async_serialize_from_host", full_disk)
    with pytest.raises(runs.RunError, match="the disk is full") as info:
        ckpt_lib.save(mngr, 2, _state(2.0), {})
        ckpt_lib.wait(mngr)
    assert calls, "the patched tensorstore write was not reached"
    assert f"imgx train --resume {run_dir}" in str(info.value)
    reader = ckpt_lib.manager(run_dir, read_only=True)
    assert sorted(reader.all_steps()) == [1]
    assert not (run_dir / "checkpoints" / "2").exists()
    step, state, _ = ckpt_lib.restore(reader, None, _state(0.0))
    assert step == 1 and float(state["params"]["w"][0]) == 1.0
