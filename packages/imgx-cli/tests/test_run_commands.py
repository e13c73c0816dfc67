"""`imgx valid`, `imgx test`, `imgx predict`, `imgx info`: words -> calls -> printout."""

from pathlib import Path

import pytest


@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluation_options_reach_evaluate(api, imgx, run_dir, split):
    code, out, _ = imgx(
        split, "--run", str(run_dir), "--sampler", "ddim", "--num-steps", "10",
        "--checkpoint", "last", "--num-samples", "2", "--seed", "1",
    )  # fmt: skip
    assert code == 0
    expected = {"split": split, "sampler": "ddim", "num_steps": 10, "checkpoint": "last",
                "num_samples": 2, "seed": 1, "overwrite": False}  # fmt: skip
    assert api.calls == [("evaluate", (run_dir,), expected)]
    assert "muscle" in out and "0.900 ± 0.010" in out and "2.00 ± 0.20" in out
    assert "background" not in out
    assert str(run_dir / split / api.results) in out


@pytest.mark.parametrize("split", ["valid", "test"])
def test_overwrite_reaches_evaluate_and_refusals_are_one_line(api, imgx, run_dir, split):
    assert imgx(split, "--run", str(run_dir), "--overwrite")[0] == 0
    assert api.call("evaluate")[1]["overwrite"] is True
    api.evaluate_error = FileExistsError(f"{run_dir}/{split}/{api.results} already holds ...")
    code, _, err = imgx(split, "--run", str(run_dir))
    assert code == 2 and f"{api.results} already holds" in err and "Traceback" not in err


def test_evaluation_defaults_use_latest_run_and_best_checkpoint(api, imgx, tmp_path):
    latest = tmp_path / "runs" / "latest"
    (latest).mkdir(parents=True)
    (latest / "config.json").write_text("{}")
    assert imgx("test")[0] == 0
    assert api.calls == [
        (
            "evaluate",
            (Path("runs/latest"),),
            {"split": "test", "sampler": None, "num_steps": None, "checkpoint": "best",
             "num_samples": 1, "seed": 0, "overwrite": False},
        )
    ]  # fmt: skip


def test_checkpoint_step_number_is_an_int(api, imgx, run_dir):
    assert imgx("test", "--run", str(run_dir), "--checkpoint", "1200")[0] == 0
    assert api.call("evaluate")[1]["checkpoint"] == 1200


def test_predict_short_flags_and_options(api, imgx, run_dir, tmp_path):
    (tmp_path / "scans").mkdir()
    code, out, _ = imgx(
        "predict", "--run", str(run_dir), "-i", "scans", "-o", "preds", "--num-samples", "3",
        "--save-probabilities", "--sampler", "ddim", "--num-steps", "2", "--seed", "4",
    )  # fmt: skip
    assert code == 0
    (run, inputs, output), kwargs = api.call("predict")
    assert (run, inputs, output) == (run_dir, Path("scans"), Path("preds"))
    assert kwargs == {"sampler": "ddim", "num_steps": 2, "checkpoint": "best", "num_samples": 3,
                      "save_probabilities": True, "seed": 4}  # fmt: skip
    assert "wrote 1 files to preds" in out


def test_predict_long_flags_and_equals_form(api, imgx, run_dir, tmp_path):
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    code, _, _ = imgx("predict", f"--run={run_dir}", "--input=scan.nii.gz", "--output", "out")
    assert code == 0
    (_, inputs, output), kwargs = api.call("predict")
    assert (inputs, output, kwargs["save_probabilities"]) == (
        Path("scan.nii.gz"),
        Path("out"),
        False,
    )


def test_predict_reports_failed_inputs_and_exits_1(api, imgx, run_dir, tmp_path):
    (tmp_path / "scans").mkdir()
    api.predict_failures = [
        ("scans/bad.nii.gz", "not a NIfTI file"),
        ("scans/c_0000.nii.gz", "scans/c_0000.nii.gz: 2 channels, the model takes 1"),
    ]
    code, out, err = imgx("predict", "--run", str(run_dir), "-i", "scans", "-o", "preds")
    assert code == 1
    assert "imgx: failed: scans/bad.nii.gz: not a NIfTI file" in err
    # a message that already names the file is not prefixed with it again
    assert "imgx: failed: scans/c_0000.nii.gz: 2 channels, the model takes 1\n" in err
    assert "2 input(s) failed" in err
    assert "Traceback" not in err


def test_info_prints_description_and_config_changes(api, imgx, run_dir):
    code, out, _ = imgx("info", "--run", str(run_dir))
    assert code == 0
    assert api.calls == [("describe_run", (run_dir,), {})]
    assert out.splitlines()[:5] == [
        f"run: {run_dir}",
        "data:        phantom",
        "checkpoints: 4, 7",
        "best:        step 4, dice 0.91",
        "config (changes from the defaults):",
    ]
    assert "train.steps = 7" in out
