"""`imgx compare`: a real comparison of results folders as `imgx test` writes them."""

import csv
import json

import numpy as np
import pytest
import scipy.stats

from imgx_train import reports

CLASSES = ["background", "muscle"]
DICE_A = np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.4])
DICE_B = DICE_A + np.array([0.05, 0.01, 0.02, 0.03, 0.06, 0.04])  # b better on every case


def _run(root, name, dice, results, **settings):
    run = root / "runs" / name
    (run / "test" / results).mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"name": "phantom"}}))
    rows = [
        reports.case_row(
            f"case_{i}",
            {"dice": np.array([1.0, d]), "hd95": np.array([0.0, 1.0]), "nsd": np.array([1.0, d])},
        )  # fmt: skip
        for i, d in enumerate(dice)
    ]
    summary = reports.summarize(rows, CLASSES) | {"split": "test", **settings}
    reports.write_per_case_csv(run / "test" / results / "per_case.csv", rows, CLASSES)
    reports.write_summary_json(run / "test" / results / "summary.json", summary)
    return run


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = _run(tmp_path, "seg", DICE_A, "step_9", sampler=None, num_steps=None)
    b = _run(tmp_path, "diffusion", DICE_B, "step_9-ddim_10steps-1sample-seed0",
             sampler="ddim", num_steps=10)  # fmt: skip
    return a, b


def test_compare_prints_the_table_and_writes_the_files(imgx, runs, tmp_path):
    code, out, err = imgx("compare", *map(str, runs))
    assert (code, err) == (0, "")
    assert f"{DICE_A.mean():.3f} ± {DICE_A.std():.3f}" in out
    assert "ddim" in out and "step_9-ddim_10steps-1sample-seed0" in out
    p = scipy.stats.wilcoxon(DICE_B, DICE_A).pvalue
    assert p == pytest.approx(2 / 2**6)
    assert f"{p:.3g}" in out
    folder = tmp_path / "compare"  # the default output folder, in the current folder
    with open(folder / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["seg", "diffusion"]
    assert float(rows[1]["dice_muscle_mean"]) == pytest.approx(DICE_B.mean())
    assert (folder / "wilcoxon.csv").is_file() and (folder / "dice_per_step.png").is_file()

    code, _, err = imgx("compare", *map(str, runs))  # the same folder again: refused
    assert code == 2 and "--replace" in err and "Traceback" not in err
    assert imgx("compare", str(runs[0]), "--replace")[0] == 0
    code, _, _ = imgx("compare", str(runs[0]), "-o", "elsewhere", "--results", "step_9")
    assert code == 0 and (tmp_path / "elsewhere" / "compare.csv").is_file()


def test_compare_errors_are_one_line(imgx, one_line_error, runs, tmp_path):
    untested = tmp_path / "runs" / "untested"
    untested.mkdir()
    (untested / "config.json").write_text("{}")
    code, _, err = imgx("compare", str(runs[0]), str(untested))
    one_line_error(code, err, f"{untested} has no test results", f"imgx test --run {untested}")
    one_line_error(*imgx("compare")[::2], "needs run directories or results folders")
    one_line_error(*imgx("compare", "runs/seg", "--split", "train")[::2], "--split takes")
    code, _, err = imgx("compare", "runs/seg", "--results", "nope")
    one_line_error(code, err, "no test results named 'nope'", "step_9")
    assert not (tmp_path / "compare").exists()
