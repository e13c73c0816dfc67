"""build → train → valid → test → predict → resume → info through the `imgx` command, in-process.

Every command of the README that runs on a CPU is exercised here with the debug preset
(the default `imgx train` itself is timed in bench/). Runs use the 2 fake CPU devices of
the conftest, so training is data parallel over 2 devices. The suite's persistent
compilation cache (see the conftest) lets runs that compile the same steps load them.
"""

import json
import math
import shutil

import jax
import numpy as np
import pytest

import imgx_data
from imgx_cli.main import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST = "logging.wandb=disabled,train.max_valid_cases=2"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    # Every run of this module is data parallel over the conftest's 2 fake CPU devices.
    assert jax.device_count() == 2, jax.devices()
    assert {d.platform for d in jax.devices()} == {"cpu"}
    path = tmp_path_factory.mktemp("work")
    mp = pytest.MonkeyPatch()
    mp.setenv("IMGX_DATA_DIR", str(path / "data"))
    mp.chdir(path)
    yield path
    mp.undo()


def imgx(*words, expect=0):
    code = main([str(w) for w in words])
    assert code == expect, f"imgx {' '.join(map(str, words))} exited {code}"
    return code


def test_two_devices_for_every_run(workdir):
    assert jax.device_count() == 2 and jax.local_device_count() == 2


# ---------------------------------------------------------------------------------------
# Checks of what a user relies on


def _diagonal_mm(geometry) -> float:
    extents = np.asarray(geometry.shape) * np.asarray(geometry.spacing)
    return float(np.sqrt(np.sum(extents**2)))


def _assert_same_geometry(geometry, expected, what):
    assert tuple(geometry.shape) == tuple(expected.shape), what
    np.testing.assert_allclose(geometry.spacing, expected.spacing, rtol=1e-5, err_msg=what)
    np.testing.assert_allclose(geometry.origin, expected.origin, atol=1e-4, err_msg=what)
    np.testing.assert_allclose(geometry.direction, expected.direction, atol=1e-6, err_msg=what)


def _check_metrics(foreground_mean, max_distance_mm, what):
    """Finite, and in range: overlaps in [0, 1], HD95 in [0, the largest field of view]."""
    for metric in ("dice", "iou", "nsd", "hd95"):
        value = foreground_mean.get(metric)
        assert value is not None and math.isfinite(value), (what, metric, value)
    for metric in ("dice", "iou", "nsd"):
        assert 0.0 <= foreground_mean[metric] <= 1.0, (what, metric, foreground_mean)
    # An empty prediction gets the diagonal of the grid (the metrics' policy): never more.
    assert 0.0 <= foreground_mean["hd95"] <= max_distance_mm + 1e-6, (what, foreground_mean)


def _results(run, split, settings=""):
    """The one results folder `step_<N><settings>` of a split (N: the best checkpoint)."""
    found = [p for p in (run / split).glob(f"step_*{settings}") if p.name.endswith(settings)]
    found = [p for p in found if "-" not in p.name] if not settings else found
    assert len(found) == 1, (run / split, [p.name for p in (run / split).iterdir()])
    return found[0]


def _check_test_outputs(out, data, split="test", *, sources=None):
    """summary.json, per_case.csv, predictions on each case's original grid, overlays.

    `sources` maps a case uid to the geometry of its source file (nifti_folder); the
    predictions must sit on it exactly. Otherwise the original grid stored with the case.
    """
    info = imgx_data.dataset_info(data)
    source = imgx_data.data_source(data, split)
    examples = {str(e["uid"]): e for e in (source[i] for i in range(len(source)))}
    summary = json.loads((out / "summary.json").read_text())
    num_cases = len(examples)
    assert summary["num_cases"] == num_cases
    grids = [g for e in examples.values() for g in imgx_data.example_geometry(e)]
    max_distance = max(_diagonal_mm(g) for g in grids)
    _check_metrics(summary["foreground_mean"], max_distance, out)
    for step, values in summary["per_step"].items():
        _check_metrics(values["foreground_mean"], max_distance, f"{out} {step}")
    assert list(summary["per_class"]) == list(info.class_names)
    assert (out / "per_case.csv").read_text().count("\n") == num_cases + 1
    predictions = sorted((out / "predictions").glob("*.nii.gz"))
    assert len(predictions) == num_cases
    for path in predictions:
        uid = path.name.removesuffix(".nii.gz")
        label, geometry = imgx_data.read_image(path)
        expected = sources[uid] if sources is not None else None
        if expected is None:
            expected = imgx_data.example_geometry(examples[uid])[1]
        _assert_same_geometry(geometry, expected, path)
        assert label.shape == tuple(expected.shape)
        assert set(np.unique(label)) <= set(range(len(info.class_names))), path
    assert list((out / "overlays").glob("*.png"))
    return summary


def _info_lines(text):
    """`imgx info`'s `key: value` lines (before the config changes) as a dict."""
    head = text.split("config (changes from the defaults):")[0]
    return dict(line.split(":", 1) for line in head.splitlines() if ":" in line)


# ---------------------------------------------------------------------------------------
# 2D phantom: diffusion strategies, samplers, ensembles, uncertainty maps


@pytest.mark.parametrize("strategy", ["recycle_last", "self_cond_next"])
def test_diffusion_2d(workdir, strategy, capsys):
    run = workdir / "runs" / f"diffusion-{strategy}"
    imgx("train", "--preset", "debug", "--strategy", strategy, "--run-dir", run, "--set", FAST)
    printed = capsys.readouterr().out
    assert "foreground mean" in printed and "curves.png" in printed
    assert f"strategy={strategy}" in printed  # the resolved config, printed at the start
    assert json.loads((run / "config.json").read_text())["diffusion"]["strategy"] == strategy
    _check_test_outputs(_results(run, "test", "-ddpm_5steps-1sample-seed0"), "phantom")
    imgx("test", "--run", run, "--sampler", "ddim", "--num-steps", 3, "--seed", 1)
    summary = _check_test_outputs(_results(run, "test", "-ddim_3steps-1sample-seed1"), "phantom")
    imgx("test", "--run", run, "--sampler", "ddim", "--num-steps", 3, "--seed", 1, expect=2)
    assert set(summary["per_step"]) == {"step_0", "step_1", "step_2"}
    assert (summary["sampler"], summary["num_steps"], summary["seed"]) == ("ddim", 3, 1)
    imgx("valid", "--run", run, "--checkpoint", "last")
    out = run / "valid" / "step_4-ddpm_5steps-1sample-seed0"
    summary = _check_test_outputs(out, "phantom", split="valid")
    assert summary["checkpoint"] == 4  # the last of the debug preset's 4 steps
    imgx("test", "--run", run, "--num-steps", 4, expect=2)  # T = 5 allows K in {2, 3, 5}


def test_test_ensemble_and_predict_uncertainty(workdir):
    """`test --num-samples 2`; `predict -i <one file> --num-samples 2 --save-probabilities`."""
    run = workdir / "runs" / "diffusion-recycle_last"
    imgx("test", "--run", run, "--num-samples", 2, "--num-steps", 2)
    summary = _check_test_outputs(_results(run, "test", "-ddpm_2steps-2samples-seed0"), "phantom")
    assert summary["num_samples"] == 2

    # A scan on its own grid (not the dataset's spacing, rotated axes) beside another one:
    # `-i <file>` predicts that file only.
    scans = workdir / "scans_2d"
    image = imgx_data.data_source("phantom", "test")[0]["image"][..., 0]
    geometry = imgx_data.Geometry(
        shape=(90, 80), spacing=(0.9, 1.2), origin=(10.0, -5.0), direction=(0.0, -1.0, 1.0, 0.0)
    )
    imgx_data.write_image(scans / "one.nii.gz", image[:90, :80], geometry)
    imgx_data.write_image(
        scans / "other.nii.gz", image, imgx_data.Geometry.identity((96, 96), (1.0, 1.0))
    )
    out = workdir / "preds_2d"
    imgx("predict", "--run", run, "-i", scans / "one.nii.gz", "-o", out, "--num-samples", 2,
         "--save-probabilities")  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "one.nii.gz", "one_entropy.nii.gz", "one_probabilities.nii.gz", "one_variance.nii.gz"
    ]  # fmt: skip
    num_classes = len(imgx_data.dataset_info("phantom").class_names)
    label, label_geometry = imgx_data.read_image(out / "one.nii.gz")
    _assert_same_geometry(label_geometry, geometry, "label")
    assert set(np.unique(label)) <= set(range(num_classes))
    entropy, entropy_geometry = imgx_data.read_image(out / "one_entropy.nii.gz")
    _assert_same_geometry(entropy_geometry, geometry, "entropy")
    assert entropy.shape == (90, 80) and np.all(np.isfinite(entropy))
    # Linear resampling keeps a value between its neighbours: 0 <= H <= log C.
    assert entropy.min() >= -1e-6 and entropy.max() <= math.log(num_classes) + 1e-5
    variance, variance_geometry = imgx_data.read_image(out / "one_variance.nii.gz")
    _assert_same_geometry(variance_geometry, geometry, "variance")
    # Probabilities in [0, 1] vary by at most 1/4; two DDPM samples are not identical.
    assert variance.shape == (90, 80) and variance.min() >= -1e-7 and variance.max() <= 0.25
    assert variance.max() > 0.0
    probabilities, probabilities_geometry = imgx_data.read_image(out / "one_probabilities.nii.gz")
    _assert_same_geometry(probabilities_geometry, geometry, "probabilities")
    assert probabilities.shape == (90, 80, num_classes)
    assert probabilities.min() >= -1e-6 and probabilities.max() <= 1 + 1e-6
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-4)


def test_standard_and_recycle_next_and_resume_without_steps(workdir):
    """The other README strategies; `train --resume` (no --steps) finishes the planned steps.

    The standard run is cut back to its step-2 checkpoint (as if killed before saving
    step 4): resuming without --steps redoes steps 3 and 4 exactly.
    """
    runs = {}
    for strategy in ("standard", "recycle_next"):
        runs[strategy] = workdir / "runs" / f"diffusion-{strategy}"
        imgx("train", "--preset", "debug", "--strategy", strategy, "--run-dir", runs[strategy],
             "--set", FAST, "--no-test")  # fmt: skip
        config = json.loads((runs[strategy] / "config.json").read_text())
        assert config["diffusion"]["strategy"] == strategy
        steps = [r["step"] for r in _jsonl(runs[strategy] / "metrics" / "train.jsonl")]
        assert steps == [1, 2, 3, 4]
        assert not (runs[strategy] / "test").exists()  # --no-test

    run = runs["standard"]
    train_before = _jsonl(run / "metrics" / "train.jsonl")
    valid_before = _jsonl(run / "metrics" / "valid.jsonl")
    assert (run / "checkpoints" / "2").is_dir() and (run / "checkpoints" / "4").is_dir()
    shutil.rmtree(run / "checkpoints" / "4")
    imgx("train", "--resume", run, "--no-test")
    assert (run / "checkpoints" / "4").is_dir()
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4
    assert _untimed(_jsonl(run / "metrics" / "train.jsonl")) == _untimed(train_before)
    assert _untimed(_jsonl(run / "metrics" / "valid.jsonl")) == _untimed(valid_before)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _untimed(records):
    return [{k: v for k, v in r.items() if "per_s" not in k and "time" not in k} for r in records]


# ---------------------------------------------------------------------------------------
# 2D seg: predict in the scan's geometry, resume past the plan, info, datasets


def test_seg_2d_predict_resume_info(workdir, capsys):
    run = workdir / "runs" / "seg"
    imgx("train", "--task", "seg", "--preset", "debug", "--run-dir", run, "--set", FAST)
    _check_test_outputs(_results(run, "test"), "phantom")
    # New scans: a NIfTI in its own geometry and a PNG.
    scans = workdir / "scans"
    scans.mkdir()
    image = imgx_data.data_source("phantom", "test")[0]["image"][..., 0]
    geometry = imgx_data.Geometry(
        shape=(90, 96), spacing=(0.9, 1.1), origin=(1.0, 2.0), direction=(1.0, 0.0, 0.0, 1.0)
    )
    imgx_data.write_image(scans / "new.nii.gz", image[:90], geometry)
    scaled = np.round(255 * (image - image.min()) / np.ptp(image)).astype(np.uint8)
    imgx_data.write_image(
        scans / "photo.png", scaled, imgx_data.Geometry.identity((96, 96), (1.0, 1.0))
    )
    imgx("predict", "--run", run, "-i", scans, "-o", workdir / "preds")
    assert sorted(p.name for p in (workdir / "preds").iterdir()) == ["new.nii.gz", "photo.nii.gz"]
    label, written = imgx_data.read_image(workdir / "preds" / "new.nii.gz")
    assert label.shape == (90, 96)
    _assert_same_geometry(written, geometry, "seg prediction")
    label, _ = imgx_data.read_image(workdir / "preds" / "photo.nii.gz")
    assert label.shape == (96, 96)
    imgx("train", "--resume", run, "--steps", 6, "--no-test")
    steps = [r["step"] for r in _jsonl(run / "metrics/train.jsonl")]
    assert steps == list(range(1, 7))
    capsys.readouterr()

    imgx("info")  # no argument: runs/latest, which the resume pointed at this run
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "run: runs/latest"
    fields = {k.strip(): v.strip() for k, v in _info_lines(out).items()}
    assert fields["data"] == "phantom" and fields["task"] == "seg"
    assert fields["steps"] == "6" and fields["last_logged_step"] == "6"
    assert "6" in fields["checkpoints"].split(", ")
    best_step = int(fields["best"].split(",")[0].removeprefix("step "))
    assert 1 <= best_step <= 6 and "dice" in fields["best"]
    changes = out.split("config (changes from the defaults):")[1]
    assert "train.task" in changes and "seg" in changes
    assert any(line.split() == ["train.steps", "=", "6"] for line in changes.splitlines())
    imgx("info", "--run", run)
    again = capsys.readouterr().out
    assert again.splitlines()[0] == f"run: {run}"
    assert again.splitlines()[1:] == out.splitlines()[1:]

    imgx("datasets")
    listed = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert listed["phantom"][-2:] == ["yes", "240/24/48"]


def test_test_on_a_run_whose_dataset_is_gone_names_the_build_command(workdir, capsys,
                                                                     monkeypatch):  # fmt: skip
    monkeypatch.setenv("IMGX_DATA_DIR", str(workdir / "no-data"))
    capsys.readouterr()
    imgx("test", "--run", workdir / "runs" / "seg", expect=2)
    err = capsys.readouterr().err
    assert "imgx build phantom" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------
# 3D phantom


def test_seg_and_diffusion_3d(workdir):
    imgx("build", "phantom_3d")
    for task in ("seg", "diffusion"):
        run = workdir / "runs" / f"3d-{task}"
        imgx(
            "train", "--data", "phantom_3d", "--task", task, "--preset", "debug",
            "--run-dir", run, "--set", FAST,
        )  # fmt: skip
        settings = "-ddpm_5steps-1sample-seed0" if task == "diffusion" else ""
        _check_test_outputs(_results(run, "test", settings), "phantom_3d")

    # valid on the seg run (cheaper; the diffusion evaluation path ran as `test` above).
    imgx("valid", "--run", workdir / "runs" / "3d-seg", "--checkpoint", "last")
    out = workdir / "runs" / "3d-seg" / "valid" / "step_4"
    summary = _check_test_outputs(out, "phantom_3d", "valid")
    assert summary["checkpoint"] == 4

    # A 3D scan on its own grid: spacing, origin and axes differ from the dataset's.
    scans = workdir / "scans_3d"
    image = imgx_data.data_source("phantom_3d", "test")[0]["image"][..., 0]
    geometry = imgx_data.Geometry(
        shape=(60, 64, 30), spacing=(1.4, 1.6, 4.5), origin=(5.0, -3.0, 2.0),
        direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0),
    )  # fmt: skip
    imgx_data.write_image(scans / "ct_0000.nii.gz", image[:60, :, :30], geometry)
    imgx("predict", "--run", workdir / "runs" / "3d-seg", "-i", scans, "-o", workdir / "preds_3d")
    assert sorted(p.name for p in (workdir / "preds_3d").iterdir()) == ["ct.nii.gz"]
    label, written = imgx_data.read_image(workdir / "preds_3d" / "ct.nii.gz")
    _assert_same_geometry(written, geometry, "3D prediction")
    assert label.shape == (60, 64, 30)
    assert set(np.unique(label)) <= set(
        range(len(imgx_data.dataset_info("phantom_3d").class_names))
    )


# ---------------------------------------------------------------------------------------
# The user's own NIfTI folder


def _write_nifti_folder(root, num_cases=10):
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in (24, 20, 8)), indexing="ij"), -1)
    for i in range(num_cases):
        centre = np.array([12, 10, 4]) + rng.integers(-3, 4, 3)
        distance = np.linalg.norm((grid - centre) * np.array([1.0, 1.0, 2.5]), axis=-1)
        label = (distance < 6).astype(np.uint8)
        image = (100 * label + rng.normal(0, 20, label.shape)).astype(np.float32)
        geometry = imgx_data.Geometry(
            shape=label.shape, spacing=(1.0, 1.0, 2.5), origin=(-12.0, 30.0, 7.5 * i),
            direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        )  # fmt: skip
        imgx_data.write_image(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz", image, geometry)
        imgx_data.write_image(root / "labelsTr" / f"case_{i:03d}.nii.gz", label, geometry)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "MRI"},
                "labels": {"background": 0, "lesion": 1},
                "numTraining": num_cases,
                "file_ending": ".nii.gz",
            }
        )
    )


def test_own_nifti_folder(workdir):
    raw = workdir / "Dataset001_Lesion"
    _write_nifti_folder(raw)
    imgx("build", "nifti_folder", "--manual-dir", raw, "--name", "lesion", "--spacing", "1,1,2",
         "--shape", "24,24,8")  # fmt: skip
    built = imgx_data.dataset_info("lesion")
    assert built.is_built and built.spacing == (1.0, 1.0, 2.0)
    assert built.image_shape == (24, 24, 8)
    run = workdir / "runs" / "lesion"
    imgx("train", "--data", "lesion", "--task", "seg", "--preset", "debug", "--run-dir", run,
         "--set", FAST)  # fmt: skip
    # Predictions sit exactly on the source files' grids (2.5 mm slices, own origins), not
    # on the 2 mm grid the model saw.
    sources = {
        path.name.removesuffix(".nii.gz"): imgx_data.read_image(path)[1]
        for path in (raw / "labelsTr").glob("*.nii.gz")
    }
    summary = _check_test_outputs(_results(run, "test"), "lesion", sources=sources)
    assert list(summary["per_class"]) == ["background", "lesion"]
    # Cases are stored whole: 8 slices of 2.5 mm are 10 of 2 mm, more than the 8-slice
    # training window, so validation went through sliding windows of (24, 24, 8).
    valid = imgx_data.data_source("lesion", "valid")[0]
    assert valid["label"].shape == (24, 24, 10)
    assert imgx_data.data_source("lesion", "train")[0]["label"].shape == (24, 24, 8)
    assert _jsonl(run / "metrics" / "valid.jsonl")[-1]["num_cases"] >= 1
    windows = summary["training_windows"]
    assert windows["num_cases"] == built.split_sizes["train"]
    assert windows["voxels"] == sum(windows["by_case"].values())
    imgx("train", "--data", "unknown_data", "--preset", "debug", expect=2)
