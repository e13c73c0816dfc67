"""Tests of resampling, normalisation, pad/crop and restoring predictions."""

import numpy as np
import pytest
import SimpleITK as sitk

from imgx_data import Geometry, resample_to_geometry
from imgx_data.io import array_to_sitk
from imgx_data.preprocess import (
    crop_start,
    extract_window,
    geometry_features,
    normalise_intensity,
    preprocess_volume,
    resampled_grid,
    restore_probabilities,
    restore_to_original,
    training_window,
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


def outside_crop_case():
    """A (32, 8) label whose foreground box (x 4..30) exceeds the (16, 8) window.

    Foreground box [4, 31) has centre 17.5: the window starts at floor(17.5 - 8 + 0.5) = 10
    and keeps x 10, 11 of the first structure (2 x 4 = 8 voxels) of 8 x 4 + 3 x 4 = 44.
    """
    label = np.zeros((32, 8), np.uint8)
    label[4:12, 2:6] = 1
    label[28:31, 2:6] = 1
    geometry = Geometry.identity(label.shape, (1.0, 1.0))
    image = np.linspace(0.0, 1.0, label.size).reshape(label.shape).astype(np.float32)
    return preprocess_volume(
        array_to_sitk(image, geometry),
        array_to_sitk(label, geometry),
        target_spacing=None,
        target_shape=(16, 8),
        intensity="identity",
    ), label


def test_preprocess_keeps_label_file_and_counts_cropped_foreground():
    case, label = outside_crop_case()
    assert case.crop_start == (10, 0)
    assert int(case.label.sum()) == 8
    assert case.cropped_foreground == 44 - 8
    np.testing.assert_array_equal(case.original_label, label)
    example = case.to_example("u")
    assert example["cropped_foreground"] == 36
    np.testing.assert_array_equal(example["original_label"], label)


def test_restore_probabilities_is_linear_then_argmax_not_nearest_labels():
    """Stored voxels of 2 mm at x = 0.5, 2.5, 4.5 mm; original 1 mm voxels at x = 0..5.

    p(class 1) = [0.55, 0, 0] stored. At x = 1 mm linear interpolation gives
    0.75 * 0.55 = 0.4125 < 0.5: background, where the nearest stored label (x = 0.5 mm) is
    class 1; at x = 2, 3, 4: 0.1375, 0, 0.
    """
    stored = Geometry(shape=(3, 2), spacing=(2.0, 1.0), origin=(0.5, 0.0), direction=(1, 0, 0, 1))
    original = Geometry.identity((6, 2), (1.0, 1.0))
    p1 = np.repeat(np.array([[0.55], [0.0], [0.0]], np.float32), 2, axis=1)
    probabilities = np.stack([1 - p1, p1], axis=-1)
    example = {"label": np.zeros((3, 2), np.uint8), **geometry_features(stored, original, (0, 0))}
    restored, grid = restore_probabilities(probabilities, example)
    assert grid.shape == (6, 2) and restored.shape == (6, 2, 2)
    np.testing.assert_allclose(restored[1:5, 0, 1], [0.4125, 0.1375, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(restored.sum(-1)[1:5], 1.0, atol=1e-6)
    linear = np.argmax(restored, axis=-1)
    nearest, _ = restore_to_original(np.argmax(probabilities, axis=-1), example)
    assert linear[1, 0] == 0 and nearest[1, 0] == 1
    np.testing.assert_array_equal(linear[2:], nearest[2:])
    with pytest.raises(ValueError, match="stored grid"):
        restore_probabilities(probabilities[:2], example)


def test_whole_case_keeps_the_foreground_the_window_drops():
    """Stored whole (as every case is), the (32, 8) grid is kept: all 44 voxels; the
    training window is remembered by its start (10, 0) and still drops 36 of them."""
    case, label = outside_crop_case()
    whole = case.whole()
    assert whole.crop_start == (0, 0) and whole.window_start == (10, 0)
    assert whole.cropped_foreground == 36
    np.testing.assert_array_equal(whole.label, label)
    assert whole.geometry == case.original
    assert whole.image.shape == (32, 8, 1)
    assert whole.resampled is None  # already whole


def test_training_window_of_a_whole_case_is_the_stored_window():
    """Reading the window back from the whole example gives the crop of the old builds:
    the same arrays, origin and crop start (x 10..25, origin 10 mm)."""
    case, _ = outside_crop_case()
    window = case.to_example("u")
    whole = case.whole().to_example("u")
    np.testing.assert_array_equal(whole["window_start"], (10, 0))
    read = training_window(whole, (16, 8))
    for key in ("image", "label", "origin", "crop_start", "spacing", "original_label"):
        np.testing.assert_array_equal(read[key], window[key], err_msg=key)
    np.testing.assert_array_equal(read["window_start"], (0, 0))
    assert read["cropped_foreground"] == 36
    np.testing.assert_allclose(read["origin"], (10.0, 0.0))
    # A window example (or one of an older build without window_start) is kept as it is.
    assert training_window(read, (16, 8))["label"] is read["label"]
    old = {k: v for k, v in window.items() if k != "window_start"}
    assert training_window(old, (16, 8))["label"] is old["label"]


def test_padded_whole_case_keeps_its_window_inside_the_padding():
    """A (6, 8) case in a (16, 8) window is padded 5 before and stored (16, 8): whole and
    window are one array, window start 0, crop start -5."""
    label = np.zeros((6, 8), np.uint8)
    label[1:3, 2:4] = 1
    geometry = Geometry.identity(label.shape, (1.0, 1.0))
    case = preprocess_volume(
        array_to_sitk(label.astype(np.float32), geometry),
        array_to_sitk(label, geometry),
        target_spacing=None,
        target_shape=(16, 8),
        intensity="identity",
    )
    whole = case.whole()
    assert whole.crop_start == (-5, 0) and whole.window_start == (0, 0)
    assert whole.cropped_foreground == 0
    np.testing.assert_array_equal(whole.label, case.label)
