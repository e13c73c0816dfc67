"""Checkpoints of a run: orbax `CheckpointManager` under `<run>/checkpoints/<step>/`.

A checkpoint holds two items:
- `state`: the device pytree (params, optimizer state, step, RNG key, timestep-sampler
  state, EMA params), restored with the shardings of a freshly built state;
- `meta`: host-side JSON (data iterator position, early-stopping state, best metric).

orbax writes each step into a temporary folder and renames it when complete, so a process
killed during a save leaves no checkpoint that restore would pick: the last complete one is
used. The last `keep` checkpoints are kept, and the best one by the validation metric
(higher is better) is kept as well.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as ocp_policy

logger = logging.getLogger(__name__)

METRIC_KEY = "valid_dice"


class CheckpointError(FileNotFoundError):
    """No usable checkpoint where one was expected."""


def manager(run_dir: str | Path, *, keep: int = 2, read_only: bool = False):
    """A checkpoint manager keeping the latest `keep` steps and the best validated one."""
    policy = ocp_policy.AnyPreservationPolicy(
        [
            ocp_policy.LatestN(n=keep),
            ocp_policy.BestN(
                get_metric_fn=lambda metrics: metrics[METRIC_KEY],
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
    """Saves asynchronously; call `mngr.wait_until_finished()` before reading it back."""
    metrics = None if valid_dice is None else {METRIC_KEY: float(valid_dice)}
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
        force=True,
    )


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
            logger.warning("checkpoint %s/%d is unreadable (%s)", mngr.directory, candidate, e)
            last_error = e
    raise CheckpointError(f"no readable checkpoint in {mngr.directory}: last error {last_error}")


def select_step(mngr: ocp.CheckpointManager, which: str | int, best_step: int | None) -> int:
    """Resolves `best`, `last` or a step number to an existing step."""
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
