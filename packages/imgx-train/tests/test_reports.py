"""Tests of imgx_train.reports: summary values, files on disk, pictures."""

import csv
import json
import math
import os
import stat
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from imgx_train import reports
from imgx_train.metrics import per_class_metrics
from imgx_train.reports import (
    case_row,
    plot_curves,
    print_results_table,
    save_overlay,
    summarize,
    write_per_case_csv,
    write_summary_json,
)

CLASSES = ["background", "liver", "kidney"]
NAN = math.nan


def _metrics(dice, hd95, volume_prediction, volume_reference):
    dice = np.asarray(dice, dtype=np.float64)
    return {
        "dice": dice,
        "iou": dice / (2 - dice),
        "hd95": np.asarray(hd95, dtype=np.float64),
        "assd": np.asarray(hd95, dtype=np.float64) / 2,
        "nsd": dice,
        "volume_prediction": np.asarray(volume_prediction, dtype=np.float64),
        "volume_reference": np.asarray(volume_reference, dtype=np.float64),
    }


@pytest.fixture
def rows():
    # Case b misses the kidney; case c has no kidney at all (both empty → NaN, excluded).
    return [
        case_row("a", _metrics([1.0, 0.8, 0.6], [0.0, 2.0, 4.0], [9, 2, 1], [9, 2, 1])),
        case_row("b", _metrics([1.0, 0.6, 0.0], [0.0, 4.0, 50.0], [9, 2, 0], [9, 2, 1])),
        case_row("c", _metrics([1.0, 0.7, NAN], [0.0, 3.0, NAN], [9, 2, 0], [9, 2, 0])),
    ]


def test_summarize_values(rows):
    summary = summarize(rows, CLASSES)
    assert summary["num_cases"] == 3
    liver = summary["per_class"]["liver"]["dice"]
    assert liver["mean"] == pytest.approx(0.7)
    assert liver["std"] == pytest.approx(np.std([0.8, 0.6, 0.7]))
    assert liver["median"] == pytest.approx(0.7)
    assert liver["count"] == 3
    kidney = summary["per_class"]["kidney"]["dice"]
    assert kidney["mean"] == pytest.approx(0.3) and kidney["count"] == 2
    # Mean over the foreground classes of the per-class means; background excluded.
    assert summary["foreground_mean"]["dice"] == pytest.approx((0.7 + 0.3) / 2)
    assert summary["foreground_mean"]["hd95"] == pytest.approx((3.0 + 27.0) / 2)
    assert set(summary["foreground_mean"]) == {"dice", "iou", "hd95", "assd", "nsd"}
    assert summary["empty"]["kidney"] == {
        "both_empty": 1,
        "prediction_empty": 1,
        "reference_empty": 0,
    }
    assert summary["empty"]["liver"] == {
        "both_empty": 0,
        "prediction_empty": 0,
        "reference_empty": 0,
    }
    assert summary["per_step"] == {}  # seg or one sampling step: present and empty


def test_summarize_counts_pure_false_positives(rows):
    # Case d predicts a kidney where there is none: Dice 0, worst-case distance, and
    # counted as reference_empty (not both_empty, not dropped from the mean).
    rows.append(case_row("d", _metrics([1.0, 0.9, 0.0], [0.0, 1.0, 60.0], [9, 2, 3], [9, 2, 0])))
    summary = summarize(rows, CLASSES)
    assert summary["empty"]["kidney"] == {
        "both_empty": 1,
        "prediction_empty": 1,
        "reference_empty": 1,
    }
    kidney = summary["per_class"]["kidney"]["dice"]
    assert kidney["count"] == 3 and kidney["mean"] == pytest.approx(0.2)
    assert summary["per_class"]["kidney"]["hd95"]["mean"] == pytest.approx((4 + 50 + 60) / 3)


def test_summarize_always_has_every_key():
    row = case_row("a", {"dice": np.array([1.0, 0.5, 0.25])})
    summary = summarize([row], CLASSES)
    assert set(summary) == {
        "num_cases",
        "foreground_mean",
        "per_class",
        "empty",
        "per_step",
        "foreground_mean_resampled",
    }
    assert summary["empty"] == {} and summary["per_step"] == {}


def test_summarize_all_nan_class_is_nan_not_a_warning(rows):
    for row in rows:
        row["dice"][2] = NAN
    with np.errstate(all="raise"):
        summary = summarize(rows, CLASSES)
    assert math.isnan(summary["per_class"]["kidney"]["dice"]["mean"])
    assert summary["per_class"]["kidney"]["dice"]["count"] == 0
    assert summary["foreground_mean"]["dice"] == pytest.approx(0.7)


def test_summarize_per_step():
    steps = [
        _metrics([1.0, 0.2, 0.4], [0.0, 9.0, 9.0], [1, 1, 1], [1, 1, 1]),
        _metrics([1.0, 0.6, 0.8], [0.0, 3.0, 1.0], [1, 1, 1], [1, 1, 1]),
    ]
    row = case_row("a", steps[-1], step_metrics=steps)
    assert "dice_step_1" in row and "hd95_step_0" in row
    summary = summarize([row], CLASSES)
    assert list(summary["per_step"]) == ["step_0", "step_1"]
    assert summary["per_step"]["step_0"]["foreground_mean"]["dice"] == pytest.approx(0.3)
    assert summary["per_step"]["step_1"]["foreground_mean"] == summary["foreground_mean"]
    assert "dice_step_0" not in summary["per_class"]["liver"]


def test_summarize_from_real_metrics():
    reference = np.zeros((8, 8), dtype=np.int32)
    reference[2:6, 2:6] = 1
    metrics = per_class_metrics(reference, reference, num_classes=3, spacing=(1.0, 1.0))
    summary = summarize([case_row("x", metrics)], CLASSES)
    assert summary["foreground_mean"]["dice"] == 1.0  # kidney absent in both: excluded
    assert summary["empty"]["kidney"]["both_empty"] == 1
    # Both empty: 0 ml, not NaN.
    assert metrics["volume_prediction"][2] == metrics["volume_reference"][2] == 0.0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rs: rs.clear(), "rows is empty"),
        (lambda rs: rs[1].pop("uid"), "row 1 must hold 'uid'"),
        (lambda rs: rs[2].pop("nsd"), "row 2 must hold"),
        (lambda rs: rs[0].update(dice=np.ones(2)), r"expected \(3,\)"),
    ],
)
def test_summarize_bad_rows(rows, mutate, message):
    mutate(rows)
    with pytest.raises(ValueError, match=message):
        summarize(rows, CLASSES)


def test_per_case_csv(tmp_path, rows):
    path = write_per_case_csv(tmp_path / "test" / "per_case.csv", rows, CLASSES)
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["uid"] for r in table] == ["a", "b", "c"]
    assert list(table[0])[:4] == ["uid", "dice_background", "dice_liver", "dice_kidney"]
    assert float(table[0]["dice_liver"]) == 0.8
    assert float(table[1]["hd95_kidney"]) == 50.0
    assert math.isnan(float(table[2]["dice_kidney"]))
    assert len(table[0]) == 1 + 7 * 3
    assert [p.name for p in tmp_path.rglob("*")] == ["test", "per_case.csv"]


def test_summary_json_nan_is_null_and_valid(tmp_path, rows):
    path = write_summary_json(tmp_path / "summary.json", summarize(rows, CLASSES))

    def reject(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    loaded = json.loads(path.read_text(), parse_constant=reject)
    assert loaded["per_class"]["kidney"]["dice"]["count"] == 2
    assert loaded["foreground_mean"]["dice"] == pytest.approx(0.5)
    rows[0]["dice"][:] = NAN
    rows[1]["dice"][:] = NAN
    rows[2]["dice"][:] = NAN
    loaded = json.loads(write_summary_json(path, summarize(rows, CLASSES)).read_text())
    assert loaded["foreground_mean"]["dice"] is None
    assert loaded["per_class"]["liver"]["dice"]["mean"] is None


@pytest.mark.parametrize("failure", ["csv_at_fsync", "json_at_fsync", "csv_at_row_2"])
def test_failed_write_keeps_the_previous_file(tmp_path, rows, monkeypatch, failure):
    """A write that fails inside the atomic write (the new content partly or wholly in the
    temporary file, not yet moved in place) leaves the previous file byte for byte and no
    temporary file behind."""
    if failure.startswith("csv"):
        path = write_per_case_csv(tmp_path / "per_case.csv", rows, CLASSES)
        rows.append(dict(rows[0], uid="d"))
        if failure == "csv_at_row_2":  # the header and row 1 are written, then row 2 fails
            rows[1] = dict(rows[1], dice=np.array(["0.5", "bad", "0.1"]))
        write_again = partial(write_per_case_csv, path, rows, CLASSES)
    else:
        path = write_summary_json(tmp_path / "summary.json", summarize(rows, CLASSES))
        write_again = partial(write_summary_json, path, {"num_cases": 4})
    before = path.read_bytes()

    temporaries = []
    real_open = os.open

    def recording_open(name, *args, **kwargs):
        fd = real_open(name, *args, **kwargs)
        temporaries.append(Path(name))
        return fd

    def full_disk(fd):
        # The new content has reached the temporary file (flushed), the rename is next.
        assert temporaries[-1].stat().st_size > 0
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reports.os, "open", recording_open)
    if failure.endswith("fsync"):
        monkeypatch.setattr(reports.os, "fsync", full_disk)
    with pytest.raises(ValueError if failure == "csv_at_row_2" else OSError):
        write_again()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    assert len(temporaries) == 1 and temporaries[0].parent == tmp_path


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_honour_the_umask(tmp_path, rows, umask):
    """Results are readable as any file the user writes: mode 0o666 less the umask (a
    temporary file from `tempfile.mkstemp` would be 0o600 whatever the umask)."""
    previous = os.umask(umask)
    try:
        csv_path = write_per_case_csv(tmp_path / "per_case.csv", rows, CLASSES)
        json_path = write_summary_json(tmp_path / "summary.json", summarize(rows, CLASSES))
        image, reference, prediction = _phantom_3d()
        png_path = tmp_path / "overlay.png"
        save_overlay(png_path, image, reference, prediction, class_names=CLASSES)
    finally:
        os.umask(previous)
    for path in (csv_path, json_path, png_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def _phantom_3d():
    image = np.random.default_rng(0).normal(size=(12, 10, 6, 2)).astype(np.float32)
    reference = np.zeros((12, 10, 6), dtype=np.int32)
    reference[2:8, 3:7, 1:5] = 1
    reference[2:10, 2:8, 4] = 1  # slice 4 has the most foreground (labels 1 and 2 both > 0)
    reference[3:6, 3:5, 4] = 2
    prediction = np.roll(reference, 1, axis=0)
    return image, reference, prediction


def test_save_overlay_3d_picks_the_slice_with_most_foreground(tmp_path):
    image, reference, prediction = _phantom_3d()
    path = tmp_path / "plots" / "case.png"
    shown = save_overlay(path, image, reference, prediction, class_names=CLASSES)
    assert shown == 4
    picture = imread(path)
    assert picture.ndim == 3 and picture.shape[1] > picture.shape[0]
    assert save_overlay(path, image, reference, prediction, slice_index=0) == 0


def test_save_overlay_2d_and_bad_input(tmp_path):
    image, reference, prediction = _phantom_3d()
    image, reference, prediction = image[:, :, 4, 0], reference[..., 4], prediction[..., 4]
    assert (
        save_overlay(tmp_path / "a.png", image, reference, prediction, spacing=(1.0, 2.0)) is None
    )
    assert imread(tmp_path / "a.png").shape[2] == 4
    with pytest.raises(ValueError, match="class_names"):
        save_overlay(tmp_path / "b.png", image, reference, prediction, class_names=["bg", "x"])
    with pytest.raises(ValueError, match="image shape"):
        save_overlay(tmp_path / "b.png", image.T, reference, prediction)
    assert not (tmp_path / "b.png").exists()


def test_print_results_table(rows):
    table = print_results_table(summarize(rows, CLASSES), CLASSES)
    lines = table.splitlines()
    assert lines[0] == "3 cases"
    assert "liver" in lines[2] and "0.700 ± 0.082" in lines[2] and "3.00 ± 0.82" in lines[2]
    assert lines[-1].startswith("foreground mean") and "0.500" in lines[-1]
    assert "background" not in table
    # liver: Dice median 0.700, HD95 median 3.00, nothing missed; kidney: case b missed
    # (prediction empty, Dice 0, HD95 50 mm), case c without kidney (NaN, not counted).
    assert lines[1].split()[-4:] == ["median", "missed", "false", "pos."]
    liver, kidney = lines[2].split(), lines[3].split()
    assert liver[0] == "liver" and liver[4] == "0.700" and liver[8] == "3.00"
    assert liver[-2:] == ["0", "0"]
    assert kidney[:5] == ["kidney", "0.300", "±", "0.300", "0.300"]
    assert kidney[5:9] == ["27.00", "±", "23.00", "27.00"] and kidney[-2:] == ["1", "0"]


def test_print_results_table_after_json_round_trip(tmp_path, rows):
    for row in rows:
        row["hd95"][1] = NAN
    path = write_summary_json(tmp_path / "s.json", summarize(rows, CLASSES))
    table = print_results_table(json.loads(path.read_text()), CLASSES)
    assert "n/a" in table.splitlines()[2]


def test_plot_curves_with_missing_keys(tmp_path):
    train = [{"step": s, "loss": 1.0 / s, "lr": 1e-3 * s} for s in range(1, 30)]
    train.append({"step": 30, "loss": None})
    valid = [{"step": 10, "dice_foreground_mean": 0.4}, {"step": 20}]
    path = plot_curves(tmp_path / "plots" / "curves.png", train, valid)
    assert imread(path).shape[1] > imread(path).shape[0]
    plot_curves(path, [], [])  # nothing logged yet: still a picture
    assert imread(path).ndim == 3
