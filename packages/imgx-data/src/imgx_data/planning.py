"""Dataset fingerprint and training plan of a ``nifti_folder`` build (nnU-Net-like).

The fingerprint (Isensee et al., "nnU-Net", Nature Methods 18, 2021) describes the raw
cases: spacings and shapes, intensity statistics per channel (all voxels and foreground
voxels; the foreground percentiles are what CT clipping uses), class frequencies. The
plan derives from it, the stored grid and a memory budget the settings a new user should
not have to choose: target spacing, patch shape, batch size, levels and channels of the
U-Net. Each rule is one small pure function below; the README ("Your own data") states
them. ``plan.json`` (:data:`PLAN_FILE`) holds both, beside the build.

Axes are ``(x, y[, z])`` as everywhere in imgx; spacings in mm.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from imgx_data.errors import DatasetError
from imgx_data.io import Geometry, image_channels, read_sitk_image

if TYPE_CHECKING:
    from imgx_data.datasets.nifti_folder import NiftiFolderLayout

PLAN_FILE = "plan.json"
PLAN_VERSION = 1

# Fingerprint: voxels sampled per case for percentiles (nnU-Net samples 10 000 foreground
# voxels per case).
SAMPLES_PER_CASE = 10_000
PERCENTILES = (0.5, 50.0, 99.5)

# Target spacing: an axis is anisotropic when its median spacing exceeds ANISOTROPY_RATIO
# times the finest one and it has ANISOTROPY_RATIO times fewer voxels than the others
# (nnU-Net v2); then its target is the 10th percentile of its spacings.
ANISOTROPY_RATIO = 3.0
ANISOTROPIC_PERCENTILE = 10.0

# Network: levels until the bottom feature map would have fewer than MIN_BOTTOM voxels
# along an axis, at most MAX_LEVELS; channels double per level from the device's width.
MIN_BOTTOM = 4
MAX_LEVELS = 4
# First down-sampling 2 on an axis whose spacing is at most this times the finest one,
# else 1 (an anisotropic axis is not halved first, e.g. male pelvic MR's 2x2x1).
FIRST_DOWNSAMPLING_RATIO = 2.0

# Batch: at least MIN_BATCH; at most the patches covering BATCH_DATASET_FRACTION of the
# training voxels (nnU-Net v2's 5 % rule) or, if more, the patches holding
# MIN_BATCH_VOXELS voxels (small 2D images: a CPU trains ~1.8x more pixels per second
# with 16 than with 8 images of 96x112); within that, as many as the budget holds.
MIN_BATCH = 2
BATCH_DATASET_FRACTION = 0.05
MIN_BATCH_VOXELS = 2**17
# Foreground oversampling when training on patches smaller than the image (nnU-Net: 1/3).
PATCH_FOREGROUND_FRACTION = 0.33

# Activation memory of one training sample (diffusion train step, float32), fitted to
# XLA's memory analysis (temp bytes) of imgx-train's step on CPU: 2D 96x112, widths 8 / 16
# / 32, 1-2 residual blocks: BYTES_PER_INPUT_VOXEL per voxel of the patch plus
# BYTES_PER_FEATURE per element of each residual block's feature maps.
BYTES_PER_INPUT_VOXEL = 512
BYTES_PER_FEATURE = 96
# Share of an accelerator's memory given to activations (the rest: parameters, optimizer
# state, XLA workspace); and of the host memory on CPU.
ACCELERATOR_MEMORY_SHARE = 0.75
HOST_MEMORY_SHARE = 0.25


@dataclasses.dataclass(frozen=True)
class Network:
    """The U-Net width of a device kind (imgx-train's ``model.*`` fields)."""

    base_channels: int
    num_res_blocks: int
    num_heads: int
    dropout: float


# GPU/TPU: the published network (32/64/128/256, 2 residual blocks). CPU: the phantom
# preset's (8/16/32/64, 1 block), which trains ~8x more pixels per second on a CPU.
NETWORKS: dict[str, Network] = {
    "gpu": Network(base_channels=32, num_res_blocks=2, num_heads=8, dropout=0.1),
    "tpu": Network(base_channels=32, num_res_blocks=2, num_heads=8, dropout=0.1),
    "cpu": Network(base_channels=8, num_res_blocks=1, num_heads=4, dropout=0.0),
}


# ---------------------------------------------------------------------------------------
# Fingerprint


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What the raw cases are.

    Attributes:
        spacings: per case, mm per axis.
        shapes: per case, voxels per axis.
        channel_names: from ``dataset.json``.
        class_names: background first.
        intensity: per channel, statistics over all voxels: ``mean``, ``std``, ``min``,
            ``max`` and the ``percentile_<p>`` of :data:`PERCENTILES` (sampled).
        foreground_intensity: the same over the voxels with label > 0.
        class_frequency: per class, its share of all voxels.
        class_presence: per class, the share of cases that contain it.
    """

    spacings: tuple[tuple[float, ...], ...]
    shapes: tuple[tuple[int, ...], ...]
    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]
    intensity: tuple[dict[str, float], ...]
    foreground_intensity: tuple[dict[str, float], ...]
    class_frequency: tuple[float, ...]
    class_presence: tuple[float, ...]

    @property
    def ndim(self) -> int:
        return len(self.spacings[0])

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fingerprint:
        return cls(
            spacings=tuple(tuple(float(v) for v in s) for s in data["spacings"]),
            shapes=tuple(tuple(int(v) for v in s) for s in data["shapes"]),
            channel_names=tuple(data["channel_names"]),
            class_names=tuple(data["class_names"]),
            intensity=tuple(dict(d) for d in data["intensity"]),
            foreground_intensity=tuple(dict(d) for d in data["foreground_intensity"]),
            class_frequency=tuple(float(v) for v in data["class_frequency"]),
            class_presence=tuple(float(v) for v in data["class_presence"]),
        )


class _Moments:
    """Pooled count, sum, sum of squares, min, max and a sample of one channel's values."""

    def __init__(self) -> None:
        self.count, self.total, self.squares = 0, 0.0, 0.0
        self.low, self.high = math.inf, -math.inf
        self.samples: list[np.ndarray] = []

    def add(self, values: np.ndarray, rng: np.random.Generator) -> None:
        values = np.asarray(values, np.float64).ravel()
        if values.size == 0:
            return
        self.count += values.size
        self.total += float(values.sum())
        self.squares += float(np.square(values).sum())
        self.low, self.high = min(self.low, values.min()), max(self.high, values.max())
        if values.size > SAMPLES_PER_CASE:
            values = rng.choice(values, SAMPLES_PER_CASE, replace=False)
        self.samples.append(values)

    def summary(self) -> dict[str, float]:
        if self.count == 0:
            return {}
        mean = self.total / self.count
        pooled = np.concatenate(self.samples)
        out = {
            "mean": mean,
            "std": math.sqrt(max(self.squares / self.count - mean**2, 0.0)),
            "min": float(self.low),
            "max": float(self.high),
        }
        for p, value in zip(PERCENTILES, np.percentile(pooled, PERCENTILES), strict=True):
            out[f"percentile_{p:g}"] = float(value)
        return out


def _read(path: Path) -> sitk.Image:
    """An image file; a 3D grid of one slice as 2D (2D data stored as NIfTI)."""
    image = read_sitk_image(path)
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        return image[:, :, 0]
    return image


def fingerprint_layout(layout: NiftiFolderLayout, seed: int = 0) -> Fingerprint:
    """Reads every case of a layout (images and labels) and describes them.

    Percentiles come from at most :data:`SAMPLES_PER_CASE` voxels per case (seeded),
    means, standard deviations, extremes and class counts from every voxel.
    """
    rng = np.random.default_rng(seed)
    num_channels, num_classes = len(layout.channel_names), len(layout.class_names)
    everything = [_Moments() for _ in range(num_channels)]
    foreground = [_Moments() for _ in range(num_channels)]
    class_counts = np.zeros(num_classes, np.int64)
    presence = np.zeros(num_classes, np.int64)
    spacings, shapes = [], []
    for case in layout.cases:
        label_image = _read(case.label_path)
        grid = Geometry.of(label_image)
        spacings.append(grid.spacing)
        shapes.append(grid.shape)
        label = sitk.GetArrayFromImage(label_image)
        counts = np.bincount(label.ravel().astype(np.int64), minlength=num_classes)
        if counts.size > num_classes:
            raise DatasetError(
                f"{case.label_path}: label values up to {counts.size - 1}, dataset.json "
                f"lists {num_classes} classes."
            )
        class_counts += counts
        presence += counts > 0
        mask = label > 0
        channels = [
            sitk.GetArrayFromImage(c)
            for path in case.image_paths
            for c in image_channels(_read(path))
        ]
        if len(channels) != num_channels:
            raise DatasetError(
                f"Case {case.uid}: {len(channels)} image channels, dataset.json lists "
                f"{num_channels}."
            )
        for c, values in enumerate(channels):
            everything[c].add(values, rng)
            foreground[c].add(values[mask], rng)
    return Fingerprint(
        spacings=tuple(spacings),
        shapes=tuple(shapes),
        channel_names=layout.channel_names,
        class_names=layout.class_names,
        intensity=tuple(m.summary() for m in everything),
        foreground_intensity=tuple(m.summary() for m in foreground),
        class_frequency=tuple(float(v) for v in class_counts / max(class_counts.sum(), 1)),
        class_presence=tuple(float(v) for v in presence / len(layout.cases)),
    )


# ---------------------------------------------------------------------------------------
# Rules (pure functions)


def target_spacing(
    spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]
) -> tuple[float, ...]:
    """The median spacing per axis, with nnU-Net v2's anisotropy rule.

    Let m be the per-axis median spacing and a the axis of the largest m_a. When
    ``m_a > 3 min(m)`` and the median size along a is ``< min(other median sizes) / 3``,
    the target along a is ``max(P10(spacings along a), max of the other m)``: the 10th
    percentile, so that the slice-thick cases are not all upsampled to the median.
    """
    spacing = np.median(np.asarray(spacings, np.float64), axis=0)
    sizes = np.median(np.asarray(shapes, np.float64), axis=0)
    axis = int(np.argmax(spacing))
    others = [i for i in range(len(spacing)) if i != axis]
    if (
        others
        and spacing[axis] > ANISOTROPY_RATIO * spacing.min()
        and sizes[axis] * ANISOTROPY_RATIO < sizes[others].min()
    ):
        low = np.percentile(np.asarray(spacings, np.float64)[:, axis], ANISOTROPIC_PERCENTILE)
        spacing[axis] = max(low, spacing[others].max())
    return tuple(float(s) for s in spacing)


def median_resampled_shape(
    spacings: Sequence[Sequence[float]],
    shapes: Sequence[Sequence[int]],
    spacing: Sequence[float],
) -> tuple[int, ...]:
    """Per-axis median of ``round(shape * spacing / target)`` over the cases."""
    sizes = np.round(np.asarray(shapes) * np.asarray(spacings) / np.asarray(spacing))
    return tuple(int(s) for s in np.median(np.maximum(sizes, 1), axis=0))


def first_downsampling(spacing: Sequence[float]) -> tuple[int, ...]:
    """2 on axes with ``spacing <= 2 min(spacing)``, else 1."""
    finest = min(spacing)
    return tuple(2 if s <= FIRST_DOWNSAMPLING_RATIO * finest else 1 for s in spacing)


def num_levels(patch_shape: Sequence[int], first: Sequence[int]) -> int:
    """Levels L <= 4 such that the bottom map ``patch / (first * 2^(L-2))`` keeps >= 4
    voxels per axis (level 0 is at the patch resolution; at least 2 levels)."""
    levels = 2
    while levels < MAX_LEVELS and all(
        p // (f * 2 ** (levels - 1)) >= MIN_BOTTOM for p, f in zip(patch_shape, first, strict=True)
    ):
        levels += 1
    return levels


def divisor(first: Sequence[int], levels: int) -> tuple[int, ...]:
    """Per axis, what the patch is a multiple of so every level's map is whole:
    ``first * 2^(L-2)``."""
    return tuple(f * 2 ** max(levels - 2, 0) for f in first)


def feature_elements(
    patch_shape: Sequence[int], first: Sequence[int], channels: Sequence[int]
) -> int:
    """``sum_l V_l C_l``: feature-map elements of one sample over the levels, with
    ``V_0 = prod(patch)`` and ``V_l = prod(patch / (first * 2^(l-1)))``."""
    total = 0
    for level, width in enumerate(channels):
        factor = [1] * len(first) if level == 0 else [f * 2 ** (level - 1) for f in first]
        total += width * math.prod(max(p // d, 1) for p, d in zip(patch_shape, factor, strict=True))
    return total


def sample_memory_bytes(
    patch_shape: Sequence[int], first: Sequence[int], channels: Sequence[int], res_blocks: int
) -> int:
    """Activation memory of one training sample:
    ``512 prod(patch) + 96 res_blocks sum_l V_l C_l`` bytes (see the constants)."""
    return BYTES_PER_INPUT_VOXEL * math.prod(
        patch_shape
    ) + BYTES_PER_FEATURE * res_blocks * feature_elements(patch_shape, first, channels)


def level_channels(base: int, levels: int) -> tuple[int, ...]:
    """``base * 2^l`` for l = 0..L-1."""
    return tuple(base * 2**level for level in range(levels))


def fit_patch(
    median_shape: Sequence[int],
    stored_shape: Sequence[int],
    first: Sequence[int],
    network: Network,
    budget_bytes: float,
) -> tuple[int, ...]:
    """The patch: the median shape rounded up to the levels' divisor (not past the stored
    shape rounded down to it), or the whole stored shape when that rounded median is
    within one divisor step of it on every axis; then shrunk while ``MIN_BATCH`` samples
    exceed the budget.

    Shrinking takes one divisor step off the axis with the largest ``patch / median``
    ratio (nnU-Net's rule), down to one divisor step per axis.
    """
    median = np.asarray(median_shape)
    stored = np.asarray(stored_shape)
    patch = np.minimum(median, stored)
    step = np.asarray(divisor(first, num_levels(tuple(patch), first)))
    if np.all(np.ceil(patch / step) * step >= stored - step):
        patch = stored
    while True:
        levels = num_levels(tuple(patch), first)
        step = np.asarray(divisor(first, levels))
        top = np.maximum(np.asarray(stored_shape) // step * step, step)
        patch = np.minimum(np.ceil(patch / step) * step, top).astype(int)
        channels = level_channels(network.base_channels, levels)
        memory = MIN_BATCH * sample_memory_bytes(patch, first, channels, network.num_res_blocks)
        if memory <= budget_bytes or np.all(patch <= step):
            return tuple(int(p) for p in patch)
        ratio = np.where(patch > step, patch / np.maximum(median, 1), -np.inf)
        axis = int(np.argmax(ratio))
        patch[axis] -= step[axis]


def batch_size(
    sample_bytes: float,
    budget_bytes: float,
    patch_shape: Sequence[int],
    train_voxels: float,
    max_batch: int | None = None,
) -> int:
    """``min(clip(floor(budget / sample), 2, cap), max_batch)`` with
    ``cap = max(2, floor(0.05 train_voxels / prod(patch)), floor(2^17 / prod(patch)))``.

    ``max_batch``: the fewest cases a training run of the build has (its train split, or
    a cross-validation fold's training cases), so that every epoch holds a batch."""
    by_memory = int(budget_bytes // max(sample_bytes, 1))
    voxels = math.prod(patch_shape)
    cap = max(
        MIN_BATCH, int(BATCH_DATASET_FRACTION * train_voxels // voxels), MIN_BATCH_VOXELS // voxels
    )
    batch = max(MIN_BATCH, min(by_memory, cap))
    return batch if max_batch is None else max(1, min(batch, max_batch))


# ---------------------------------------------------------------------------------------
# The plan


def default_memory_gb(device: str | None = None) -> float:
    """The activation budget of the device kind, GB: 75 % of the first accelerator's
    memory (XLA's ``bytes_limit``), or 25 % of the host memory on CPU.

    Args:
        device: ``cpu``, ``gpu``, ``tpu`` or None for JAX's default backend.
    """
    import jax

    kind = device or jax.default_backend()
    if kind != "cpu":
        stats = jax.devices(kind)[0].memory_stats() or {}
        if "bytes_limit" in stats:
            return ACCELERATOR_MEMORY_SHARE * stats["bytes_limit"] / 1e9
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return HOST_MEMORY_SHARE * host / 1e9


def default_device() -> str:
    """JAX's default backend: ``cpu``, ``gpu`` or ``tpu``."""
    import jax

    return jax.default_backend()


@dataclasses.dataclass(frozen=True)
class Plan:
    """The training plan of a dataset (stored grid, device kind, memory budget).

    Attributes:
        device: device kind the plan is for (``cpu``, ``gpu``, ``tpu``).
        memory_gb: activation budget, GB.
        spacing: target spacing of the build, mm.
        median_shape: median case shape on that spacing.
        stored_shape: shape of the stored images.
        patch_shape: training patch; None = whole stored images.
        batch_size: global batch size.
        num_channels: U-Net channels per level (its length is the number of levels).
        num_res_blocks, num_heads, dropout: of the device's network.
        first_downsampling: down-sampling factor per axis into level 1 (later ones 2).
        foreground_oversampling: share of patches centred on foreground.
        memory_estimate_gb: the batch's activation memory by the estimate.
    """

    device: str
    memory_gb: float
    spacing: tuple[float, ...]
    median_shape: tuple[int, ...]
    stored_shape: tuple[int, ...]
    patch_shape: tuple[int, ...] | None
    batch_size: int
    num_channels: tuple[int, ...]
    num_res_blocks: int
    num_heads: int
    dropout: float
    first_downsampling: tuple[int, ...]
    foreground_oversampling: float
    memory_estimate_gb: float

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        def ints(v: Any) -> tuple[int, ...] | None:
            return None if v is None else tuple(int(x) for x in v)

        return cls(
            device=str(data["device"]),
            memory_gb=float(data["memory_gb"]),
            spacing=tuple(float(x) for x in data["spacing"]),
            median_shape=ints(data["median_shape"]) or (),
            stored_shape=ints(data["stored_shape"]) or (),
            patch_shape=ints(data["patch_shape"]),
            batch_size=int(data["batch_size"]),
            num_channels=ints(data["num_channels"]) or (),
            num_res_blocks=int(data["num_res_blocks"]),
            num_heads=int(data["num_heads"]),
            dropout=float(data["dropout"]),
            first_downsampling=ints(data["first_downsampling"]) or (),
            foreground_oversampling=float(data["foreground_oversampling"]),
            memory_estimate_gb=float(data["memory_estimate_gb"]),
        )


def make_plan(
    fingerprint: Fingerprint,
    *,
    spacing: Sequence[float],
    stored_shape: Sequence[int],
    num_train_cases: int,
    device: str,
    memory_gb: float,
    max_batch: int | None = None,
) -> Plan:
    """The training plan from the fingerprint and the stored grid (rules above).

    Args:
        fingerprint: of the raw cases.
        spacing: the build's target spacing (:func:`target_spacing` unless the user gave
            one).
        stored_shape: the build's stored image shape.
        num_train_cases: cases in the train split (for the batch's 5 % rule).
        device: ``cpu``, ``gpu`` or ``tpu`` (chooses the network width).
        memory_gb: activation budget, GB.
        max_batch: the fewest cases a training run of the build has (train split or a
            cross-validation fold's training cases); the batch is at most that.
    """
    if device not in NETWORKS:
        raise DatasetError(f"Unknown device kind {device!r}; choose one of {sorted(NETWORKS)}.")
    if memory_gb <= 0:
        raise DatasetError(f"The memory budget must be positive, got {memory_gb} GB.")
    network = NETWORKS[device]
    spacing = tuple(float(s) for s in spacing)
    stored = tuple(int(s) for s in stored_shape)
    median = median_resampled_shape(fingerprint.spacings, fingerprint.shapes, spacing)
    first = first_downsampling(spacing)
    budget = memory_gb * 1e9
    patch = fit_patch(median, stored, first, network, budget)
    channels = level_channels(network.base_channels, num_levels(patch, first))
    sample = sample_memory_bytes(patch, first, channels, network.num_res_blocks)
    batch = batch_size(sample, budget, patch, num_train_cases * math.prod(median), max_batch)
    whole = patch == stored
    return Plan(
        device=device,
        memory_gb=float(memory_gb),
        spacing=spacing,
        median_shape=median,
        stored_shape=stored,
        patch_shape=None if whole else patch,
        batch_size=batch,
        num_channels=channels,
        num_res_blocks=network.num_res_blocks,
        num_heads=network.num_heads,
        dropout=network.dropout,
        first_downsampling=first,
        foreground_oversampling=0.0 if whole else PATCH_FOREGROUND_FRACTION,
        memory_estimate_gb=batch * sample / 1e9,
    )


# ---------------------------------------------------------------------------------------
# plan.json


def write_plan(folder: str | Path, fingerprint: Fingerprint, plan: Plan) -> Path:
    """Writes ``folder/plan.json`` atomically (a temporary file renamed into place)."""
    folder = Path(folder)
    data = {"version": PLAN_VERSION, "plan": plan.to_json(), "fingerprint": fingerprint.to_json()}
    fd, tmp = tempfile.mkstemp(prefix=".plan-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, folder / PLAN_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / PLAN_FILE


def read_plan(folder: str | Path) -> tuple[Fingerprint, Plan] | None:
    """The fingerprint and plan of ``folder/plan.json``, None if there is none.

    Raises:
        DatasetError: the file is there but unreadable or of another version.
    """
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {PLAN_VERSION}")
        return Fingerprint.from_json(data["fingerprint"]), Plan.from_json(data["plan"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(
            f"{path}: not a readable imgx plan ({exc}); remake it with `imgx plan NAME`."
        ) from exc
