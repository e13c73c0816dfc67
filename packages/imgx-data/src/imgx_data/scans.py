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

from imgx_data.errors import DatasetError
from imgx_data.io import (
    Geometry,
    check_intensities,
    check_same_geometry,
    compose_channels,
    image_channels,
    read_sitk_image,
    sitk_path,
)
from imgx_data.preprocess import prepare_image, resample_to_geometry, scale_intensity

IMAGE_ENDINGS = (".nii.gz", ".nii", ".png", ".mha", ".nrrd")
#: Fewest voxels along each axis of a scan for a 3D model; one slice is a 2D image.
MIN_3D_SIZE = 2
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _split_ending(path: Path) -> tuple[str, str] | None:
    name = path.name
    for ending in IMAGE_ENDINGS:
        if name.lower().endswith(ending):
            return name[: -len(ending)], ending
    return None


@dataclasses.dataclass(frozen=True)
class FoundScans:
    """The cases of a folder of new scans, and the files that cannot be used.

    Attributes:
        cases: case name -> channel files in channel order, sorted by case name.
        problems: ``(file, message)`` for each case or file that cannot be predicted (a
            channel missing or too many, a file that does not fit the naming), sorted by
            file; the message names the file and what is expected.
    """

    cases: dict[str, list[Path]]
    problems: list[tuple[Path, str]]


def _channel_names(case: str, num_channels: int) -> str:
    if num_channels == 1:
        return f"{case}_0000 (or {case} without a suffix)"
    return f"{case}_0000 to {case}_{num_channels - 1:04d}"


def case_of(path: str | Path) -> str | None:
    """The case name of an image file (``<case>_0000.nii.gz`` or ``<case>.nii.gz``).

    None for a file that is not an image (its ending is none of ``IMAGE_ENDINGS``).
    """
    parts = _split_ending(Path(path))
    if parts is None:
        return None
    match = _CHANNEL.match(parts[0])
    return match["case"] if match else parts[0]


def find_scans(folder: str | Path, num_channels: int, *, case: str | None = None) -> FoundScans:
    """Groups the image files of a folder into cases; lists those that cannot be used.

    nnU-Net naming ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... gives one case with
    those channels; with one channel, a plain ``<case>.nii.gz`` (or ``.nii``, ``.png``,
    ``.mha``, ``.nrrd``) is a case too. Files with other endings are ignored. A case whose
    channels are not exactly ``0 .. num_channels - 1`` (one missing, one too many, two
    files for one channel), an image file without a channel suffix when the model takes
    several channels and a file whose name is not valid UTF-8 (which SimpleITK cannot
    open) are reported in ``problems``, so the other cases can still be predicted.

    Args:
        folder: the folder of scans.
        num_channels: image channels the model takes.
        case: only look at this case's files (a single input file's case).

    Raises:
        DatasetError: not a folder, or no image file in it (of ``case``, when given).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder of scans not found.")
    channels: dict[str, dict[int, list[Path]]] = {}
    problems: list[tuple[Path, str]] = []
    found = False
    for path in sorted(folder.iterdir()):
        parts = _split_ending(path) if path.is_file() else None
        if parts is None:
            continue
        match = _CHANNEL.match(parts[0])
        if case is not None and (match["case"] if match else parts[0]) != case:
            continue
        found = True
        try:
            sitk_path(path)
        except DatasetError as error:  # SimpleITK would abort the process on this name
            problems.append((path, str(error)))
            continue
        if match:
            channels.setdefault(match["case"], {}).setdefault(int(match["channel"]), []).append(
                path
            )
        elif num_channels == 1:
            channels.setdefault(parts[0], {}).setdefault(0, []).append(path)
        else:
            problems.append(
                (
                    path,
                    f"{path}: no channel suffix, but the model takes {num_channels} channels: "
                    f"name the files {_channel_names(parts[0], num_channels)}.",
                )
            )
    if not found:
        what = f"of case {case} " if case is not None else ""
        raise DatasetError(
            f"{folder}: no image files {what}({', '.join(IMAGE_ENDINGS)}); put the scans "
            f"there as <case>_0000.nii.gz, <case>_0001.nii.gz, ... (one file per channel)."
        )
    cases = {}
    expected = list(range(num_channels))
    for name, files in sorted(channels.items()):
        first = min(p for paths in files.values() for p in paths)
        doubled = [paths for paths in files.values() if len(paths) > 1]
        extra = sorted(set(files) - set(expected))
        missing = sorted(set(expected) - set(files))
        if doubled:
            culprit = doubled[0][1]
            names = ", ".join(p.name for p in doubled[0])
            message = f"{culprit}: case {name} has several files for one channel ({names})"
        elif extra:
            culprit = files[extra[0]][0]
            names = ", ".join(p.name for c in extra for p in files[c])
            message = f"{culprit}: case {name} has channels {sorted(files)} ({names} too many)"
        elif missing:
            culprit = first
            names = ", ".join(f"{name}_{c:04d}" for c in missing)
            message = f"{culprit}: case {name} has channels {sorted(files)} ({names} missing)"
        else:
            cases[name] = [files[c][0] for c in expected]
            continue
        plural = "s" if num_channels > 1 else ""
        message += (
            f"; the model takes {num_channels} channel{plural}, files "
            f"{_channel_names(name, num_channels)}."
        )
        problems.append((culprit, message))
    return FoundScans(cases, sorted(problems))


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
        DatasetError: unreadable files, channel grids that disagree, NaN/inf or constant
            intensities, a channel count or dimension that does not match the dataset, or a
            single slice (``(x, y, 1)``) for a 3D dataset.
    """
    case = case or Path(paths[0]).name
    ndim = len(spacing)
    images, reference = [], None
    for path in paths:
        image = read_sitk_image(path)
        size = tuple(image.GetSize())
        if image.GetDimension() == 3 and size[2] == 1 and ndim == 2:
            image = image[:, :, 0]
        elif image.GetDimension() != ndim:
            raise DatasetError(
                f"{path}: a {image.GetDimension()}D image of shape {size}, but the model "
                f"segments {ndim}D images: give "
                + (
                    "a 2D image (PNG, or NIfTI with one slice)."
                    if ndim == 2
                    else f"a 3D volume of at least {MIN_3D_SIZE} voxels along each axis."
                )
            )
        elif ndim == 3 and min(size) < MIN_3D_SIZE:
            raise DatasetError(
                f"{path}: shape {size} is a 2D image stored as a 3D volume, but the model "
                f"segments 3D volumes: give a volume of at least {MIN_3D_SIZE} voxels along "
                f"each axis (or use a 2D model)."
            )
        geometry = Geometry.of(image)
        if reference is None:
            reference = geometry
        else:
            check_same_geometry(
                reference, geometry, case=case, reference_name=str(paths[0]), other_name=str(path)
            )
        check_intensities(image, path)
        images += image_channels(image)
    if reference is None:
        raise DatasetError("prepare_scan needs at least one file.")
    if len(images) != num_channels:
        raise DatasetError(
            f"{paths[0]}: case {case} has {len(images)} image channels, the model takes "
            f"{num_channels}: give one file per channel ({_channel_names(case, num_channels)})."
        )
    composed = compose_channels(images)
    same = np.allclose(reference.spacing, spacing, rtol=1e-5, atol=1e-3)
    array, grid, original = prepare_image(composed, target_spacing=None if same else spacing)
    return PreparedScan(scale_intensity(array, intensity), grid, original)


def restore_scan_label(label: np.ndarray, scan: PreparedScan) -> np.ndarray:
    """A label map predicted on ``scan.grid`` resampled (nearest) onto ``scan.original``."""
    return resample_to_geometry(np.asarray(label), scan.grid, scan.original, is_label=True)
