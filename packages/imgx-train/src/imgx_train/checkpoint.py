"""Checkpoints of a run: orbax `CheckpointManager` under `<run>/checkpoints/<step>/`.

A checkpoint holds two items:
- `state`: the device pytree (params, optimizer state, step, RNG key, timestep-sampler
  state, EMA params), restored with the shardings of a freshly built state;
- `meta`: host-side JSON (data iterator position, early-stopping state, best validation
  step and metric).

orbax writes each step into a temporary folder and renames it when complete, so a process
killed during a save leaves no checkpoint that restore would pick: the last complete one is
used. A resume never deletes a checkpoint: it passes over a step only when reading it proves
the step corrupt (a missing file, metadata that is not JSON, damaged array data; see
`corruption_reason`), says so, and moves it aside to `checkpoints/corrupt-<step>-<time>/`
before writing that step again; any other read error stops the resume. The last `keep`
checkpoints are kept, and the best one by the validation metric (higher is better; of equal
values the earliest step, as `valid.jsonl` readers pick it) is kept as well. A full disk
during a save is a `RunError` saying so.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as ocp_policy
from orbax.checkpoint._src.path import atomicity as ocp_atomicity

from imgx_train import runs

logger = logging.getLogger(__name__)


class _DropReadOnlyNotice(logging.Filter):
    """orbax warns that a read-only manager's directory is read only: true and intended
    (evaluation and prediction open checkpoints read-only), so users are not shown it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Given directory is read only" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropReadOnlyNotice())

METRIC_KEY = "valid_dice"
_STEP_KEY = "step"


class CheckpointError(FileNotFoundError):
    """No usable checkpoint where one was expected."""


def manager(run_dir: str | Path, *, keep: int = 2, read_only: bool = False):
    """A checkpoint manager keeping the latest `keep` steps and the best validated one."""
    policy = ocp_policy.AnyPreservationPolicy(
        [
            ocp_policy.LatestN(n=keep),
            ocp_policy.BestN(
                # Ties go to the earliest step (sorted ascending, the last one is kept).
                get_metric_fn=lambda metrics: (metrics[METRIC_KEY], -metrics.get(_STEP_KEY, 0)),
                reverse=False,
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        create=not read_only,
        read_only=read_only,
        save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=True,
    )
    directory = Path(run_dir).absolute() / "checkpoints"
    return ocp.CheckpointManager(directory, item_names=("state", "meta"), options=options)


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    state: Any,
    meta: dict[str, Any],
    valid_dice: float | None = None,
) -> None:
    """Saves asynchronously; call `wait` before reading it back.

    A NaN `valid_dice` is saved without a metric, so it never ranks as the best.

    Raises:
      RunError: the disk is full (this save, or the previous one still being written).
    """
    metrics = None
    if valid_dice is not None and math.isfinite(valid_dice):
        metrics = {METRIC_KEY: float(valid_dice), _STEP_KEY: int(step)}
    try:
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            metrics=metrics,
            force=True,
        )
    except Exception as e:
        _raise_if_disk_full(mngr, e)
        raise


def wait(mngr: ocp.CheckpointManager) -> None:
    """Waits for the save in progress; a full disk there is a `RunError`."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        _raise_if_disk_full(mngr, e)
        raise


def _raise_if_disk_full(mngr: ocp.CheckpointManager, error: BaseException) -> None:
    """A full disk is a `RunError`; the unfinished step stays in orbax's temporary folder
    (`<step>.orbax-checkpoint-tmp*`), which no restore lists."""
    if runs.is_disk_full(error):
        directory = Path(str(mngr.directory))
        path = getattr(error, "filename", None) or directory
        raise runs.disk_full_error(path, directory.parent) from error


def kill_during_save(step: int) -> None:
    """Test hook: SIGKILL this process in the middle of saving checkpoint `step`.

    Fires when the step's files are written in orbax's temporary folder and the folder is
    about to be committed (renamed into place), so the step is left incomplete on disk.
    Used by the fault-tolerance tests through `IMGX_FAULT_INJECTION=save:<step>`.
    """
    path_class = ocp_atomicity.AtomicRenameTemporaryPath
    # the unpatched method: installing the hook again (several runs in one process) replaces
    # the previous hook instead of stacking on it
    original = getattr(path_class.finalize, "_imgx_original", path_class.finalize)

    async def finalize(self, *args, **kwargs):
        if self.get_final().name == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self, *args, **kwargs)

    finalize._imgx_original = original
    path_class.finalize = finalize


def _abstract(state: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def restore(
    mngr: ocp.CheckpointManager, step: int | None, target_state: Any
) -> tuple[int, Any, dict[str, Any]]:
    """Restores `step` (None = the latest readable one, see `restore_latest`) with the shapes
    and shardings of `target_state`.

    Returns:
      (step, state, meta).
    """
    if step is None:
        step, state, meta, _ = restore_latest(mngr, target_state)
        return step, state, meta
    steps = sorted(mngr.all_steps())
    if step not in steps:
        raise CheckpointError(
            f"no checkpoint for step {step} in {mngr.directory}; available: {steps}"
        )
    return step, *_restore_step(mngr, step, _abstract(target_state))


def restore_latest(
    mngr: ocp.CheckpointManager, target_state: Any
) -> tuple[int, Any, dict[str, Any], dict[int, str]]:
    """Restores the latest checkpoint, passing over those that are provably corrupt.

    A step is passed over (with a warning naming it and the reason) only when reading it
    fails in a way that proves it incomplete or corrupt, see `corruption_reason`; nothing is
    deleted or changed on disk. Any other failure (an I/O error, out of memory, a timeout) is
    a `CheckpointReadError` for that step, not a reason to go back to an older one.

    Returns:
      (step, state, meta, skipped): `skipped` maps each newer step passed over to why.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    abstract = _abstract(target_state)
    skipped: dict[int, str] = {}
    for candidate in steps:
        try:
            state, meta = _restore_step(mngr, candidate, abstract)
        except CorruptCheckpointError as e:
            skipped[candidate] = e.reason
            logger.warning(
                "checkpoint %s/%d is corrupt (%s): it is kept on disk and the previous one "
                "is tried",
                mngr.directory,
                candidate,
                e.reason,
            )
            continue
        return candidate, state, meta, skipped
    reasons = "; ".join(f"step {s}: {r}" for s, r in skipped.items())
    raise CheckpointError(f"no readable checkpoint in {mngr.directory} ({reasons})")


class CorruptCheckpointError(CheckpointError):
    """A checkpoint step that is provably incomplete or corrupt (see `corruption_reason`)."""

    def __init__(self, directory: Any, step: int, reason: str):
        super().__init__(f"checkpoint {directory}/{step} is corrupt: {reason}")
        self.step = step
        self.reason = reason


class CheckpointReadError(CheckpointError):
    """A checkpoint could not be read for a reason that does not prove it corrupt."""


# tensorstore's status codes (the message's prefix) that a read of local files only gives
# for missing or damaged data; others (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
# an OS error, ...) may pass.
_CORRUPT_TS_CODES = ("NOT_FOUND:", "DATA_LOSS:", "OUT_OF_RANGE:")
_CORRUPT_TS_MARKERS = ("Data corruption detected", "Error decoding")


def corruption_reason(error: BaseException) -> str | None:
    """Why `error`, raised reading a checkpoint, proves the step corrupt; None if it does not.

    Proof is a missing file (`FileNotFoundError`, tensorstore's NOT_FOUND, an item folder
    missing), metadata that is not JSON, or array data that tensorstore reports as truncated
    (OUT_OF_RANGE) or undecodable (DATA_LOSS, "Data corruption detected", "Error
    decoding"). Unfinalized steps (a save cut short) are never listed by orbax at all.
    """
    if isinstance(error, FileNotFoundError):
        return f"a file is missing ({error})"
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
        return f"a metadata file is not valid JSON ({error})"
    message = str(error)
    if isinstance(error, KeyError) and "was not found in the checkpoint" in message:
        return f"an item is missing ({error.args[0] if error.args else message})"
    if type(error) is ValueError and (
        message.startswith(_CORRUPT_TS_CODES) or any(m in message for m in _CORRUPT_TS_MARKERS)
    ):
        return f"array data is missing or damaged ({_first_line(message)})"
    return None


def _first_line(message: str, limit: int = 300) -> str:
    line = message.split(" [tensorstore_spec", 1)[0].splitlines()[0] if message else ""
    return line if len(line) <= limit else line[:limit] + "..."


def _restore_step(mngr: ocp.CheckpointManager, step: int, abstract: Any):
    """(state, meta) of `step`; a `CorruptCheckpointError` or `CheckpointReadError`."""
    try:
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
    except Exception as e:
        reason = corruption_reason(e)
        if reason is not None:
            raise CorruptCheckpointError(mngr.directory, step, reason) from e
        raise CheckpointReadError(
            f"cannot read checkpoint {mngr.directory}/{step}: {type(e).__name__}: "
            f"{_first_line(str(e))}. This does not show the checkpoint is damaged (e.g. a "
            "network file system, memory or time-out problem), so it is used as is and "
            "nothing was changed: fix the cause and resume again"
        ) from e
    return restored["state"], dict(restored["meta"])


def set_aside(mngr: ocp.CheckpointManager, step: int, reason: str) -> Path:
    """Moves corrupt checkpoint `step` to `checkpoints/corrupt-<step>-<time>/` (kept, never
    deleted) so that a resumed run can write that step again; returns the new folder.

    On several hosts the main process moves it and every process then sees it gone.
    """
    directory = Path(str(mngr.directory))
    target = None
    if jax.process_index() == 0:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        target = directory / f"corrupt-{step}-{stamp}"
        i = 1
        while target.exists():
            target = directory / f"corrupt-{step}-{stamp}-{i}"
            i += 1
        (directory / str(step)).rename(target)
        logger.warning(
            "checkpoint %s/%d is corrupt (%s): moved to %s (delete it yourself once you no "
            "longer need it); this run writes step %d again",
            directory,
            step,
            reason,
            target,
            step,
        )
    ocp.multihost.sync_global_processes(f"imgx_set_aside_{step}")
    mngr.reload()
    return target or directory / f"corrupt-{step}"


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
    """The host-side `meta` of checkpoint `step` (None when it cannot be read)."""
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:
        logger.warning("checkpoint %s/%d: meta is unreadable (%s)", mngr.directory, step, e)
        return None
    return dict(restored["meta"])


def best_step(
    mngr: ocp.CheckpointManager, valid_records: Iterable[dict[str, Any]] = ()
) -> int | None:
    """The kept checkpoint with the highest validation Dice (the earliest of equal ones).

    Only checkpoints that still exist are candidates, so `best` never silently falls back
    to `last` because the step with the highest logged Dice was deleted: the retention
    policy keeps one best checkpoint (the earliest of equal values), and this is it. The
    Dice stored with each checkpoint is used; runs whose checkpoints carry none fall back
    to `metrics/valid.jsonl`, restricted to the kept steps. None when no kept checkpoint
    was validated. The one record of the best checkpoint: every reader (`imgx test
    --checkpoint best`, `imgx info`) asks this function.
    """
    steps = set(mngr.all_steps())
    scored = []
    for step in steps:
        metrics = mngr.metrics(step)
        if metrics and metrics.get(METRIC_KEY) is not None:
            scored.append((float(metrics[METRIC_KEY]), step))
    if not scored:
        scored = [
            (float(r["dice"]), int(r["step"]))
            for r in valid_records
            if r.get("dice") is not None and r.get("step") in steps
        ]
    scored = [(dice, -step) for dice, step in scored if math.isfinite(dice)]
    return -max(scored)[1] if scored else None


def select_step(mngr: ocp.CheckpointManager, which: str | int, best_step: int | None) -> int:
    """Resolves `best`, `last` or a step number to an existing step.

    `best_step` is the best validated step (the earliest of equal values, the one the
    preservation policy keeps); `best` falls back to the last step without one.
    """
    steps = sorted(mngr.all_steps())
    if not steps:
        raise CheckpointError(
            f"no checkpoint in {mngr.directory}: train the run first (imgx train)"
        )
    if which == "last":
        return steps[-1]
    if which == "best":
        return best_step if best_step in steps else steps[-1]
    try:
        wanted = int(which)
    except ValueError:
        raise CheckpointError(
            f"checkpoint must be best, last or a step number, got {which!r}"
        ) from None
    if wanted not in steps:
        raise CheckpointError(f"no checkpoint for step {wanted}; available: {steps}")
    return wanted
