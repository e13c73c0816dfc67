"""Comparing evaluated runs: one table, ``compare.csv``, paired tests and a Dice-per-step plot.

`imgx test` leaves each evaluation in ``<run>/<split>/<results_name>/`` with
``summary.json`` and ``per_case.csv`` (:func:`imgx_train.evaluation.evaluate`).
:func:`compare_runs` picks one such folder per run (the newest, or the one named), and

- tabulates Dice, HD95 and NSD per foreground class as mean ± std over the cases, with the
  sampler and the number of sampling steps of each evaluation;
- averages folds of one cross-validation (runs whose ``config.json`` differ only in
  ``data.fold``, evaluated with the same settings): mean ± std over the folds' means;
- tests each pair of runs per class and metric with the two-sided Wilcoxon signed-rank
  test (Wilcoxon 1945, `scipy.stats.wilcoxon`) on the cases both were evaluated on,
  paired by ``uid``;
- draws the foreground-mean Dice against the sampling step (``per_step`` of diffusion
  summaries): ``dice_per_step.png``.

Nothing needs a model: only the files of `imgx test` are read.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from imgx_train import reports
from imgx_train.runs import RunError

#: (key in summary.json / per_case.csv, name in the table, decimals shown).
METRICS = (("dice", "Dice", 3), ("hd95", "HD95 (mm)", 2), ("nsd", "NSD", 3))
#: The files `compare_runs` writes, always all of them.
OUTPUTS = ("compare.csv", "wilcoxon.csv", "dice_per_step.png")
#: Fewest non-zero paired differences for a test: with n of them, the smallest two-sided
#: exact p-value of the signed-rank test is 2 / 2**n (all differences of one sign), which
#: is 0.0625 for n = 5, so below 6 no difference can ever reach p < 0.05.
MIN_PAIRS = 6

_SUMMARY = "summary.json"
_PER_CASE = "per_case.csv"
_CONFIG = "config.json"
_UNFINISHED = (".partial", ".replaced")  # evaluate's folders while it writes


@dataclasses.dataclass(frozen=True)
class Results:
    """One evaluation of one run, as `imgx test` / `imgx valid` wrote it.

    Attributes:
      name: the run's label in the table (the run folder's name, unique in a comparison).
      folder: the results folder (holds summary.json).
      run_dir: the run directory (holds config.json), None for a results folder on its own.
      summary: summary.json (null values as None).
      per_case: ``{uid: {column: value}}`` from per_case.csv, None without the file.
      config: the run's config.json, None without a run directory.
    """

    name: str
    folder: Path
    run_dir: Path | None
    summary: dict[str, Any]
    per_case: dict[str, dict[str, float]] | None
    config: dict[str, Any] | None

    @property
    def class_names(self) -> list[str]:
        """Class names, background first (the order of summary.json)."""
        return list(self.summary.get("per_class", {}))

    @property
    def fold(self) -> int | None:
        """``data.fold`` of the run's config (a fold of a cross-validation), else None."""
        return ((self.config or {}).get("data") or {}).get("fold")

    @property
    def split(self) -> str:
        return self.summary.get("split") or self.folder.parent.name


@dataclasses.dataclass(frozen=True)
class CrossValidation:
    """Folds of one cross-validation: per class and metric, mean ± std over the folds.

    Attributes:
      name: ``cross-validation (<k> folds)``.
      members: the fold runs' names, in the order of their folds.
      folds: their ``data.fold``.
      per_class: ``{metric: {class: (mean, std)}}`` of the folds' class means (NaN-aware,
        std with ddof=0).
      foreground_mean: ``{metric: (mean, std)}`` of the folds' foreground means.
    """

    name: str
    members: list[str]
    folds: list[int]
    per_class: dict[str, dict[str, tuple[float, float]]]
    foreground_mean: dict[str, tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class PairedTest:
    """Wilcoxon signed-rank test of ``run_b − run_a`` for one metric of one class.

    Attributes:
      shared_cases: uids both runs were evaluated on.
      pairs: shared cases with a finite value in both (NaN: both masks empty).
      median_difference: median of ``b − a`` over the pairs (NaN without pairs).
      statistic, p_value: of `scipy.stats.wilcoxon` (two-sided, zero differences dropped);
        None when fewer than `MIN_PAIRS` differences are non-zero (``note`` says so).
    """

    run_a: str
    run_b: str
    metric: str
    class_name: str
    shared_cases: int
    pairs: int
    median_difference: float
    statistic: float | None
    p_value: float | None
    note: str


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What `compare_runs` found and wrote; `format_comparison` renders it."""

    results: list[Results]
    class_names: list[str]  # foreground classes of all runs, in order of appearance
    cross_validations: list[CrossValidation]
    tests: list[PairedTest]
    notes: list[str]
    written: list[Path]


def _results_folders(split_dir: Path) -> list[Path]:
    """Finished results folders in ``<run>/<split>/`` (and the folder itself if it holds one)."""
    if not split_dir.is_dir():
        return []
    folders = [split_dir] if (split_dir / _SUMMARY).is_file() else []
    folders += sorted(
        d
        for d in split_dir.iterdir()
        if d.is_dir() and not d.name.endswith(_UNFINISHED) and (d / _SUMMARY).is_file()
    )
    return folders


def find_results(path: str | Path, *, split: str = "test", results: str | None = None) -> Path:
    """The results folder of ``path``: a results folder itself, or one in a run directory.

    For a run directory: ``<run>/<split>/<results>`` when ``results`` names one, else the
    newest (summary.json written last) of ``<run>/<split>/*/``.

    Raises:
      RunError: ``path`` is neither, the run has no such results (the message gives the
        `imgx` command that makes them, or the names there are).
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be valid or test, got {split!r}")
    path = Path(path)
    if (path / _SUMMARY).is_file():
        return path
    if not (path / _CONFIG).is_file():
        raise RunError(
            f"{path}: neither a run directory (with config.json, made by `imgx train`) nor a "
            f"results folder (with summary.json, made by `imgx {split}`)"
        )
    found = _results_folders(path / split)
    if results is not None:
        folder = path / split / results
        if folder not in found:
            names = ", ".join(f.name for f in found) or "none"
            raise RunError(
                f"{path} has no {split} results named {results!r} ({folder / _SUMMARY} is "
                f"missing); its {split} results: {names}"
            )
        return folder
    if not found:
        raise RunError(
            f"{path} has no {split} results (no {path / split}/*/{_SUMMARY}); make them "
            f"with: imgx {split} --run {path}"
        )
    return max(found, key=lambda folder: (folder / _SUMMARY).stat().st_mtime_ns)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _read_per_case(path: Path) -> dict[str, dict[str, float]] | None:
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        return {
            row["uid"]: {k: _number(v) for k, v in row.items() if k != "uid"}
            for row in csv.DictReader(f)
        }


def load_results(path: str | Path, *, split: str = "test", results: str | None = None) -> Results:
    """Reads the results `find_results` picks: summary.json, per_case.csv, config.json."""
    folder = find_results(path, split=split, results=results)
    # <run>/<split>/<results>/, or <run>/<split>/ as a plain seg test/ folder.
    run_dir = next((p for p in folder.parents[:2] if (p / _CONFIG).is_file()), None)
    try:
        summary = json.loads((folder / _SUMMARY).read_text())
        config = json.loads((run_dir / _CONFIG).read_text()) if run_dir else None
    except json.JSONDecodeError as error:
        raise RunError(f"cannot read the results in {folder}: {error}") from None
    return Results(
        name=(run_dir or folder).resolve().name,  # runs/latest: the run it points at
        folder=folder,
        run_dir=run_dir,
        summary=summary,
        per_case=_read_per_case(folder / _PER_CASE),
        config=config,
    )


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def class_mean_std(summary: Mapping[str, Any], class_name: str, metric: str) -> tuple[float, float]:
    """(mean, std) over the cases of one class's metric in a summary; NaN where absent."""
    stats = (summary.get("per_class", {}).get(class_name) or {}).get(metric) or {}
    return _float(stats.get("mean")), _float(stats.get("std"))


def _foreground(summary: Mapping[str, Any], metric: str) -> float:
    """The mean over the foreground classes of a metric in a summary; NaN where absent."""
    return _float((summary.get("foreground_mean") or {}).get(metric))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std())


def _cross_validation_key(results: Results) -> str | None:
    """Equal for folds of one cross-validation: the config less data.fold (and logging),
    and the evaluation's settings; None for a run that is not a fold."""
    if results.fold is None:
        return None
    config = {k: v for k, v in results.config.items() if k != "logging"}
    config["data"] = {k: v for k, v in config["data"].items() if k != "fold"}
    settings = [results.summary.get(k) for k in ("split", "sampler", "num_steps", "num_samples")]
    return json.dumps([config, settings], sort_keys=True)


def cross_validations(
    results: Sequence[Results], class_names: Sequence[str]
) -> tuple[list[CrossValidation], list[str]]:
    """The cross-validations among ``results`` (two or more folds), and notes on folds left out."""
    groups: dict[str, list[Results]] = {}
    for r in results:
        key = _cross_validation_key(r)
        if key is not None:
            groups.setdefault(key, []).append(r)
    found, notes = [], []
    for members in groups.values():
        folds = [r.fold for r in members]
        if len(members) < 2:
            continue
        if len(set(folds)) < len(folds):
            notes.append(
                f"{', '.join(r.name for r in members)} repeat a fold ({folds}); not averaged "
                "as a cross-validation"
            )
            continue
        members = sorted(members, key=lambda r: r.fold)
        found.append(
            CrossValidation(
                name=f"cross-validation ({len(members)} folds)",
                members=[r.name for r in members],
                folds=[r.fold for r in members],
                per_class={
                    metric: {
                        c: _mean_std([class_mean_std(r.summary, c, metric)[0] for r in members])
                        for c in class_names
                    }
                    for metric, _, _ in METRICS
                },
                foreground_mean={
                    metric: _mean_std([_foreground(r.summary, metric) for r in members])
                    for metric, _, _ in METRICS
                },
            )
        )
    return found, notes


def paired_wilcoxon(
    a: Mapping[str, float], b: Mapping[str, float]
) -> tuple[int, int, float, float | None, float | None, str]:
    """Two-sided Wilcoxon signed-rank test of ``b[uid] − a[uid]`` over the shared uids.

    Cases with a non-finite value in either run are left out (NaN: nothing to score);
    zero differences are dropped by the test (Wilcoxon's method, scipy's default).

    Args:
      a, b: ``{uid: value}`` of one metric of one class in two runs.

    Returns:
      (shared cases, pairs, median difference, statistic, p-value, note); statistic and
      p-value are None with a note when fewer than `MIN_PAIRS` differences are non-zero.
    """
    shared = sorted(set(a) & set(b))
    differences = np.asarray(
        [b[u] - a[u] for u in shared if math.isfinite(a[u]) and math.isfinite(b[u])],
        dtype=np.float64,
    )
    median = float(np.median(differences)) if differences.size else math.nan
    nonzero = int(np.count_nonzero(differences))
    if not shared:
        return 0, 0, median, None, None, "no shared cases"
    if nonzero < MIN_PAIRS:
        note = (
            f"too few shared cases: {nonzero} of {len(shared)} differ, at least {MIN_PAIRS} "
            "are needed (with fewer, p >= 0.0625 whatever the differences)"
        )
        return len(shared), differences.size, median, None, None, note
    result = scipy.stats.wilcoxon(differences)
    return len(shared), differences.size, median, float(result.statistic), float(result.pvalue), ""


def _column(results: Results, metric: str, class_name: str) -> dict[str, float] | None:
    column = f"{metric}_{class_name}"
    if results.per_case is None or not all(column in row for row in results.per_case.values()):
        return None
    return {uid: row[column] for uid, row in results.per_case.items()}


def paired_tests(
    results: Sequence[Results], class_names: Sequence[str]
) -> tuple[list[PairedTest], list[str]]:
    """`paired_wilcoxon` for every pair of runs (not two folds of one cross-validation),
    metric and class both runs have; notes on pairs that cannot be tested."""
    tests, notes = [], []
    for i, a in enumerate(results):
        for b in results[i + 1 :]:
            key = _cross_validation_key(a)
            if key is not None and key == _cross_validation_key(b):
                continue
            missing = [r.folder / _PER_CASE for r in (a, b) if r.per_case is None]
            if missing:
                notes.append(f"{a.name} vs {b.name}: not tested, no {missing[0]}")
                continue
            for metric, _, _ in METRICS:
                for class_name in class_names:
                    values_a = _column(a, metric, class_name)
                    values_b = _column(b, metric, class_name)
                    if values_a is None or values_b is None:
                        continue
                    tests.append(
                        PairedTest(
                            a.name, b.name, metric, class_name, *paired_wilcoxon(values_a, values_b)
                        )
                    )
    return tests, notes


def _unique_names(loaded: list[Results]) -> list[Results]:
    """The same run twice (two evaluations): names get the results folder's name."""
    names = [r.name for r in loaded]
    return [
        dataclasses.replace(r, name=f"{r.name}/{r.split}/{r.folder.name}")
        if names.count(r.name) > 1
        else r
        for r in loaded
    ]


def _foreground_classes(results: Sequence[Results]) -> list[str]:
    names: list[str] = []
    for r in results:
        names += [c for c in r.class_names[1:] if c not in names]
    return names


def _plot(path: Path, results: Sequence[Results]) -> Path:
    """Foreground-mean Dice against the sampling step (1-based); runs without ``per_step``
    (seg, one sampling step) as dashed lines at their final Dice."""
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.subplots()
    drawn = False
    for r in results:
        per_step = r.summary.get("per_step") or {}
        steps = sorted(per_step, key=lambda k: int(k.rpartition("_")[2]))
        if steps:
            x = [int(k.rpartition("_")[2]) + 1 for k in steps]
            y = [_float(per_step[k]["foreground_mean"].get("dice")) for k in steps]
            ax.plot(x, y, marker="o", label=r.name)
            drawn = True
        elif math.isfinite(dice := _foreground(r.summary, "dice")):
            ax.axhline(dice, linestyle="--", color=f"C{len(ax.get_lines()) % 10}",
                       label=f"{r.name} (final Dice only)")  # fmt: skip
            drawn = True
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no Dice to plot", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("sampling step")
    ax.set_ylabel("Dice (foreground mean)")
    ax.set_title("Dice per sampling step")
    ax.grid(alpha=0.3)
    return reports.save_figure(path, figure)


def _compare_rows(comparison: Comparison) -> tuple[list[str], list[list[Any]]]:
    classes = comparison.class_names
    header = ["run", "path", "split", "results", "sampler", "num_steps", "num_samples",
              "checkpoint", "num_cases", "fold"]  # fmt: skip
    for metric, _, _ in METRICS:
        header += [f"{metric}_{c}_{s}" for c in classes for s in ("mean", "std")]
        header.append(f"{metric}_foreground_mean")
    rows = []
    for r in comparison.results:
        s = r.summary
        row = [r.name, r.folder, r.split, r.folder.name, s.get("sampler"), s.get("num_steps"),
               s.get("num_samples"), s.get("checkpoint"), s.get("num_cases"), r.fold]  # fmt: skip
        for metric, _, _ in METRICS:
            row += [v for c in classes for v in class_mean_std(s, c, metric)]
            row.append(_foreground(s, metric))
        rows.append(row)
    by_name = {r.name: r for r in comparison.results}
    for cv in comparison.cross_validations:
        first = by_name[cv.members[0]].summary
        cases = sum(by_name[m].summary.get("num_cases", 0) for m in cv.members)
        row = [cv.name, "", first.get("split"), "", first.get("sampler"), first.get("num_steps"),
               first.get("num_samples"), "", cases, " ".join(map(str, cv.folds))]  # fmt: skip
        for metric, _, _ in METRICS:
            row += [v for c in classes for v in cv.per_class[metric][c]]
            row.append(cv.foreground_mean[metric][0])
        rows.append(row)
    return header, rows


_TEST_HEADER = ["run_a", "run_b", "metric", "class", "shared_cases", "pairs",
                "median_difference", "statistic", "p_value", "note"]  # fmt: skip


def compare_runs(
    paths: Sequence[str | Path],
    output_dir: str | Path = "compare",
    *,
    split: str = "test",
    results: str | None = None,
    overwrite: bool = False,
) -> Comparison:
    """Compares the evaluations of runs; writes ``compare.csv``, ``wilcoxon.csv`` and
    ``dice_per_step.png`` into ``output_dir``.

    Args:
      paths: run directories (their newest ``<split>`` results, or ``results``) or results
        folders (``<run>/test/<name>/``), in the order of the table.
      output_dir: the folder for the files (created).
      split: test or valid, for run directories.
      results: the results folder name to take in every run directory, e.g.
        ``step_100-ddim_10steps-1sample-seed0``.
      overwrite: replace the files of an earlier comparison in ``output_dir``; without it a
        `FileExistsError` is raised before anything is written.

    Returns:
      The comparison (`format_comparison` prints it); ``written`` lists the files.
      ``compare.csv`` has one row per run and one per cross-validation (its ``_std``
      columns are over the folds), ``wilcoxon.csv`` one row per test (columns of
      `PairedTest`; empty when no two runs can be tested).

    Raises:
      RunError: a path without results (see `find_results`).
      FileExistsError: ``output_dir`` holds a comparison and ``overwrite`` is False.
    """
    if not paths:
        raise ValueError("compare_runs needs at least one run or results folder")
    loaded = _unique_names([load_results(p, split=split, results=results) for p in paths])
    output_dir = Path(output_dir)
    existing = [output_dir / name for name in OUTPUTS if (output_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists (an earlier comparison); replace it (imgx compare "
            "--replace) or write elsewhere (-o DIR)"
        )
    class_names = _foreground_classes(loaded)
    folds, fold_notes = cross_validations(loaded, class_names)
    tests, test_notes = paired_tests(loaded, class_names)
    comparison = Comparison(loaded, class_names, folds, tests, fold_notes + test_notes, [])
    header, rows = _compare_rows(comparison)
    test_rows = [
        [
            t.run_a,
            t.run_b,
            t.metric,
            t.class_name,
            t.shared_cases,
            t.pairs,
            t.median_difference,
            t.statistic,
            t.p_value,
            t.note,
        ]  # fmt: skip
        for t in tests
    ]
    written = [
        reports.write_csv(output_dir / OUTPUTS[0], header, rows),
        reports.write_csv(output_dir / OUTPUTS[1], _TEST_HEADER, test_rows),
        _plot(output_dir / OUTPUTS[2], loaded),
    ]
    return dataclasses.replace(comparison, written=written)


def _cell(mean: float, std: float | None, digits: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    return [
        "  " + "  ".join(f"{str(x):<{w}}" for x, w in zip(line, widths, strict=True)).rstrip()
        for line in (header, *rows)
    ]


def _p_value(test: PairedTest | None) -> str:
    if test is None:
        return "-"
    return "too few" if test.p_value is None else f"{test.p_value:.3g}"


def format_comparison(comparison: Comparison) -> str:
    """The comparison as text: the evaluations, then Dice, HD95 and NSD per class (mean ±
    std over the cases; over the folds for a cross-validation), the Wilcoxon p-values, the
    notes and the files written."""
    classes = comparison.class_names
    lines = [f"{len(comparison.results)} evaluations compared"]
    lines += _text_table(
        ["run", "split", "results", "sampler", "steps", "samples", "cases", "fold"],
        [
            [
                r.name,
                r.split,
                r.folder.name,
                r.summary.get("sampler") or "-",
                r.summary.get("num_steps") or "-",
                r.summary.get("num_samples") or "-",
                r.summary.get("num_cases", "-"),
                "-" if r.fold is None else r.fold,
            ]  # fmt: skip
            for r in comparison.results
        ],
    )
    for metric, title, digits in METRICS:
        rows = [
            [r.name]
            + [_cell(*class_mean_std(r.summary, c, metric), digits) for c in classes]
            + [_cell(_foreground(r.summary, metric), None, digits)]
            for r in comparison.results
        ]
        rows += [
            [f"{cv.name}, over folds"]
            + [_cell(*cv.per_class[metric][c], digits) for c in classes]
            + [_cell(*cv.foreground_mean[metric], digits)]
            for cv in comparison.cross_validations
        ]
        lines += ["", f"{title}, mean ± std over cases"]
        lines += _text_table(["run", *classes, "foreground mean"], rows)
    pairs = list(dict.fromkeys((t.run_a, t.run_b) for t in comparison.tests))
    if pairs:
        lines += ["", "Wilcoxon signed-rank test, two-sided p (cases paired by uid)"]
    for a, b in pairs:
        found = {
            (t.metric, t.class_name): t for t in comparison.tests if (t.run_a, t.run_b) == (a, b)
        }
        shared = max(t.shared_cases for t in found.values())
        if shared == 0:
            lines.append(f"  {a} vs {b}: no shared cases, not tested")
            continue
        lines.append(f"  {a} vs {b}: {shared} shared cases")
        lines += [
            "  " + line
            for line in _text_table(
                ["class", *(title for _, title, _ in METRICS)],
                [[c, *(_p_value(found.get((m, c))) for m, _, _ in METRICS)] for c in classes],
            )
        ]
    if any(t.p_value is None and t.shared_cases for t in comparison.tests):
        lines.append(
            f"  too few: fewer than {MIN_PAIRS} shared cases with a difference (no p < 0.05 "
            "possible)"
        )
    if comparison.notes:
        lines += ["", *comparison.notes]
    if comparison.written:
        lines += ["", "written: " + ", ".join(str(p) for p in comparison.written)]
    return "\n".join(lines)
