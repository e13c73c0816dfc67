"""Tests of the muscle ultrasound post-processing."""

import numpy as np

import imgx_data
from imgx_data.postprocess import postprocess_muscle_mask, select_muscle_component


def _disc(shape, centre, radius):
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return (x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius**2


def test_largest_component_kept_when_second_is_small():
    mask = _disc((80, 80), (40, 60), 15) | _disc((80, 80), (40, 15), 8)
    kept = select_muscle_component(mask)
    np.testing.assert_array_equal(kept, _disc((80, 80), (40, 60), 15))


def test_superficial_component_kept_when_sizes_are_close():
    """Second > 0.75 of the largest: the one with the smaller minimum row y wins."""
    deep = _disc((80, 80), (40, 60), 15)
    shallow = _disc((80, 80), (40, 20), 14)  # (14/15)^2 = 0.87 of the area
    kept = select_muscle_component(deep | shallow)
    np.testing.assert_array_equal(kept, shallow)


def test_diagonal_pixels_are_one_component():
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = True
    assert select_muscle_component(mask).sum() == 2


def test_postprocess_fills_holes_and_removes_specks():
    muscle = _disc((96, 96), (48, 50), 25)
    mask = muscle.copy()
    mask[45:50, 45:50] = False  # a hole
    mask[5:8, 5:8] = True  # a speck, removed by the opening
    out = postprocess_muscle_mask(mask.astype(np.uint8))
    assert out.dtype == np.uint8
    assert out[47, 47] == 1
    assert out[6, 6] == 0
    # Erosion 5x5 then dilation by disk(4) then opening: the disc stays within 2 px.
    assert np.abs(int(out.sum()) - int(muscle.sum())) < 0.1 * muscle.sum()


def test_registry_postprocess_applies_by_dataset():
    mask = np.zeros((40, 40), np.uint8)
    mask[2, 2] = 1
    np.testing.assert_array_equal(imgx_data.postprocess("muscle_us", mask, (1.0, 1.0)), 0)
    np.testing.assert_array_equal(imgx_data.postprocess("phantom", mask, (1.0, 1.0)), mask)
