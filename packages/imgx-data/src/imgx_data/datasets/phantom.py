"""Built-in synthetic datasets: ``phantom`` (2D ultrasound-like) and ``phantom_3d`` (CT-like).

Deterministic: example ``i`` of split ``s`` is drawn from
``numpy.random.default_rng([seed, s, i])``, independent of the split sizes. Vectorised
numpy, so the default splits are generated in well under a second; no input files.
Arrays are in ``(x, y[, z])`` order; ``y`` is depth (rows) in 2D.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from scipy import ndimage

from imgx_data.datasets.base import SPLITS, ImgxBuilder
from imgx_data.errors import DatasetError
from imgx_data.io import Geometry
from imgx_data.preprocess import IDENTITY, PreprocessedCase

PHANTOM_2D_SEED = 20231
PHANTOM_3D_SEED = 20232
# Probability that a structure is present in a 2D image (the rest show it absent).
MUSCLE_PRESENCE = 0.92
VESSEL_PRESENCE = 0.8


def _deformed_ellipse(
    x: np.ndarray,
    y: np.ndarray,
    centre: Sequence[float],
    axes: Sequence[float],
    angle: float,
    rng: np.random.Generator,
    roughness: float,
) -> np.ndarray:
    """Mask of a rotated ellipse whose radius is modulated by harmonics 2..4.

    Boundary in polar coordinates of the normalised ellipse frame:
    ``rho(phi) = 1 + sum_k c_k cos(k phi + p_k)``, ``c_k ~ N(0, roughness)``.
    """
    dx, dy = x - centre[0], y - centre[1]
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / axes[0]
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) / axes[1]
    phi = np.arctan2(v, u)
    boundary = np.ones_like(phi)
    for k in (2, 3, 4):
        boundary += rng.normal(0, roughness) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) < boundary


def phantom_2d(
    rng: np.random.Generator, shape: Sequence[int] = (96, 96)
) -> tuple[np.ndarray, np.ndarray]:
    """One ultrasound-like image: a muscle section (1) and a vessel (2) inside/next to it.

    Image model: piecewise-constant echogenicity with a smooth background texture,
    multiplicative gamma speckle (shape 3..6), Gaussian blur (sigma 0.7..1.2 px), depth
    attenuation ``exp(-alpha y)`` with alpha 0.004..0.015 per px, random gain 0.7..1.3,
    clipped to [0, 1]. Random position, size, rotation and boundary deformation; the muscle
    is absent in 8 % and the vessel in 20 % of images.

    Returns:
        image float32 ``(x, y, 1)`` in [0, 1], label uint8 ``(x, y)`` in {0, 1, 2}.
    """
    nx, ny = shape
    x, y = np.meshgrid(
        np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64), indexing="ij"
    )
    label = np.zeros(shape, dtype=np.uint8)
    centre = (rng.uniform(0.3, 0.7) * nx, rng.uniform(0.35, 0.65) * ny)
    axes = (rng.uniform(0.18, 0.32) * nx, rng.uniform(0.1, 0.2) * ny)
    angle = rng.uniform(-0.4, 0.4)
    muscle = _deformed_ellipse(x, y, centre, axes, angle, rng, roughness=0.06)
    if rng.uniform() < MUSCLE_PRESENCE:
        label[muscle] = 1
    if rng.uniform() < VESSEL_PRESENCE:
        offset = rng.uniform(-1.1, 1.1, size=2) * np.asarray(axes)
        vessel_axes = rng.uniform(0.04, 0.08, size=2) * np.asarray(shape)
        vessel = _deformed_ellipse(
            x, y, np.asarray(centre) + offset, vessel_axes, rng.uniform(0, np.pi), rng, 0.04
        )
        label[vessel] = 2

    texture = ndimage.gaussian_filter(rng.normal(size=shape), sigma=6)
    echogenicity = rng.uniform(0.45, 0.6) + 0.6 * texture
    means = (echogenicity, rng.uniform(0.25, 0.4), rng.uniform(0.08, 0.18))
    image = np.select([label == 0, label == 1, label == 2], means)
    speckle_shape = rng.uniform(3, 6)
    image = image * rng.gamma(speckle_shape, 1 / speckle_shape, size=shape)
    image = ndimage.gaussian_filter(image, sigma=rng.uniform(0.7, 1.2))
    image = image * np.exp(-rng.uniform(0.004, 0.015) * y) * rng.uniform(0.7, 1.3)
    return np.clip(image, 0, 1).astype(np.float32)[..., None], label


# (name, centre mm, semi-axes mm, mean intensity) of the 3D organs, in label order.
ORGANS_3D = (
    ("liver", (32.0, 44.0, 85.0), (22.0, 19.0, 45.0), 0.55),
    ("spleen", (70.0, 52.0, 90.0), (10.0, 13.0, 30.0), 0.62),
    ("right kidney", (34.0, 70.0, 70.0), (8.0, 10.0, 22.0), 0.7),
    ("left kidney", (64.0, 70.0, 72.0), (8.0, 10.0, 22.0), 0.76),
)


def phantom_3d(
    rng: np.random.Generator,
    shape: Sequence[int] = (64, 64, 32),
    spacing: Sequence[float] = (1.5, 1.5, 5.0),
) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like volume: 4 organs as deformed ellipsoids in a soft-tissue body.

    Geometry is in mm (anisotropic spacing): each organ's centre is jittered by N(0, 4 mm),
    its semi-axes scaled by U(0.85, 1.15), rotated about z by U(-0.3, 0.3) rad and its
    coordinates displaced by a smooth sinusoidal field (amplitude up to 3 mm). Intensities:
    air 0, body 0.3, organs 0.55, 0.62, 0.7, 0.76 (each jittered by U(-0.03, 0.03), so the classes
    overlap under noise), multiplied by a quadratic bias field ``1 + sum b_ij u_i u_j``
    (|b| <= 0.1), plus Gaussian noise with sigma U(0.04, 0.07), clipped to [0, 1].

    Returns:
        image float32 ``(x, y, z, 1)``, label uint8 ``(x, y, z)`` in {0, ..., 4}.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    axes_mm = [np.arange(n) * s for n, s in zip(shape, spacing, strict=True)]
    extent = np.asarray(shape) * spacing
    label = np.zeros(shape, dtype=np.uint8)
    x, y = np.meshgrid(axes_mm[0], axes_mm[1], indexing="ij", sparse=True)
    body = ((x - extent[0] / 2) / (0.46 * extent[0])) ** 2 + (
        (y - extent[1] / 2) / (0.42 * extent[1])
    ) ** 2 < 1
    image = np.repeat(0.3 * body[..., None], shape[2], axis=2).astype(np.float64)
    scale = extent / np.array([96.0, 96.0, 160.0])
    for index, (_, centre, axes, mean) in enumerate(ORGANS_3D, start=1):
        c = (np.asarray(centre) + rng.normal(0, 4.0, size=3)) * scale
        a = np.asarray(axes) * rng.uniform(0.85, 1.15, size=3) * scale
        angle = rng.uniform(-0.3, 0.3)
        wave = rng.uniform(20, 60, size=3)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        amplitude = rng.uniform(0, 3.0, size=3)
        # Only the organ's bounding box (semi-axes + displacement) is evaluated.
        reach = a.max() + amplitude.max() + spacing
        lo = np.clip(np.floor((c - reach) / spacing), 0, shape).astype(int)
        hi = np.clip(np.ceil((c + reach) / spacing) + 1, 0, shape).astype(int)
        d = np.meshgrid(
            *[axes_mm[i][lo[i] : hi[i]] - c[i] for i in range(3)], indexing="ij", sparse=True
        )
        shifted = [
            d[i] + amplitude[i] * np.sin(2 * np.pi * d[(i + 1) % 3] / wave[i] + phase[i])
            for i in range(3)
        ]
        u = np.cos(angle) * shifted[0] + np.sin(angle) * shifted[1]
        v = -np.sin(angle) * shifted[0] + np.cos(angle) * shifted[1]
        organ = (u / a[0]) ** 2 + (v / a[1]) ** 2 + (shifted[2] / a[2]) ** 2 < 1
        box = tuple(slice(lo[i], hi[i]) for i in range(3))
        label[box][organ] = index
        image[box][organ] = mean + rng.uniform(-0.03, 0.03)
    coords = np.meshgrid(*axes_mm, indexing="ij", sparse=True)
    normalised = [2 * coords[i] / extent[i] - 1 for i in range(3)]
    bias = np.ones(shape)
    for i in range(3):
        for j in range(i, 3):
            bias = bias + rng.uniform(-0.1, 0.1) * normalised[i] * normalised[j]
    image = ndimage.gaussian_filter(image * bias, sigma=(0.7, 0.7, 0.3))
    image = image + rng.normal(0, rng.uniform(0.04, 0.07), size=shape)
    return np.clip(image, 0, 1).astype(np.float32)[..., None], label


class _PhantomBuilder(ImgxBuilder, skip_registration=True):
    """Shared split generation of the phantom builders."""

    SEED: ClassVar[int]
    SPLIT_SIZES: ClassVar[tuple[int, int, int]]
    ENCODING = tfds.features.Encoding.BYTES
    INTENSITY = IDENTITY

    def __init__(self, *, split_sizes: Sequence[int] | None = None, **kwargs: Any) -> None:
        self.split_sizes = tuple(int(n) for n in (split_sizes or self.SPLIT_SIZES))
        if len(self.split_sizes) != len(SPLITS) or min(self.split_sizes) < 1:
            raise DatasetError(
                f"split_sizes must be 3 positive counts (train, valid, test), got {split_sizes}."
            )
        super().__init__(**kwargs)

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        """The target grid and ``split_sizes`` (train, valid, test)."""
        return {**super().default_options(), "split_sizes": cls.SPLIT_SIZES}

    @abc.abstractmethod
    def generate(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One (image, label) pair on the target grid."""

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager
        return self._split_examples(
            {
                split: [(index, i) for i in range(size)]
                for index, (split, size) in enumerate(zip(SPLITS, self.split_sizes, strict=True))
            }
        )

    def _load(self, case: tuple[int, int]) -> tuple[str, PreprocessedCase]:
        split_index, i = case
        image, label = self.generate(np.random.default_rng([self.SEED, split_index, i]))
        geometry = Geometry.identity(self.target_shape, self.target_spacing)
        # Generated on the stored grid: no resampling, no crop.
        no_crop = (0,) * geometry.ndim
        return f"{SPLITS[split_index]}_{i:04d}", PreprocessedCase(
            image, label, geometry, geometry, no_crop, original_label=label
        )


class Phantom(_PhantomBuilder, skip_registration=True):
    """``phantom``: 2D ultrasound-like images 96x96, spacing 1 mm, 240/24/48 images."""

    name = "phantom"
    CLASS_NAMES = ("background", "muscle", "vessel")
    TARGET_SHAPE = (96, 96)
    TARGET_SPACING = (1.0, 1.0)
    SEED = PHANTOM_2D_SEED
    SPLIT_SIZES = (240, 24, 48)
    DESCRIPTION = "2D ultrasound-like phantom: muscle section and vessel (see phantom_2d)."

    def generate(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """See :func:`phantom_2d`."""
        return phantom_2d(rng, self.target_shape)


class Phantom3d(_PhantomBuilder, skip_registration=True):
    """``phantom_3d``: CT-like volumes 64x64x32, spacing 1.5x1.5x5 mm, 48/8/16 volumes."""

    name = "phantom_3d"
    CLASS_NAMES = ("background", *(organ[0] for organ in ORGANS_3D))
    TARGET_SHAPE = (64, 64, 32)
    TARGET_SPACING = (1.5, 1.5, 5.0)
    SEED = PHANTOM_3D_SEED
    SPLIT_SIZES = (48, 8, 16)
    DESCRIPTION = "3D CT-like phantom: liver, spleen, kidneys (see phantom_3d)."

    def generate(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """See :func:`phantom_3d`."""
        return phantom_3d(rng, self.target_shape, self.target_spacing)
