"""Published builders on tiny fake raw downloads in the exact real layouts, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import imgx_data
from imgx_data import DatasetError, Geometry, write_image

SHAPE = (12, 10, 6)


def write_case(
    image_path: Path,
    label_path: Path | None,
    seed: int,
    *,
    labels: tuple[int, ...] = (0, 1, 2),
    spacing: tuple[float, ...] = (1.2, 1.2, 3.0),
    shape: tuple[int, ...] = SHAPE,
) -> np.ndarray:
    """A volume with a block of each foreground label; image = label + noise."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    for i, value in enumerate(labels[1:]):
        label[2 + i : 6 + i, 2 : 5 + i, 1:4] = value
    geometry = Geometry.identity(shape, spacing)
    image = 100.0 * label + rng.normal(0, 10, size=shape)
    write_image(image_path, image.astype(np.float32), geometry)
    if label_path is not None:
        write_image(label_path, label, geometry)
    return label


# The seven institutions of zenodo 7013610 (as in institution.txt).
INSTITUTIONS = ("UCL", "Prostate3T", "ProstateDx", "ProstateMRI", "bergen", "Nijmegen", "Rutgers")


def write_male_pelvic(
    root: Path, institutions: dict[str, int], gzipped: tuple[str, ...] = ("000001",)
) -> None:
    """zenodo 7013610: uncompressed data/<uid>_img.nii and data/<uid>_mask.nii (the cases
    in ``gzipped`` as .nii.gz, which the builder accepts too), institution.txt."""
    (root / "data").mkdir(parents=True)
    lines, seed = [], 0
    for name, count in institutions.items():
        assert name in INSTITUTIONS, name
        for _ in range(count):
            uid = f"{seed:06d}"
            suffix = ".nii.gz" if uid in gzipped else ".nii"
            write_case(
                root / "data" / f"{uid}_img{suffix}",
                root / "data" / f"{uid}_mask{suffix}",
                seed,
                labels=(0, 1, 5, 8),
                spacing=(0.8, 0.8, 3.0),
            )
            lines.append(f"{uid} {name}")
            seed += 1
    (root / "institution.txt").write_text("\n".join(lines) + "\n")


# amos22/dataset.json of zenodo 7262581 (labels as published, with their spellings).
AMOS_LABELS = {
    "0": "background",
    "1": "spleen",
    "2": "right kidney",
    "3": "left kidney",
    "4": "gall bladder",
    "5": "esophagus",
    "6": "liver",
    "7": "stomach",
    "8": "arota",
    "9": "postcava",
    "10": "pancreas",
    "11": "right adrenal gland",
    "12": "left adrenal gland",
    "13": "duodenum",
    "14": "bladder",
    "15": "prostate/uterus",
}


def write_amos(root: Path, train_ids: list[int], valid_ids: list[int]) -> None:
    """zenodo 7262581: amos22/dataset.json + imagesTr/labelsTr/imagesVa/labelsVa/imagesTs."""
    amos = root / "amos22"
    meta = {
        "name": "AMOS",
        "description": "MICCAI2022 Multi-Modality Abdominal Multi-Organ Segmentation Challenge",
        "tensorImageSize": "3D",
        "reference": "SRIDB x CUHKSZ x HKU x SYSU x LGCHSZ x LGPHSZ",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0 01/05/2022",
        "modality": {"0": "CT"},
        "labels": AMOS_LABELS,
        "numTraining": len(train_ids),
        "numValidation": len(valid_ids),
        "numTest": 1,
        "training": [],
        "validation": [],
        "test": ["./imagesTs/amos_0002.nii.gz"],  # unlabelled: never read
    }
    for key, folder, ids in (("training", "Tr", train_ids), ("validation", "Va", valid_ids)):
        for i in ids:
            name = f"amos_{i:04d}.nii.gz"
            write_case(amos / f"images{folder}" / name, amos / f"labels{folder}" / name, i)
            meta[key].append(
                {"image": f"./images{folder}/{name}", "label": f"./labels{folder}/{name}"}
            )
    write_case(amos / "imagesTs" / "amos_0002.nii.gz", None, 2)
    (amos / "dataset.json").write_text(json.dumps(meta, indent=4))


BRATS = {"labels": (0, 2, 1, 4), "spacing": (1.0, 1.0, 1.0)}


def write_brats(root: Path, count: int) -> None:
    """BraTS2021_Training_Data/<uid>/<uid>_{t1,t1ce,t2,flair,seg}.nii.gz, labels {0,1,2,4}."""
    for i in range(count):
        uid = f"BraTS2021_{i:05d}"
        case = root / "BraTS2021_Training_Data" / uid
        write_case(case / f"{uid}_t1.nii.gz", case / f"{uid}_seg.nii.gz", i, **BRATS)
        for j, modality in enumerate(("t1ce", "t2", "flair")):
            write_case(case / f"{uid}_{modality}.nii.gz", None, 100 * i + j, **BRATS)


def write_muscle(root: Path, counts: dict[str, int]) -> None:
    """Mendeley 3jykz7wz8d: .../MuscleCNN/{train,trainannot,val,valannot,test,testannot}/."""
    base = root / "Polito-Radboud-DeepLearningUS" / "Segmentation_models" / "data" / "MuscleCNN"
    rng = np.random.default_rng(0)
    for folder, count in counts.items():
        (base / folder).mkdir(parents=True)
        (base / f"{folder}annot").mkdir(parents=True)
        for i in range(count):
            mask = np.zeros((20, 24), np.uint8)  # 20 rows, 24 columns
            mask[5:12, 4 + i : 15 + i] = 255
            image = np.clip(mask * 0.5 + rng.normal(60, 20, size=mask.shape), 0, 255)
            name = f"BB_anon_{folder}_{i}.png"
            sitk.WriteImage(
                sitk.GetImageFromArray(image.astype(np.uint8)), str(base / folder / name)
            )
            sitk.WriteImage(sitk.GetImageFromArray(mask), str(base / f"{folder}annot" / name))


def _built(tmp_path, name, raw, **options):
    return imgx_data.build(name, manual_dir=raw, data_dir=tmp_path / "data", **options)


def _uids(tmp_path, name, split):
    source = imgx_data.data_source(name, split, tmp_path / "data")
    return [source[i]["uid"] for i in range(len(source))]


def test_male_pelvic_split_per_institution(tmp_path):
    raw = tmp_path / "raw"
    write_male_pelvic(raw, {"UCL": 8, "bergen": 4})
    assert (raw / "data" / "000000_img.nii").is_file()  # uncompressed, as published
    assert (raw / "data" / "000001_mask.nii.gz").is_file()  # .nii.gz accepted too
    info = _built(tmp_path, "male_pelvic_mr", raw, target_shape=(8, 8, 4))
    # UCL (n = 8, k = 4): valid 0-1, train 2-3, test 4-7; bergen (n = 4, k = 2): valid 8-9,
    # test 10-11.
    assert _uids(tmp_path, "male_pelvic_mr", "valid") == ["000000", "000001", "000008", "000009"]
    assert _uids(tmp_path, "male_pelvic_mr", "train") == ["000002", "000003"]
    assert info.split_sizes == {"train": 2, "valid": 4, "test": 6}
    assert info.spacing == (0.75, 0.75, 2.5) and info.image_shape == (8, 8, 4)
    assert info.class_names[4] == "transition zone" and info.num_classes == 9
    example = imgx_data.data_source("male_pelvic_mr", "test", tmp_path / "data")[0]
    assert set(np.unique(example["label"])) == {0, 1, 5, 8}
    np.testing.assert_allclose(example["original_spacing"], (0.8, 0.8, 3.0))
    np.testing.assert_array_equal(example["original_shape"], SHAPE)
    gz = imgx_data.data_source("male_pelvic_mr", "valid", tmp_path / "data")[1]
    assert gz["uid"] == "000001" and set(np.unique(gz["label"])) == {0, 1, 5, 8}


def test_amos_keeps_ct_and_splits_validation(tmp_path):
    raw = tmp_path / "raw"
    write_amos(raw, train_ids=[1, 4, 507], valid_ids=[8, *range(10, 19), 599])
    info = _built(tmp_path, "amos_ct", raw, target_shape=(8, 8, 4))
    assert info.split_sizes == {"train": 2, "valid": 1, "test": 9}
    assert _uids(tmp_path, "amos_ct", "train") == ["amos_0001", "amos_0004"]
    assert _uids(tmp_path, "amos_ct", "valid") == ["amos_0008"]
    assert info.class_names[9] == "inferior vena cava" and info.num_classes == 16
    example = imgx_data.data_source("amos_ct", "train", tmp_path / "data")[0]
    assert example["image"].shape == (8, 8, 4, 1) and example["image"].dtype == np.float32
    assert 0.0 <= example["image"].min() and example["image"].max() <= 1.0
    # Resampled to the default spacing 1.5 x 1.5 x 5: 12 * 1.2 / 1.5 = 9.6 -> 10 voxels.
    np.testing.assert_allclose(example["spacing"], (1.5, 1.5, 5.0))


def write_amos_hu_case(image_path: Path, label_path: Path) -> None:
    """An int16 CT in HU, 20x14x8 voxels of 0.8x0.8x3 mm: air (-2000) for x < 6, bone
    (1500) for 6 <= x < 10, soft tissue (40) elsewhere, and a spleen (label 1, 60 HU) in
    the far corner, inside a 60 HU region two voxels larger so that linear
    interpolation at the labelled voxels only sees 60 HU."""
    shape = (20, 14, 8)
    image = np.full(shape, 40, np.int16)
    image[:6] = -2000
    image[6:10] = 1500
    image[14:, 8:, 4:] = 60
    label = np.zeros(shape, np.uint8)
    label[16:, 10:, 5:] = 1
    geometry = Geometry(shape, (0.8, 0.8, 3.0), (-80.0, -120.0, 30.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_image(image_path, image, geometry)
    write_image(label_path, label, geometry)


def test_amos_clips_hu_and_resamples_to_the_spec_grid(tmp_path):
    raw = tmp_path / "raw"
    write_amos(raw, train_ids=[1], valid_ids=[8])
    amos = raw / "amos22"
    write_amos_hu_case(
        amos / "imagesTr" / "amos_0001.nii.gz", amos / "labelsTr" / "amos_0001.nii.gz"
    )
    _built(tmp_path, "amos_ct", raw, target_shape=(8, 4, 2))
    example = imgx_data.data_source("amos_ct", "train", tmp_path / "data")[0]
    # Resampled size round(size * spacing / target) with the spec's 1.5 x 1.5 x 5 mm:
    # 20 * 0.8 / 1.5 = 10.67 -> 11, 14 * 0.8 / 1.5 = 7.47 -> 7, 8 * 3 / 5 = 4.8 -> 5 (floor
    # would give 10, 7, 4 and ceil 11, 8, 5). The spleen sits at the far end of every axis,
    # so the window ends there: crop start = resampled size - (8, 4, 2).
    np.testing.assert_array_equal(example["crop_start"], (11 - 8, 7 - 4, 5 - 2))
    np.testing.assert_allclose(example["spacing"], (1.5, 1.5, 5.0))
    # Origin: raw origin + (target - spacing) / 2 + crop start * target.
    np.testing.assert_allclose(
        example["origin"],
        np.add((-80.0, -120.0, 30.0), [0.35 + 4.5, 0.35 + 4.5, 1.0 + 15.0]),
        atol=1e-4,
    )
    # HU clipped to [-991, 362] (air and bone hit both ends), z-scored and rescaled to
    # [0, 1], i.e. (clip(v) + 991) / 1353: 60 HU -> 0.7768. Without the clip (or with
    # percentiles, which here equal the extremes) it would be (60 + 2000) / 3500 = 0.589.
    spleen = example["image"][..., 0][example["label"] == 1]
    assert spleen.size >= 4
    np.testing.assert_allclose(spleen, (60 + 991) / 1353, atol=1e-5)
    assert example["image"].min() >= 0.0 and example["image"].max() <= 1.0


@pytest.mark.parametrize(
    ("name", "labels"), [("brats2021_mr", {0, 1, 2, 3}), ("brats2021_mr_wt", {0, 1})]
)
def test_brats_regions_and_split(tmp_path, name, labels):
    raw = tmp_path / "raw"
    write_brats(raw, 6)
    info = _built(tmp_path, name, raw, **SMALL["brats2021_mr"])
    # round(6 * 938 / 1251) = 4 train, round(6 * 282 / 1251) = 1 test, 1 valid.
    assert info.split_sizes == {"train": 4, "valid": 1, "test": 1}
    assert info.num_channels == 4 and info.overlapping == (name == "brats2021_mr")
    example = imgx_data.data_source(name, "test", tmp_path / "data")[0]
    assert example["uid"] == "BraTS2021_00005"
    # Test cases are stored whole (the raw (12, 10, 6) grid), not in the (9, 8, 6) window.
    assert example["image"].shape == (12, 10, 6, 4)
    assert set(np.unique(example["label"])) == labels
    # Raw ED (2) is the block [2:6, 2:5]; stored whole, it keeps its index.
    raw_seg = write_case(tmp_path / "i.nii.gz", None, 0, **BRATS)
    assert raw_seg[2, 2, 1] == 2 and example["label"][2, 2, 1] == 1
    np.testing.assert_allclose(example["origin"], (0.0, 0.0, 0.0))
    np.testing.assert_array_equal(example["crop_start"], (0, 0, 0))
    # Train cases keep the brain window, which starts at (1, 1, 0).
    train = imgx_data.data_source(name, "train", tmp_path / "data")[0]
    assert train["image"].shape == (9, 8, 6, 4)
    np.testing.assert_allclose(train["origin"], (1.0, 1.0, 0.0))


def test_muscle_us_folders_and_png_scaling(tmp_path):
    raw = tmp_path / "raw"
    write_muscle(raw, {"train": 3, "val": 1, "test": 2})
    info = _built(tmp_path, "muscle_us", raw, target_shape=(32, 24))
    assert info.split_sizes == {"train": 3, "valid": 1, "test": 2}
    assert info.postprocess == "muscle_mask" and info.num_spatial_dims == 2
    example = imgx_data.data_source("muscle_us", "valid", tmp_path / "data")[0]
    assert example["uid"] == "BB_anon_val_0"
    assert example["image"].shape == (32, 24, 1)
    assert set(np.unique(example["label"])) == {0, 1}
    np.testing.assert_array_equal(example["original_shape"], (24, 20))  # columns, rows
    restored, geometry = imgx_data.restore_to_original(example["label"], example)
    assert restored.shape == (24, 20)
    assert restored[4:15, 5:12].all() and restored.sum() == 11 * 7
    # Image = raw grayscale / 255, padded symmetrically: (32, 24) from (24, 20) -> start -4, -2.
    muscle = next(raw.rglob("MuscleCNN"))
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(muscle / "val" / "BB_anon_val_0.png")))
    np.testing.assert_array_equal(example["crop_start"], (-4, -2))
    np.testing.assert_allclose(example["image"][4:28, 2:22, 0], png.T / 255.0, atol=1e-7)
    assert not example["image"][:4].any() and not example["image"][28:].any()


def test_default_grids_follow_the_spec():
    infos = {
        name: imgx_data.dataset_info(name, "/nonexistent") for name in imgx_data.datasets.BUILDERS
    }
    assert infos["amos_ct"].image_shape == (192, 128, 128)
    assert infos["male_pelvic_mr"].spacing == (0.75, 0.75, 2.5)
    assert infos["brats2021_mr"].image_shape == (179, 219, 155)
    assert infos["muscle_us"].image_shape == (512, 480)
    assert not any(info.is_built for info in infos.values())


def test_zip_manual_dir_is_extracted(tmp_path):
    raw = tmp_path / "raw"
    write_male_pelvic(raw, {"UCL": 3})
    archive = shutil.make_archive(str(tmp_path / "download"), "zip", raw)
    info = _built(tmp_path, "male_pelvic_mr", archive, target_shape=(8, 8, 4))
    assert sum(info.split_sizes.values()) == 3


def _corrupt(path):
    path.write_bytes(b"garbage")


def _label_value(value):
    def change(path):
        array, geometry = imgx_data.read_image(path)
        array[0, 0, 0] = value
        write_image(path, array, geometry)

    return change


def _shifted_origin(path):
    array, geometry = imgx_data.read_image(path)
    write_image(
        path, array, Geometry(geometry.shape, geometry.spacing, (0.0, 0.0, 0.1), geometry.direction)
    )


def _other_spacing(path):
    array, geometry = imgx_data.read_image(path)
    write_image(
        path, array, Geometry(geometry.shape, (1.2, 1.3, 3.0), geometry.origin, geometry.direction)
    )


def _flipped_direction(path):
    array, geometry = imgx_data.read_image(path)
    write_image(
        path,
        array,
        Geometry(geometry.shape, geometry.spacing, geometry.origin, (-1, 0, 0, 0, 1, 0, 0, 0, 1)),
    )


def _one_slice_less(path):
    array, geometry = imgx_data.read_image(path)
    shape = (*geometry.shape[:2], geometry.shape[2] - 1)
    write_image(
        path,
        array[..., :-1],
        Geometry(shape, geometry.spacing, geometry.origin, geometry.direction),
    )


def _nonfinite(value):
    """Puts one NaN/inf voxel into a float NIfTI image (ITK would read it as 0)."""

    def change(path):
        array, geometry = imgx_data.read_image(path)
        array = array.astype(np.float32)
        array[3, 2, 1] = value
        write_image(path, array, geometry)

    return change


def _json_without(key):
    def change(path):
        meta = json.loads(path.read_text())
        del meta[key]
        path.write_text(json.dumps(meta))

    return change


def _amos_id_twice(path):
    """A second CT with the id of training case amos_0004, listed under validation."""
    meta, amos = json.loads(path.read_text()), path.parent
    for kind in ("images", "labels"):
        shutil.copy(amos / f"{kind}Tr" / "amos_0004.nii.gz", amos / f"{kind}Va")
    meta["validation"].append(
        {"image": "./imagesVa/amos_0004.nii.gz", "label": "./labelsVa/amos_0004.nii.gz"}
    )
    path.write_text(json.dumps(meta))


def _wider_png(path):
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    sitk.WriteImage(sitk.GetImageFromArray(np.pad(mask, ((0, 0), (0, 1)))), str(path))


AMOS_IMAGE = "amos22/imagesTr/amos_0004.nii.gz"
AMOS_LABEL = "amos22/labelsTr/amos_0004.nii.gz"
BRATS_SEG = "BraTS2021_Training_Data/BraTS2021_00001/BraTS2021_00001_seg.nii.gz"
BRATS_T2 = "BraTS2021_Training_Data/BraTS2021_00001/BraTS2021_00001_t2.nii.gz"
BRATS_T1CE = "BraTS2021_Training_Data/BraTS2021_00001/BraTS2021_00001_t1ce.nii.gz"

MUSCLE_VAL_MASK = (
    "Polito-Radboud-DeepLearningUS/Segmentation_models/data/MuscleCNN/valannot/BB_anon_val_0.png"
)
BAD_INPUTS = [
    # pytest.param(dataset, file to change, change, expected message, id=case)
    pytest.param(
        "amos_ct", AMOS_IMAGE, Path.unlink, r"amos_0004.nii.gz: file of case", id="missing image"
    ),
    pytest.param(
        "amos_ct", AMOS_IMAGE, _corrupt, r"amos_0004.nii.gz: cannot be read", id="unreadable"
    ),
    pytest.param(
        "amos_ct",
        AMOS_LABEL,
        _label_value(16),
        r"amos_0004.nii.gz: label values \[16\]",
        id="label value",
    ),
    pytest.param(
        "amos_ct",
        AMOS_IMAGE,
        _shifted_origin,
        r"Case amos_0004: origin of image \S*amos22/imagesTr/amos_0004.nii.gz",
        id="origin",
    ),
    pytest.param(
        "amos_ct",
        AMOS_LABEL,
        _other_spacing,
        r"Case amos_0004: spacing of image \S*amos22/imagesTr/amos_0004.nii.gz",
        id="spacing",
    ),
    pytest.param(
        "amos_ct",
        AMOS_LABEL,
        _one_slice_less,
        r"Case amos_0004: size of image \S*/imagesTr/amos_0004.nii.gz \(12, 10, 6\) differs "
        r"from size of label \S*/labelsTr/amos_0004.nii.gz \(12, 10, 5\)",
        id="size",
    ),
    pytest.param(
        "male_pelvic_mr",
        "data/000002_mask.nii",
        _flipped_direction,
        r"Case 000002: direction of image \S*/data/000002_img.nii \(1.0, 0.0, 0.0, .*\) differs "
        r"from direction of label \S*/data/000002_mask.nii \(-1.0, 0.0, 0.0,",
        id="direction",
    ),
    pytest.param(
        "amos_ct",
        AMOS_IMAGE,
        _nonfinite(np.nan),
        r"imagesTr/amos_0004.nii.gz: 1 NaN or infinite values in the raw NIfTI data",
        id="AMOS NaN",
    ),
    pytest.param(
        "brats2021_mr",
        BRATS_T2,
        _nonfinite(-np.inf),
        r"BraTS2021_00001_t2.nii.gz: 1 NaN or infinite values in the raw NIfTI data",
        id="BraTS inf",
    ),
    pytest.param(
        "male_pelvic_mr",
        "data/000002_img.nii",
        _nonfinite(np.inf),
        r"data/000002_img.nii: 1 NaN or infinite values in the raw NIfTI data",
        id="uncompressed NIfTI inf",
    ),
    pytest.param(
        "amos_ct",
        "amos22/dataset.json",
        _json_without("training"),
        r"amos22/dataset.json: missing the list 'training'",
        id="json without training",
    ),
    pytest.param(
        "brats2021_mr",
        BRATS_T1CE,
        _one_slice_less,
        r"BraTS2021_00001_t1ce.nii.gz: size \(12, 10, 5\) is not the BraTS 2021 grid "
        r"\(12, 10, 6\)",
        id="BraTS grid",
    ),
    pytest.param(
        "muscle_us",
        MUSCLE_VAL_MASK,
        _wider_png,
        r"Case BB_anon_val_0: size of image \S*/val/BB_anon_val_0.png \(24, 20\) differs from "
        r"size of label \S*/valannot/BB_anon_val_0.png \(25, 20\)",
        id="muscle sizes",
    ),
    pytest.param(
        "amos_ct", "amos22/dataset.json", _corrupt, r"dataset.json: not valid JSON", id="bad json"
    ),
    pytest.param(
        "amos_ct",
        "amos22/dataset.json",
        _amos_id_twice,
        r"amos22/dataset.json: case id 'amos_0004' is given twice, by \S*amos22/imagesTr/"
        r"amos_0004.nii.gz and \S*amos22/imagesVa/amos_0004.nii.gz; each case needs its own",
        id="AMOS id twice",
    ),
    pytest.param(
        "brats2021_mr",
        BRATS_SEG,
        _label_value(3),
        r"00001_seg.nii.gz: label values \[3\]",
        id="BraTS label 3",
    ),
    pytest.param(
        "brats2021_mr",
        BRATS_T2,
        Path.unlink,
        r"00001_t2.nii.gz: file of case BraTS2021_00001",
        id="BraTS no t2",
    ),
    pytest.param(
        "male_pelvic_mr",
        "institution.txt",
        Path.unlink,
        r"institution.txt: institution list",
        id="no institution.txt",
    ),
    pytest.param(
        "muscle_us",
        MUSCLE_VAL_MASK,
        Path.unlink,
        r"BB_anon_val_0.png: image has no label",
        id="muscle without label",
    ),
    pytest.param(
        "male_pelvic_mr",
        "data/000002_mask.nii",
        Path.unlink,
        r"data/000002_mask.nii.gz: file not found \(nor 000002_mask.nii\)",
        id="no mask",
    ),
]

WRITERS = {
    "amos_ct": lambda raw: write_amos(raw, [1, 4], [8, 10]),
    "brats2021_mr": lambda raw: write_brats(raw, 3),
    "male_pelvic_mr": lambda raw: write_male_pelvic(raw, {"UCL": 3}),
    "muscle_us": lambda raw: write_muscle(raw, {"train": 1, "val": 1, "test": 1}),
}
SMALL = {"brats2021_mr": {"target_shape": (9, 8, 6), "window_start": (1, 1, 0), "raw_shape": SHAPE}}


@pytest.mark.parametrize(("dataset", "relative", "change", "message"), BAD_INPUTS)
def test_bad_input_names_the_file_and_leaves_nothing(tmp_path, dataset, relative, change, message):
    raw = tmp_path / "raw"
    WRITERS[dataset](raw)
    change(raw / relative)
    options = SMALL.get(dataset, {"target_shape": (8, 8, 4)[: 2 if dataset == "muscle_us" else 3]})
    with pytest.raises(DatasetError, match=message):
        _built(tmp_path, dataset, raw, **options)
    data = tmp_path / "data"
    assert not (data / dataset).exists(), list(data.rglob("*"))
    assert not imgx_data.dataset_info(dataset, data).is_built


def test_empty_or_missing_manual_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: manual dir is empty"):
        _built(tmp_path, "amos_ct", tmp_path / "empty")
    with pytest.raises(DatasetError, match=r"nowhere: manual dir not found"):
        _built(tmp_path, "amos_ct", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"imgx build amos_ct --manual-dir DIR"):
        imgx_data.build("amos_ct", data_dir=tmp_path)
    (tmp_path / "other" / "x").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"other/amos22: folder amos22/"):
        _built(tmp_path, "amos_ct", tmp_path / "other")
    assert not (tmp_path / "data" / "amos_ct").exists()


def test_brats_needs_the_release_grid(tmp_path):
    raw = tmp_path / "raw"
    write_brats(raw, 2)
    first = raw / "BraTS2021_Training_Data" / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz"
    with pytest.raises(DatasetError) as error:
        _built(tmp_path, "brats2021_mr", raw)  # the default grid 240 x 240 x 155
    assert str(error.value).startswith(
        f"{first}: size (12, 10, 6) is not the BraTS 2021 grid (240, 240, 155)"
    )
    with pytest.raises(DatasetError, match=r"does not fit in the raw grid \(12, 10, 6\)"):
        _built(
            tmp_path, "brats2021_mr", raw, **{**SMALL["brats2021_mr"], "window_start": (4, 3, 0)}
        )
    assert not (tmp_path / "data").exists()
