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
