"""Tests of the JAX augmentation against closed forms."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from imgx_data.augmentation import (
    AugmentationConfig,
    augment_batch,
    clip_shift_to_foreground,
    foreground_bounding_box,
    gamma_correction,
    identity_parameters,
    min_max_rescale,
    random_patch_start,
    resample,
    sample_affine_parameters,
    sampling_coordinates,
    sampling_matrix,
)

_augment_batch = jax.jit(augment_batch, static_argnums=2)


@functools.partial(jax.jit, static_argnums=4)
def _transform(image, label, params, spacing, patch_shape, start):
    coordinates = sampling_coordinates(params, spacing, start, patch_shape)
    return resample(image, label, coordinates)


def _transform_whole(image, label, params, spacing):
    ndim = label.ndim
    return _transform(
        image,
        label,
        params,
        jnp.asarray(spacing, jnp.float32),
        label.shape,
        jnp.zeros(ndim, jnp.int32),
    )


_IMAGE_2D = jnp.arange(64.0, dtype=jnp.float32).reshape(8, 8, 1)
_LABEL_2D = (jnp.arange(64).reshape(8, 8) % 3).astype(jnp.uint8)
_IMAGE_3D = jnp.arange(256.0, dtype=jnp.float32).reshape(8, 8, 4, 1)
_LABEL_3D = (jnp.arange(256).reshape(8, 8, 4) % 4).astype(jnp.uint8)


@pytest.mark.parametrize(("image", "label"), [(_IMAGE_2D, _LABEL_2D), (_IMAGE_3D, _LABEL_3D)])
def test_identity_parameters_give_the_input_back_exactly(image, label):
    ndim = label.ndim
    spacing = [0.7, 2.5, 3.0][:ndim]
    new_image, new_label = _transform_whole(image, label, identity_parameters(ndim), spacing)
    np.testing.assert_array_equal(new_image, image)
    np.testing.assert_array_equal(new_label, label)
    assert new_label.dtype == jnp.int32


def test_rotation_by_90_degrees_matches_rot90():
    params = identity_parameters(2)._replace(rotation=jnp.array([jnp.pi / 2]))
    new_image, new_label = _transform_whole(_IMAGE_2D, _LABEL_2D, params, [1.0, 1.0])
    # x(o) = c + R (o − c): output (i, j) reads input (n − 1 − j, i), a clockwise turn.
    np.testing.assert_allclose(new_image[..., 0], jnp.rot90(_IMAGE_2D[..., 0], k=-1), atol=1e-4)
    np.testing.assert_array_equal(new_label, jnp.rot90(_LABEL_2D, k=-1))


def test_rotation_in_3d_about_z_turns_x_towards_y():
    params = identity_parameters(3)._replace(rotation=jnp.array([0.0, 0.0, jnp.pi / 2]))
    new_image, _ = _transform_whole(_IMAGE_3D, _LABEL_3D, params, [1.0, 1.0, 2.0])
    expected = jnp.rot90(_IMAGE_3D, k=-1, axes=(0, 1))
    np.testing.assert_allclose(new_image, expected, atol=1e-3)


def test_integer_shift_equals_slicing_with_zero_fill():
    params = identity_parameters(2)._replace(shift=jnp.array([2.0, -1.0]))
    new_image, new_label = _transform_whole(_IMAGE_2D, _LABEL_2D, params, [1.0, 3.0])
    # output (i, j) reads input (i + 2, j − 1).
    expected = jnp.zeros_like(_IMAGE_2D).at[:6, 1:].set(_IMAGE_2D[2:, :7])
    np.testing.assert_array_equal(new_image, expected)
    np.testing.assert_array_equal(new_label, jnp.zeros((8, 8)).at[:6, 1:].set(_LABEL_2D[2:, :7]))


def test_flip_reverses_the_axis():
    params = identity_parameters(3)._replace(flip=jnp.array([1.0, -1.0, 1.0]))
    new_image, new_label = _transform_whole(_IMAGE_3D, _LABEL_3D, params, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(new_image, _IMAGE_3D[:, ::-1])
    np.testing.assert_array_equal(new_label, _LABEL_3D[:, ::-1])


def test_rotation_is_in_millimetres_with_anisotropic_spacing():
    # Spacing (1, 2) mm on a 9 x 9 grid, centre c = (4, 4). Rotating by 90° maps the offset
    # (2, 0) voxels = (2, 0) mm to (0, 2) mm = (0, 1) voxels: output c + (2, 0) reads input
    # c + (0, 1), not c + (0, 2) as a voxel-grid rotation would.
    params = identity_parameters(2)._replace(rotation=jnp.array([jnp.pi / 2]))
    spacing = jnp.array([1.0, 2.0])
    coordinates = sampling_coordinates(params, spacing, jnp.zeros(2, jnp.int32), (9, 9))
    np.testing.assert_allclose(coordinates[:, 6, 4], [4.0, 5.0], atol=1e-5)
    image = jnp.zeros((9, 9, 1)).at[4, 5, 0].set(1.0)
    new_image, _ = _transform_whole(image, jnp.zeros((9, 9), jnp.uint8), params, spacing)
    assert float(new_image[6, 4, 0]) == pytest.approx(1.0, abs=1e-5)


def test_zoom_scales_offsets_from_the_centre():
    params = identity_parameters(2)._replace(zoom=jnp.array([1.0, 0.0]))
    coordinates = sampling_coordinates(
        params, jnp.array([1.0, 1.0]), jnp.zeros(2, jnp.int32), (9, 9)
    )
    # scale 2 along axis 0: output 4 + k reads 4 + 2k.
    np.testing.assert_allclose(coordinates[0, :, 0], 4.0 + 2.0 * (np.arange(9) - 4.0), atol=1e-6)


def test_labels_stay_in_their_label_set_under_random_affine():
    config = AugmentationConfig(probability=1.0, flip_axes=(0, 1, 2))
    batch = {
        "image": jnp.stack([_IMAGE_3D, _IMAGE_3D]),
        "label": jnp.stack([_LABEL_3D * 2, _LABEL_3D * 2 + 1]),  # {0,2,4,6} and {1,3,5,7}
        "spacing": jnp.array([[1.0, 1.0, 2.0], [0.5, 1.5, 3.0]]),
    }
    out = _augment_batch(jax.random.key(3), batch, config)
    assert set(np.unique(out["label"][0])) <= {0, 2, 4, 6}
    assert set(np.unique(out["label"][1])) <= {0, 1, 3, 5, 7}
    assert out["image"].shape == (2, 8, 8, 4, 1) and out["image"].dtype == jnp.float32
    assert out["label"].dtype == jnp.int32


def test_min_max_rescale_per_channel():
    image = jnp.stack([jnp.linspace(-3.0, 5.0, 16).reshape(4, 4), jnp.full((4, 4), 2.0)], -1)
    rescaled = min_max_rescale(image)
    np.testing.assert_allclose(rescaled[..., 0], (image[..., 0] + 3.0) / 8.0, rtol=1e-6)
    np.testing.assert_array_equal(rescaled[..., 1], 0.0)


def test_gamma_correction_formula():
    image = jnp.linspace(1.0, 3.0, 12).reshape(3, 4, 1)
    log_gamma = jnp.float32(0.25)
    expected = 1.0 + 2.0 * ((image - 1.0) / 2.0) ** np.exp(0.25)
    np.testing.assert_allclose(gamma_correction(image, log_gamma), expected, rtol=1e-5)


def test_augment_batch_output_range_and_patch_shape():
    config = AugmentationConfig(patch_shape=(4, 4), probability=1.0)
    batch = {
        "image": jnp.stack([_IMAGE_2D, 10.0 - _IMAGE_2D, _IMAGE_2D, _IMAGE_2D]),
        "label": jnp.stack([_LABEL_2D] * 4),
        "spacing": jnp.ones((4, 2)),
    }
    out = _augment_batch(jax.random.key(0), batch, config)
    assert out["image"].shape == (4, 4, 4, 1)
    assert out["label"].shape == (4, 4, 4)
    np.testing.assert_allclose(out["image"].min(axis=(1, 2, 3)), 0.0, atol=1e-6)
    np.testing.assert_allclose(out["image"].max(axis=(1, 2, 3)), 1.0, atol=1e-6)


def test_sampled_parameters_respect_ranges_and_probability():
    config = AugmentationConfig(
        rotation_degrees=10.0,
        zoom=0.1,
        shear_degrees=5.0,
        shift=(2.0, 1.0),
        shift_unit="voxel",
        probability=0.5,
    )
    keys = jax.random.split(jax.random.key(0), 2000)
    params = jax.vmap(lambda k: sample_affine_parameters(k, config, (8, 8)))(keys)
    assert np.abs(params.rotation).max() <= np.radians(10.0) + 1e-6
    assert np.abs(params.shear).max() <= np.radians(5.0) + 1e-6
    assert np.abs(params.zoom).max() <= 0.1 + 1e-6
    assert np.all(np.abs(params.shift) <= np.array([2.0, 1.0]) + 1e-6)
    applied = np.mean(params.zoom != 0)
    assert abs(applied - 0.5) < 0.05  # 4000 draws: 3 standard deviations ≈ 0.024
    np.testing.assert_array_equal(params.flip, 1.0)  # no flip axes configured


def test_foreground_oversampling_centres_patches_on_foreground():
    label = jnp.zeros((24, 24), jnp.uint8).at[14:16, 5:7].set(1)  # 4 of 576 voxels
    fraction = 0.4
    patch_shape = (6, 6)
    keys = jax.random.split(jax.random.key(1), 500)
    starts = jax.jit(jax.vmap(lambda k: random_patch_start(k, label, patch_shape, fraction)))(keys)
    centres = np.asarray(starts) + np.array(patch_shape) // 2
    hits = np.asarray(label)[centres[:, 0], centres[:, 1]] > 0
    # Bernoulli(≥ 0.4) over 500 draws: 3 standard deviations ≈ 0.066.
    assert hits.mean() >= fraction - 0.066
    assert np.all((starts >= 0) & (starts <= 18))


@pytest.mark.parametrize(("class_balance", "expected_small"), [(True, 0.5), (False, 1 / 37)])
def test_foreground_class_balance(class_balance, expected_small):
    # class 1: 36 voxels, class 2: 1 voxel; centred patches land on class 2 half the time
    # when balanced, 1/37 of the time when drawn uniformly over foreground voxels.
    label = jnp.zeros((32, 32), jnp.uint8).at[4:10, 4:10].set(1).at[20, 20].set(2)
    keys = jax.random.split(jax.random.key(4), 1000)
    starts = jax.jit(jax.vmap(lambda k: random_patch_start(k, label, (8, 8), 1.0, class_balance)))(
        keys
    )
    centres = np.asarray(starts) + 4
    small = np.mean(np.asarray(label)[centres[:, 0], centres[:, 1]] == 2)
    assert abs(small - expected_small) < 3 * np.sqrt(expected_small * (1 - expected_small) / 1000)


def test_foreground_patch_stays_inside_image_and_holds_foreground():
    label = jnp.zeros((16, 8), jnp.uint8).at[0, 7].set(2)  # a corner voxel
    keys = jax.random.split(jax.random.key(2), 50)
    starts = jax.vmap(lambda k: random_patch_start(k, label, (4, 4), 1.0))(keys)
    np.testing.assert_array_equal(starts, np.broadcast_to([0, 4], (50, 2)))


def test_patch_larger_than_image_is_padded_symmetrically():
    start = random_patch_start(jax.random.key(0), jnp.ones((5, 8), jnp.uint8), (8, 8), 0.0)
    np.testing.assert_array_equal(start, [-2, 0])


def test_augment_batch_under_a_mesh_keeps_batch_sharding():
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    batch = {
        "image": jax.device_put(jnp.stack([_IMAGE_2D, 2 * _IMAGE_2D]), sharding),
        "label": jax.device_put(jnp.stack([_LABEL_2D, _LABEL_2D]), sharding),
        "spacing": jax.device_put(jnp.ones((2, 2)), sharding),
    }
    config = AugmentationConfig()
    out = _augment_batch(jax.random.key(5), batch, config)
    local = _augment_batch(jax.random.key(5), jax.device_get(batch), config)
    np.testing.assert_allclose(out["image"], local["image"], atol=1e-6)
    np.testing.assert_array_equal(out["label"], local["label"])
    assert out["image"].sharding.spec[0] == "data"


def test_config_rejects_bad_probability():
    with pytest.raises(ValueError, match="probability"):
        AugmentationConfig(probability=1.5)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (AugmentationConfig(shift=(0.1, 0.2, 0.3)), "shift"),
        (AugmentationConfig(flip_axes=(2,)), "flip_axes"),
    ],
)
def test_config_that_does_not_fit_the_image_is_named(config, match):
    with pytest.raises(ValueError, match=match):
        sample_affine_parameters(jax.random.key(0), config, (8, 8))


# Pure shifts of up to 6 voxels: the nearest-neighbour label then loses a foreground voxel
# only where it leaves the image, so foreground counts are exact.
_SHIFT_ONLY = AugmentationConfig(
    rotation_degrees=0.0,
    zoom=0.0,
    shear_degrees=0.0,
    shift=6.0,
    shift_unit="voxel",
    gamma=0.0,
    probability=1.0,
    rescale=False,
)
_NEAR_BORDER = jnp.zeros((16, 16), jnp.uint8).at[1:4, 12:15].set(1)  # 9 voxels
_CENTRAL = jnp.zeros((16, 16), jnp.uint8).at[7:9, 7:9].set(2)  # never leaves under ±6
_COPIES = 16


def _shift_only_batch(keep):
    labels = [_NEAR_BORDER, _CENTRAL, jnp.zeros((16, 16), jnp.uint8)]
    batch = {
        "image": jnp.broadcast_to(
            jnp.arange(256.0, dtype=jnp.float32).reshape(16, 16, 1),
            (3 * _COPIES, 16, 16, 1),
        ),
        "label": jnp.concatenate([jnp.stack([label] * _COPIES) for label in labels]),
        "spacing": jnp.ones((3 * _COPIES, 2)),
    }
    config = dataclasses.replace(_SHIFT_ONLY, keep_foreground_in_view=keep)
    return _augment_batch(jax.random.key(6), batch, config)


@functools.cache
def _shift_only_outputs():
    return _shift_only_batch(True), _shift_only_batch(False)


def test_foreground_bounding_box():
    low, high, any_foreground = foreground_bounding_box(_NEAR_BORDER)
    np.testing.assert_array_equal(low, [1, 12])
    np.testing.assert_array_equal(high, [3, 14])
    assert bool(any_foreground)
    assert not bool(foreground_bounding_box(jnp.zeros((4, 5), jnp.uint8))[2])


def test_keep_foreground_in_view_loses_no_foreground_near_the_border():
    kept, free = _shift_only_outputs()
    near = slice(0, _COPIES)
    counts_kept = np.sum(np.asarray(kept["label"][near]) > 0, axis=(1, 2))
    counts_free = np.sum(np.asarray(free["label"][near]) > 0, axis=(1, 2))
    np.testing.assert_array_equal(counts_kept, 9)
    assert counts_free.min() < 9  # without the option the shift pushes some out


def test_keep_foreground_in_view_still_shifts():
    kept, _ = _shift_only_outputs()
    labels = np.asarray(kept["label"][:_COPIES]) > 0
    # Each sample's box is the input box moved by −t (rounded), t clipped to
    # t_0 ∈ [−12, 1], t_1 ∈ [−1, 12] out of ±6: it still moves, and by several voxels.
    corners = np.array([np.argwhere(label).min(axis=0) for label in labels])
    assert len({tuple(c) for c in corners}) >= 5
    assert corners[:, 0].max() >= 4 and corners[:, 1].min() <= 9
    assert np.all(corners >= 0) and np.all(corners + [2, 2] <= 15)


@pytest.mark.parametrize("which", [1, 2], ids=["constraint_inactive", "no_foreground"])
def test_keep_foreground_in_view_leaves_other_samples_unchanged(which):
    kept, free = _shift_only_outputs()
    rows = slice(which * _COPIES, (which + 1) * _COPIES)
    np.testing.assert_array_equal(kept["image"][rows], free["image"][rows])
    np.testing.assert_array_equal(kept["label"][rows], free["label"][rows])


def test_keep_foreground_in_view_keeps_the_view_inside_a_wider_foreground():
    # Foreground spans all 16 rows, the patch 8: the view must stay inside rows 0..15.
    label = jnp.zeros((16, 16), jnp.uint8).at[:, 6:10].set(1)
    config = dataclasses.replace(_SHIFT_ONLY, patch_shape=(8, 16), keep_foreground_in_view=True)
    batch = {
        "image": jnp.ones((_COPIES, 16, 16, 1)),
        "label": jnp.stack([label] * _COPIES),
        "spacing": jnp.ones((_COPIES, 2)),
    }
    out = _augment_batch(jax.random.key(7), batch, config)
    np.testing.assert_array_equal(np.sum(np.asarray(out["label"]) > 0, axis=(1, 2)), 8 * 4)


def test_clipped_shift_keeps_the_box_inside_the_view_under_the_whole_affine():
    # 3D, anisotropic, rotation + shear + zoom + flips: every corner of the foreground box
    # maps inside [0, P − 1] by o = c_P + M⁻¹(x − q − t); untouched where it already did.
    label = jnp.zeros((12, 12, 6), jnp.uint8).at[1:4, 8:11, 1:3].set(1)
    spacing = jnp.array([1.0, 1.5, 3.0])
    start = jnp.array([1, 1, 0], jnp.int32)
    patch = (10, 10, 6)
    config = AugmentationConfig(
        rotation_degrees=10.0,
        zoom=0.1,
        shear_degrees=5.0,
        shift=8.0,
        shift_unit="voxel",
        probability=1.0,
        flip_axes=(0, 1, 2),
    )

    def sample(key):
        params = sample_affine_parameters(key, config, label.shape)
        clipped = clip_shift_to_foreground(params, spacing, label, start, patch)
        return params.shift, clipped.shift, sampling_matrix(params, spacing)

    keys = jax.random.split(jax.random.key(8), 64)
    sampled, clipped, matrices = map(np.asarray, jax.jit(jax.vmap(sample))(keys))
    corners = np.array(np.meshgrid([1, 3], [8, 10], [1, 2], indexing="ij")).reshape(3, -1).T
    centre = (np.array(patch) - 1.0) / 2.0
    origin = np.asarray(start) + centre

    def positions(matrix, shift):  # (corners, ndim) output positions
        return centre + np.linalg.solve(matrix, (corners - origin - shift).T).T

    outside_before = 0
    for matrix, before, after in zip(matrices, sampled, clipped, strict=True):
        inside = np.all(
            (positions(matrix, after) >= -1e-3)
            & (positions(matrix, after) <= np.array(patch) - 1 + 1e-3)
        )
        assert inside
        was_inside = np.all(
            (positions(matrix, before) >= 0) & (positions(matrix, before) <= np.array(patch) - 1)
        )
        outside_before += not was_inside
        if was_inside:
            np.testing.assert_array_equal(after, before)
    assert outside_before > 0  # the clip was needed for some samples
