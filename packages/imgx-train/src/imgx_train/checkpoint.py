"""Checkpoints of a run: orbax `CheckpointManager` under `<run>/checkpoints/<step>/`.

A checkpoint holds two items:
- `state`: the device pytree (params, optimizer state, step, RNG key, timestep-sampler
  state, EMA params), restored with the shardings of a freshly built state;
- `meta`: host-side JSON (data iterator position, early-stopping state, best validation
  step and metric).

orbax writes each step into a temporary folder and renames it when complete, so a process
killed during a save leaves no checkpoint that restore would pick: the last complete one is
used. The last `keep` checkpoints are kept, and the best one by the validation metric
(higher is better; of equal values the earliest step, as `valid.jsonl` readers pick it) is
kept as well. A full disk during a save is a `RunError` saying so.
"""

from __future__ import annotations

import logging
import math
import os
import signal
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
    except OSError as e:
        _raise_if_disk_full(mngr, e)
        raise


def wait(mngr: ocp.CheckpointManager) -> None:
    """Waits for the save in progress; a full disk there is a `RunError`."""
    try:
        mngr.wait_until_finished()
    except OSError as e:
        _raise_if_disk_full(mngr, e)
        raise


def _raise_if_disk_full(mngr: ocp.CheckpointManager, error: OSError) -> None:
    if runs.is_disk_full(error):
        directory = Path(str(mngr.directory))
        raise runs.disk_full_error(error.filename or directory, directory.parent) from error


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
    """Restores `step` (None = the latest) with the shapes and shardings of `target_state`.

    A checkpoint that cannot be read (e.g. corrupted files) is skipped with a warning and
    the previous one is tried, unless a specific step was asked for.

    Returns:
      (step, state, meta).
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    candidates = [step] if step is not None else steps
    if step is not None and step not in steps:
        raise CheckpointError(
            f"no checkpoint for step {step} in {mngr.directory}; available: {sorted(steps)}"
        )
    abstract = _abstract(target_state)
    last_error: Exception | None = None
    for candidate in candidates:
        try:
            restored = mngr.restore(
                candidate,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
            return candidate, restored["state"], dict(restored["meta"])
        except Exception as e:
            logger.warning(
                "checkpoint %s/%d is unreadable, trying the previous one (%s)",
                mngr.directory,
                candidate,
                e,
            )
            last_error = e
    raise CheckpointError(f"no readable checkpoint in {mngr.directory}: last error {last_error}")


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
    """The host-side `meta` of checkpoint `step` (None when it cannot be read)."""
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:
        logger.warning("checkpoint %s/%d: meta is unreadable (%s)", mngr.directory, step, e)
        return None
    return dict(restored["meta"])


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
