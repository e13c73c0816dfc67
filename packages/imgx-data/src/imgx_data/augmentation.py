"""Per-sample random augmentation in JAX, run on device inside the jitted training step.

One sample goes through (all spatial work is a single resampling):

1. **Patch and affine.** Output voxel ``o`` of a patch of shape ``P`` reads the input at

       x(o) = q + S⁻¹ · A · S · F · (o − c_P) + t        (voxels)

   with ``c_P = (P − 1) / 2`` the patch centre, ``F`` a diagonal of ±1 (flips), ``S`` the
   diagonal of the spacing (mm per voxel), ``A = R · H · Z`` rotation, shear and zoom acting in
   millimetres (so a rotation of an anisotropic volume is a rotation in space, not of the voxel
   grid), ``t`` a shift in voxels and ``q`` the centre of the patch in the input (the image
   centre for whole images). Images interpolate linearly
   (``jax.scipy.ndimage.map_coordinates``, order 1), labels take the nearest voxel (order 0);
   outside the image both read 0.
2. **Min-max rescale** per channel to [0, 1].
3. **Gamma**: ``x ← lo + (hi − lo) · ((x − lo) / (hi − lo))^γ`` per channel with
   ``log γ ~ U(−g, g)`` (the range stays ``[lo, hi]``).

Every scalar affine parameter (each angle, each zoom factor, each shift) and the gamma are
drawn independently and kept with probability ``p``, else set to the identity; each flip axis
flips with probability ``flip_probability``. In 3D the rotation is
``R = R_x(θ_x) · R_y(θ_y) · R_z(θ_z)`` and the shear has one angle per axis pair ``(i, j)``,
``i < j``: ``H_ij = tan(φ_ij)``. Patches are centred uniformly at random or, with probability
``foreground_fraction``, on a random foreground voxel (label > 0), moved the least needed to keep
the patch inside the image (nnU-Net-style oversampling, Isensee et al., Nat. Methods 2021). With
``foreground_class_balance`` the voxel is drawn with probability ``∝ 1 / n_c`` for a voxel of
class ``c`` (``n_c`` voxels of that class in the sample), so every present class is equally
likely to be centred, however small it is.

With ``keep_foreground_in_view`` the sampled shift is clipped, per sample, so that the
foreground stays in view. In output coordinates the transform reads ``o = c_P + M⁻¹(x − q) − u``
with ``u = M⁻¹ t``, so each output axis ``i`` constrains only ``u_i``: the foreground bounding
box ``[b_lo, b_hi]`` (voxel centres with label > 0, computed on device) maps inside
``[0, P_i − 1]`` exactly when ``u_i ∈ [e_hi,i − (P_i − 1), e_lo,i]``, where ``[e_lo, e_hi]``
is the box's extent ``c_P + M⁻¹([b_lo, b_hi] − q)`` under the rest of the transform (interval
arithmetic, exact for a box). ``u`` is clipped to that interval and ``t = M u``, which moves
the shift the least along each output axis. Guarantee: where the box's transformed extent fits
in the view (``e_hi,i − e_lo,i ≤ P_i − 1``), every point of the box, hence every foreground
voxel centre, lands inside the view after the whole affine (rotation, shear, zoom, flips
included); with a pure shift the nearest-neighbour label then keeps every foreground voxel.
Along an axis where it does not fit, ``u_i`` is clipped to ``[e_hi,i − (P_i − 1), e_lo,i]``
reversed, i.e. the view stays within the foreground's extent. The clip can move a shift beyond
the sampled range (and an unapplied shift away from 0) when the identity shift does not keep
the foreground in view, e.g. for a random patch away from the foreground. Samples without
foreground keep their sampled shift.

Defaults follow the published toolkit (ImgX-DiffSeg, Fu et al. 2023): rotation ±30°,
zoom ±0.2, shear ±30°, shift ±0.3 of the size, log γ ± 0.3, probability 0.5 each.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Class-balanced patch sampling counts labels with a fixed-size bincount (uint8 labels).
_MAX_CLASSES = 256


@dataclasses.dataclass(frozen=True)
class AugmentationConfig:
    """Random augmentation ranges; every range is symmetric around the identity.

    Attributes:
        rotation_degrees: maximum |angle| of each rotation (one in 2D, one per axis in 3D).
        zoom: maximum |z| of each per-axis scale factor ``1 + z``.
        shear_degrees: maximum |angle| of each shear (one per axis pair).
        shift: maximum |shift| per axis, a float for all axes or one per axis; in units of
            ``shift_unit``.
        shift_unit: ``"fraction"`` of the image size along the axis, or ``"voxel"``.
        gamma: maximum |log γ| of the gamma correction.
        probability: chance that each scalar parameter above is applied.
        flip_axes: spatial axes that may be flipped.
        flip_probability: chance that each axis of ``flip_axes`` is flipped.
        rescale: min-max rescale each channel to [0, 1] after resampling.
        patch_shape: spatial shape of the random patch; None keeps the whole image.
        foreground_fraction: share of patches centred on a random foreground voxel.
        foreground_class_balance: draw the foreground voxel's class uniformly among the
            classes present (labels < 256), not in proportion to their volume.
        keep_foreground_in_view: clip each sample's shift so that its foreground bounding
            box (label > 0) stays inside the output after the whole affine (see the module
            docstring for the exact guarantee); samples without foreground are unchanged.
    """

    rotation_degrees: float = 30.0
    zoom: float = 0.2
    shear_degrees: float = 30.0
    shift: float | tuple[float, ...] = 0.3
    shift_unit: Literal["fraction", "voxel"] = "fraction"
    gamma: float = 0.3
    probability: float = 0.5
    flip_axes: tuple[int, ...] = ()
    flip_probability: float = 0.5
    rescale: bool = True
    patch_shape: tuple[int, ...] | None = None
    foreground_fraction: float = 0.0
    foreground_class_balance: bool = True
    keep_foreground_in_view: bool = False

    def __post_init__(self):
        for name in ("probability", "flip_probability", "foreground_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentationConfig.{name} must lie in [0, 1], got {value}.")
        for name in ("rotation_degrees", "zoom", "shear_degrees", "gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentationConfig.{name} is a range half-width, must be ≥ 0.")
        if self.zoom >= 1:
            raise ValueError(
                f"AugmentationConfig.zoom must be < 1 (scale 1 ± zoom), got {self.zoom}."
            )
        if self.shift_unit not in ("fraction", "voxel"):
            raise ValueError(
                "AugmentationConfig.shift_unit must be 'fraction' or 'voxel', "
                f"got {self.shift_unit!r}."
            )


class AffineParameters(NamedTuple):
    """One sample's spatial transform; the identity is all zeros with ``flip`` all ones.

    Attributes:
        rotation: radians, ``(1,)`` in 2D or ``(3,)`` in 3D (about x, y, z).
        shear: radians, ``(ndim·(ndim−1)/2,)``, one per axis pair ``(i, j)``, ``i < j``.
        zoom: ``(ndim,)``, scale factor ``1 + zoom`` per axis.
        shift: voxels, ``(ndim,)``.
        flip: ``(ndim,)`` of ±1.
    """

    rotation: jax.Array
    shear: jax.Array
    zoom: jax.Array
    shift: jax.Array
    flip: jax.Array


def identity_parameters(ndim: int) -> AffineParameters:
    """Parameters of the identity transform for ``ndim`` spatial axes."""
    num_pairs = ndim * (ndim - 1) // 2
    return AffineParameters(
        rotation=jnp.zeros(1 if ndim == 2 else 3),
        shear=jnp.zeros(num_pairs),
        zoom=jnp.zeros(ndim),
        shift=jnp.zeros(ndim),
        flip=jnp.ones(ndim),
    )


def _axis_rotation(angle: jax.Array, ndim: int, axes: tuple[int, int]) -> jax.Array:
    """Rotation by ``angle`` in the plane of ``axes`` (from axes[0] towards axes[1])."""
    i, j = axes
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    matrix = jnp.eye(ndim)
    return matrix.at[i, i].set(cos).at[j, j].set(cos).at[j, i].set(sin).at[i, j].set(-sin)


def rotation_matrix(rotation: jax.Array, ndim: int) -> jax.Array:
    """``R`` for angles in radians: 2D ``[[cos, −sin], [sin, cos]]``; 3D ``R_x R_y R_z``."""
    if ndim == 2:
        return _axis_rotation(rotation[0], 2, (0, 1))
    # R_x turns y towards z, R_y turns z towards x, R_z turns x towards y (right-handed).
    r_x = _axis_rotation(rotation[0], 3, (1, 2))
    r_y = _axis_rotation(rotation[1], 3, (2, 0))
    r_z = _axis_rotation(rotation[2], 3, (0, 1))
    return r_x @ r_y @ r_z


def shear_matrix(shear: jax.Array, ndim: int) -> jax.Array:
    """``H``: identity with ``H_ij = tan(shear_k)`` for the k-th pair ``i < j``."""
    rows, cols = np.triu_indices(ndim, k=1)
    return jnp.eye(ndim).at[rows, cols].set(jnp.tan(shear))


def sampling_matrix(params: AffineParameters, spacing: jax.Array) -> jax.Array:
    """``M = S⁻¹ · R · H · Z · S · F`` mapping output offsets to input offsets in voxels.

    Entry-wise ``M_ij = A_ij · s_j / s_i · f_j`` so that the identity is exact in floats.

    Args:
        params: the transform.
        spacing: ``(ndim,)`` mm per voxel.

    Returns:
        ``(ndim, ndim)``.
    """
    ndim = spacing.shape[0]
    physical = (
        rotation_matrix(params.rotation, ndim)
        @ shear_matrix(params.shear, ndim)
        @ jnp.diag(1.0 + params.zoom)
    )
    spacing = spacing.astype(jnp.float32)
    return physical * spacing[None, :] / spacing[:, None] * params.flip[None, :]


def sampling_coordinates(
    params: AffineParameters,
    spacing: jax.Array,
    patch_start: jax.Array,
    patch_shape: tuple[int, ...],
) -> jax.Array:
    """Input coordinates ``x(o) = q + M (o − c_P) + t`` of every output voxel ``o``.

    Args:
        params: the transform.
        spacing: ``(ndim,)`` mm per voxel.
        patch_start: ``(ndim,)`` integer input index of the patch's first voxel (without the
            transform), so ``q = patch_start + c_P``.
        patch_shape: output spatial shape ``P``.

    Returns:
        ``(ndim, *patch_shape)`` float32, for ``map_coordinates``.
    """
    centre = (jnp.asarray(patch_shape, jnp.float32) - 1.0) / 2.0
    grid = jnp.stack(
        jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in patch_shape], indexing="ij")
    )
    offsets = grid - centre.reshape(-1, *[1] * len(patch_shape))
    mapped = jnp.einsum("ij,j...->i...", sampling_matrix(params, spacing), offsets)
    origin = patch_start.astype(jnp.float32) + centre + params.shift
    return mapped + origin.reshape(-1, *[1] * len(patch_shape))


def resample(
    image: jax.Array, label: jax.Array, coordinates: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Reads image (linear) and label (nearest) at ``coordinates``; outside reads 0.

    Args:
        image: ``(*spatial, channels)`` float.
        label: ``(*spatial)`` integer.
        coordinates: ``(ndim, *patch)``.

    Returns:
        image ``(*patch, channels)`` float32 and label ``(*patch)`` int32.
    """
    coords = list(coordinates)

    def linear(channel: jax.Array) -> jax.Array:
        return jax.scipy.ndimage.map_coordinates(channel, coords, order=1, mode="constant")

    new_image = jax.vmap(linear, in_axes=-1, out_axes=-1)(image.astype(jnp.float32))
    new_label = jax.scipy.ndimage.map_coordinates(label, coords, order=0, mode="constant")
    return new_image, new_label.astype(jnp.int32)


def min_max_rescale(image: jax.Array) -> jax.Array:
    """``(x − min) / (max − min)`` per channel over space; a constant channel becomes 0.

    Args:
        image: ``(*spatial, channels)``.
    """
    axes = tuple(range(image.ndim - 1))
    low = image.min(axis=axes, keepdims=True)
    span = image.max(axis=axes, keepdims=True) - low
    return jnp.where(span > 0, (image - low) / jnp.where(span > 0, span, 1.0), 0.0)


def gamma_correction(image: jax.Array, log_gamma: jax.Array) -> jax.Array:
    """``lo + (hi − lo) · ((x − lo) / (hi − lo))^γ`` per channel, ``γ = exp(log_gamma)``.

    Args:
        image: ``(*spatial, channels)``.
        log_gamma: scalar.
    """
    axes = tuple(range(image.ndim - 1))
    low = image.min(axis=axes, keepdims=True)
    span = image.max(axis=axes, keepdims=True) - low
    unit = min_max_rescale(image)
    return low + span * jnp.power(unit, jnp.exp(log_gamma))


def _keep(key: jax.Array, values: jax.Array, probability: float) -> jax.Array:
    """Each value kept with ``probability``, else 0 (the identity)."""
    return jnp.where(jax.random.bernoulli(key, probability, values.shape), values, 0.0)


def sample_affine_parameters(
    key: jax.Array, config: AugmentationConfig, image_shape: tuple[int, ...]
) -> AffineParameters:
    """Draws one sample's transform (see the module docstring).

    Args:
        key: PRNG key.
        config: ranges and probabilities.
        image_shape: spatial shape of the input, for a shift given as a fraction.
    """
    ndim = len(image_shape)
    num_angles = 1 if ndim == 2 else 3
    num_pairs = ndim * (ndim - 1) // 2
    shift = np.asarray(config.shift, np.float32)
    if shift.ndim and shift.shape != (ndim,):
        raise ValueError(
            f"AugmentationConfig.shift {config.shift} needs one value per spatial axis ({ndim})."
        )
    if any(not 0 <= axis < ndim for axis in config.flip_axes):
        raise ValueError(
            f"AugmentationConfig.flip_axes {config.flip_axes} must be spatial axes in [0, {ndim})."
        )
    shift = np.broadcast_to(shift, (ndim,))
    if config.shift_unit == "fraction":
        shift = shift * np.asarray(image_shape, np.float32)
    keys = jax.random.split(key, 9)
    p = config.probability

    def uniform(k: jax.Array, half_width: float | np.ndarray, n: int) -> jax.Array:
        return jax.random.uniform(k, (n,), minval=-1.0, maxval=1.0) * jnp.asarray(half_width)

    flip_axes = np.zeros(ndim, bool)
    flip_axes[list(config.flip_axes)] = True
    flipped = jax.random.bernoulli(keys[8], config.flip_probability, (ndim,)) & flip_axes
    return AffineParameters(
        rotation=_keep(
            keys[0], uniform(keys[1], math.radians(config.rotation_degrees), num_angles), p
        ),
        shear=_keep(keys[2], uniform(keys[3], math.radians(config.shear_degrees), num_pairs), p),
        zoom=_keep(keys[4], uniform(keys[5], config.zoom, ndim), p),
        shift=_keep(keys[6], uniform(keys[7], shift, ndim), p),
        flip=jnp.where(flipped, -1.0, 1.0),
    )


def foreground_bounding_box(label: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-axis first and last index of the voxels with ``label > 0``.

    Args:
        label: ``(*spatial)`` integer labels.

    Returns:
        ``low`` and ``high`` ``(ndim,)`` int32 (inclusive) and a scalar bool, whether there is
        any foreground; without foreground the box is meaningless.
    """
    foreground = label > 0
    low, high = [], []
    for axis, size in enumerate(label.shape):
        others = tuple(a for a in range(label.ndim) if a != axis)
        profile = foreground.any(axis=others)
        low.append(jnp.argmax(profile))
        high.append(size - 1 - jnp.argmax(profile[::-1]))
    return (
        jnp.stack(low).astype(jnp.int32),
        jnp.stack(high).astype(jnp.int32),
        foreground.any(),
    )


def clip_shift_to_foreground(
    params: AffineParameters,
    spacing: jax.Array,
    label: jax.Array,
    patch_start: jax.Array,
    patch_shape: tuple[int, ...],
) -> AffineParameters:
    """``params`` with the shift clipped so that the foreground box stays in view.

    Output voxel ``o`` reads ``x = q + M (o − c_P) + t``, so input voxel ``x`` appears at
    ``o = c_P + M⁻¹(x − q) − u`` with ``u = M⁻¹ t``. Over the foreground box
    ``b_lo ≤ x ≤ b_hi`` row ``i`` of ``M⁻¹(x − q)`` spans
    ``[Σ_j min(m_ij (b_lo − q)_j, m_ij (b_hi − q)_j), Σ_j max(...)]`` (``m = M⁻¹``), which
    gives the extent ``[e_lo, e_hi]``; ``0 ≤ o_i ≤ P_i − 1`` over the box holds exactly when
    ``e_hi,i − (P_i − 1) ≤ u_i ≤ e_lo,i``. ``u`` is clipped to that interval (to the reversed
    interval where the extent exceeds the view) and ``t`` becomes ``t + M (u_clipped − u)``,
    which is ``t`` bit for bit where no clip is needed. Without foreground ``t`` is kept.

    Args:
        params: the sampled transform.
        spacing: ``(ndim,)`` mm per voxel.
        label: ``(*spatial)`` integer labels of the input.
        patch_start: ``(ndim,)`` integer input index of the patch's first voxel.
        patch_shape: output spatial shape ``P``.

    Returns:
        ``params`` with a new ``shift`` (voxels, ``(ndim,)``).
    """
    matrix = sampling_matrix(params, spacing)
    inverse = jnp.linalg.inv(matrix)
    low, high, has_foreground = foreground_bounding_box(label)
    centre = (jnp.asarray(patch_shape, jnp.float32) - 1.0) / 2.0
    origin = patch_start.astype(jnp.float32) + centre
    to_low = inverse * (low.astype(jnp.float32) - origin)[None, :]
    to_high = inverse * (high.astype(jnp.float32) - origin)[None, :]
    extent_low = centre + jnp.minimum(to_low, to_high).sum(axis=1)
    extent_high = centre + jnp.maximum(to_low, to_high).sum(axis=1)
    bound_a = extent_high - (jnp.asarray(patch_shape, jnp.float32) - 1.0)
    bound_b = extent_low
    shift_out = inverse @ params.shift
    clipped = jnp.clip(shift_out, jnp.minimum(bound_a, bound_b), jnp.maximum(bound_a, bound_b))
    shift = params.shift + matrix @ (clipped - shift_out)
    return params._replace(shift=jnp.where(has_foreground, shift, params.shift))


def random_patch_start(
    key: jax.Array,
    label: jax.Array,
    patch_shape: tuple[int, ...],
    foreground_fraction: float,
    class_balance: bool = True,
) -> jax.Array:
    """Integer start of a random patch, centred on foreground with ``foreground_fraction``.

    Uniform patches start anywhere in ``[0, n − p]`` per axis. A foreground patch puts a
    random voxel with ``label > 0`` at patch index ``p // 2``, then shifts the start into
    ``[0, n − p]``, so the voxel is always inside the patch. With ``class_balance`` a voxel
    of class ``c`` is drawn with probability ``1 / (K · n_c)`` (``K`` classes present,
    ``n_c`` voxels of class ``c``), else uniformly among all foreground voxels. An image
    without foreground gets a uniform patch. Where the patch is larger than the image
    (``p > n``) the start is ``⌊(n − p) / 2⌋`` and the patch pads the image with zeros.

    Args:
        key: PRNG key.
        label: ``(*spatial)`` integer labels.
        patch_shape: spatial patch shape.
        foreground_fraction: probability of a foreground-centred patch.
        class_balance: give every foreground class present the same chance.

    Returns:
        ``(ndim,)`` int32.
    """
    image_shape = np.asarray(label.shape)
    patch = np.asarray(patch_shape)
    high = image_shape - patch
    key_choice, key_uniform, key_voxel = jax.random.split(key, 3)
    uniform_start = jax.random.randint(key_uniform, (len(patch),), 0, np.maximum(high, 0) + 1)
    flat_label = label.reshape(-1).astype(jnp.int32)
    foreground = flat_label > 0
    if class_balance:
        counts = jnp.bincount(flat_label, length=_MAX_CLASSES)
        class_count = counts[jnp.clip(flat_label, 0, _MAX_CLASSES - 1)]
        log_weight = -jnp.log(class_count.astype(jnp.float32))
    else:
        log_weight = jnp.zeros(flat_label.shape)
    flat_index = jax.random.categorical(key_voxel, jnp.where(foreground, log_weight, -jnp.inf))
    voxel = jnp.stack(jnp.unravel_index(flat_index, label.shape))
    foreground_start = jnp.clip(voxel - patch // 2, 0, np.maximum(high, 0))
    use_foreground = jax.random.bernoulli(key_choice, foreground_fraction) & foreground.any()
    start = jnp.where(use_foreground, foreground_start, uniform_start)
    return jnp.where(high >= 0, start, high // 2).astype(jnp.int32)


def augment_sample(
    key: jax.Array,
    image: jax.Array,
    label: jax.Array,
    spacing: jax.Array,
    config: AugmentationConfig,
) -> tuple[jax.Array, jax.Array]:
    """Augments one sample (see the module docstring for the order and formulas).

    Args:
        key: PRNG key.
        image: ``(*spatial, channels)`` float.
        label: ``(*spatial)`` integer.
        spacing: ``(ndim,)`` mm per voxel.
        config: ranges; static.

    Returns:
        image ``(*patch, channels)`` float32 and label ``(*patch)`` int32, where the patch
        shape is ``config.patch_shape`` or the image's spatial shape.
    """
    spatial = tuple(label.shape)
    patch_shape = spatial if config.patch_shape is None else tuple(config.patch_shape)
    if len(patch_shape) != len(spatial):
        raise ValueError(
            f"AugmentationConfig.patch_shape {patch_shape} has {len(patch_shape)} axes but the "
            f"images have {len(spatial)} ({spatial})."
        )
    key_patch, key_affine, key_gamma, key_apply = jax.random.split(key, 4)
    if config.patch_shape is None:
        start = jnp.zeros(len(spatial), jnp.int32)
    else:
        start = random_patch_start(
            key_patch,
            label,
            patch_shape,
            config.foreground_fraction,
            config.foreground_class_balance,
        )
    params = sample_affine_parameters(key_affine, config, spatial)
    if config.keep_foreground_in_view:
        params = clip_shift_to_foreground(params, spacing, label, start, patch_shape)
    coordinates = sampling_coordinates(params, spacing, start, patch_shape)
    image, label = resample(image, label, coordinates)
    if config.rescale:
        image = min_max_rescale(image)
    log_gamma = jax.random.uniform(key_gamma, (1,), minval=-config.gamma, maxval=config.gamma)
    image = gamma_correction(image, _keep(key_apply, log_gamma, config.probability)[0])
    return image, label


def augment_batch(
    key: jax.Array, batch: dict[str, jax.Array], config: AugmentationConfig
) -> dict[str, jax.Array]:
    """Augments every sample of a batch with its own key; jit with ``config`` static.

    Works unchanged on batches sharded over a mesh's data axis: the per-sample work is
    ``vmap``-ped, so it stays on the devices holding the samples.

    Args:
        key: PRNG key for the whole batch.
        batch: ``image`` float32 ``(batch, *spatial, channels)``, ``label`` integer
            ``(batch, *spatial)``, ``spacing`` float32 ``(batch, ndim)``.
        config: ranges and patch shape.

    Returns:
        ``{"image": float32 (batch, *patch, channels), "label": int32 (batch, *patch)}``.
    """
    image, label, spacing = batch["image"], batch["label"], batch["spacing"]
    chex.assert_rank(spacing, 2)
    ndim = spacing.shape[1]
    if ndim not in (2, 3):
        raise ValueError(f"batch['spacing'] has {ndim} axes; only 2D and 3D images are supported.")
    chex.assert_rank([image, label], [ndim + 2, ndim + 1])
    chex.assert_equal_shape_prefix([image, label], ndim + 1)
    keys = jax.random.split(key, image.shape[0])
    new_image, new_label = jax.vmap(functools.partial(augment_sample, config=config))(
        keys, image, label, spacing
    )
    return {"image": new_image, "label": new_label}
