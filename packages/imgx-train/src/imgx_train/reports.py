"""Evaluation outputs a person opens: per_case.csv, summary.json, overlays and curves.

Row format (one case). A row is a dict::

    {
        "uid": "case_007",                      # str, the case identifier
        "dice": array (num_classes,),           # every key of per_class_metrics(...)
        ...,
        "dice_step_0": array (num_classes,),    # optional, diffusion: metrics of sampling
        ...,                                    # step k as "<metric>_step_<k>"
    }

Build it with :func:`case_row` from :func:`imgx_train.metrics.per_class_metrics` results.
Index 0 of every array is the background; ``class_names[k]`` names index k. Values follow
the empty-mask policy of :mod:`imgx_train.metrics` (NaN only where both masks are empty).

Files are written atomically (a temporary file in the same folder, then ``os.replace``), so
an interrupted run never leaves a half-written CSV, JSON or PNG behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

#: Metrics averaged over the foreground classes in ``summary.json``.
SUMMARY_METRICS = ("dice", "iou", "hd95", "assd", "nsd")

_STEP_KEY = re.compile(r"^(?P<metric>.+)_step_(?P<step>\d+)$")
_UID = "uid"
_OVERLAY_ALPHA = 0.6


def case_row(
    uid: str,
    metrics: Mapping[str, np.ndarray],
    step_metrics: Sequence[Mapping[str, np.ndarray]] = (),
) -> dict[str, Any]:
    """One case's row: ``uid``, its metrics and, optionally, those of each sampling step.

    Args:
      uid: case identifier.
      metrics: ``{metric: (num_classes,)}``, e.g. from ``per_class_metrics``.
      step_metrics: one such dict per sampling step k (diffusion), stored as
        ``"<metric>_step_<k>"``.

    Returns:
      The row (see the module docstring).
    """
    row: dict[str, Any] = {_UID: uid}
    row |= {name: np.asarray(values, dtype=np.float64) for name, values in metrics.items()}
    for step, step_values in enumerate(step_metrics):
        row |= {
            f"{name}_step_{step}": np.asarray(values, dtype=np.float64)
            for name, values in step_values.items()
        }
    return row


def _metric_columns(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> list[str]:
    """Metric keys of the rows (in the first row's order), checked against ``class_names``."""
    if not rows:
        raise ValueError("no cases to report: rows is empty.")
    names = [key for key in rows[0] if key != _UID]
    for index, row in enumerate(rows):
        if _UID not in row or set(row) - {_UID} != set(names):
            raise ValueError(
                f"row {index} must hold 'uid' and the same metric keys as row 0 ({names}); "
                f"got {sorted(row)}."
            )
        for name in names:
            if np.shape(row[name]) != (len(class_names),):
                raise ValueError(
                    f"row {index} ({row[_UID]!r}): '{name}' has shape {np.shape(row[name])}, "
                    f"expected ({len(class_names)},) — one value per class in class_names "
                    f"{list(class_names)}."
                )
    return names


def _stats(values: np.ndarray) -> dict[str, float | int]:
    """NaN-aware mean, population std, median and count of the non-NaN values."""
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "count": 0}
    return {
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "median": float(np.median(finite)),
        "count": int(finite.size),
    }


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _foreground_mean(
    table: Mapping[str, np.ndarray], suffix: str, num_classes: int
) -> dict[str, float]:
    """Mean over foreground classes of the per-class means over cases (both NaN-aware)."""
    result = {}
    for metric in SUMMARY_METRICS:
        key = metric + suffix
        if key in table:
            class_means = [_stats(table[key][:, k])["mean"] for k in range(1, num_classes)]
            result[metric] = _nanmean(class_means)
    return result


def summarize(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """The content of ``summary.json`` for a set of evaluated cases.

    Args:
      rows: one row per case (module docstring).
      class_names: name of each class index, background first, `(num_classes,)`.

    Returns:
      ``{"num_cases": int,
      "foreground_mean": {metric: float} for metric in dice, iou, hd95, assd, nsd — the
      mean over foreground classes (index ≥ 1) of each class's mean over cases, NaN-aware;
      "per_class": {class: {metric: {"mean", "std", "median", "count"}}} over cases, NaN
      excluded (std with ddof=0, count = cases with a value);
      "empty": {class: {"both_empty", "prediction_empty", "reference_empty"}} case counts
      (exclusive: prediction_empty = a missed structure, reference_empty = a pure false
      positive), from the volumes ({} for rows without volumes);
      "per_step": {"step_<k>": {"foreground_mean": {...}}} for rows with step metrics, {}
      without (seg, or a single sampling step);
      "foreground_mean_resampled": the same mean of the ``<metric>_resampled`` columns
      (metrics on the stored grid next to those on the original grid), {} without}``.
      Every key is always present.
    """
    names = _metric_columns(rows, class_names)
    num_classes = len(class_names)
    table = {
        name: np.stack([np.asarray(r[name], dtype=np.float64) for r in rows]) for name in names
    }
    final = [name for name in names if not _STEP_KEY.match(name)]

    summary: dict[str, Any] = {
        "num_cases": len(rows),
        "foreground_mean": _foreground_mean(table, "", num_classes),
        # The stored (resampled, cropped) grid's metrics, when the rows also hold them.
        "foreground_mean_resampled": _foreground_mean(table, "_resampled", num_classes),
        "per_class": {
            class_name: {name: _stats(table[name][:, k]) for name in final}
            for k, class_name in enumerate(class_names)
        },
    }
    if "volume_prediction" in table and "volume_reference" in table:
        pred_empty = table["volume_prediction"] == 0
        ref_empty = table["volume_reference"] == 0
        summary["empty"] = {
            class_name: {
                "both_empty": int(np.sum(pred_empty[:, k] & ref_empty[:, k])),
                "prediction_empty": int(np.sum(pred_empty[:, k] & ~ref_empty[:, k])),
                "reference_empty": int(np.sum(~pred_empty[:, k] & ref_empty[:, k])),
            }
            for k, class_name in enumerate(class_names)
        }
    else:
        summary["empty"] = {}
    steps = sorted({int(m["step"]) for name in names if (m := _STEP_KEY.match(name))})
    summary["per_step"] = {
        f"step_{step}": {"foreground_mean": _foreground_mean(table, f"_step_{step}", num_classes)}
        for step in steps
    }
    return summary


def _atomic_write(path: str | os.PathLike, write: Callable[[io.IOBase], None], mode: str) -> Path:
    """Writes ``path`` through ``write(file)`` on a temporary file, then renames it.

    The temporary file is created with mode 0o666 less the umask, as `open` would create
    ``path`` (`tempfile.mkstemp` makes it 0o600, which the renamed result would keep).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, **({"newline": ""} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_per_case_csv(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]
) -> Path:
    """Writes ``per_case.csv``: one line per case, columns ``uid, <metric>_<class>, ...``.

    Metrics keep the rows' order (step metrics appear as ``<metric>_step_<k>_<class>``);
    values are written in full precision, NaN as ``nan``. Atomic.
    """
    names = _metric_columns(rows, class_names)
    header = [_UID] + [f"{name}_{class_name}" for name in names for class_name in class_names]

    def write(f):
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            values = np.concatenate([np.asarray(row[name], dtype=np.float64) for name in names])
            writer.writerow([row[_UID], *(repr(float(v)) for v in values)])

    return _atomic_write(path, write, "w")


def write_csv(
    path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]]
) -> Path:
    """Writes a CSV file of ``header`` and ``rows``: floats in full precision (``repr``, NaN
    as ``nan``), None as an empty cell, anything else as ``str``. Atomic."""

    def text(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float | np.floating):
            return repr(float(value))
        return str(value)

    def write(f):
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([text(value) for value in row] for row in rows)

    return _atomic_write(path, write, "w")


def save_figure(path: str | os.PathLike, figure: Figure) -> Path:
    """Writes a matplotlib ``figure`` as a PNG (100 dpi). Atomic."""
    return _atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100), "wb")


def _json_safe(value: Any) -> Any:
    """Plain JSON types with NaN and ±inf as None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, np.ndarray | list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_summary_json(path: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """Writes ``summary.json`` (NaN → null, so any JSON reader accepts it). Atomic."""
    text = json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n"
    return _atomic_write(path, lambda f: f.write(text), "w")


def _class_colours(num_classes: int) -> np.ndarray:
    """RGBA per class, `(num_classes, 4)`: background transparent, others from tab10/tab20."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num_classes <= 11 else "tab20"]
    colours = np.array([cmap(k % cmap.N) for k in range(-1, num_classes - 1)], dtype=np.float64)
    colours[0] = 0.0
    colours[1:, 3] = _OVERLAY_ALPHA
    return colours


def _display(array: np.ndarray) -> np.ndarray:
    """(x, y[, rgba]) array → (row = y, column = x[, rgba]) for imshow."""
    return np.swapaxes(array, 0, 1)


def _most_foreground_slice(reference: np.ndarray, prediction: np.ndarray) -> int:
    """Index along the last axis with the most reference foreground (else prediction's)."""
    for labels in (reference, prediction):
        per_slice = np.count_nonzero(labels > 0, axis=(0, 1))
        if per_slice.any():
            return int(np.argmax(per_slice))
    return reference.shape[-1] // 2


def save_overlay(
    path: str | os.PathLike,
    image: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    *,
    class_names: Sequence[str] | None = None,
    slice_index: int | None = None,
    spacing: Sequence[float] | None = None,
) -> int | None:
    """Saves a PNG: the image, the ground truth and the prediction side by side.

    Args:
      path: the PNG to write (atomically).
      image: `(x, y[, z])` or `(x, y[, z], channels)` (the first channel is shown).
      reference: integer labels `(x, y[, z])`.
      prediction: integer labels `(x, y[, z])`.
      class_names: names for the legend, background first; default ``class <k>``.
      slice_index: 3D only, index along the last (z) axis; default the slice with the most
        reference foreground.
      spacing: voxel size in mm per axis, to draw voxels with their true aspect ratio.

    Returns:
      The slice index shown (3D), or None (2D).
    """
    image = np.asarray(image, dtype=np.float32)
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    if reference.shape != prediction.shape or reference.ndim not in (2, 3):
        raise ValueError(
            f"reference and prediction must be label arrays of one case with the same 2D/3D "
            f"shape; got {reference.shape} and {prediction.shape}."
        )
    if image.ndim == reference.ndim + 1:
        image = image[..., 0]
    if image.shape != reference.shape:
        raise ValueError(
            f"image shape {image.shape} must be the label shape {reference.shape}, optionally "
            "with a trailing channel axis."
        )
    largest = int(max(reference.max(), prediction.max()))
    num_classes = len(class_names) if class_names else largest + 1
    names = list(class_names) if class_names else [f"class {k}" for k in range(num_classes)]
    if largest >= num_classes or min(reference.min(), prediction.min()) < 0:
        raise ValueError(f"labels must lie in [0, {num_classes}) to match class_names {names}.")

    shown = None
    if reference.ndim == 3:
        shown = (
            _most_foreground_slice(reference, prediction) if slice_index is None else slice_index
        )
        if not 0 <= shown < reference.shape[-1]:
            raise ValueError(f"slice_index {shown} outside [0, {reference.shape[-1]}).")
        image, reference, prediction = (
            image[..., shown],
            reference[..., shown],
            prediction[..., shown],
        )

    low, high = np.percentile(image, (0.5, 99.5))
    colours = _class_colours(num_classes)
    aspect = float(spacing[1]) / float(spacing[0]) if spacing is not None else 1.0

    figure = Figure(figsize=(9.6, 3.8), layout="constrained")
    axes = figure.subplots(1, 3)
    for ax, title, labels in zip(
        axes, ("image", "ground truth", "prediction"), (None, reference, prediction), strict=True
    ):
        ax.imshow(_display(image), cmap="gray", vmin=low, vmax=max(high, low + 1e-6), aspect=aspect)
        if labels is not None:
            ax.imshow(_display(colours[labels]), aspect=aspect, interpolation="nearest")
        ax.set_title(title)
        ax.set_axis_off()
    legend = [Patch(facecolor=colours[k, :3], label=names[k]) for k in range(1, num_classes)]
    if legend:
        figure.legend(handles=legend, loc="outside lower center", ncols=min(len(legend), 6))
    if shown is not None:
        figure.suptitle(f"slice z = {shown}")
    _atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100), "wb")
    return shown


def print_results_table(summary: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """A text table per foreground class: Dice and HD95 as mean ± std and median over the
    cases, and how many cases were scored worst-case.

    Worst-case cases follow the empty-mask policy of :mod:`imgx_train.metrics`: a missed
    structure (empty prediction, non-empty reference) and a false positive only (non-empty
    prediction, empty reference) score Dice 0 and the image diagonal as HD95; their counts
    come from ``summary["empty"]`` (``-`` when the summary has none).

    Args:
      summary: the output of :func:`summarize` (or its JSON).
      class_names: class names, background first (the background is not listed).

    Returns:
      The table, lines joined by newlines, for the CLI to print.
    """

    def number(value: float | None, digits: int) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    def spread(stats: Mapping[str, float] | None, digits: int) -> str:
        if stats is None or stats["mean"] is None or math.isnan(stats["mean"]):
            return "n/a"
        return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"

    def median(stats: Mapping[str, float] | None, digits: int) -> str:
        return "n/a" if stats is None else number(stats.get("median"), digits)

    width = max([len("foreground mean"), *(len(name) for name in class_names[1:])])
    header = (
        f"{'class':<{width}}  {'Dice':>15}  {'median':>6}  {'HD95 (mm)':>15}  {'median':>7}"
        f"  {'missed':>6}  {'false pos.':>10}"
    )
    lines = [f"{summary['num_cases']} cases", header]
    empty = summary.get("empty") or {}
    for name in class_names[1:]:
        metrics = summary["per_class"].get(name, {})
        counts = empty.get(name)
        missed = "-" if counts is None else str(counts["prediction_empty"])
        false_positive = "-" if counts is None else str(counts["reference_empty"])
        lines.append(
            f"{name:<{width}}  {spread(metrics.get('dice'), 3):>15}  "
            f"{median(metrics.get('dice'), 3):>6}  {spread(metrics.get('hd95'), 2):>15}  "
            f"{median(metrics.get('hd95'), 2):>7}  {missed:>6}  {false_positive:>10}"
        )
    foreground = summary["foreground_mean"]
    lines.append(
        f"{'foreground mean':<{width}}  {number(foreground.get('dice'), 3):>15}  {'':>6}  "
        f"{number(foreground.get('hd95'), 2):>15}"
    )
    return "\n".join(lines)


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records holding a finite number under ``key`` and a step."""
    points = [
        (r["step"], r[key])
        for r in records
        if r.get("step") is not None
        and isinstance(r.get(key), int | float)
        and math.isfinite(r[key])
    ]
    steps, values = zip(*points, strict=True) if points else ((), ())
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def plot_curves(
    path: str | os.PathLike,
    train_records: Sequence[Mapping[str, Any]],
    valid_records: Sequence[Mapping[str, Any]],
    *,
    valid_metric: str = "dice_foreground_mean",
) -> Path:
    """Saves ``plots/curves.png``: training loss, learning rate and a validation metric vs step.

    Args:
      path: the PNG to write (atomically).
      train_records: lines of ``metrics/train.jsonl`` (``step``, ``loss``, ``lr``, ...).
      valid_records: lines of ``metrics/valid.jsonl`` (``step``, ``valid_metric``, ...;
        a ``loss`` there is drawn with the training loss).
      valid_metric: the key plotted in the third panel.

    Records without ``step`` or with a missing, null or non-finite value are skipped; an
    empty panel says so instead of failing, so the plot can be drawn at any time.
    """
    figure = Figure(figsize=(12, 3.6), layout="constrained")
    axes = figure.subplots(1, 3)
    panels = (
        ("loss", [("train", train_records, "loss"), ("valid", valid_records, "loss")]),
        ("learning rate", [("train", train_records, "lr")]),
        (valid_metric, [("valid", valid_records, valid_metric)]),
    )
    for ax, (title, curves) in zip(axes, panels, strict=True):
        drawn = False
        for label, records, key in curves:
            steps, values = _series(records, key)
            if steps.size:
                ax.plot(steps, values, marker="o" if steps.size < 20 else None, label=label)
                drawn = True
        if drawn:
            if len(ax.get_lines()) > 1:
                ax.legend()
        else:
            ax.text(0.5, 0.5, "not logged yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100), "wb")
