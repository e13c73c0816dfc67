"""Preprocessing of raw volumes onto a fixed grid, and its inverse for predictions.

Steps (spec/data.md): resample to the target spacing (linear for images, nearest for
labels) keeping the grid corner fixed; clip intensities to a range or to the
[0.5, 99.5] percentiles, z-score and rescale to [0, 1] per channel; pad symmetrically to
the target shape and crop to it centred on the label's foreground. The preprocessed grid's
geometry and the original file's geometry are kept so that a prediction can be resampled
back onto the original grid (:func:`restore_to_original`, or better
:func:`restore_probabilities`: probabilities linearly, then the argmax), and the label file
itself is kept on its own grid (``original_label``) so that metrics can be computed against
it, as nnU-Net does. Cases of every split are stored whole
(:meth:`PreprocessedCase.whole`, build format 3): training reads the window centred on the
foreground (:func:`training_window`; ``cropped_foreground`` counts what it drops),
validation and test predict the whole case with sliding windows.

All arrays are in ``(x, y[, z])`` order (see :mod:`imgx_data.io`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from imgx_data.io import Geometry, array_to_sitk, sitk_to_array

PERCENTILES = (0.5, 99.5)

# Intensity policies: clip to the [0.5, 99.5] percentiles, or to a fixed (low, high) range
# (e.g. CT HU), then z-score and rescale to [0, 1]; PNG: divide by 255; identity: keep
# (data already in [0, 1], e.g. generated).
PERCENTILE = "percentile"
PNG = "png"
IDENTITY = "identity"
Intensity = str | tuple[float, float]


def resampled_grid(geometry: Geometry, target_spacing: Sequence[float]) -> Geometry:
    """The grid of ``geometry`` resampled to ``target_spacing``.

    new size = round(size * spacing / target), at least 1;
    new origin = origin + D (target - spacing) / 2, so that both grids share the corner
    ``origin - D spacing / 2`` of voxel 0.
    """
    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    target = np.asarray(target_spacing, dtype=np.float64)
    if target.shape != spacing.shape or np.any(target <= 0):
        raise ValueError(
            f"Target spacing {tuple(target_spacing)} must be {geometry.ndim} values > 0."
        )
    size = np.maximum(np.round(np.asarray(geometry.shape) * spacing / target), 1).astype(int)
    origin = np.asarray(geometry.origin) + geometry.direction_matrix @ ((target - spacing) / 2)
    return Geometry(
        shape=tuple(int(s) for s in size),
        spacing=tuple(float(s) for s in target),
        origin=tuple(float(o) for o in origin),
        direction=geometry.direction,
    )


def resample_image(image: sitk.Image, grid: Geometry, *, is_label: bool) -> sitk.Image:
    """Resamples a SimpleITK image onto ``grid`` (nearest for labels, linear otherwise).

    Points outside the source grid get 0.
    """
    return sitk.Resample(
        image,
        grid.shape,
        sitk.Transform(),
        sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear,
        grid.origin,
        grid.spacing,
        grid.direction,
        0,
        image.GetPixelID(),
    )


def resample_to_geometry(
    array: np.ndarray, source: Geometry, target: Geometry, *, is_label: bool
) -> np.ndarray:
    """Resamples an ``(x, y[, z])`` array from the ``source`` grid onto the ``target`` grid.

    Args:
        array: values on ``source``, shape ``source.shape``.
        source: the grid of ``array``.
        target: the grid to sample on; points outside ``source`` get 0.
        is_label: nearest-neighbour interpolation (labels) instead of linear.

    Returns:
        Array of shape ``target.shape`` and the dtype of ``array``.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = array_to_sitk(array, source)
    return sitk_to_array(resample_image(image, target, is_label=is_label)).astype(array.dtype)


def normalise_intensity(
    image: np.ndarray, intensity_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Clips, z-scores and rescales each channel to [0, 1].

    With ``lo, hi`` the given range (e.g. CT HU) or the [0.5, 99.5] percentiles of the
    channel: ``x = clip(x, lo, hi)``, ``z = (x - mean) / std``,
    ``out = (z - min z) / (max z - min z)``. A constant channel becomes 0.

    Args:
        image: ``(*spatial, channels)``.
        intensity_range: fixed clipping range, or None for the percentiles.

    Returns:
        float32 ``(*spatial, channels)`` in [0, 1].
    """
    image = np.asarray(image, dtype=np.float64)
    out = np.empty(image.shape, dtype=np.float32)
    for c in range(image.shape[-1]):
        channel = image[..., c]
        if intensity_range is None:
            lo, hi = np.percentile(channel, PERCENTILES)
        else:
            lo, hi = intensity_range
        channel = np.clip(channel, lo, hi)
        std = channel.std()
        z = (channel - channel.mean()) / std if std > 0 else np.zeros_like(channel)
        span = z.max() - z.min()
        out[..., c] = (z - z.min()) / span if span > 0 else 0.0
    return out


def scale_intensity(image: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Applies an intensity policy to ``(*spatial, channels)``; float32 out."""
    if intensity == PERCENTILE:
        return normalise_intensity(image)
    if intensity == PNG:
        return (np.asarray(image, np.float32) / 255).astype(np.float32)
    if intensity == IDENTITY:
        return np.asarray(image, np.float32)
    if isinstance(intensity, tuple | list) and len(intensity) == 2:
        return normalise_intensity(image, (float(intensity[0]), float(intensity[1])))
    raise ValueError(f"Unknown intensity policy {intensity!r}.")


def crop_start(
    size: Sequence[int], target_shape: Sequence[int], label: np.ndarray | None
) -> tuple[int, ...]:
    """Start index of the ``target_shape`` window after symmetric padding, per axis.

    The volume of ``size`` is first padded symmetrically to at least ``target_shape``
    (``pad_before = max(target - size, 0) // 2``), then a window of ``target_shape`` is
    centred on the foreground bounding box of ``label`` (or the volume centre when the label
    is empty or None) and shifted to stay inside the padded volume. A negative start means
    padding before the first voxel.
    """
    size = np.asarray(size)
    target = np.asarray(target_shape)
    pad_before = np.maximum(target - size, 0) // 2
    pad_after = np.maximum(target - size, 0) - pad_before
    if label is not None and np.any(label):
        foreground = np.nonzero(label)
        lower = np.array([ax.min() for ax in foreground])
        upper = np.array([ax.max() for ax in foreground]) + 1
        centre = (lower + upper) / 2
    else:
        centre = size / 2
    start = np.floor(centre - target / 2 + 0.5).astype(int)
    start = np.clip(start, -pad_before, size + pad_after - target)
    return tuple(int(s) for s in start)


def extract_window(array: np.ndarray, start: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """``array[start : start + shape]`` over the leading axes, zero outside the array."""
    out = np.zeros((*shape, *array.shape[len(shape) :]), dtype=array.dtype)
    src, dst = [], []
    for s, n, size in zip(start, shape, array.shape, strict=False):
        lo, hi = max(s, 0), min(s + n, size)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def window_grid(grid: Geometry, start: Sequence[int], shape: Sequence[int]) -> Geometry:
    """Geometry of the window starting at index ``start`` of ``grid``."""
    offset = grid.direction_matrix @ (np.asarray(start) * np.asarray(grid.spacing))
    return Geometry(
        shape=tuple(int(s) for s in shape),
        spacing=grid.spacing,
        origin=tuple(float(o) for o in np.asarray(grid.origin) + offset),
        direction=grid.direction,
    )


@dataclasses.dataclass(frozen=True)
class PreprocessedCase:
    """One case on the target grid with what is needed to undo the preprocessing.

    Attributes:
        image: float32 ``(*target_shape, channels)`` in [0, 1].
        label: uint8 ``(*target_shape)``.
        geometry: the preprocessed (stored) grid.
        original: the grid of the raw file.
        crop_start: start of the stored window in the resampled grid (negative = padding).
        original_label: uint8 label on the raw file's grid ``original.shape`` (the label
            file itself), the reference of test metrics.
        cropped_foreground: foreground voxels of the resampled label outside the training
            window (0 when the window holds all of it): what training on the case never
            sees.
        resampled: the whole scaled image and label on the resampled grid, and that grid
            (for :meth:`whole`), or None when the stored window is the whole grid.
        window_start: where the training window (of the target shape) starts in
            ``image``; None when ``image`` is that window.
        window: the training window's image and label when ``image`` is larger (stored
            beside the whole case so that training decodes only them), else None.
    """

    image: np.ndarray
    label: np.ndarray
    geometry: Geometry
    original: Geometry
    crop_start: tuple[int, ...]
    original_label: np.ndarray
    cropped_foreground: int = 0
    resampled: tuple[np.ndarray, np.ndarray, Geometry] | None = None
    window_start: tuple[int, ...] | None = None
    window: tuple[np.ndarray, np.ndarray] | None = None

    def whole(self) -> PreprocessedCase:
        """The case stored whole: the entire resampled grid, padded symmetrically (with
        zeros) to at least the window's shape, so that no foreground is cropped away
        (``crop_start`` is then ``-padding``, the true extent is ``original``'s).

        The training window is kept as ``window_start``, its start in the whole array
        (``crop_start`` of the window minus that of the whole grid), and
        ``cropped_foreground`` still counts what that window drops.
        """
        if self.resampled is None:
            return self
        image, label, grid = self.resampled
        shape = tuple(int(max(n, t)) for n, t in zip(grid.shape, self.label.shape, strict=True))
        start = crop_start(grid.shape, shape, None)
        return PreprocessedCase(
            image=extract_window(image, start, shape),
            label=extract_window(label, start, shape),
            geometry=window_grid(grid, start, shape),
            original=self.original,
            crop_start=start,
            original_label=self.original_label,
            cropped_foreground=self.cropped_foreground,
            window_start=tuple(int(w - s) for w, s in zip(self.crop_start, start, strict=True)),
            window=None if shape == self.label.shape else (self.image, self.label),
        )

    def to_example(self, uid: str) -> dict[str, object]:
        """The TFDS feature dict of this case."""
        return {
            "uid": uid,
            "image": self.image.astype(np.float32),
            "label": self.label.astype(np.uint8),
            "original_label": np.asarray(self.original_label).astype(np.uint8),
            "cropped_foreground": np.int64(self.cropped_foreground),
            "window_start": np.asarray(self.window_start or (0,) * self.label.ndim, np.int32),
            # A 2-voxel-wide placeholder when the stored arrays are the window (nothing
            # stored twice; TFDS's BYTES encoding cannot read back an all-ones shape).
            "window_stored": np.bool_(self.window is not None),
            "window_image": np.asarray(
                self.window[0]
                if self.window
                else np.zeros((2,) * self.label.ndim + self.image.shape[-1:]),
                np.float32,
            ),
            "window_label": np.asarray(
                self.window[1] if self.window else np.zeros((2,) * self.label.ndim), np.uint8
            ),
            **geometry_features(self.geometry, self.original, self.crop_start),
        }


def training_window(example: Mapping[str, np.ndarray], shape: Sequence[int]) -> dict:
    """The training window of a case stored whole: ``image``/``label`` of ``shape`` from
    ``window_start`` on, with the window's geometry (``origin``, ``crop_start``; zeros
    outside the stored array), so that the example reads as if only the window were stored.

    The window's arrays are the stored ``window_image``/``window_label`` when
    ``window_stored`` (a case larger than its window; reading them needs no decoding of the
    whole case; else they are a placeholder), else cut from ``image``/``label``. An
    example without ``window_start`` (built before whole storage) is its window already
    and is returned as it is, as is one whose label already has ``shape`` at start 0. The
    output has no ``window_*`` arrays.
    """
    shape = tuple(int(s) for s in shape)
    example = dict(example)
    window_image = example.pop("window_image", None)
    window_label = example.pop("window_label", None)
    stored_window = bool(example.pop("window_stored", False))
    if "window_start" not in example:
        return example
    start = tuple(int(s) for s in example["window_start"])
    if stored_window:
        image, label = np.asarray(window_image), np.asarray(window_label)
    else:
        label = np.asarray(example["label"])
        if label.shape == shape and not any(start):
            return example
        image = extract_window(np.asarray(example["image"]), start, shape)
        label = extract_window(label, start, shape)
    stored = Geometry(
        shape=shape,
        spacing=tuple(float(v) for v in example["spacing"]),
        origin=tuple(float(v) for v in example["origin"]),
        direction=tuple(float(v) for v in example["direction"]),
    )
    return {
        **example,
        "image": image,
        "label": label,
        "origin": np.asarray(window_grid(stored, start, shape).origin, np.float32),
        "crop_start": np.asarray(example["crop_start"], np.int32) + np.asarray(start, np.int32),
        "window_start": np.zeros(len(shape), np.int32),
    }


def geometry_features(
    geometry: Geometry, original: Geometry, start: Sequence[int]
) -> dict[str, np.ndarray]:
    """Geometry as flat numpy features (float32 mm / int32 indices)."""
    return {
        "spacing": np.asarray(geometry.spacing, np.float32),
        "origin": np.asarray(geometry.origin, np.float32),
        "direction": np.asarray(geometry.direction, np.float32),
        "original_shape": np.asarray(original.shape, np.int32),
        "original_spacing": np.asarray(original.spacing, np.float32),
        "original_origin": np.asarray(original.origin, np.float32),
        "original_direction": np.asarray(original.direction, np.float32),
        "crop_start": np.asarray(start, np.int32),
    }


def example_geometry(example: Mapping[str, np.ndarray]) -> tuple[Geometry, Geometry]:
    """The preprocessed and the original grid of a stored example (from ``data_source``)."""
    label_shape = tuple(int(s) for s in np.shape(example["label"]))

    def grid(prefix: str, shape: tuple[int, ...]) -> Geometry:
        return Geometry(
            shape=shape,
            spacing=tuple(float(v) for v in example[prefix + "spacing"]),
            origin=tuple(float(v) for v in example[prefix + "origin"]),
            direction=tuple(float(v) for v in example[prefix + "direction"]),
        )

    original_shape = tuple(int(s) for s in example["original_shape"])
    return grid("", label_shape), grid("original_", original_shape)


def restore_to_original(
    label: np.ndarray, example: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, Geometry]:
    """Puts a label map predicted on the stored grid back onto the original file's grid.

    Nearest-neighbour resampling from the preprocessed grid to the original grid; voxels
    that were cropped away get background (0).

    Args:
        label: integer labels ``(*spatial)`` on the stored grid of ``example``.
        example: a stored example (its geometry features are used).

    Returns:
        The label map on the original grid ``(x, y[, z])`` and that grid's Geometry,
        ready for :func:`imgx_data.io.write_image`.
    """
    geometry, original = example_geometry(example)
    label = np.asarray(label)
    if label.shape != geometry.shape:
        raise ValueError(
            f"Prediction shape {label.shape} differs from the stored grid {geometry.shape}."
        )
    return resample_to_geometry(label, geometry, original, is_label=True), original


def restore_probabilities(
    probabilities: np.ndarray, example: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, Geometry]:
    """Puts class probabilities predicted on the stored grid back onto the original grid.

    Each class channel is resampled linearly (voxels outside the stored window get 0, so
    that the argmax, or nested regions' ``p >= 0.5``, gives background there); take the
    labels after, as nnU-Net does (``resample_data_or_seg`` on the softmax): an argmax of
    interpolated probabilities follows the decision boundary between stored voxels, where
    nearest-neighbour labels (:func:`restore_to_original`) make blocks of the coarser grid.

    Args:
        probabilities: ``(*spatial, C)`` on the stored grid of ``example``.
        example: a stored example (its geometry features are used).

    Returns:
        float32 ``(*original.shape, C)`` and the original grid.
    """
    geometry, original = example_geometry(example)
    probabilities = np.asarray(probabilities, np.float32)
    if probabilities.shape[:-1] != geometry.shape:
        raise ValueError(
            f"Probabilities of shape {probabilities.shape} do not fit the stored grid "
            f"{geometry.shape} (spatial axes, then classes)."
        )
    channels = [
        resample_to_geometry(probabilities[..., c], geometry, original, is_label=False)
        for c in range(probabilities.shape[-1])
    ]
    return np.stack(channels, axis=-1), original


def foreground_outside(label: np.ndarray, start: Sequence[int], shape: Sequence[int]) -> int:
    """Foreground voxels of ``label`` outside the window ``start : start + shape``."""
    inside = extract_window(np.asarray(label) > 0, start, shape)
    return int(np.count_nonzero(label)) - int(np.count_nonzero(inside))


def preprocess_volume(
    image: sitk.Image,
    label: sitk.Image,
    *,
    target_spacing: Sequence[float] | None,
    target_shape: Sequence[int],
    intensity: Intensity = PERCENTILE,
    window_start: Sequence[int] | None = None,
) -> PreprocessedCase:
    """Resamples, normalises and pads/crops one case (image may be a vector image).

    The caller has checked that image and label share one grid.

    Args:
        image: scalar or vector (channels) SimpleITK image.
        label: integer label image on the same grid.
        target_spacing: mm per axis, or None to keep the grid (no resampling).
        target_shape: stored spatial shape ``(x, y[, z])``.
        intensity: the intensity policy (:func:`scale_intensity`).
        window_start: a fixed crop start (e.g. BraTS' brain box) instead of the window
            centred on the foreground (:func:`crop_start`).
    """
    image_array, grid, original = prepare_image(image, target_spacing=target_spacing)
    original_label = sitk_to_array(label).astype(np.uint8)
    if target_spacing is not None:
        label = resample_image(label, grid, is_label=True)
    label_array = sitk_to_array(label)
    if window_start is None:
        start = crop_start(grid.shape, target_shape, label_array)
    else:
        start = tuple(int(s) for s in window_start)
    scaled = scale_intensity(image_array, intensity)
    label_array = label_array.astype(np.uint8)
    return PreprocessedCase(
        image=extract_window(scaled, start, target_shape),
        label=extract_window(label_array, start, target_shape),
        geometry=window_grid(grid, start, target_shape),
        original=original,
        crop_start=start,
        original_label=original_label,
        cropped_foreground=foreground_outside(label_array, start, target_shape),
        resampled=(scaled, label_array, grid),
    )


def prepare_image(
    image: sitk.Image, *, target_spacing: Sequence[float] | None
) -> tuple[np.ndarray, Geometry, Geometry]:
    """Resamples an image (linear) to ``target_spacing`` without cropping.

    Args:
        image: scalar or vector (channels) SimpleITK image.
        target_spacing: mm per axis, or None to keep the grid.

    Returns:
        The array ``(*spatial, channels)`` on the resampled grid (intensities untouched),
        that grid, and the original grid.
    """
    original = Geometry.of(image)
    if target_spacing is not None:
        grid = resampled_grid(original, target_spacing)
        image = resample_image(sitk.Cast(image, _float_pixel_type(image)), grid, is_label=False)
    array = sitk_to_array(image)
    if array.ndim == original.ndim:
        array = array[..., None]
    return array, Geometry.of(image), original


def _float_pixel_type(image: sitk.Image) -> int:
    if image.GetNumberOfComponentsPerPixel() > 1:
        return sitk.sitkVectorFloat32
    return sitk.sitkFloat32
