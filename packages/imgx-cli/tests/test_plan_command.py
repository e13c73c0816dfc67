"""`imgx plan`, the plan printed by `imgx build nifti_folder` and shown by `imgx info`."""

import json
from pathlib import Path

import numpy as np
import pytest

import imgx_data
import imgx_train
from imgx_data import Geometry, planning, write_image


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A built 2D `nifti_folder` dataset `slices` (5 cases of 18x22 at 2 mm)."""
    root = tmp_path_factory.mktemp("plan")
    raw = root / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    meta = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "organ": 1},
            "file_ending": ".nii.gz"}  # fmt: skip
    (raw / "dataset.json").write_text(json.dumps(meta))
    geometry = Geometry.identity((18, 22), (2.0, 2.0))
    for i in range(5):
        label = np.zeros((18, 22), np.uint8)
        label[4:10, 5:15] = 1
        write_image(raw / "imagesTr" / f"c{i}_0000.nii.gz", 100.0 + 50 * label, geometry)
        write_image(raw / "labelsTr" / f"c{i}.nii.gz", label, geometry)
    imgx_data.build("nifti_folder", manual_dir=raw, data_dir=root / "data", name="slices")
    return root / "data"


def test_plan_command_replans_for_a_device_and_budget(imgx, built):
    code, out, err = imgx(
        "plan", "slices", "--data-dir", str(built), "--device", "gpu", "--memory-gb", "0.001"
    )
    assert code == 0, err
    plan = imgx_data.dataset_plan("slices", built)
    assert plan.device == "gpu" and plan.memory_gb == 0.001
    assert "fingerprint of slices: 5 cases, 1 channel(s)" in out
    assert "plan (gpu, 0.001 GB budget" in out
    assert f"patch_shape:        {'x'.join(map(str, plan.patch_shape))}" in out
    assert f"batch_size:         {plan.batch_size}" in out
    assert "train with: imgx train --data slices" in out
    saved = json.loads((built / "slices" / "1.0.0" / planning.PLAN_FILE).read_text())
    assert saved["plan"]["device"] == "gpu"


@pytest.mark.parametrize(
    ("words", "fragment"),
    [
        (("--memory-gb", "-1"), "--memory-gb takes a positive number"),
        (("--device", "npu"), "--device takes cpu, gpu, tpu"),
    ],
)
def test_plan_command_rejects_bad_options(imgx, one_line_error, built, words, fragment):
    code, _, err = imgx("plan", "slices", "--data-dir", str(built), *words)
    one_line_error(code, err, fragment)


def test_plan_command_on_a_published_dataset_says_presets(imgx, one_line_error, tmp_path):
    code, _, err = imgx("plan", "phantom", "--data-dir", str(tmp_path))
    one_line_error(code, err, "presets")


def test_info_shows_the_plan_of_the_run_dataset(api, imgx, run_dir, built, monkeypatch):
    description = {"data": "slices", "config": {"data": {"name": "slices",
                                                         "data_dir": str(built)}}}  # fmt: skip
    monkeypatch.setattr(imgx_train, "describe_run", lambda run: description)
    code, out, _ = imgx("info", "--run", str(run_dir))
    assert code == 0
    plan = imgx_data.dataset_plan("slices", built)
    assert f"plan ({plan.device}, " in out
    assert f"batch_size:         {plan.batch_size}" in out


def test_build_prints_the_plan(api, imgx, built, monkeypatch):
    info = imgx_data.dataset_info("slices", built)
    monkeypatch.setattr(api, "build", lambda dataset, /, **kwargs: info)
    words = ["build", "nifti_folder", "--manual-dir", "raw", "--name", "slices"]
    code, out, _ = imgx(*words, "--data-dir", str(built))
    assert code == 0
    assert "plan (" in out and "channels:" in out
    assert out.strip().endswith("train with: imgx train --data slices")


def test_build_plan_file_is_beside_the_build(built):
    assert (Path(built) / "slices" / "1.0.0" / planning.PLAN_FILE).is_file()
    assert (Path(built) / "slices" / "1.0.0" / "imgx_build.json").is_file()


def test_train_uses_the_plan_unless_flags_override(api, imgx, built, monkeypatch):
    monkeypatch.setenv("IMGX_DATA_DIR", str(built))
    plan = imgx_data.dataset_plan("slices")
    code, _, err = imgx("train", "--data", "slices", "--no-test")
    assert code == 0, err
    (cfg,), _ = api.call("train")
    assert cfg.data.global_batch_size == plan.batch_size
    assert cfg.data.patch_shape == plan.patch_shape
    assert cfg.model.num_channels == plan.num_channels
    assert cfg.model.num_res_blocks == plan.num_res_blocks
    assert cfg.model.patch_size == plan.first_downsampling
    api.calls.clear()
    words = ["train", "--data", "slices", "--no-test", "--batch-size", "3", "--run-dir", "r2"]
    code, _, err = imgx(*words, "--set", "model.num_channels=[4,8]")
    assert code == 0, err
    (cfg,), _ = api.call("train")
    assert cfg.data.global_batch_size == 3 and cfg.model.num_channels == (4, 8)
    assert cfg.model.num_res_blocks == plan.num_res_blocks
