"""Reading and writing medical images with their geometry (NIfTI, PNG) via SimpleITK.

Axis convention shared by all imgx packages: arrays are in physical axis order
``(x, y[, z])``, i.e. the transpose of SimpleITK's ``(z, y, x)`` array, so that
``spacing[i]`` belongs to array axis ``i`` and equals ``GetSpacing()[i]``. For a 2D
PNG, ``x`` is the column and ``y`` the row. Channels, where present, are last.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

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


def check_intensities(image: sitk.Image, path: str | Path) -> None:
    """Raises DatasetError if an image holds NaN/inf values or a channel is constant.

    Intensity normalisation would silently turn either into an image of zeros: nothing to
    segment, and at prediction time a confident prediction of nothing.
    """
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if not np.all(finite):
        count = int(np.size(array) - np.count_nonzero(finite))
        raise DatasetError(f"{path}: {count} NaN or infinite values; fix or drop the file.")
    channels = np.reshape(array, (-1, image.GetNumberOfComponentsPerPixel()))
    for c in range(channels.shape[1]):
        lo, hi = channels[:, c].min(), channels[:, c].max()
        if lo == hi:
            channel = f" (channel {c})" if channels.shape[1] > 1 else ""
            raise DatasetError(
                f"{path}: every voxel{channel} has the value {lo:g}: a constant image has "
                "nothing to segment (normalised, it would become all zeros); fix or drop "
                "the file."
            )


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


def _utf8_problem(path: Path) -> str | None:
    """Why SimpleITK cannot be given ``path``, or None.

    A file name that is not valid UTF-8 (on Linux, bytes such as ``b"case\\xff.nii.gz"``
    that ``os.listdir`` returns surrogate-escaped, ``"case\\udcff.nii.gz"``) makes
    SimpleITK abort the whole process instead of raising.
    """
    for part in reversed(path.parts):
        try:
            part.encode("utf-8")
        except UnicodeEncodeError:
            what = "file name" if part == path.name else f"folder name {part!r} in the path"
            return (
                f"{path}: the {what} is not valid UTF-8 ({part!r}, bytes "
                f"{os.fsencode(part)!r}), which SimpleITK cannot open: rename it to a "
                "UTF-8 name."
            )
    return None


def sitk_path(path: str | Path) -> str:
    """``path`` as the str to give SimpleITK, checked to be valid UTF-8 first.

    Raises:
        DatasetError: naming the file (its name's repr) and the fix, rename it.
    """
    problem = _utf8_problem(Path(path))
    if problem is not None:
        raise DatasetError(problem)
    return str(path)


def _read_sitk(path: Path) -> sitk.Image:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found.")
    try:
        return sitk.ReadImage(sitk_path(path))
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


# NIfTI-1/2 float datatype codes -> numpy dtype (float128 / complex256 are left to ITK).
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8", 32: "c8", 1792: "c16"}
_NIFTI_CHUNK_BYTES = 1 << 24


def _nifti_layout(header: bytes) -> tuple[np.dtype, int, int] | None:
    """``(dtype, voxel count, data offset)`` of a single-file NIfTI-1/2 header whose data
    is floating point, else None (integer data, ``.hdr``/``.img`` pairs, not NIfTI).

    NIfTI-1 (348-byte header): ``dim`` int16[8] at 40, ``datatype`` int16 at 70,
    ``vox_offset`` float32 at 108, magic ``n+1`` at 344. NIfTI-2 (540 bytes): magic
    ``n+2`` at 4, ``datatype`` int16 at 12, ``dim`` int64[8] at 16, ``vox_offset`` int64
    at 168. The byte order is the one in which ``sizeof_hdr`` reads 348 or 540.
    """
    if len(header) < 348:
        return None
    for order in "<>":
        size = int(np.frombuffer(header, f"{order}i4", count=1)[0])
        if size == 348 and header[344:347] == b"n+1":
            datatype = int(np.frombuffer(header, f"{order}i2", count=1, offset=70)[0])
            dim = np.frombuffer(header, f"{order}i2", count=8, offset=40).astype(np.int64)
            offset = int(np.frombuffer(header, f"{order}f4", count=1, offset=108)[0])
            offset = max(offset, 352)
            break
        if size == 540 and len(header) >= 540 and header[4:7] == b"n+2":
            datatype = int(np.frombuffer(header, f"{order}i2", count=1, offset=12)[0])
            dim = np.frombuffer(header, f"{order}i8", count=8, offset=16)
            offset = max(int(np.frombuffer(header, f"{order}i8", count=1, offset=168)[0]), 544)
            break
    else:
        return None
    if datatype not in _NIFTI_FLOAT_TYPES or not 1 <= dim[0] <= 7:
        return None
    count = int(np.prod(np.maximum(dim[1 : dim[0] + 1], 1)))
    return np.dtype(order + _NIFTI_FLOAT_TYPES[datatype]), count, offset


def _open_nifti(path: Path) -> BinaryIO:
    with path.open("rb") as file:
        gzipped = file.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else path.open("rb")


def nifti_nonfinite_count(path: str | Path) -> int:
    """Number of NaN or infinite values in the raw voxel data of a NIfTI file.

    ITK's NIfTI reader silently turns NaN and infinity into 0, so a check on the image it
    returns cannot see them; this reads the raw data (``.nii`` or gzipped ``.nii.gz``) with
    numpy in chunks, for floating-point datatypes only.

    Returns:
        The count; 0 for integer data, other formats, and headers that are not single-file
        NIfTI-1/2 (unreadable files are left to the image reader to report).
    """
    path = Path(path)
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")) or not path.is_file():
        return 0
    try:
        with _open_nifti(path) as file:
            layout = _nifti_layout(file.read(540))
            if layout is None:
                return 0
            dtype, count, offset = layout
            file.seek(offset)
            remaining, bad = count * dtype.itemsize, 0
            chunk = max(_NIFTI_CHUNK_BYTES // dtype.itemsize, 1) * dtype.itemsize
            while remaining > 0:
                wanted = min(chunk, remaining)
                data = file.read(wanted)
                values = np.frombuffer(data, dtype, count=len(data) // dtype.itemsize)
                bad += values.size - int(np.count_nonzero(np.isfinite(values)))
                if len(data) < wanted:
                    break  # truncated: the image reader reports it
                remaining -= wanted
            return bad
    except (OSError, EOFError, ValueError, zlib.error):
        return 0


def check_nifti_finite(path: str | Path) -> None:
    """Raises DatasetError naming ``path`` if its raw NIfTI data holds NaN or infinity."""
    bad = nifti_nonfinite_count(path)
    if bad:
        raise DatasetError(
            f"{path}: {bad} NaN or infinite values in the raw NIfTI data (ITK would "
            "read them as 0); fix or drop the file."
        )


def read_sitk_image(path: str | Path) -> sitk.Image:
    """Reads one image file (NIfTI, PNG, ...) with SimpleITK; PNG colour becomes grayscale.

    4D NIfTI files (Medical Segmentation Decathlon multi-channel images) are returned as a
    3D vector image with the 4th axis as channels. Floating-point NIfTI files are first
    checked for NaN/infinity in their raw data (:func:`nifti_nonfinite_count`), which ITK's
    reader would silently turn into 0.

    Raises:
        DatasetError: the file is missing, unreadable, named in bytes that are not valid
            UTF-8 (:func:`sitk_path`), or a NIfTI file holds NaN/infinity.
    """
    path = Path(path)
    sitk_path(path)
    check_nifti_finite(path)
    image = _read_sitk(path)
    if image.GetDimension() == 4:
        channels = [image[:, :, :, c] for c in range(image.GetSize()[3])]
        return sitk.Compose(channels) if len(channels) > 1 else channels[0]
    if path.suffix.lower() == ".png":
        image = _to_grayscale(image)
    return image


def read_header(path: str | Path) -> Geometry:
    """Grid of an image file from its header only (spatial part of a 4D file).

    Raises:
        DatasetError: the file is missing, unreadable or not named in UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found.")
    reader = sitk.ImageFileReader()
    reader.SetFileName(sitk_path(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DatasetError(f"{path}: cannot be read as an image.") from exc
    ndim = min(reader.GetDimension(), 3)
    direction = np.asarray(reader.GetDirection()).reshape(reader.GetDimension(), -1)
    return Geometry(
        shape=tuple(int(s) for s in reader.GetSize()[:ndim]),
        spacing=tuple(float(s) for s in reader.GetSpacing()[:ndim]),
        origin=tuple(float(s) for s in reader.GetOrigin()[:ndim]),
        direction=tuple(float(v) for v in direction[:ndim, :ndim].ravel()),
    )


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
    name = sitk_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(array_to_sitk(array, geometry), name, useCompression=True)
