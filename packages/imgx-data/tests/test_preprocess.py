"""Tests of resampling, normalisation, pad/crop and restoring predictions."""

import numpy as np
import pytest
import SimpleITK as sitk

from imgx_data import Geometry, resample_to_geometry
from imgx_data.io import array_to_sitk
from imgx_data.preprocess import (
    crop_start,
    extract_window,
    normalise_intensity,
    preprocess_volume,
    resampled_grid,
    restore_to_original,
)

ROTATED = Geometry(
    shape=(10, 8, 6),
    spacing=(1.0, 1.0, 2.0),
    origin=(5.0, -2.0, 1.0),
    direction=(0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0),
)


def test_resampled_grid_closed_form():
    """size = round(size * spacing / target); origin = origin + D (target - spacing) / 2."""
    grid = resampled_grid(ROTATED, (2.0, 0.5, 3.0))
    assert grid.shape == (5, 16, 4)
    delta = np.array([0.5, -0.25, 0.5])  # (target - spacing) / 2
    expected = np.array(ROTATED.origin) + ROTATED.direction_matrix @ delta
    np.testing.assert_allclose(grid.origin, expected)
    # The corner of voxel 0 is shared: origin - D spacing / 2.
    corner = np.array(grid.origin) - grid.direction_matrix @ (np.array(grid.spacing) / 2)
    old_corner = np.array(ROTATED.origin) - ROTATED.direction_matrix @ (
        np.array(ROTATED.spacing) / 2
    )
    np.testing.assert_allclose(corner, old_corner)


def test_resample_keeps_physical_position_of_a_block():
    label = np.zeros(ROTATED.shape, np.uint8)
    label[2:6, 2:4, 1:3] = 1
    fine = resampled_grid(ROTATED, (0.5, 0.5, 1.0))
    resampled = resample_to_geometry(label, ROTATED, fine, is_label=True)
    assert resampled.shape == (20, 16, 12)
    assert resampled.sum() == label.sum() * 8
    np.testing.assert_array_equal(resampled[4:12, 4:8, 2:6], 1)


def test_normalise_intensity_closed_form():
    """Fixed range: clip then min-max (z-scoring does not change the min-max result)."""
    image = np.array([-2000.0, -991.0, 0.0, 362.0, 1000.0])[:, None]
    out = normalise_intensity(image, (-991.0, 362.0))
    expected = (np.clip(image, -991, 362) + 991) / (362 + 991)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    constant = normalise_intensity(np.full((4, 2), 3.0))
    np.testing.assert_array_equal(constant, 0)


def test_normalise_percentiles_per_channel():
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(size=1000), 100 + 5 * rng.normal(size=1000)], axis=-1)
    image[0, 0] = 1e6  # outlier clipped at the 99.5th percentile
    out = normalise_intensity(image)
    assert out.shape == image.shape and out.dtype == np.float32
    np.testing.assert_allclose(out.min(axis=0), 0)
    np.testing.assert_allclose(out.max(axis=0), 1)
    assert np.mean(out[:, 0] == 1) >= 0.004  # the top 0.5 % share the clipped maximum


@pytest.mark.parametrize(
    ("size", "target", "fg", "expected"),
    [
        ((10,), (4,), None, (3,)),  # centre of the volume
        ((10,), (4,), (7, 9), (6,)),  # centred on the foreground [7, 9)
        ((10,), (4,), (9, 10), (6,)),  # clamped to the last voxel
        ((4,), (8,), (0, 1), (-2,)),  # symmetric padding 2 + 2
        ((5,), (8,), (0, 1), (-1,)),  # padding 1 before, 2 after
    ],
)
def test_crop_start(size, target, fg, expected):
    label = None
    if fg is not None:
        label = np.zeros(size)
        label[fg[0] : fg[1]] = 1
    assert crop_start(size, target, label) == expected


def test_extract_window_pads_with_zeros():
    array = np.arange(1, 6)
    np.testing.assert_array_equal(extract_window(array, (-2,), (8,)), [0, 0, 1, 2, 3, 4, 5, 0])
    np.testing.assert_array_equal(extract_window(array, (3,), (2,)), [4, 5])


def test_preprocess_then_restore_recovers_the_label():
    """Same spacing: the window holds the whole foreground, restoring is exact."""
    label = np.zeros(ROTATED.shape, np.uint8)
    label[3:7, 2:5, 2:4] = 2
    label[4, 3, 3] = 1
    image = np.random.default_rng(0).normal(size=ROTATED.shape).astype(np.float32)
    case = preprocess_volume(
        array_to_sitk(image, ROTATED),
        array_to_sitk(label, ROTATED),
        target_spacing=ROTATED.spacing,
        target_shape=(6, 12, 4),
    )
    assert case.image.shape == (6, 12, 4, 1) and case.label.shape == (6, 12, 4)
    assert case.label.sum() == label.sum()
    example = case.to_example("u")
    restored, geometry = restore_to_original(example["label"], example)
    assert geometry.shape == ROTATED.shape
    np.testing.assert_array_equal(restored, label)
    # The stored grid's voxel 0 is the original voxel crop_start.
    start = np.array(case.crop_start)
    physical = np.array(ROTATED.origin) + ROTATED.direction_matrix @ (start * ROTATED.spacing)
    np.testing.assert_allclose(example["origin"], physical, atol=1e-5)


def test_preprocess_resampled_restore_close_to_original():
    label = np.zeros(ROTATED.shape, np.uint8)
    label[2:8, 2:6, 1:5] = 1
    image = label.astype(np.float32)
    case = preprocess_volume(
        array_to_sitk(image, ROTATED),
        sitk.Cast(array_to_sitk(label, ROTATED), sitk.sitkUInt8),
        target_spacing=(0.5, 0.5, 1.0),
        target_shape=(24, 20, 12),
    )
    restored, _ = restore_to_original(case.label, case.to_example("u"))
    np.testing.assert_array_equal(restored, label)
