"""Tests of the dataset fingerprint and the training plan (closed forms of the rules)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import imgx_data
from imgx_data import DatasetError, Geometry, planning, write_image
from imgx_data.datasets.nifti_folder import read_layout

# The nnU-Net folder writer of the nifti_folder tests (tests are not a package here).
_spec = importlib.util.spec_from_file_location(
    "nifti_folder_tests", Path(__file__).with_name("test_nifti_folder.py")
)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
write_nnunet = _module.write_nnunet


def test_target_spacing_is_the_median():
    spacings = [(1.0, 1.0, 2.0), (1.0, 1.0, 3.0), (0.8, 1.0, 2.0)]
    assert planning.target_spacing(spacings, [(64, 64, 32)] * 3) == (1.0, 1.0, 2.0)


def test_target_spacing_anisotropic_axis_takes_the_10th_percentile():
    # z median 5 > 3 x 0.7 and 20 slices * 3 < 200 voxels: anisotropic; P10 of
    # (2, 5, 5, 5, 6) by linear interpolation = 2 + 0.4 * (5 - 2) = 3.2, above max(xy) 0.7.
    spacings = [(0.7, 0.7, z) for z in (2.0, 5.0, 5.0, 5.0, 6.0)]
    shapes = [(200, 200, 20)] * 5
    assert planning.target_spacing(spacings, shapes) == pytest.approx((0.7, 0.7, 3.2))
    # Many slices (70 * 3 >= 200): not anisotropic by the voxel count, the median stays.
    assert planning.target_spacing(spacings, [(200, 200, 70)] * 5)[2] == 5.0
    # The percentile never goes below the other axes' spacing.
    spacings = [(1.5, 1.5, z) for z in (1.0, 1.0, 6.0, 6.0, 6.0)]
    assert planning.target_spacing(spacings, [(200, 200, 20)] * 5)[2] == 1.5


def test_network_rules():
    assert planning.first_downsampling((0.75, 0.75, 2.5)) == (2, 2, 1)
    assert planning.first_downsampling((1.0, 1.0, 2.0)) == (2, 2, 2)
    # Bottom map patch / (2 * 2^(L-2)) >= 4: 96 -> L = 4 (cap, bottom 12); 16 -> L = 2
    # (L = 3 would leave 16 / 4 = 4, allowed, L = 4: 16 / 8 = 2): L = 3.
    assert planning.num_levels((96, 112), (2, 2)) == 4
    assert planning.num_levels((16, 64), (2, 2)) == 3
    assert planning.num_levels((8, 8), (2, 2)) == 2
    assert planning.num_levels((64, 64, 8), (2, 2, 1)) == 3  # z: 8 / 2 = 4 at L = 3
    assert planning.divisor((2, 2, 1), 4) == (8, 8, 4)
    assert planning.level_channels(8, 4) == (8, 16, 32, 64)
    # sum_l V_l C_l: 96x112x8 + 48x56x16 + 24x28x32 + 12x14x64.
    elements = planning.feature_elements((96, 112), (2, 2), (8, 16, 32, 64))
    assert elements == 96 * 112 * 8 + 48 * 56 * 16 + 24 * 28 * 32 + 12 * 14 * 64
    memory = planning.sample_memory_bytes((96, 112), (2, 2), (8, 16, 32, 64), 1)
    assert memory == 512 * 96 * 112 + 96 * elements


def test_batch_size_rule():
    sample = 1e6
    # Budget for 100, the 5 % rule allows 0.05 * 1e6 / 1e4 = 5, the voxel floor
    # 2^17 // 1e4 = 13: 13.
    assert planning.batch_size(sample, 100e6, (100, 100), 1e6) == 13
    # Dataset rule above the floor: 0.05 * 1e7 / 1e4 = 50; the budget (30) binds.
    assert planning.batch_size(sample, 30e6, (100, 100), 1e7) == 30
    # Never below 2, even when the budget holds one sample.
    assert planning.batch_size(sample, 1e6, (100, 100), 1e7) == 2
    # Never above the fewest cases a run trains on (else no epoch holds a batch).
    assert planning.batch_size(sample, 100e6, (100, 100), 1e6, max_batch=8) == 8
    assert planning.batch_size(sample, 100e6, (100, 100), 1e6, max_batch=20) == 13
    assert planning.batch_size(sample, 1e6, (100, 100), 1e7, max_batch=1) == 1


def test_plan_batch_fits_the_smallest_training_set_of_the_build(tmp_path):
    """18 train + valid cases of 2D 16x16: the voxel floor gives 512 images; fold
    training sets hold 18 - ceil(18 / 5) = 14 cases, fewer than the 16 train cases."""
    raw = tmp_path / "raw"
    write_nnunet(raw, 20, channels=1, shape=(16, 16), spacings=((1.0, 1.0),))
    splits = {"train": [f"case{i:03d}" for i in range(16)], "valid": ["case016", "case017"],
              "test": ["case018", "case019"]}  # fmt: skip
    (raw / "splits.json").write_text(json.dumps(splits))
    imgx_data.build("nifti_folder", manual_dir=raw, data_dir=tmp_path / "data", name="few")
    assert imgx_data.dataset_plan("few", tmp_path / "data").batch_size == 14


def test_fit_patch_shrinks_the_axis_largest_relative_to_the_median():
    network = planning.NETWORKS["gpu"]
    first = (2, 2, 2)
    full = planning.fit_patch((160, 160, 160), (160, 160, 160), first, network, 1e12)
    assert full == (160, 160, 160)
    # A budget of 2 samples of 144x160x160: one divisor step (L = 4: 2 * 2^2 = 8) off the
    # axis with the largest patch / median ratio (ties: the first), until it fits:
    # 152x160x160, 152x152x160 (too big), 152x152x152 (3.51M voxels < 3.69M) fits.
    channels = planning.level_channels(32, 4)
    need = 2 * planning.sample_memory_bytes((144, 160, 160), first, channels, 2)
    for too_big in ((152, 160, 160), (152, 152, 160)):
        assert 2 * planning.sample_memory_bytes(too_big, first, channels, 2) > need
    assert planning.fit_patch((160, 160, 160), (160, 160, 160), first, network, need) == (
        152,
        152,
        152,
    )
    # Median 90x110 rounds up to the divisor 8 (96x112), not past the stored shape.
    cpu = planning.NETWORKS["cpu"]
    assert planning.fit_patch((90, 110), (96, 112), (2, 2), cpu, 1e12) == (96, 112)
    assert planning.fit_patch((90, 110), (96, 104), (2, 2), cpu, 1e12) == (96, 104)


def _fingerprint(spacings, shapes, classes=("background", "a", "b")):
    return planning.Fingerprint(
        spacings=tuple(spacings),
        shapes=tuple(shapes),
        channel_names=("MR",),
        class_names=classes,
        intensity=({},),
        foreground_intensity=({},),
        class_frequency=(1.0, 0.0, 0.0),
        class_presence=(1.0, 0.0, 0.0),
    )


def test_plan_2d_whole_images_on_cpu():
    fp = _fingerprint([(2.0, 2.0)] * 40, [(90, 110)] * 40)
    plan = planning.make_plan(
        fp, spacing=(2.0, 2.0), stored_shape=(96, 112), num_train_cases=32, device="cpu",
        memory_gb=8.0,
    )  # fmt: skip
    assert plan.patch_shape is None and plan.foreground_oversampling == 0.0
    assert plan.median_shape == (90, 110)
    assert plan.num_channels == (8, 16, 32, 64) and plan.num_res_blocks == 1
    assert plan.first_downsampling == (2, 2)
    # 5 % rule: 0.05 * 32 * 9900 / 10752 = 1.47; voxel floor 2^17 // 10752 = 12.
    assert plan.batch_size == 12
    sample = planning.sample_memory_bytes((96, 112), (2, 2), plan.num_channels, 1)
    assert plan.memory_estimate_gb == pytest.approx(12 * sample / 1e9)


def test_plan_3d_anisotropic_fits_the_budget_on_gpu():
    fp = _fingerprint([(0.75, 0.75, 2.5)] * 10, [(256, 256, 48)] * 10)
    common = dict(spacing=(0.75, 0.75, 2.5), stored_shape=(256, 256, 48), num_train_cases=8)
    roomy = planning.make_plan(fp, **common, device="gpu", memory_gb=1000.0)
    assert roomy.patch_shape is None and roomy.first_downsampling == (2, 2, 1)
    assert roomy.num_channels == (32, 64, 128, 256) and roomy.batch_size >= 2
    tight = planning.make_plan(fp, **common, device="gpu", memory_gb=4.0)
    patch = tight.patch_shape
    assert patch is not None and tight.foreground_oversampling == 0.33
    levels = len(tight.num_channels)
    step = planning.divisor((2, 2, 1), levels)
    assert all(p % s == 0 for p, s in zip(patch, step, strict=True))
    sample = planning.sample_memory_bytes(patch, (2, 2, 1), tight.num_channels, 2)
    assert 2 * sample <= 4e9 and tight.batch_size == 2
    # Shrunk in turn along the axis largest relative to the median: the ratios patch /
    # median stay within one step (x, y: 8 voxels of 256; z: 4 of 48) of each other.
    ratios = [p / m for p, m in zip(patch, (256, 256, 48), strict=True)]
    assert max(ratios) - min(ratios) <= max(
        s / m for s, m in zip(step, (256, 256, 48), strict=True)
    )
    assert patch[0] == patch[1] < 256
    assert tight.memory_estimate_gb <= 4.0


def test_fingerprint_of_a_multichannel_folder(tmp_path):
    write_nnunet(tmp_path, 4, channels=2, shape=(8, 8, 4))
    fp = planning.fingerprint_layout(read_layout(tmp_path))
    assert fp.spacings == ((1.0, 1.0, 2.0), (1.0, 1.0, 3.0)) * 2
    assert fp.shapes == ((8, 8, 4),) * 4
    # Every case: label[1:4, 1:3] = 1 (3 x 2 x 4 = 24 voxels), label[4:6, 3:5] = 2 (16) of 256.
    assert fp.class_frequency == pytest.approx((216 / 256, 24 / 256, 16 / 256))
    assert fp.class_presence == (1.0, 1.0, 1.0)
    # Channel 1 is channel 0 + 1 (write_nnunet): means differ by 1, stds agree.
    images = []
    for i in range(4):
        image, _ = imgx_data.read_image(tmp_path / "imagesTr" / f"case{i:03d}_0000.nii.gz")
        images.append(image)
    values = np.concatenate([im.ravel() for im in images]).astype(np.float64)
    assert fp.intensity[0]["mean"] == pytest.approx(values.mean(), rel=1e-6)
    assert fp.intensity[0]["std"] == pytest.approx(values.std(), rel=1e-4)
    assert fp.intensity[1]["mean"] == pytest.approx(values.mean() + 1, rel=1e-6)
    assert fp.intensity[0]["percentile_50"] == pytest.approx(np.percentile(values, 50), rel=1e-5)
    labels = [imgx_data.read_image(tmp_path / "labelsTr" / f"case{i:03d}.nii.gz")[0]
              for i in range(4)]  # fmt: skip
    fg = np.concatenate([im[lb > 0] for im, lb in zip(images, labels, strict=True)])
    assert fp.foreground_intensity[0]["percentile_99.5"] == pytest.approx(
        np.percentile(fg, 99.5), rel=1e-5
    )
    assert planning.Fingerprint.from_json(fp.to_json()) == fp


def test_build_writes_plan_json_and_plan_replans(tmp_path):
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    meta = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "organ": 1},
            "file_ending": ".nii.gz"}  # fmt: skip
    (raw / "dataset.json").write_text(json.dumps(meta))
    for i in range(5):
        label = np.zeros((18, 22), np.uint8)
        label[4:10, 5:15] = 1
        image = 100.0 + 50 * label + i
        geometry = Geometry.identity((18, 22), (2.0, 2.0))
        write_image(raw / "imagesTr" / f"c{i}_0000.nii.gz", image.astype(np.float32), geometry)
        write_image(raw / "labelsTr" / f"c{i}.nii.gz", label, geometry)
    data = tmp_path / "data"
    info = imgx_data.build("nifti_folder", manual_dir=raw, data_dir=data, name="slices")
    assert info.image_shape == (24, 24)
    plan = imgx_data.dataset_plan("slices", data)
    assert plan is not None and plan.stored_shape == (24, 24) and plan.spacing == (2.0, 2.0)
    # 24 / 2 = 12 >= 4, 24 / 4 = 6, 24 / 8 = 3 < 4: three levels; whole images.
    assert plan.num_channels == tuple(
        planning.NETWORKS[plan.device].base_channels * 2**level for level in range(3)
    )
    assert plan.patch_shape is None
    # The voxel floor allows 2^17 // (24 * 24) = 227 images, more than the train cases: the
    # batch is all of them (a larger one would leave every epoch without a batch).
    assert 2**17 // (24 * 24) > info.split_sizes["train"] >= 2
    assert plan.batch_size == info.split_sizes["train"]
    saved = json.loads((info.path / planning.PLAN_FILE).read_text())
    assert saved["fingerprint"]["class_presence"] == [1.0, 1.0]
    assert not list(info.path.glob(".plan-*"))  # the temporary file was renamed
    # Replanning for a small GPU budget keeps the fingerprint (raw folder not needed).
    shutil.rmtree(raw)
    fp, replanned = imgx_data.plan("slices", data, memory_gb=0.001, device="gpu")
    assert replanned.device == "gpu" and replanned.num_channels[0] == 32
    assert replanned.memory_gb == 0.001 and fp.shapes == ((18, 22),) * 5
    assert imgx_data.dataset_plan("slices", data) == replanned
    with pytest.raises(DatasetError, match="raw folder"):
        imgx_data.plan("slices", data, refingerprint=True)
    with pytest.raises(DatasetError, match="presets"):
        imgx_data.plan("phantom", data)
    # 1 MB holds no 2 samples of 24x24 at the GPU width: the patch shrinks until it does.
    patch = replanned.patch_shape
    sample = planning.sample_memory_bytes(patch, (2, 2), replanned.num_channels, 2)
    assert patch is not None and math.prod(patch) < 24 * 24 and 2 * sample <= 1e6
    assert math.isclose(replanned.memory_estimate_gb * 1e9, replanned.batch_size * sample)


def test_anisotropic_3d_folder_build_and_plan(tmp_path):
    # z spacings 4 and 5 mm (median 4.5 > 3 x 0.8; 4 slices x 3 < 16): the target is the
    # 10th percentile, 4 mm; resampled z sizes 4 and round(4 * 5 / 4) = 5 -> stored 8.
    write_nnunet(
        tmp_path / "raw", 10, channels=1, shape=(16, 16, 4),
        spacings=((0.8, 0.8, 4.0), (0.8, 0.8, 5.0)),
    )  # fmt: skip
    data = tmp_path / "data"
    info = imgx_data.build("nifti_folder", manual_dir=tmp_path / "raw", data_dir=data, name="ct")
    assert info.spacing == pytest.approx((0.8, 0.8, 4.0)) and info.image_shape == (16, 16, 8)
    _, plan = imgx_data.plan("ct", data, device="cpu", memory_gb=1.0)
    assert plan.first_downsampling == (2, 2, 1)  # 4 mm > 2 x 0.8 mm
    # Median resampled shape 16x16x4 (median of 4 and 5 slices, floored); z = 4 allows
    # only L = 2 (4 / (1 * 2^1) = 2 < 4 at L = 3); the patch 16x16x4 is more than one
    # step (1 slice) short of the stored 8 slices: patches with foreground oversampling.
    assert plan.median_shape == (16, 16, 4) and plan.num_channels == (8, 16)
    assert plan.patch_shape == (16, 16, 4) and plan.foreground_oversampling == 0.33
    # Batch: the budget holds thousands; 5 % of 8 x 1024 voxels is 0; 2^17 / 1024 = 128;
    # but a cross-validation fold trains on 9 - ceil(9 / 5) = 7 of the 8 train + 1 valid.
    assert info.split_sizes == {"train": 8, "valid": 1, "test": 1}
    assert plan.batch_size == 7
