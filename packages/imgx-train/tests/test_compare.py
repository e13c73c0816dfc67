"""Tests of imgx_train.compare on results folders written as `imgx test` writes them."""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from matplotlib.image import imread

from imgx_train import compare, reports
from imgx_train.compare import compare_runs, find_results, format_comparison
from imgx_train.runs import RunError

CLASSES = ["background", "liver", "kidney"]
DIFFUSION = "step_8-ddpm_2steps-1sample-seed0"
UIDS = [f"case_{i}" for i in range(7)]
# Run a's per-case values; run b's liver Dice is higher on all 7 cases (distinct
# differences: an exact two-sided p of 2 / 2**7), its kidney Dice differs on 3 only.
LIVER_A = np.array([0.8, 0.7, 0.9, 0.6, 0.85, 0.75, 0.65])
LIVER_B = LIVER_A + np.arange(1, 8) / 100
KIDNEY_A = np.array([0.5, 0.6, 0.7, 0.8, 0.9, math.nan, 0.4])
KIDNEY_B = KIDNEY_A + np.array([0.1, -0.2, 0.05, 0, 0, 0, 0])
HD95_A = np.array([2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])


def _metrics(liver, kidney, hd95):
    dice = np.array([1.0, liver, kidney])
    return {"dice": dice, "hd95": np.array([0.0, hd95, 2 * hd95]), "nsd": dice / 2}


def write_results(folder: Path, uids, liver, kidney, hd95, steps=(), **settings) -> Path:
    """A results folder as `evaluate` writes it: per_case.csv and summary.json.

    `steps` gives the liver Dice of each sampling step but the last (the final one).
    """
    rows = []
    for i, uid in enumerate(uids):
        per_step = [_metrics(s[i], kidney[i], hd95[i]) for s in steps]
        final = _metrics(liver[i], kidney[i], hd95[i])
        rows.append(reports.case_row(uid, final, per_step + [final] if steps else []))
    summary = reports.summarize(rows, CLASSES) | {"split": "test", "num_samples": 1, **settings}
    reports.write_per_case_csv(folder / "per_case.csv", rows, CLASSES)
    reports.write_summary_json(folder / "summary.json", summary)
    return folder


def make_run(root: Path, name: str, fold=None, **config) -> Path:
    run = root / name
    run.mkdir(parents=True)
    data = {"name": "phantom"} | ({} if fold is None else {"fold": fold})
    body = {"data": data, "train": {"task": "seg"}, "logging": {"wandb": name}} | config
    (run / "config.json").write_text(json.dumps(body))
    return run


@pytest.fixture
def two_runs(tmp_path):
    """Run a: diffusion, 2 sampling steps, 7 cases; run b: seg, the same 7 (in another
    order) and one more."""
    a = make_run(tmp_path / "runs", "a", train={"task": "diffusion"})
    write_results(a / "test" / DIFFUSION, UIDS, LIVER_A, KIDNEY_A, HD95_A,
                  steps=[LIVER_A - 0.1], sampler="ddpm", num_steps=2, checkpoint=8)  # fmt: skip
    b = make_run(tmp_path / "runs", "b")
    order = [6, 2, 0, 5, 1, 4, 3]
    write_results(
        b / "test" / "step_9",
        [UIDS[i] for i in order] + ["extra"],
        [*LIVER_B[order], 0.1],
        [*KIDNEY_B[order], 0.1],
        [*(HD95_A[order] + 1), 1.0],
        sampler=None,
        num_steps=None,
        checkpoint=9,
    )
    return a, b


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_table_values_and_csv(two_runs, tmp_path):
    a, b = two_runs
    comparison = compare_runs([a, b], tmp_path / "out")
    rows = _read_csv(tmp_path / "out" / "compare.csv")
    assert [r["run"] for r in rows] == ["a", "b"]
    row_a, row_b = rows
    assert row_a["results"] == DIFFUSION
    assert (row_a["sampler"], row_a["num_steps"], row_a["num_cases"]) == ("ddpm", "2", "7")
    assert (row_b["sampler"], row_b["num_steps"], row_b["fold"]) == ("", "", "")
    assert float(row_a["dice_liver_mean"]) == pytest.approx(LIVER_A.mean())
    assert float(row_a["dice_liver_std"]) == pytest.approx(LIVER_A.std())
    assert float(row_a["dice_kidney_mean"]) == pytest.approx(np.nanmean(KIDNEY_A))
    assert float(row_a["hd95_kidney_mean"]) == pytest.approx(2 * HD95_A.mean())
    assert float(row_a["nsd_liver_mean"]) == pytest.approx(LIVER_A.mean() / 2)
    fg = (LIVER_A.mean() + np.nanmean(KIDNEY_A)) / 2
    assert float(row_a["dice_foreground_mean"]) == pytest.approx(fg)
    liver_b = np.array([*LIVER_B, 0.1])
    assert float(row_b["dice_liver_std"]) == pytest.approx(liver_b.std())
    assert comparison.class_names == ["liver", "kidney"]
    assert [p.name for p in comparison.written] == list(compare.OUTPUTS)

    text = format_comparison(comparison)
    assert f"{LIVER_A.mean():.3f} ± {LIVER_A.std():.3f}" in text
    assert "ddpm" in text and DIFFUSION in text
    assert "7 shared cases" in text


def test_wilcoxon_pairs_cases_by_uid(two_runs, tmp_path):
    a, b = two_runs
    tests = {(t.metric, t.class_name): t for t in compare_runs([a, b], tmp_path / "o").tests}
    liver = tests["dice", "liver"]
    expected = scipy.stats.wilcoxon(LIVER_B, LIVER_A)
    assert liver.p_value == pytest.approx(expected.pvalue, rel=1e-12)
    assert liver.p_value == pytest.approx(2 / 2**7)  # all 7 differences positive, exact test
    assert (liver.shared_cases, liver.pairs, liver.statistic) == (7, 7, expected.statistic)
    assert liver.median_difference == pytest.approx(0.04)
    hd95 = tests["hd95", "liver"]  # b − a = +1 on every case: ties, scipy's approximation
    assert hd95.p_value == pytest.approx(scipy.stats.wilcoxon(HD95_A + 1, HD95_A).pvalue)
    kidney = tests["dice", "kidney"]  # 6 finite pairs (case_5 is NaN), 3 differ
    assert (kidney.pairs, kidney.p_value, kidney.statistic) == (6, None, None)
    assert "too few shared cases: 3 of 7 differ" in kidney.note
    rows = _read_csv(tmp_path / "o" / "wilcoxon.csv")
    assert len(rows) == 6  # 3 metrics x 2 classes
    row = next(r for r in rows if (r["metric"], r["class"]) == ("dice", "liver"))
    assert float(row["p_value"]) == pytest.approx(liver.p_value)
    row = next(r for r in rows if (r["metric"], r["class"]) == ("dice", "kidney"))
    assert row["p_value"] == "" and "too few" in row["note"]


def test_paired_wilcoxon_without_shared_cases():
    assert compare.paired_wilcoxon({"a": 1.0}, {"b": 1.0})[-1] == "no shared cases"


def test_dice_per_step_plot(two_runs, tmp_path):
    a, b = two_runs
    compare_runs([a, b], tmp_path / "out")
    image = imread(tmp_path / "out" / "dice_per_step.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    summary = json.loads((a / "test" / DIFFUSION / "summary.json").read_text())
    fg_step0 = summary["per_step"]["step_0"]["foreground_mean"]["dice"]
    assert fg_step0 == pytest.approx(((LIVER_A - 0.1).mean() + np.nanmean(KIDNEY_A)) / 2)


def test_cross_validation_row(tmp_path):
    """Three folds (configs differ only in data.fold and logging) and a run that is not one."""
    runs = []
    for fold, liver in enumerate([LIVER_A, LIVER_A - 0.1, LIVER_A - 0.2]):
        run = make_run(tmp_path, f"fold{fold}", fold=fold)
        write_results(run / "test" / "step_9", UIDS, liver, KIDNEY_A, HD95_A * (fold + 1),
                      sampler=None, num_steps=None)  # fmt: skip
        runs.append(run)
    other = make_run(tmp_path, "other", fold=0, train={"task": "other"})
    write_results(other / "test" / "step_9", UIDS, LIVER_A, KIDNEY_A, HD95_A)
    comparison = compare_runs([runs[2], runs[0], other, runs[1]], tmp_path / "out")

    (cv,) = comparison.cross_validations
    assert cv.name == "cross-validation (3 folds)"
    assert (cv.members, cv.folds) == (["fold0", "fold1", "fold2"], [0, 1, 2])
    means = [LIVER_A.mean(), LIVER_A.mean() - 0.1, LIVER_A.mean() - 0.2]
    assert cv.per_class["dice"]["liver"] == pytest.approx((np.mean(means), np.std(means)))
    hd95 = HD95_A.mean() * np.array([1, 2, 3])  # fold k's liver HD95 is (k + 1) HD95_A
    assert cv.per_class["hd95"]["liver"] == pytest.approx((hd95.mean(), hd95.std()))
    assert cv.per_class["hd95"]["kidney"] == pytest.approx((2 * hd95.mean(), 2 * hd95.std()))
    assert cv.foreground_mean["hd95"] == pytest.approx((1.5 * hd95.mean(), 1.5 * hd95.std()))
    # folds of one cross-validation are not tested against each other
    assert {(t.run_a, t.run_b) for t in comparison.tests} == {
        ("fold2", "other"), ("other", "fold1"), ("fold0", "other")
    }  # fmt: skip
    rows = _read_csv(tmp_path / "out" / "compare.csv")
    assert rows[-1]["run"] == "cross-validation (3 folds)"
    assert rows[-1]["fold"] == "0 1 2"
    assert rows[-1]["num_cases"] == "21"
    assert float(rows[-1]["dice_liver_std"]) == pytest.approx(np.std(means))
    assert "cross-validation (3 folds), over folds" in format_comparison(comparison)


def test_runs_without_fold_are_independent(two_runs, tmp_path):
    assert compare_runs(list(two_runs), tmp_path / "out").cross_validations == []


def test_find_results_newest_named_or_the_folder(two_runs):
    a, _ = two_runs
    older = write_results(a / "test" / "step_4-ddim_2steps-1sample-seed0", UIDS, LIVER_A,
                          KIDNEY_A, HD95_A)  # fmt: skip
    os.utime(older / "summary.json", ns=(0, 0))
    (a / "test" / "step_9-ddpm_2steps-1sample-seed0.partial").mkdir()  # unfinished: ignored
    assert find_results(a) == a / "test" / DIFFUSION
    assert find_results(a, results=older.name) == older
    assert find_results(older) == older
    assert compare.load_results(older).run_dir == a
    (a.parent / "latest").symlink_to(a.name)
    assert compare.load_results(a.parent / "latest").name == "a"


def test_same_run_twice_gets_two_names(two_runs, tmp_path):
    a, _ = two_runs
    older = write_results(a / "test" / "step_4", UIDS, LIVER_A, KIDNEY_A, HD95_A)
    comparison = compare_runs([a / "test" / DIFFUSION, older], tmp_path / "out")
    assert [r.name for r in comparison.results] == [f"a/test/{DIFFUSION}", "a/test/step_4"]


def test_errors_name_the_run_and_the_fix(two_runs, tmp_path):
    a, _ = two_runs
    empty = make_run(tmp_path, "untested")
    with pytest.raises(RunError, match=f"no test results .* imgx test --run {empty}$"):
        compare_runs([a, empty], tmp_path / "out")
    with pytest.raises(RunError, match=f"imgx valid --run {a}$"):
        find_results(a, split="valid")
    with pytest.raises(RunError, match=f"no test results named 'nope'.*: {DIFFUSION}$"):
        find_results(a, results="nope")
    with pytest.raises(RunError, match="neither a run directory"):
        find_results(tmp_path / "missing")
    assert not (tmp_path / "out").exists()  # nothing written


def test_never_overwrites_silently(two_runs, tmp_path):
    compare_runs(two_runs, tmp_path / "out")
    before = (tmp_path / "out" / "compare.csv").read_text()
    with pytest.raises(FileExistsError, match="--replace"):
        compare_runs(two_runs[:1], tmp_path / "out")
    assert (tmp_path / "out" / "compare.csv").read_text() == before
    compare_runs(two_runs[:1], tmp_path / "out", overwrite=True)
    assert len(_read_csv(tmp_path / "out" / "compare.csv")) == 1
    assert _read_csv(tmp_path / "out" / "wilcoxon.csv") == []


def test_write_csv_cells(tmp_path):
    """reports.write_csv, which compare.csv and wilcoxon.csv go through."""
    reports.write_csv(tmp_path / "t.csv", ["a", "b", "c"], [[0.1, None, math.nan], ["x", 3, 1e-17]])
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a,b,c", "0.1,,nan", "x,3,1e-17"]
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]  # no temporary file left


def test_pairs_that_cannot_be_tested_say_why(two_runs, tmp_path):
    a, b = two_runs
    c = make_run(tmp_path / "runs", "c")
    write_results(c / "test" / "step_9", ["other_0", "other_1"], LIVER_A, KIDNEY_A, HD95_A)
    (b / "test" / "step_9" / "per_case.csv").unlink()
    comparison = compare_runs([a, b, c], tmp_path / "out")
    assert comparison.notes == [
        f"a vs b: not tested, no {b / 'test' / 'step_9' / 'per_case.csv'}",
        f"b vs c: not tested, no {b / 'test' / 'step_9' / 'per_case.csv'}",
    ]
    assert {t.note for t in comparison.tests} == {"no shared cases"}  # a vs c
    assert "a vs c: no shared cases, not tested" in format_comparison(comparison)
