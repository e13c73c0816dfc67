"""Tests of imgx_train.metrics against closed forms and a brute-force reference."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from imgx_train.metrics import (
    METRIC_NAMES,
    binary_metrics,
    grid_diagonal,
    per_class_metrics,
    surface,
    surface_distances,
)

AGREEMENT = ("dice", "iou", "nsd", "hd95", "assd", "centroid_distance")


def _box_mask(shape, start, size):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))] = True
    return mask


def _ball(shape, centre, radius):
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) <= radius**2


def _brute_force(pred, ref, spacing, tolerance):
    """Independent reference: neighbour test for the surface, all pairwise distances."""

    def surface_points(mask):
        padded = np.pad(mask, 1, constant_values=False)
        inner = tuple(slice(1, -1) for _ in mask.shape)
        interior = np.ones_like(mask)
        for axis in range(mask.ndim):
            for step in (-1, 1):
                interior &= np.roll(padded, step, axis=axis)[inner]
        return np.argwhere(mask & ~interior) * np.asarray(spacing)

    distances = cdist(surface_points(pred), surface_points(ref))
    d_pr, d_rp = distances.min(axis=1), distances.min(axis=0)
    both = np.concatenate([d_pr, d_rp])
    centre = lambda m: np.argwhere(m).mean(axis=0) * np.asarray(spacing)
    return {
        "hd95": max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)),
        "assd": both.mean(),
        "nsd": np.mean(both <= tolerance + 1e-9),
        "centroid_distance": np.linalg.norm(centre(pred) - centre(ref)),
    }


@pytest.mark.parametrize("shape", [(9, 7), (8, 7, 6)])
def test_identical_masks(shape):
    mask = _box_mask(shape, (2,) * len(shape), (4,) * len(shape))
    m = binary_metrics(mask, mask, spacing=(0.7,) * len(shape))
    assert m["dice"] == m["iou"] == m["nsd"] == 1.0
    assert m["hd95"] == m["assd"] == m["centroid_distance"] == 0.0
    assert set(m) == set(METRIC_NAMES)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [1, 2])
def test_shifted_cube_anisotropic(axis, shift):
    shape, side, spacing = (14, 12, 10), 6, (0.5, 2.0, 3.0)
    ref = _box_mask(shape, (2, 2, 2), (side,) * 3)
    start = [2, 2, 2]
    start[axis] += shift
    pred = _box_mask(shape, start, (side,) * 3)
    m = binary_metrics(pred, ref, spacing, tolerance_mm=0.1)
    dice = 1 - shift / side
    assert m["dice"] == pytest.approx(dice)
    assert m["iou"] == pytest.approx(dice / (2 - dice))
    # Every surface distance is at most shift·spacing and a whole face attains it (> 5 %).
    assert m["hd95"] == pytest.approx(shift * spacing[axis])
    assert m["centroid_distance"] == pytest.approx(shift * spacing[axis])
    voxel_ml = 0.5 * 2.0 * 3.0 / 1000
    assert m["volume_prediction"] == m["volume_reference"] == pytest.approx(side**3 * voxel_ml)
    assert m["nsd"] < 1.0
    assert binary_metrics(pred, ref, spacing, shift * spacing[axis])["nsd"] == 1.0


def test_shifted_square_nsd_and_assd_closed_form():
    # Square side L shifted by k along x (1 <= k <= L-2); surfaces are the 4L-4 perimeters.
    side, shift, spacing = 8, 2, (1.5, 1.0)
    ref = _box_mask((16, 12), (2, 2), (side, side))
    pred = _box_mask((16, 12), (2 + shift, 2), (side, side))
    # Distance 0 only on the shared parts of the top and bottom rows: 2(L-k) per surface.
    m = binary_metrics(pred, ref, spacing, tolerance_mm=0.5)
    assert m["nsd"] == pytest.approx((side - shift) / (2 * side - 2))
    assert m["hd95"] == pytest.approx(shift * spacing[0])
    expected = _brute_force(pred, ref, spacing, 0.5)
    assert m["assd"] == pytest.approx(expected["assd"])


@pytest.mark.parametrize(
    ("side", "shift", "spacing"), [(8, 1, (1.0, 1.0)), (8, 2, (0.5, 2.0)), (11, 3, (0.4, 1.5))]
)
def test_shifted_square_assd_closed_form(side, shift, spacing):
    # Square of side L, the copy shifted by k along x (spacing sx <= sy / k, k <= (L-1)/2).
    # Predicted surface (4L-4 voxels): the side columns inside the reference, 2(L-k)
    # voxels, lie on the reference surface (0); the near row's L-2 inner voxels are k·sx
    # from the reference's row; the far row (L voxels) is k·sx beyond it and the side
    # voxels of the k-1 rows in between are j·sx (j = 1 .. k-1) beyond it. So
    # Σd_pr = k·sx·(L-2) + k·sx·L + sx·k(k-1) = k·sx·(2L+k-3), the same for d_rp, and
    # ASSD = k·sx·(2L+k-3) / (4L-4).
    sx = spacing[0]
    ref = _box_mask((side + 8, side + 4), (2, 2), (side, side))
    pred = _box_mask((side + 8, side + 4), (2 + shift, 2), (side, side))
    m = binary_metrics(pred, ref, spacing)
    assert m["assd"] == pytest.approx(shift * sx * (2 * side + shift - 3) / (4 * side - 4))
    assert m["hd95"] == pytest.approx(shift * sx)
    assert m["centroid_distance"] == pytest.approx(shift * sx)


def _ellipsoid(shape, centre, radius_mm, spacing):
    """Voxels whose centre lies within radius_mm of centre (voxel indices) in mm."""
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (
        sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing, strict=True))
        <= radius_mm**2
    )


def test_spheres_with_anisotropic_spacing():
    # Spheres in mm on voxels of 0.5 x 1 x 2 mm: ellipsoids in voxel indices.
    shape, spacing, centre = (56, 30, 16), (0.5, 1.0, 2.0), (28, 15, 8)
    small = _ellipsoid(shape, centre, 6.0, spacing)
    large = _ellipsoid(shape, centre, 11.0, spacing)
    m = binary_metrics(small, large, spacing)
    # Every surface point is about 11 - 6 = 5 mm from the other sphere, up to a voxel.
    assert abs(m["hd95"] - 5.0) <= max(spacing)
    assert abs(m["assd"] - 5.0) <= max(spacing)
    assert m["centroid_distance"] == pytest.approx(0.0, abs=1e-9)
    voxel_ml = np.prod(spacing) / 1000
    assert m["volume_prediction"] == pytest.approx(small.sum() * voxel_ml)
    assert m["volume_prediction"] == pytest.approx(4 / 3 * np.pi * 6.0**3 / 1000, rel=0.05)
    assert m["volume_reference"] == pytest.approx(4 / 3 * np.pi * 11.0**3 / 1000, rel=0.03)
    assert m["dice"] == pytest.approx(2 * small.sum() / (small.sum() + large.sum()))
    # The same sphere moved by 2 voxels along the 2 mm axis: centroids exactly 4 mm apart,
    # the volumes equal, and the distances match the brute-force reference.
    moved = _ellipsoid(shape, (28, 15, 10), 6.0, spacing)
    m = binary_metrics(moved, small, spacing, tolerance_mm=1.0)
    assert m["centroid_distance"] == pytest.approx(4.0)
    assert m["volume_prediction"] == m["volume_reference"]
    expected = _brute_force(moved, small, spacing, 1.0)
    for name, value in expected.items():
        assert m[name] == pytest.approx(value), name


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0)])
def test_concentric_spheres(spacing):
    shape, r_small, r_large = (25, 25, 25), 6, 10
    small = _ball(shape, (12, 12, 12), r_small)
    large = _ball(shape, (12, 12, 12), r_large)
    m = binary_metrics(small, large, spacing)
    gap = (r_large - r_small) * spacing[0]
    assert abs(m["hd95"] - gap) <= spacing[0]
    assert abs(m["assd"] - gap) <= spacing[0]
    assert m["centroid_distance"] == pytest.approx(0.0, abs=1e-9)
    assert m["dice"] == pytest.approx(2 * small.sum() / (small.sum() + large.sum()))


@pytest.mark.parametrize(
    ("shape", "spacing"), [((11, 9), (0.8, 1.7)), ((10, 9, 7), (0.6, 1.1, 2.5))]
)
def test_matches_brute_force_on_random_blobs(shape, spacing):
    rng = np.random.default_rng(0)
    for _ in range(3):
        # Blobs touching the image border check that border voxels count as surface.
        pred = rng.random(shape) < 0.35
        ref = rng.random(shape) < 0.35
        m = binary_metrics(pred, ref, spacing, tolerance_mm=1.2)
        expected = _brute_force(pred, ref, spacing, 1.2)
        for name, value in expected.items():
            assert m[name] == pytest.approx(value), name


def test_crop_gives_the_uncropped_distances():
    shape, spacing = (20, 18, 9), (0.9, 1.3, 2.0)
    ref = _ball(shape, (8, 9, 4), 4.5) | _box_mask(shape, (15, 0, 0), (3, 3, 3))
    pred = _ball(shape, (9, 8, 4), 5.0)
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    expected = _brute_force(pred, ref, spacing, 1.0)
    m = binary_metrics(pred, ref, spacing, tolerance_mm=1.0)
    assert m["hd95"] == pytest.approx(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
    assert m["assd"] == pytest.approx(np.concatenate([d_pr, d_rp]).mean())
    for name, value in expected.items():
        assert m[name] == pytest.approx(value), name


def test_surface_includes_the_image_border():
    mask = np.ones((5, 4), dtype=bool)
    expected = np.ones((5, 4), dtype=bool)
    expected[1:-1, 1:-1] = False
    np.testing.assert_array_equal(surface(mask), expected)
    m = binary_metrics(mask, mask, (1.0, 1.0))
    assert m["hd95"] == 0.0 and m["dice"] == 1.0


@pytest.mark.parametrize("shape", [(9, 7), (8, 7, 6)])
def test_empty_mask_policy(shape):
    spacing = (0.5, 2.0, 1.5)[: len(shape)]
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True)))
    assert grid_diagonal(shape, spacing) == pytest.approx(diagonal)
    empty = np.zeros(shape, dtype=bool)
    blob = _box_mask(shape, (1,) * len(shape), (3,) * len(shape))
    blob_ml = 27 ** (len(shape) / 3) * np.prod(spacing) / 1000

    both = binary_metrics(empty, empty, spacing)
    assert all(math.isnan(both[name]) for name in AGREEMENT)
    assert both["volume_prediction"] == both["volume_reference"] == 0.0

    for pred, ref in ((empty, blob), (blob, empty)):  # a miss, then a pure false positive
        m = binary_metrics(pred, ref, spacing)
        assert m["dice"] == m["iou"] == m["nsd"] == 0.0
        assert m["hd95"] == m["assd"] == m["centroid_distance"] == pytest.approx(diagonal)
        assert m["volume_prediction"] == pytest.approx(blob_ml if pred is blob else 0.0)
        assert m["volume_reference"] == pytest.approx(blob_ml if ref is blob else 0.0)


def test_per_class_metrics_matches_binary_metrics_3d():
    shape, spacing = (12, 10, 8), (0.8, 1.0, 2.5)
    reference = np.zeros(shape, dtype=np.int32)
    prediction = np.zeros(shape, dtype=np.uint8)
    reference[2:7, 2:6, 1:5] = 1
    prediction[3:8, 2:6, 1:5] = 1
    reference[8:11, 6:9, 4:7] = 2  # class 2 missed
    prediction[0:2, 7:10, 6:8] = 3  # class 3 a pure false positive; class 4 absent
    m = per_class_metrics(prediction, reference, num_classes=5, spacing=spacing)
    assert set(m) == set(METRIC_NAMES)
    for k in range(5):
        expected = binary_metrics(prediction == k, reference == k, spacing)
        for name in METRIC_NAMES:
            assert m[name].shape == (5,)
            np.testing.assert_allclose(m[name][k], expected[name], err_msg=f"{name}[{k}]")
    assert m["dice"][2] == 0.0 and m["dice"][3] == 0.0 and np.isnan(m["dice"][4])
    assert m["hd95"][2] == pytest.approx(grid_diagonal(shape, spacing))


def test_per_class_metrics_2d_closed_form():
    reference = np.zeros((10, 8), dtype=np.int64)
    reference[1:5, 1:5] = 1
    reference[6:9, 2:6] = 2
    prediction = reference.copy()
    prediction[1:5, 1:5] = 0
    prediction[2:6, 1:5] = 1  # class 1 shifted by one voxel along x
    m = per_class_metrics(prediction, reference, num_classes=3, spacing=(2.0, 0.5))
    np.testing.assert_allclose(m["dice"][1:], [0.75, 1.0])
    np.testing.assert_allclose(m["iou"], m["dice"] / (2 - m["dice"]))
    np.testing.assert_allclose(m["hd95"][1:], [2.0, 0.0])
    np.testing.assert_allclose(m["centroid_distance"][1:], [2.0, 0.0])
    np.testing.assert_allclose(m["volume_reference"], [(80 - 28) / 1000, 0.016, 0.012])


def test_overlapping_regions():
    # Nested BraTS-style code: 1 = whole tumour only, 2 = tumour core, 3 = enhancing.
    shape, spacing = (14, 12, 6), (1.0, 1.2, 2.0)
    reference = np.zeros(shape, dtype=np.int32)
    reference[2:12, 2:10, 1:5] = 1
    reference[4:10, 3:9, 1:5] = 2
    reference[5:8, 4:7, 2:4] = 3
    prediction = np.zeros_like(reference)
    prediction[3:12, 2:10, 1:5] = 1
    prediction[4:9, 3:9, 1:5] = 2  # no enhancing tumour predicted
    m = per_class_metrics(prediction, reference, num_classes=4, spacing=spacing, overlapping=True)
    for k in range(4):
        pred_k, ref_k = (
            (prediction == 0, reference == 0)
            if k == 0
            else (
                prediction >= k,
                reference >= k,
            )
        )
        expected = binary_metrics(pred_k, ref_k, spacing)
        for name in METRIC_NAMES:
            np.testing.assert_allclose(m[name][k], expected[name], err_msg=f"{name}[{k}]")
    assert m["dice"][1] == pytest.approx(2 * 9 * 8 * 4 / (9 * 8 * 4 + 10 * 8 * 4))
    assert m["dice"][3] == 0.0
    assert m["volume_reference"][2] == pytest.approx(6 * 6 * 4 * 2.4 / 1000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prediction": np.zeros((4, 5), int)}, "same shape"),
        ({"spacing": (1.0, 1.0)}, "one voxel size in mm per array axis"),
        ({"spacing": (1.0, 0.0, 1.0)}, "positive"),
        ({"prediction": np.full((4, 4, 4), 3)}, r"\[0, num_classes=3\)"),
        ({"reference": np.zeros((4, 4, 4), np.float32)}, "integer label array"),
        ({"tolerance_mm": -1.0}, "tolerance_mm"),
        (
            {"prediction": np.zeros((4, 4, 4, 1), int), "reference": np.zeros((4, 4, 4, 1), int)},
            "2D",
        ),
    ],
)
def test_bad_input_raises(kwargs, message):
    args = {
        "prediction": np.zeros((4, 4, 4), int),
        "reference": np.zeros((4, 4, 4), int),
        "num_classes": 3,
        "spacing": (1.0, 1.0, 1.0),
    } | kwargs
    with pytest.raises(ValueError, match=message):
        per_class_metrics(**args)


def test_binary_metrics_rejects_labels():
    with pytest.raises(ValueError, match="boolean masks"):
        binary_metrics(np.ones((3, 3), int), np.ones((3, 3), int), (1.0, 1.0))
