"""New scans for prediction: finding their files, putting them on a dataset's grid, and
writing predictions back onto their own grid.

Prediction runs on the whole resampled scan (sliding windows, no crop), so the inverse is
a plain resampling back to the scan's grid (:func:`restore_scan_label`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from imgx_data.errors import DatasetError
from imgx_data.io import (
    Geometry,
    check_same_geometry,
    compose_channels,
    image_channels,
    read_sitk_image,
)
from imgx_data.preprocess import prepare_image, resample_to_geometry, scale_intensity

IMAGE_ENDINGS = (".nii.gz", ".nii", ".png", ".mha", ".nrrd")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _split_ending(path: Path) -> tuple[str, str] | None:
    name = path.name
    for ending in IMAGE_ENDINGS:
        if name.lower().endswith(ending):
            return name[: -len(ending)], ending
    return None


def find_scans(folder: str | Path, num_channels: int) -> dict[str, list[Path]]:
    """Groups the image files of a folder into cases.

    nnU-Net naming ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... gives one case with
    those channels; with one channel, a plain ``<case>.nii.gz`` (or ``.nii``, ``.png``,
    ``.mha``, ``.nrrd``) is a case too.

    Returns:
        Case name -> channel files in channel order, sorted by case name.

    Raises:
        DatasetError: no image files, or a case lacks a channel.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder of scans not found.")
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        parts = _split_ending(path) if path.is_file() else None
        if parts is None:
            continue
        match = _CHANNEL.match(parts[0])
        if match:
            cases.setdefault(match["case"], {})[int(match["channel"])] = path
        elif num_channels == 1:
            cases.setdefault(parts[0], {})[0] = path
    if not cases:
        raise DatasetError(f"{folder}: no image files ({', '.join(IMAGE_ENDINGS)}).")
    result = {}
    for case, channels in sorted(cases.items()):
        if sorted(channels) != list(range(num_channels)):
            raise DatasetError(
                f"{folder}: case {case} has channels {sorted(channels)}, the model needs "
                f"{list(range(num_channels))} (files {case}_0000 to "
                f"{case}_{num_channels - 1:04d})."
            )
        result[case] = [channels[c] for c in range(num_channels)]
    return result


@dataclasses.dataclass(frozen=True)
class PreparedScan:
    """A new scan on the dataset's spacing, ready for sliding-window prediction.

    Attributes:
        image: float32 ``(*spatial, channels)`` with the dataset's intensity policy.
        grid: the resampled grid of ``image``.
        original: the scan's own grid, where predictions are written.
    """

    image: np.ndarray
    grid: Geometry
    original: Geometry


def prepare_scan(
    paths: Sequence[str | Path],
    *,
    spacing: Sequence[float],
    num_channels: int,
    intensity: Any,
    case: str = "",
) -> PreparedScan:
    """Reads a scan's channel files and puts them on a dataset's spacing and intensities.

    Use the dataset's ``DatasetInfo`` values: ``spacing``, ``num_channels``, ``intensity``.
    No crop or pad: the whole scan is kept for sliding-window prediction.

    Raises:
        DatasetError: unreadable files, channel grids that disagree, NaN/inf intensities,
            or a channel count or dimension that does not match the dataset.
    """
    case = case or Path(paths[0]).name
    images, reference = [], None
    for path in paths:
        image = read_sitk_image(path)
        if image.GetDimension() == 3 and image.GetSize()[2] == 1 and len(spacing) == 2:
            image = image[:, :, 0]
        geometry = Geometry.of(image)
        if reference is None:
            reference = geometry
        else:
            check_same_geometry(
                reference, geometry, case=case, reference_name=str(paths[0]), other_name=str(path)
            )
        array = sitk.GetArrayViewFromImage(image)
        if not np.all(np.isfinite(array)):
            raise DatasetError(f"{path}: NaN or infinite intensities.")
        images += image_channels(image)
    if reference is None:
        raise DatasetError("prepare_scan needs at least one file.")
    if reference.ndim != len(spacing):
        raise DatasetError(f"Case {case}: a {reference.ndim}D scan for a {len(spacing)}D dataset.")
    if len(images) != num_channels:
        raise DatasetError(f"Case {case}: {len(images)} channels, the dataset has {num_channels}.")
    composed = compose_channels(images)
    same = np.allclose(reference.spacing, spacing, rtol=1e-5, atol=1e-3)
    array, grid, original = prepare_image(composed, target_spacing=None if same else spacing)
    return PreparedScan(scale_intensity(array, intensity), grid, original)


def restore_scan_label(label: np.ndarray, scan: PreparedScan) -> np.ndarray:
    """A label map predicted on ``scan.grid`` resampled (nearest) onto ``scan.original``."""
    return resample_to_geometry(np.asarray(label), scan.grid, scan.original, is_label=True)
