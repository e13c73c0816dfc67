"""`imgx build` and `imgx datasets`."""

import dataclasses
from pathlib import Path

import pytest

import imgx_data


def test_build_published_dataset(api, imgx):
    code, out, _ = imgx("build", "amos_ct", "--manual-dir", "downloads", "--data-dir", "store")
    assert code == 0
    where = {"manual_dir": Path("downloads"), "data_dir": Path("store")}
    assert api.calls == [
        ("existing_build", ("amos_ct",), where),
        ("build", ("amos_ct",), {**where, "overwrite": False}),
    ]
    assert "built amos_ct (8 train / 1 valid / 1 test cases) in store/amos_ct" in out
    assert "train with: imgx train --data amos_ct" in out


@pytest.mark.parametrize(
    ("spacing", "shape"),
    [("1,1,3", "128,128,32"), ("1x1x3", "128x128x32"), ("[1,1,3]", "(128,128,32)")],
)
def test_build_nifti_folder_geometry_in_any_spelling(api, imgx, spacing, shape):
    words = ["build", "nifti_folder", "--manual-dir", "raw", "--name", "liver"]
    code, out, _ = imgx(*words, "--spacing", spacing, "--shape", shape)
    assert code == 0
    (name,), kwargs = api.call("build")
    assert name == "nifti_folder"
    assert kwargs == {"manual_dir": Path("raw"), "data_dir": None, "name": "liver",
                      "spacing": (1.0, 1.0, 3.0), "shape": (128, 128, 32),
                      "overwrite": False}  # fmt: skip
    assert "imgx train --data liver" in out


def test_build_warns_when_training_windows_drop_foreground(api, imgx):
    api.drops = {
        "train": {"num_cases": 8, "by_case": {"a": 5, "b": 40, "c": 7, "d": 1}},
        "valid": {"num_cases": 1, "by_case": {"v": 9}},
    }
    code, out, _ = imgx("build", "nifti_folder", "--manual-dir", "raw", "--name", "liver")
    assert code == 0
    assert (
        "warning: the 96x96 training windows of 5 of 9 train/valid cases drop 62 foreground "
        "voxels (most: b 40, v 9, c 7); training never sees them" in out
    )
    api.drops = {}
    code, out, _ = imgx("build", "nifti_folder", "--manual-dir", "raw", "--name", "liver")
    assert "training windows" not in out


def test_datasets_prints_a_table(api, imgx):
    code, out, _ = imgx("datasets")
    assert code == 0
    assert api.calls == [("list_datasets", (), {"data_dir": None})]
    header, built, not_built, note = out.strip().splitlines()
    assert header.split() == [
        "name", "dims", "shape", "spacing_mm", "channels", "classes", "built", "train/valid/test"
    ]  # fmt: skip
    assert built.split() == ["phantom", "2D", "96x96", "1x1", "1", "3", "yes", "240/24/48"]
    assert not_built.split() == ["amos_ct", "2D", "96x96", "1x1", "1", "3", "no", "-"]
    assert "background" in note


def test_build_passes_target_geometry_to_published_builders(api, imgx):
    assert imgx("build", "phantom_3d", "--spacing", "1.5,1.5,5", "--shape", "64,64,32")[0] == 0
    assert api.call("build")[1] == {
        "manual_dir": None, "data_dir": None, "overwrite": False,
        "target_spacing": (1.5, 1.5, 5.0), "target_shape": (64, 64, 32),
    }  # fmt: skip


def _built_phantom():
    return dataclasses.replace(
        imgx_data.dataset_info("phantom", data_dir=Path("no-data-dir")),
        split_sizes={"train": 240, "valid": 24, "test": 48},
        is_built=True,
        path=Path("store") / "phantom",
    )


def test_build_already_built_alike_is_kept(api, imgx):
    api.existing = _built_phantom()
    code, out, _ = imgx("build", "phantom", "--spacing", "1,1")
    assert code == 0
    assert api.calls == [
        ("existing_build", ("phantom",), {"manual_dir": None, "data_dir": None,
                                          "target_spacing": (1.0, 1.0)}),
    ]  # fmt: skip
    assert "already built phantom (240 train / 24 valid / 48 test cases) in store/phantom" in out
    assert "--overwrite rebuilds it" in out


def test_build_overwrite_rebuilds_without_looking(api, imgx):
    api.existing = _built_phantom()
    code, out, _ = imgx("build", "phantom", "--overwrite")
    assert code == 0
    assert api.calls == [
        ("build", ("phantom",), {"manual_dir": None, "data_dir": None, "overwrite": True})
    ]
    assert out.startswith("built phantom (8 train / 1 valid / 1 test cases)")


def test_build_with_other_parameters_is_one_error_naming_overwrite(imgx, one_line_error, tmp_path):
    data = str(tmp_path / "data")
    assert imgx("build", "phantom", "--data-dir", data, "--shape", "8,8")[0] == 0
    code, _, err = imgx("build", "phantom", "--data-dir", data, "--shape", "16,16")
    one_line_error(code, err, "phantom/1.0.0: dataset phantom is built with other parameters",
                   "target_shape [8, 8] -> [16, 16]", "--overwrite")  # fmt: skip
    code, out, _ = imgx("build", "phantom", "--data-dir", data, "--shape", "16,16", "--overwrite")
    assert code == 0 and "built phantom (240 train / 24 valid / 48 test cases)" in out
