"""build → train → valid → test → predict → resume through the `imgx` command, in-process.

Every command of the README that runs on a CPU is exercised here with the debug preset
(the default `imgx train` itself is timed in bench/). Runs use the 2 fake CPU devices of
the conftest, so training is data parallel over 2 devices.
"""

import json

import numpy as np
import pytest

import imgx_data
from imgx_cli.main import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST = "logging.wandb=disabled,train.max_valid_cases=2"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("work")
    mp = pytest.MonkeyPatch()
    mp.setenv("IMGX_DATA_DIR", str(path / "data"))
    mp.chdir(path)
    yield path
    mp.undo()


def imgx(*words, expect=0, capsys=None):
    code = main([str(w) for w in words])
    assert code == expect, f"imgx {' '.join(map(str, words))} exited {code}"
    return code


def _check_test_outputs(out, num_cases, three_d=False):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == num_cases
    for metric in ("dice", "iou", "nsd"):
        value = summary["foreground_mean"][metric]
        assert value is None or 0.0 <= value <= 1.0
    assert (out / "per_case.csv").read_text().count("\n") == num_cases + 1
    predictions = sorted((out / "predictions").glob("*.nii.gz"))
    assert len(predictions) == num_cases
    label, geometry = imgx_data.read_image(predictions[0])
    assert label.ndim == (3 if three_d else 2)
    assert list((out / "overlays").glob("*.png"))
    return summary


@pytest.mark.parametrize("strategy", ["recycle_last", "self_cond_next"])
def test_diffusion_2d(workdir, strategy, capsys):
    run = workdir / "runs" / f"diffusion-{strategy}"
    imgx("train", "--preset", "debug", "--strategy", strategy, "--run-dir", run, "--set", FAST)
    printed = capsys.readouterr().out
    assert "foreground mean" in printed and "curves.png" in printed
    assert json.loads((run / "config.json").read_text())["diffusion"]["strategy"] == strategy
    _check_test_outputs(run / "test" / "ddpm-5", 48)
    imgx("test", "--run", run, "--sampler", "ddim", "--num-steps", 3, "--seed", 1)
    summary = _check_test_outputs(run / "test" / "ddim-3", 48)
    assert set(summary["per_step"]) == {"step_0", "step_1", "step_2"}
    imgx("valid", "--run", run, "--checkpoint", "last")
    assert (run / "valid" / "ddpm-5" / "summary.json").exists()
    imgx("test", "--run", run, "--num-steps", 4, expect=2)  # T = 5 allows K in {2, 3, 5}


def test_seg_2d_predict_resume_info(workdir, capsys):
    run = workdir / "runs" / "seg"
    imgx("train", "--task", "seg", "--preset", "debug", "--run-dir", run, "--set", FAST)
    _check_test_outputs(run / "test", 48)
    # New scans: a NIfTI in its own geometry and a PNG.
    scans = workdir / "scans"
    scans.mkdir()
    image = imgx_data.data_source("phantom", "test")[0]["image"][..., 0]
    geometry = imgx_data.Geometry(
        shape=(90, 96), spacing=(0.9, 1.1), origin=(1.0, 2.0), direction=(1.0, 0.0, 0.0, 1.0)
    )
    imgx_data.write_image(scans / "new.nii.gz", image[:90], geometry)
    imgx("predict", "--run", run, "-i", scans, "-o", workdir / "preds")
    label, written = imgx_data.read_image(workdir / "preds" / "new.nii.gz")
    assert label.shape == (90, 96)
    np.testing.assert_allclose(written.spacing, (0.9, 1.1), rtol=1e-6)
    imgx("train", "--resume", run, "--steps", 6, "--no-test")
    lines = (run / "metrics/train.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(1, 7))
    capsys.readouterr()
    imgx("info", "--run", run)
    assert "6" in capsys.readouterr().out
    imgx("datasets")
    assert "phantom" in capsys.readouterr().out


def test_seg_and_diffusion_3d(workdir):
    imgx("build", "phantom_3d")
    for task in ("seg", "diffusion"):
        run = workdir / "runs" / f"3d-{task}"
        imgx(
            "train", "--data", "phantom_3d", "--task", task, "--preset", "debug",
            "--run-dir", run, "--set", FAST,
        )  # fmt: skip
        out = run / "test" / ("ddpm-5" if task == "diffusion" else "")
        _check_test_outputs(out, 16, three_d=True)


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
        geometry = imgx_data.Geometry.identity(label.shape, (1.0, 1.0, 2.5))
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
    imgx("build", "nifti_folder", "--manual-dir", raw, "--name", "lesion", "--shape", "24,24,8")
    run = workdir / "runs" / "lesion"
    imgx("train", "--data", "lesion", "--task", "seg", "--preset", "debug", "--run-dir", run,
         "--set", FAST)  # fmt: skip
    summary = _check_test_outputs(run / "test", 1, three_d=True)
    assert list(summary["per_class"]) == ["background", "lesion"]
    imgx("train", "--data", "unknown_data", "--preset", "debug", expect=2)
