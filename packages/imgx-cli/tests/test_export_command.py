"""`imgx export` and `imgx predict --model`: words -> calls, and the usage errors."""

from pathlib import Path

import pytest

import imgx_train


@pytest.fixture
def exports(monkeypatch):
    calls = []

    def export_run(run_dir, output, **kwargs):
        calls.append((run_dir, output, kwargs))
        return {"output": str(output), "step": 4, "files": []}

    monkeypatch.setattr(imgx_train, "export_run", export_run)
    return calls


def test_export_short_output_flag_beside_overwrite(exports, imgx, run_dir):
    code, out, _ = imgx("export", "--run", str(run_dir), "-o", "model.zip", "--overwrite")
    assert code == 0
    assert exports == [
        (
            run_dir,
            Path("model.zip"),
            {"checkpoint": "best", "sampler": None, "num_steps": None, "overwrite": True},
        )
    ]
    assert "wrote model.zip (checkpoint 4)" in out


def test_export_needs_an_output(exports, imgx, run_dir, one_line_error):
    code, _, err = imgx("export", "--run", str(run_dir))
    one_line_error(code, err, "-o/--output")
    assert exports == []


def test_predict_from_a_model_file(api, imgx, tmp_path):
    (tmp_path / "scans").mkdir()
    (tmp_path / "model.zip").write_bytes(b"PK")
    code, _, _ = imgx("predict", "--model", "model.zip", "-i", "scans", "-o", "preds")
    assert code == 0
    (model, inputs, output), _ = api.call("predict")
    assert (model, inputs, output) == (Path("model.zip"), Path("scans"), Path("preds"))


def test_predict_takes_a_run_or_a_model(api, imgx, run_dir, tmp_path, one_line_error):
    (tmp_path / "scans").mkdir()
    code, _, err = imgx("predict", "--run", str(run_dir), "--model", "model.zip", "-i", "scans",
                        "-o", "preds")  # fmt: skip
    one_line_error(code, err, "not both")
    code, _, err = imgx("predict", "--model", "missing.zip", "-i", "scans", "-o", "preds")
    one_line_error(code, err, "no model file at missing.zip")
    assert api.calls == []
