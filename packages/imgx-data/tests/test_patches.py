"""Tests of the sliding-window helpers against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgx_data.patches import gaussian_weight, patch_grid, sliding_window_inference


def test_patch_grid_starts_and_flush_last_patch():
    starts = patch_grid((10, 8), (4, 8), overlap=(1, 0))
    # axis 0: stride 3 -> 0, 3, then the flush start 10 - 4 = 6; axis 1: one patch.
    np.testing.assert_array_equal(starts, [[0, 0], [3, 0], [6, 0]])


def test_patch_grid_no_duplicate_when_divisible():
    np.testing.assert_array_equal(patch_grid((8,), (4,), 0), [[0], [4]])
    np.testing.assert_array_equal(patch_grid((8,), (4,), 2), [[0], [2], [4]])


def test_patch_grid_image_smaller_than_patch():
    np.testing.assert_array_equal(patch_grid((3, 9), (5, 4), 0), [[0, 0], [0, 4], [0, 5]])


@pytest.mark.parametrize(
    ("image_shape", "patch_shape", "overlap"),
    [((9, 7), (4, 3), (1, 2)), ((7, 6, 5), (3, 4, 2), (2, 1, 0)), ((5, 11), (5, 4), 3)],
)
def test_patch_grid_covers_every_voxel(image_shape, patch_shape, overlap):
    coverage = np.zeros(image_shape, int)
    for start in patch_grid(image_shape, patch_shape, overlap):
        coverage[tuple(slice(s, s + p) for s, p in zip(start, patch_shape, strict=True))] += 1
    assert coverage.min() >= 1


def test_patch_grid_rejects_overlap_not_below_patch():
    with pytest.raises(ValueError, match="overlap"):
        patch_grid((8, 8), (4, 4), overlap=4)


def test_gaussian_weight_closed_form():
    weight = gaussian_weight((5, 4), sigma_scale=0.5)
    x = np.arange(5) - 2.0
    y = np.arange(4) - 1.5
    expected = np.exp(-(x[:, None] ** 2) / (2 * 2.5**2) - y[None, :] ** 2 / (2 * 2.0**2))
    np.testing.assert_allclose(weight, expected / expected.max(), rtol=1e-6)
    assert weight.dtype == np.float32


def test_gaussian_weight_is_floored_above_zero():
    weight = gaussian_weight((64,), sigma_scale=0.01)
    assert weight.min() > 0
    assert weight.max() == 1.0


def _identity(patches):
    return patches


_jitted_identity = jax.jit(lambda patches: jnp.concatenate([patches, 2 * patches], axis=-1))


@pytest.mark.parametrize("blend", ["gaussian", "mean"])
@pytest.mark.parametrize(
    ("shape", "patch_shape", "overlap", "batch_size"),
    [
        ((9, 7, 2), (4, 3), (1, 2), 3),
        ((7, 6, 5, 1), (3, 4, 2), (2, 1, 1), 4),
        ((3, 10, 1), (5, 4), 2, 2),  # first axis smaller than the patch: padded
    ],
)
def test_sliding_window_returns_position_function_exactly(
    shape, patch_shape, overlap, batch_size, blend
):
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    result = sliding_window_inference(
        _identity,
        image,
        patch_shape=patch_shape,
        overlap=overlap,
        batch_size=batch_size,
        blend=blend,
    )
    assert result.shape == shape
    np.testing.assert_allclose(result, image, rtol=1e-5, atol=1e-6)


def test_sliding_window_with_jitted_predictor_and_more_classes():
    image = np.random.default_rng(1).uniform(size=(6, 5, 4, 1)).astype(np.float32)
    result = sliding_window_inference(
        _jitted_identity, image, patch_shape=(4, 4, 4), overlap=(2, 2, 0), batch_size=2
    )
    np.testing.assert_allclose(result, np.concatenate([image, 2 * image], -1), rtol=1e-5)


def test_sliding_window_constant_prediction():
    def constant(patches):
        return np.full((*patches.shape[:-1], 3), [0.2, 0.3, 0.5], np.float32)

    result = sliding_window_inference(constant, np.zeros((10, 9, 1)), patch_shape=(4, 4), overlap=1)
    np.testing.assert_allclose(result, np.broadcast_to([0.2, 0.3, 0.5], (10, 9, 3)), rtol=1e-6)


def test_sliding_window_calls_predictor_with_fixed_batch_shape():
    shapes = []

    def record(patches):
        shapes.append(patches.shape)
        return patches

    sliding_window_inference(
        record, np.ones((10, 10, 1)), patch_shape=(4, 4), overlap=0, batch_size=4
    )
    # 3 x 3 patches in batches of 4: 3 calls, all of one shape.
    assert shapes == [(4, 4, 4, 1)] * 3


def test_sliding_window_mean_blend_averages_overlaps():
    # Each patch predicts its own index; a voxel's mean blend is the mean index covering it.
    calls = iter(range(100))

    def patch_index(patches):
        return np.stack([np.full(patches.shape[1:], next(calls), np.float32) for _ in patches])

    result = sliding_window_inference(
        patch_index, np.zeros((6, 1)), patch_shape=(4,), overlap=2, batch_size=1, blend="mean"
    )
    # patches start at 0 (index 0) and 2 (index 1).
    np.testing.assert_allclose(result[:, 0], [0, 0, 0.5, 0.5, 1, 1])
