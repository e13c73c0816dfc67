"""Tests of building the user's own data (nnU-Net v2 / Decathlon layouts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import imgx_data
from imgx_data import DatasetError, Geometry, write_image
from imgx_data.datasets.nifti_folder import default_split


def _case(shape, seed):
    label = np.zeros(shape, np.uint8)
    label[1:4, 1:3] = 1
    label[4:6, 3:5] = 2
    image = 50.0 * label + np.random.default_rng(seed).normal(0, 5, size=shape)
    return image.astype(np.float32), label


def write_nnunet(
    root: Path,
    num_cases: int = 10,
    *,
    channels: int = 2,
    ending: str = ".nii.gz",
    shape: tuple[int, ...] = (8, 8, 4),
    spacings: tuple[tuple[float, ...], ...] = ((1.0, 1.0, 2.0), (1.0, 1.0, 3.0)),
) -> None:
    """nnU-Net v2: dataset.json, imagesTr/<case>_000c<ending>, labelsTr/<case><ending>."""
    meta = {
        "channel_names": {str(c): f"MR{c}" for c in range(channels)},
        "labels": {"background": 0, "left lobe": 1, "right lobe": 2},
        "numTraining": num_cases,
        "file_ending": ending,
    }
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps(meta))
    for i in range(num_cases):
        image, label = _case(shape, i)
        if ending == ".png":
            image = np.clip(np.round(image + 20), 0, 250).astype(np.uint8)
        geometry = Geometry.identity(shape, spacings[i % len(spacings)])
        for c in range(channels):
            write_image(root / "imagesTr" / f"case{i:03d}_{c:04d}{ending}", image + c, geometry)
        write_image(root / "labelsTr" / f"case{i:03d}{ending}", label, geometry)


def _build(tmp_path, raw, name="mine", **options):
    return imgx_data.build(
        "nifti_folder", manual_dir=raw, data_dir=tmp_path / "data", name=name, **options
    )


def test_nnunet_layout_derives_grid_and_split(tmp_path):
    write_nnunet(tmp_path / "raw")
    info = _build(tmp_path, tmp_path / "raw")
    assert info.class_names == ("background", "left lobe", "right lobe")
    assert info.num_channels == 2 and info.num_spatial_dims == 3
    assert info.channel_names == ("MR0", "MR1")  # dataset.json's, recorded in the build
    # Median of z spacings {2, 3} x 5 each = 2.5; z size round(4 * 3 / 2.5) = 5 -> 8.
    assert info.spacing == (1.0, 1.0, 2.5)
    assert info.image_shape == (8, 8, 8)
    assert info.split_sizes == {"train": 8, "valid": 1, "test": 1}
    split = default_split([f"case{i:03d}" for i in range(10)])
    source = imgx_data.data_source("mine", "valid", tmp_path / "data")
    assert [source[0]["uid"]] == split["valid"]
    example = source[0]
    assert example["image"].shape == (8, 8, 8, 2)
    assert set(np.unique(example["label"])) == {0, 1, 2}


def test_user_grid_and_splits_json(tmp_path):
    raw = tmp_path / "raw"
    write_nnunet(raw, 4, channels=1)
    (raw / "splits.json").write_text(
        json.dumps({"train": ["case000", "case001"], "valid": ["case002"], "test": ["case003"]})
    )
    info = _build(tmp_path, raw, spacing=(2.0, 2.0, 3.0), shape=(4, 4, 4))
    assert info.spacing == (2.0, 2.0, 3.0) and info.image_shape == (4, 4, 4)
    assert info.split_sizes == {"train": 2, "valid": 1, "test": 1}
    test = imgx_data.data_source("mine", "test", tmp_path / "data")[0]
    assert test["uid"] == "case003"
    restored, geometry = imgx_data.restore_to_original(test["label"], test)
    assert geometry.shape == (8, 8, 4)
    np.testing.assert_allclose(geometry.spacing, (1.0, 1.0, 3.0))


def test_folds_divide_the_train_and_valid_cases_of_a_users_splits_json(tmp_path):
    raw = tmp_path / "raw"
    write_nnunet(raw, 6, channels=1, shape=(4, 4, 2))
    splits = {"train": ["case000", "case001", "case002"], "valid": ["case003"],
              "test": ["case004", "case005"]}  # fmt: skip
    (raw / "splits.json").write_text(json.dumps(splits))
    _build(tmp_path, raw)
    folds = imgx_data.cross_validation_folds("mine", tmp_path / "data", num_folds=2)
    assert sorted(folds[0]["val"] + folds[1]["val"]) == ["case000", "case001", "case002", "case003"]
    for k in range(2):
        test = imgx_data.data_source("mine", "test", tmp_path / "data", fold=k, num_folds=2)
        assert sorted(test[i]["uid"] for i in range(len(test))) == splits["test"]


def write_decathlon(raw: Path, num_cases: int = 3) -> list[dict[str, str]]:
    """Medical Segmentation Decathlon: 2-channel 4D images; returns the training list."""
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    training = []
    for i in range(num_cases):
        image, label = _case((6, 6, 3), i)
        four_d = sitk.JoinSeries(
            [sitk.GetImageFromArray(image.T), sitk.GetImageFromArray(image.T + 1)]
        )
        sitk.WriteImage(four_d, str(raw / "imagesTr" / f"tiny_{i}.nii.gz"))
        write_image(
            raw / "labelsTr" / f"tiny_{i}.nii.gz", label, Geometry.identity((6, 6, 3), (1, 1, 1))
        )
        training.append(
            {"image": f"./imagesTr/tiny_{i}.nii.gz", "label": f"./labelsTr/tiny_{i}.nii.gz"}
        )
    meta = {
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "training": training,
    }
    (raw / "dataset.json").write_text(json.dumps(meta))
    return training


def test_decathlon_layout_with_4d_images(tmp_path):
    raw = tmp_path / "Task01_Tiny"
    write_decathlon(raw)
    info = _build(tmp_path, raw, name="tiny")
    assert info.num_channels == 2 and info.class_names[2] == "tumour"
    example = imgx_data.data_source("tiny", "train", tmp_path / "data")[0]
    assert example["image"].shape == (8, 8, 8, 2)


def test_png_2d_and_several_datasets_listed(tmp_path):
    raw = tmp_path / "raw"
    write_nnunet(raw, 5, channels=1, ending=".png", shape=(10, 7), spacings=((1.0, 1.0),))
    info = _build(tmp_path, raw, name="us_2d")
    assert info.num_spatial_dims == 2 and info.image_shape == (16, 8)
    write_nnunet(tmp_path / "raw3d", 3, channels=1)
    _build(tmp_path, tmp_path / "raw3d", name="ct_3d")
    names = [d.name for d in imgx_data.list_datasets(tmp_path / "data")]
    assert names[-2:] == ["ct_3d", "us_2d"] and "phantom" in names
    assert imgx_data.dataset_info("us_2d", tmp_path / "data").is_built


def test_single_slice_nifti_is_2d(tmp_path):
    raw = tmp_path / "raw"
    write_nnunet(raw, 3, channels=1, shape=(8, 8, 1), spacings=((0.5, 0.5, 1.0),))
    info = _build(tmp_path, raw)
    assert info.num_spatial_dims == 2 and info.spacing == (0.5, 0.5)


def test_default_split_is_seeded_80_10_10():
    uids = [f"c{i:02d}" for i in range(20)]
    split = default_split(uids)
    assert [len(split[s]) for s in ("train", "valid", "test")] == [16, 2, 2]
    assert split == default_split(list(reversed(uids)))
    assert sorted(sum(split.values(), [])) == uids


def _rewrite_json(**changes):
    def change(raw):
        meta = json.loads((raw / "dataset.json").read_text())
        meta.update(changes)
        for key, value in changes.items():
            if value is None:
                del meta[key]
        (raw / "dataset.json").write_text(json.dumps(meta))

    return change


def _nonfinite_nifti(name, value):
    """One NaN/inf voxel in a float32 .nii.gz image (ITK's reader would make it 0)."""

    def change(raw):
        path = raw / "imagesTr" / name
        array, geometry = imgx_data.read_image(path)
        array[2, 3, 1] = value
        write_image(path, array.astype(np.float32), geometry)

    return change


def _constant(name, value):
    def change(raw):
        path = raw / "imagesTr" / name
        array, geometry = imgx_data.read_image(path)
        write_image(path, np.full_like(array, value), geometry)

    return change


def _nan_mha(raw):
    # Other formats (here MetaImage, which keeps NaN) are checked on ITK's array.
    for path in sorted((raw / "imagesTr").glob("*.nii.gz")) + sorted((raw / "labelsTr").glob("*")):
        image = sitk.ReadImage(str(path))
        if "imagesTr" in str(path) and path.name.startswith("case001"):
            array = sitk.GetArrayFromImage(image)
            array[0, 0, 0] = np.nan
            image = _copy(array, image)
        sitk.WriteImage(image, str(path).replace(".nii.gz", ".mha"))
        path.unlink()
    _rewrite_json(file_ending=".mha")(raw)


def _copy(array, reference):
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _shift_label(raw):
    image = sitk.ReadImage(str(raw / "labelsTr" / "case002.nii.gz"))
    image.SetOrigin((0.0, 0.5, 0.0))
    sitk.WriteImage(image, str(raw / "labelsTr" / "case002.nii.gz"))


def _label_value(raw):
    image = sitk.ReadImage(str(raw / "labelsTr" / "case002.nii.gz"))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = 7
    sitk.WriteImage(_copy(array, image), str(raw / "labelsTr" / "case002.nii.gz"))


def _splits(content):
    def change(raw):
        (raw / "splits.json").write_text(json.dumps(content))

    return change


BAD_FOLDERS = [
    pytest.param(lambda raw: (raw / "dataset.json").unlink(), r"raw: no dataset.json", id="json"),
    pytest.param(_rewrite_json(channel_names=None), r"dataset.json: neither nnU-Net", id="keys"),
    pytest.param(_rewrite_json(file_ending=None), r"needs 'labels'.*'file_ending'", id="ending"),
    pytest.param(
        _rewrite_json(labels={"background": 0, "a": 2}),
        r"without gaps, got values \[0, 2\]",
        id="label gap",
    ),
    pytest.param(
        lambda raw: (raw / "labelsTr" / "case001.nii.gz").unlink(),
        r"case001_0000.nii.gz: image has no label",
        id="image without label",
    ),
    pytest.param(
        lambda raw: (raw / "imagesTr" / "case001_0001.nii.gz").unlink(),
        r"case001_0001.nii.gz: file not found",
        id="missing channel",
    ),
    pytest.param(_shift_label, r"Case case002: origin of image case002_0000", id="geometry"),
    pytest.param(_label_value, r"case002.nii.gz: label values \[7\]", id="label value"),
    pytest.param(_nan_mha, r"case001_0000.mha: 1 NaN or infinite", id="NaN"),
    pytest.param(
        _nonfinite_nifti("case001_0000.nii.gz", np.nan),
        r"imagesTr/case001_0000.nii.gz: 1 NaN or infinite values in the raw NIfTI data",
        id="NIfTI NaN",
    ),
    pytest.param(
        _nonfinite_nifti("case003_0001.nii.gz", np.inf),
        r"imagesTr/case003_0001.nii.gz: 1 NaN or infinite values in the raw NIfTI data",
        id="NIfTI inf",
    ),
    pytest.param(
        _constant("case002_0001.nii.gz", 0),
        r"imagesTr/case002_0001.nii.gz: every voxel has the value 0: a constant image",
        id="constant",
    ),
    pytest.param(
        _splits({"train": ["case000", "nope"]}), r"splits.json: case 'nope'", id="splits unknown"
    ),
    pytest.param(
        _splits({"train": ["case000"], "test": ["case000"]}),
        r"more than one split",
        id="splits twice",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD_FOLDERS)
def test_bad_folder_names_the_problem_and_leaves_nothing(tmp_path, change, message):
    raw = tmp_path / "raw"
    write_nnunet(raw, 4)
    change(raw)
    with pytest.raises(DatasetError, match=message):
        _build(tmp_path, raw)
    assert not (tmp_path / "data" / "mine").exists()
    assert [d.name for d in imgx_data.list_datasets(tmp_path / "data")][-1] != "mine"


def test_bad_names(tmp_path):
    write_nnunet(tmp_path / "raw", 3, channels=1)
    with pytest.raises(DatasetError, match="taken by a built-in"):
        _build(tmp_path, tmp_path / "raw", name="phantom")
    with pytest.raises(DatasetError, match="lower case"):
        _build(tmp_path, tmp_path / "raw", name="My Data")
    with pytest.raises(DatasetError, match="needs a name"):
        imgx_data.build("nifti_folder", manual_dir=tmp_path / "raw", data_dir=tmp_path)


def test_failed_overwrite_keeps_the_existing_build(tmp_path):
    raw, data = tmp_path / "raw", tmp_path / "data"
    write_nnunet(raw, 4, channels=1)
    first = _build(tmp_path, raw)
    before = [imgx_data.data_source("mine", "train", data)[i] for i in range(2)]
    # Fails while writing (NaN found when case002 is read), after TFDS would have
    # deleted the old build.
    image = raw / "imagesTr" / "case002_0000.nii.gz"
    clean = image.read_bytes()
    _nonfinite_nifti("case002_0000.nii.gz", np.nan)(raw)
    with pytest.raises(DatasetError, match=r"case002_0000.nii.gz: 1 NaN or infinite"):
        _build(tmp_path, raw, overwrite=True, shape=(4, 4, 4))
    assert imgx_data.dataset_info("mine", data) == first
    after = [imgx_data.data_source("mine", "train", data)[i] for i in range(2)]
    for old, new in zip(before, after, strict=True):
        assert old["uid"] == new["uid"]
        np.testing.assert_array_equal(old["image"], new["image"])
    assert [p.name for p in data.iterdir()] == ["mine"]  # no staging folder left
    assert [p.name for p in (data / "mine").iterdir()] == ["1.0.0"]
    # A successful overwrite replaces the build.
    image.write_bytes(clean)
    rebuilt = _build(tmp_path, raw, overwrite=True, shape=(4, 4, 4))
    assert rebuilt.image_shape == (4, 4, 4) != first.image_shape
    assert imgx_data.data_source("mine", "train", data)[0]["image"].shape == (4, 4, 4, 1)
    assert [p.name for p in data.iterdir()] == ["mine"]


def test_build_under_a_name_taken_by_a_foreign_folder_deletes_nothing(tmp_path):
    write_nnunet(tmp_path / "raw", 3, channels=1)
    foreign = tmp_path / "data" / "mine" / "1.0.0"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("not imgx's")
    for overwrite in (False, True):
        with pytest.raises(
            DatasetError,
            match=rf"{foreign}: exists but is not an imgx build.*choose another --data-dir or "
            r"--name, or remove the folder yourself",
        ):
            _build(tmp_path, tmp_path / "raw", overwrite=overwrite)
        assert (foreign / "notes.txt").read_text() == "not imgx's"
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["mine"]  # no staging left


def test_build_from_another_folder_or_grid_names_the_differences(tmp_path):
    raw, moved = tmp_path / "raw", tmp_path / "moved"
    write_nnunet(raw, 3, channels=1)
    first = _build(tmp_path, raw)
    assert _build(tmp_path, raw) == first  # already built alike: kept
    raw.rename(moved)
    with pytest.raises(
        DatasetError,
        match=rf"built with other parameters \(manual_dir \"{raw}\" -> \"{moved}\"; spacing "
        r"default -> \[2.0, 2.0, 3.0\]\); rebuild it with --overwrite .*another --name or",
    ):
        _build(tmp_path, moved, spacing=(2.0, 2.0, 3.0))
    assert imgx_data.dataset_info("mine", tmp_path / "data") == first
    rebuilt = _build(tmp_path, moved, spacing=(2.0, 2.0, 3.0), overwrite=True)
    assert rebuilt.spacing == (2.0, 2.0, 3.0) != first.spacing


def test_decathlon_case_id_given_twice_names_both_files(tmp_path):
    raw = tmp_path / "Task01_Tiny"
    training = write_decathlon(raw)
    # tiny_1.nii next to tiny_1.nii.gz: both have the case id tiny_1.
    image, geometry = imgx_data.read_image(raw / "imagesTr" / "tiny_1.nii.gz")
    write_image(raw / "imagesTr" / "tiny_1.nii", image, geometry)
    training.append({"image": "./imagesTr/tiny_1.nii", "label": "./labelsTr/tiny_1.nii.gz"})
    meta = json.loads((raw / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**meta, "training": training}))
    with pytest.raises(
        DatasetError,
        match=rf"^{raw / 'dataset.json'}: case id 'tiny_1' is given twice, by "
        rf"{raw}/imagesTr/tiny_1.nii.gz and {raw}/imagesTr/tiny_1.nii; each case",
    ):
        _build(tmp_path, raw, name="tiny")
    assert not (tmp_path / "data" / "tiny").exists()


def test_file_name_that_is_not_utf8_is_a_build_error(tmp_path, not_utf8):
    raw = tmp_path / "raw"
    write_nnunet(raw, 3, channels=1)
    for folder, name in (("imagesTr", "case001_0000"), ("labelsTr", "case001")):
        bad = not_utf8(raw / folder, name.replace("case", "c\xe9").encode("latin-1") + b".nii.gz")
        bad.write_bytes((raw / folder / f"{name}.nii.gz").read_bytes())
        (raw / folder / f"{name}.nii.gz").unlink()
    with pytest.raises(
        DatasetError,
        match=r"labelsTr/.*: the file name is not valid UTF-8 \('c\\udce9001.nii.gz', bytes "
        r"b'c\\xe9001.nii.gz'\), which SimpleITK cannot open: rename it",
    ):
        _build(tmp_path, raw)
    assert not (tmp_path / "data" / "mine").exists()


def write_wide_cases(raw: Path, num_cases: int = 6) -> np.ndarray:
    """nnU-Net layout of 2D (32, 8) cases at 1 mm whose two structures (x 4..11 and
    28..30, 44 voxels) do not fit one (16, 8) window: centred on their box (start 10), the
    window keeps 8 voxels. Splits: train case000-002, valid case003, test case004-005."""
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    meta = {"channel_names": {"0": "US"}, "labels": {"background": 0, "muscle": 1},
            "numTraining": num_cases, "file_ending": ".nii.gz"}  # fmt: skip
    (raw / "dataset.json").write_text(json.dumps(meta))
    label = np.zeros((32, 8), np.uint8)
    label[4:12, 2:6] = 1
    label[28:31, 2:6] = 1
    geometry = Geometry.identity(label.shape, (1.0, 1.0))
    for i in range(num_cases):
        image = 50.0 * label + np.random.default_rng(i).normal(0, 5, size=label.shape)
        write_image(raw / "imagesTr" / f"case{i:03d}_0000.nii.gz", image, geometry)
        write_image(raw / "labelsTr" / f"case{i:03d}.nii.gz", label, geometry)
    splits = {"train": ["case000", "case001", "case002"], "valid": ["case003"],
              "test": ["case004", "case005"]}  # fmt: skip
    (raw / "splits.json").write_text(json.dumps(splits))
    return label


def test_cases_are_stored_whole_and_training_reads_the_window(tmp_path, caplog, monkeypatch):
    """Valid and test cases hold the whole (32, 8) grid, all 44 voxels; training reads the
    (16, 8) window with 8 of them, and the build says so: 3 train + 1 valid warnings (a
    valid case trains in folds), and `window_drops` counts 36 voxels per case."""
    raw = tmp_path / "raw"
    label = write_wide_cases(raw)
    with caplog.at_level("WARNING"):
        info = _build(tmp_path, raw, spacing=(1.0, 1.0), shape=(16, 8))
    warned = [r.getMessage() for r in caplog.records if "training window drops" in r.getMessage()]
    assert len(warned) == 4 and all("36 foreground voxels" in m for m in warned)
    assert info.image_shape == (16, 8)
    data = tmp_path / "data"
    for split in ("valid", "test"):
        example = imgx_data.data_source("mine", split, data)[0]
        assert example["image"].shape == (32, 8, 1), split
        np.testing.assert_array_equal(example["label"], label)
        np.testing.assert_array_equal(example["window_start"], (10, 0))
    train = imgx_data.data_source("mine", "train", data)
    example = train[0]
    assert example["image"].shape == (16, 8, 1) and int(example["label"].sum()) == 8
    np.testing.assert_array_equal(example["label"], label[10:26])
    np.testing.assert_array_equal(example["crop_start"], (10, 0))
    np.testing.assert_allclose(example["origin"], (10.0, 0.0))
    # Read from the window stored beside the whole case: the whole arrays stay undecoded
    # (no original_label in the example), the window equals the one cut from the case
    # (read without the light source).
    assert "original_label" not in example and "window_image" not in example
    cut = imgx_data.DataSource(train._source, "mine", "train", None, (16, 8), light=None)[0]
    for key in ("image", "label", "origin", "crop_start", "window_start", "spacing"):
        np.testing.assert_array_equal(example[key], cut[key], err_msg=key)
    assert "original_label" in cut
    whole = imgx_data.data_source("mine", "train", data, windows=False)[0]
    assert whole["label"].shape == (32, 8) and "window_image" not in whole
    assert imgx_data.data_source("mine", "valid", data, windows=True)[0]["label"].shape == (16, 8)
    drops = imgx_data.window_drops("mine", "train", data)
    assert drops == {
        "num_cases": 3,
        "cases_dropping_foreground": 3,
        "voxels": 108,
        "by_case": {"case000": 36, "case001": 36, "case002": 36},
    }
    assert imgx_data.window_drops("mine", "valid", data)["voxels"] == 36
    # Counted once at build (cases.json); read again from the records only without it.
    index = json.loads((info.path / "cases.json").read_text())
    assert index["splits"]["train"] == {
        "uids": ["case000", "case001", "case002"],
        "cropped_foreground": {"case000": 36, "case001": 36, "case002": 36},
    }
    with monkeypatch.context() as m:
        m.setattr(imgx_data.registry, "_light_sources", None)  # no record is read
        assert imgx_data.window_drops("mine", "train", data) == drops
        assert len(imgx_data.cross_validation_folds("mine", data, num_folds=2)) == 2
    (info.path / "cases.json").unlink()
    assert imgx_data.window_drops("mine", "train", data) == drops
    # Folds draw from train + valid: the held-out fold is whole, its training cases windows.
    folds = imgx_data.cross_validation_folds("mine", data, num_folds=2)
    valid = imgx_data.data_source("mine", "valid", data, fold=0, num_folds=2)
    assert [valid[i]["uid"] for i in range(len(valid))] == folds[0]["val"]
    assert all(valid[i]["label"].shape == (32, 8) for i in range(len(valid)))
    train = imgx_data.data_source("mine", "train", data, fold=0, num_folds=2)
    assert all(train[i]["label"].shape == (16, 8) for i in range(len(train)))
    fold_drops = imgx_data.window_drops("mine", "train", data, fold=0, num_folds=2)
    assert sorted(fold_drops["by_case"]) == folds[0]["train"]
    assert fold_drops["voxels"] == 36 * len(folds[0]["train"])


def test_a_users_build_of_an_older_format_is_used_with_a_warning(tmp_path, caplog):
    """A format-2 build (valid cases stored as windows) is the user's data: kept and used,
    with a warning naming the rebuild; `imgx build` alike names the format change."""
    raw = tmp_path / "raw"
    write_nnunet(raw, 4, channels=1, shape=(4, 4, 2))
    info = _build(tmp_path, raw)
    record = info.path / "imgx_build.json"
    old = json.loads(record.read_text())
    record.write_text(json.dumps({**old, "format": 2}))
    with caplog.at_level("WARNING"):
        again = imgx_data.ensure_built("mine", tmp_path / "data")
    assert again.split_sizes == info.split_sizes
    assert "format 2, now 3" in caplog.text and "--overwrite" in caplog.text
    assert json.loads(record.read_text())["format"] == 2  # nothing rebuilt
    with pytest.raises(DatasetError, match=r"format 2 -> 3.*--overwrite"):
        _build(tmp_path, raw)
