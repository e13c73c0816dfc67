"""Tests of the dataset registry: data dir, names, info, build on demand, sources."""

import dataclasses
import json

import numpy as np
import pytest

import imgx_data
from imgx_data import DatasetError, registry


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("IMGX_DATA_DIR", raising=False)
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    assert imgx_data.data_dir().name == "tensorflow_datasets"
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    assert imgx_data.data_dir() == tmp_path / "tfds"
    monkeypatch.setenv("IMGX_DATA_DIR", str(tmp_path / "imgx"))
    assert imgx_data.data_dir() == tmp_path / "imgx"
    assert imgx_data.data_dir(tmp_path / "given") == tmp_path / "given"


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(
        ValueError, match=r"Unknown dataset 'nope'; valid names: phantom, phantom_3d"
    ):
        imgx_data.dataset_info("nope", tmp_path)
    with pytest.raises(imgx_data.DatasetError, match="buildable"):
        imgx_data.build("nope", data_dir=tmp_path)


def test_info_of_unbuilt_datasets(tmp_path):
    other = tmp_path / "other_tfds_dataset" / "1.0.0"  # not an imgx dataset: ignored
    other.mkdir(parents=True)
    (other / "dataset_info.json").write_text("{}")
    (other / "metadata.json").write_text("{}")
    infos = {info.name: info for info in imgx_data.list_datasets(tmp_path)}
    assert set(infos) == {
        "phantom",
        "phantom_3d",
        "muscle_us",
        "male_pelvic_mr",
        "amos_ct",
        "brats2021_mr",
        "brats2021_mr_wt",
    }
    brats = infos["brats2021_mr"]
    assert brats.overlapping and brats.num_classes == 4 and brats.num_channels == 4
    assert not infos["brats2021_mr_wt"].overlapping and infos["brats2021_mr_wt"].num_classes == 2
    assert infos["phantom"].split_sizes == {} and not infos["phantom"].is_built
    assert "BraTS2021_Training_Data" in brats.manual_dir
    assert infos["amos_ct"].intensity == (-991.0, 362.0) and brats.intensity == "percentile"
    assert infos["muscle_us"].intensity == "png" and infos["phantom"].intensity == "identity"
    with pytest.raises(dataclasses.FrozenInstanceError):
        brats.name = "x"  # type: ignore[misc]


def test_ensure_built_builds_phantoms_only(tmp_path):
    with pytest.raises(imgx_data.DatasetError, match=r"run: imgx build brats2021_mr --manual-dir"):
        imgx_data.ensure_built("brats2021_mr", tmp_path)
    imgx_data.build("phantom", data_dir=tmp_path, split_sizes=(2, 1, 1))
    info = imgx_data.ensure_built("phantom", tmp_path)  # already built: kept as it is
    assert info.split_sizes == {"train": 2, "valid": 1, "test": 1}
    assert info.intensity == "identity"  # read back from metadata.json
    rebuilt = imgx_data.build("phantom", data_dir=tmp_path, split_sizes=(3, 1, 1), overwrite=True)
    assert rebuilt.split_sizes["train"] == 3


def test_data_source_items_and_errors(tmp_path):
    imgx_data.build("phantom", data_dir=tmp_path, split_sizes=(2, 1, 1))
    source = imgx_data.data_source("phantom", "train", tmp_path)
    assert len(source) == 2
    example = source[1]
    assert isinstance(example["uid"], str) and example["uid"] == "train_0001"
    assert example["image"].dtype == np.float32 and example["label"].dtype == np.uint8
    assert example["spacing"].dtype == np.float32
    with pytest.raises(imgx_data.DatasetError, match="Unknown split 'training'"):
        imgx_data.data_source("phantom", "training", tmp_path)
    with pytest.raises(imgx_data.DatasetError, match="not built .*; run: imgx build phantom_3d$"):
        imgx_data.data_source("phantom_3d", "train", tmp_path)
    with pytest.raises(
        imgx_data.DatasetError, match=r"run: imgx build amos_ct --manual-dir DIR  # DIR: "
    ):
        imgx_data.data_source("amos_ct", "test", tmp_path)


@pytest.mark.parametrize("overwrite", [False, True])
def test_build_never_replaces_a_folder_imgx_did_not_write(tmp_path, overwrite):
    # The default data dir is TFDS's: another dataset may live at <data_dir>/<name>/1.0.0.
    foreign = tmp_path / "phantom" / "1.0.0"
    foreign.mkdir(parents=True)
    (foreign / "dataset_info.json").write_text("{}")
    message = rf"{foreign}: exists but is not an imgx build.*remove the folder yourself"
    with pytest.raises(imgx_data.DatasetError, match=message):
        imgx_data.build("phantom", data_dir=tmp_path, split_sizes=(1, 1, 1), overwrite=overwrite)
    with pytest.raises(imgx_data.DatasetError, match=message):
        imgx_data.ensure_built("phantom", tmp_path)  # `imgx train --data phantom`
    assert (foreign / "dataset_info.json").read_text() == "{}"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "phantom",
        "phantom/1.0.0",
        "phantom/1.0.0/dataset_info.json",
    ]
    (tmp_path / "phantom_3d").write_text("a file where the dataset folder would go")
    with pytest.raises(imgx_data.DatasetError, match=r"phantom_3d: is a file, not an imgx"):
        imgx_data.build("phantom_3d", data_dir=tmp_path, split_sizes=(1, 1, 1))
    assert (tmp_path / "phantom_3d").read_text().startswith("a file")


def test_build_with_the_same_parameters_keeps_the_build(tmp_path):
    first = imgx_data.build("phantom", data_dir=tmp_path, split_sizes=(2, 1, 1))
    sentinel = first.path / "sentinel"  # gone if the folder were rebuilt
    sentinel.touch()
    # The same request, spelled otherwise (a list; a default given explicitly).
    same = {"split_sizes": [2, 1, 1], "target_spacing": (1, 1)}
    assert imgx_data.build("phantom", data_dir=tmp_path, **same) == first
    assert imgx_data.existing_build("phantom", data_dir=tmp_path, **same) == first
    assert imgx_data.existing_build("phantom_3d", data_dir=tmp_path) is None
    assert sentinel.exists()


def test_build_with_other_parameters_needs_overwrite(tmp_path):
    first = imgx_data.build("phantom", data_dir=tmp_path, split_sizes=(2, 1, 1))
    (first.path / "sentinel").touch()
    other = {"split_sizes": (3, 1, 1), "target_shape": (32, 32)}
    message = (
        rf"^{first.path}: dataset phantom is built with other parameters \(target_shape "
        r"\[96, 96\] -> \[32, 32\]; split_sizes \[2, 1, 1\] -> \[3, 1, 1\]\); rebuild it with "
        r"--overwrite \(build\(\.\.\., overwrite=True\)\), or build it under another --data-dir"
    )
    with pytest.raises(imgx_data.DatasetError, match=message):
        imgx_data.build("phantom", data_dir=tmp_path, **other)
    with pytest.raises(imgx_data.DatasetError, match=message):
        imgx_data.existing_build("phantom", data_dir=tmp_path, **other)
    assert imgx_data.dataset_info("phantom", tmp_path) == first
    assert (first.path / "sentinel").exists()
    rebuilt = imgx_data.build("phantom", data_dir=tmp_path, overwrite=True, **other)
    assert rebuilt.split_sizes["train"] == 3 and rebuilt.image_shape == (32, 32)
    assert not (first.path / "sentinel").exists()
    assert imgx_data.existing_build("phantom", data_dir=tmp_path, **other) == rebuilt
    # A build without a record (an earlier imgx) cannot be compared: rebuild it.
    (rebuilt.path / imgx_data.registry.BUILD_RECORD).unlink()
    with pytest.raises(imgx_data.DatasetError, match=r"without a record .* --overwrite"):
        imgx_data.build("phantom", data_dir=tmp_path, **other)
    with pytest.raises(imgx_data.DatasetError, match=r"unknown build option\(s\) spacing"):
        imgx_data.build("phantom", data_dir=tmp_path, spacing=(1, 1))


def test_build_output_in_a_log_file_has_no_progress_bars(tmp_path, capfd):
    """Not a terminal (a log file): plain lines, no carriage returns or escape codes."""
    imgx_data.build("phantom", data_dir=tmp_path, split_sizes=(2, 1, 1))
    out, err = capfd.readouterr()
    assert "\r" not in out + err and "\x1b" not in out + err
    # Nor TFDS's "Downloading and preparing dataset Unknown size ... to <temporary dir>".
    assert "Downloading" not in out + err and ".imgx-build-" not in out + err


def test_a_phantom_of_an_older_format_is_built_again_with_its_options(tmp_path):
    """A build without the current `format` (e.g. crops only, no original labels) is not
    kept as it is: generated phantoms are rebuilt with the options they were built with;
    a request for another build names the format change and --overwrite."""
    imgx_data.build("phantom", data_dir=tmp_path, split_sizes=(2, 1, 1))
    record = tmp_path / "phantom" / "1.0.0" / registry.BUILD_RECORD
    old = json.loads(record.read_text())
    del old["format"]
    record.write_text(json.dumps(old))
    with pytest.raises(DatasetError, match=r"format default -> 3.*--overwrite"):
        imgx_data.build("phantom", data_dir=tmp_path, split_sizes=(2, 1, 1))
    info = imgx_data.ensure_built("phantom", tmp_path)
    assert json.loads(record.read_text())["format"] == registry.BUILD_FORMAT
    assert info.split_sizes == {"train": 2, "valid": 1, "test": 1}
