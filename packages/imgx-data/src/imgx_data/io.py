"""Reading and writing medical images with their geometry (NIfTI, PNG) via SimpleITK.

Axis convention shared by all imgx packages: arrays are in physical axis order
``(x, y[, z])``, i.e. the transpose of SimpleITK's ``(z, y, x)`` array, so that
``spacing[i]`` belongs to array axis ``i`` and equals ``GetSpacing()[i]``. For a 2D
PNG, ``x`` is the column and ``y`` the row. Channels, where present, are last.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from imgx_data.errors import DatasetError

# Geometry agreement tolerances (numpy.allclose semantics), in mm for spacing/origin.
GEOMETRY_RTOL = 1e-5
GEOMETRY_ATOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The physical grid of an image.

    A voxel with index ``i`` (array order ``(x, y[, z])``) sits at the physical point
    ``origin + D @ (spacing * i)`` in mm, with ``D`` the direction cosine matrix.

    Attributes:
        shape: spatial array shape ``(x, y[, z])``.
        spacing: voxel size per array axis, mm.
        origin: physical position of the centre of voxel 0, mm.
        direction: ``D`` flattened row-major (``ndim * ndim`` values), as in SimpleITK.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        ndim = len(self.shape)
        if not (len(self.spacing) == len(self.origin) == ndim and len(self.direction) == ndim**2):
            raise ValueError(f"Inconsistent geometry dimensions: {self}.")

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions."""
        return len(self.shape)

    @property
    def direction_matrix(self) -> np.ndarray:
        """Direction cosines as an ``(ndim, ndim)`` matrix."""
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        """The geometry of a SimpleITK image."""
        return cls(
            shape=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(s) for s in image.GetOrigin()),
            direction=tuple(float(s) for s in image.GetDirection()),
        )

    @classmethod
    def identity(cls, shape: Sequence[int], spacing: Sequence[float]) -> Geometry:
        """Axis-aligned grid with origin 0, e.g. for PNGs and generated data."""
        ndim = len(shape)
        return cls(
            shape=tuple(int(s) for s in shape),
            spacing=tuple(float(s) for s in spacing),
            origin=(0.0,) * ndim,
            direction=tuple(float(v) for v in np.eye(ndim).ravel()),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Sets spacing, origin and direction of ``image`` to this geometry."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def check_same_geometry(
    reference: Geometry,
    other: Geometry,
    *,
    case: str,
    reference_name: str,
    other_name: str,
) -> None:
    """Raises DatasetError naming the case and field where two grids disagree.

    Shapes must be equal; spacing, origin and direction agree within
    ``|a - b| <= atol + rtol * |b|`` (rtol 1e-5, atol 1e-3).
    """
    if reference.shape != other.shape:
        raise DatasetError(
            f"Case {case}: size of {other_name} {other.shape} differs from size of "
            f"{reference_name} {reference.shape}; the files of one case must share one grid."
        )
    for field in ("spacing", "origin", "direction"):
        a, b = getattr(other, field), getattr(reference, field)
        if not np.allclose(a, b, rtol=GEOMETRY_RTOL, atol=GEOMETRY_ATOL):
            raise DatasetError(
                f"Case {case}: {field} of {other_name} {a} differs from {field} of "
                f"{reference_name} {b} (rtol {GEOMETRY_RTOL}, atol {GEOMETRY_ATOL}); "
                "resample or fix the header so that the files of one case share one grid."
            )


def sitk_to_array(image: sitk.Image) -> np.ndarray:
    """SimpleITK image to an array in ``(x, y[, z])`` order (channels last if vector)."""
    array = sitk.GetArrayFromImage(image)
    ndim = image.GetDimension()
    spatial = tuple(reversed(range(ndim)))
    if image.GetNumberOfComponentsPerPixel() > 1:
        return np.transpose(array, (*spatial, ndim))
    return np.transpose(array, spatial)


def array_to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """Array in ``(x, y[, z])`` order (optionally ``(..., channels)``) to a SimpleITK image."""
    array = np.asarray(array)
    ndim = geometry.ndim
    if array.shape[:ndim] != geometry.shape or array.ndim not in (ndim, ndim + 1):
        raise ValueError(
            f"Array of shape {array.shape} does not match the geometry shape {geometry.shape}."
        )
    spatial = tuple(reversed(range(ndim)))
    if array.ndim == ndim:
        image = sitk.GetImageFromArray(np.transpose(array, spatial))
    else:
        image = sitk.GetImageFromArray(np.transpose(array, (*spatial, ndim)), isVector=True)
    return geometry.apply_to(image)


def _read_sitk(path: Path) -> sitk.Image:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found.")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise DatasetError(f"{path}: cannot be read as an image ({first_line}).") from exc


def _to_grayscale(image: sitk.Image) -> sitk.Image:
    """RGB(A) PNGs to one channel by the ITU-R BT.601 luma weights."""
    if image.GetNumberOfComponentsPerPixel() == 1:
        return image
    array = sitk.GetArrayViewFromImage(image).astype(np.float64)
    luma = array[..., :3] @ np.array([0.299, 0.587, 0.114])
    gray = sitk.GetImageFromArray(np.round(luma).astype(np.uint8))
    gray.CopyInformation(image)
    return gray


def read_sitk_image(path: str | Path) -> sitk.Image:
    """Reads one image file (NIfTI, PNG, ...) with SimpleITK; PNG colour becomes grayscale.

    4D NIfTI files (Medical Segmentation Decathlon multi-channel images) are returned as a
    3D vector image with the 4th axis as channels.

    Raises:
        DatasetError: the file is missing or unreadable.
    """
    path = Path(path)
    image = _read_sitk(path)
    if image.GetDimension() == 4:
        channels = [image[:, :, :, c] for c in range(image.GetSize()[3])]
        return sitk.Compose(channels) if len(channels) > 1 else channels[0]
    if path.suffix.lower() == ".png":
        image = _to_grayscale(image)
    return image


def image_channels(image: sitk.Image) -> list[sitk.Image]:
    """The channels of a (vector) image as scalar float32 images."""
    count = image.GetNumberOfComponentsPerPixel()
    if count == 1:
        return [sitk.Cast(image, sitk.sitkFloat32)]
    return [
        sitk.Cast(sitk.VectorIndexSelectionCast(image, c), sitk.sitkFloat32) for c in range(count)
    ]


def compose_channels(channels: Sequence[sitk.Image]) -> sitk.Image:
    """One scalar image or a vector image of several on the first one's grid."""
    if len(channels) == 1:
        return channels[0]
    for channel in channels[1:]:
        channel.CopyInformation(channels[0])
    return sitk.Compose(list(channels))


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Reads an image file into an ``(x, y[, z][, channels])`` array and its Geometry.

    Args:
        path: a NIfTI (``.nii``, ``.nii.gz``), PNG or other SimpleITK-readable file.

    Returns:
        The array (the file's dtype) and the grid geometry.

    Raises:
        DatasetError: the file is missing or unreadable.
    """
    image = read_sitk_image(path)
    return sitk_to_array(image), Geometry.of(image)


def read_channels(paths: Sequence[str | Path], *, case: str) -> tuple[np.ndarray, Geometry]:
    """Reads the channel files of one case (``_0000``, ``_0001``, ...) into one array.

    Returns:
        float32 array ``(*spatial, channels)`` and the shared geometry.

    Raises:
        DatasetError: a file is missing/unreadable or the grids disagree.
    """
    arrays, reference = [], None
    for path in paths:
        array, geometry = read_image(path)
        if reference is None:
            reference = geometry
        else:
            check_same_geometry(
                reference,
                geometry,
                case=case,
                reference_name=Path(paths[0]).name,
                other_name=Path(path).name,
            )
        arrays.append(array[..., None] if array.ndim == geometry.ndim else array)
    if reference is None:
        raise DatasetError(f"Case {case}: no image files given.")
    return np.concatenate(arrays, axis=-1).astype(np.float32), reference


def write_image(path: str | Path, array: np.ndarray, geometry: Geometry) -> None:
    """Writes an ``(x, y[, z])`` array with its geometry; the format follows the suffix.

    NIfTI keeps spacing, origin and direction exactly; PNG (2D only) stores the values
    as they are, so the array must be integer-valued in ``[0, 255]``.
    """
    path = Path(path)
    array = np.asarray(array)
    if path.suffix.lower() == ".png":
        if geometry.ndim != 2:
            raise ValueError(f"{path}: PNG holds 2D images, got a {geometry.ndim}D geometry.")
        if array.min(initial=0) < 0 or array.max(initial=0) > 255:
            raise ValueError(
                f"{path}: PNG values must be in [0, 255], got [{array.min()}, {array.max()}]."
            )
        array = array.astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(array_to_sitk(array, geometry), str(path), useCompression=True)
