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


def test_every_sampler_of_the_config_reaches_evaluate(api, imgx, run_dir):
    samplers = ["ddpm", "ddim", "dpm_solver_2m"]
    for sampler in samplers:
        assert imgx("test", "--run", str(run_dir), "--sampler", sampler)[0] == 0
    assert [kwargs["sampler"] for _, _, kwargs in api.calls] == samplers


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


# ---------------------------------------------------------------------------------------
# Ensembles: --runs (every run) or --run plus --ensemble-with, one list of runs.


@pytest.fixture
def folds(tmp_path):
    """Three run directories (what the commands look at: config.json)."""
    paths = [tmp_path / "runs" / f"f{k}" for k in range(3)]
    for path in paths:
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
    return paths


@pytest.mark.parametrize("spelling", ["plain", "tuple"])
def test_test_runs_reach_evaluate_as_one_ensemble(api, imgx, folds, spelling, monkeypatch):
    # Fire reads `runs/f0,runs/f1` as a string and `f0,f1` (barewords) as a tuple.
    value = ",".join(str(f) for f in folds)
    if spelling == "tuple":
        monkeypatch.chdir(folds[0].parent)
        value = ",".join(f.name for f in folds)
    code, out, _ = imgx("test", "--runs", value, "--checkpoint", "last")
    assert code == 0
    (first,), kwargs = api.call("evaluate")
    assert first.name == "f0" and [p.name for p in kwargs["ensemble_with"]] == ["f1", "f2"]
    assert kwargs["checkpoint"] == "last" and kwargs["split"] == "test"
    assert "ensemble_3runs_0123abcd" in out
    assert out.count("alone:") == 3 and "Dice 0.700, HD95 3.000 mm" in out


def test_test_ensemble_with_adds_runs_to_run(api, imgx, run_dir, folds):
    assert imgx("test", "--run", str(run_dir), "--ensemble-with", str(folds[0]))[0] == 0
    (first,), kwargs = api.call("evaluate")
    assert first == run_dir and kwargs["ensemble_with"] == [folds[0]]


@pytest.mark.parametrize(
    ("words", "fragment"),
    [
        (["--runs", "RUNS", "--ensemble-with", "F0"], "drop --ensemble-with"),
        (["--runs", "F0"], "two runs or more"),
        (["--runs", "RUNS", "--run", "F0"], "drop --run"),
        (["--run", "F0", "--ensemble-with", "runs/nowhere"], "no run directory at runs/nowhere"),
    ],
)
@pytest.mark.parametrize("command", ["test", "predict"])
def test_bad_ensembles_are_one_line_errors(
    api, imgx, folds, one_line_error, words, fragment, command
):
    (Path("scans")).mkdir(exist_ok=True)
    names = {"RUNS": ",".join(str(f) for f in folds), "F0": str(folds[0])}
    words = [names.get(w, w) for w in words]
    if command == "predict":
        words += ["-i", "scans", "-o", "out"]
    code, _, err = imgx(command, *words)
    one_line_error(code, err, fragment)
    assert api.calls == []


def test_predict_runs_and_ensemble_with_reach_predict(api, imgx, run_dir, folds):
    Path("scans").mkdir()
    runs = ",".join(str(f) for f in folds)
    assert imgx("predict", "--runs", runs, "-i", "scans", "-o", "out")[0] == 0
    (first, _, _), kwargs = api.call("predict")
    assert first == folds[0] and kwargs["ensemble_with"] == folds[1:]
    api.calls.clear()
    words = ["--run", str(run_dir), "--ensemble-with", str(folds[2]), "--num-samples", "4"]
    assert imgx("predict", *words, "-i", "scans", "-o", "out")[0] == 0
    (first, _, _), kwargs = api.call("predict")
    assert first == run_dir and kwargs["ensemble_with"] == [folds[2]]
    assert kwargs["num_samples"] == 4
