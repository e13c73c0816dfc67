"""Tests of image I/O and the (x, y[, z]) axis convention."""

import gzip
import os
import re
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from imgx_data import DatasetError, Geometry, read_channels, read_image, write_image
from imgx_data.io import (
    check_same_geometry,
    nifti_nonfinite_count,
    read_header,
    read_sitk_image,
)

GEOMETRY_3D = Geometry(
    shape=(5, 4, 3),
    spacing=(0.5, 0.8, 2.5),
    origin=(-10.0, 3.0, 7.5),
    direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0),
)


def test_nifti_round_trip_keeps_axes_and_geometry(tmp_path):
    """Array axis i is SimpleITK's size/spacing index i; the file holds the geometry."""
    array = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    path = tmp_path / "x.nii.gz"
    write_image(path, array, GEOMETRY_3D)
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (5, 4, 3)
    np.testing.assert_allclose(image.GetSpacing(), GEOMETRY_3D.spacing)
    # SimpleITK indexes (x, y, z) in GetPixel, like our arrays.
    assert image.GetPixel(4, 1, 2) == array[4, 1, 2]
    read, geometry = read_image(path)
    np.testing.assert_array_equal(read, array)
    assert geometry.shape == GEOMETRY_3D.shape
    np.testing.assert_allclose(geometry.origin, GEOMETRY_3D.origin, atol=1e-5)
    np.testing.assert_allclose(geometry.direction, GEOMETRY_3D.direction, atol=1e-6)


def test_png_is_read_as_column_row(tmp_path):
    rows_cols = np.zeros((3, 7), dtype=np.uint8)  # 3 rows, 7 columns
    rows_cols[1, 5] = 200
    path = tmp_path / "x.png"
    sitk.WriteImage(sitk.GetImageFromArray(rows_cols), str(path))
    array, geometry = read_image(path)
    assert array.shape == (7, 3)
    assert array[5, 1] == 200
    assert geometry.spacing == (1.0, 1.0)


def test_rgb_png_becomes_grayscale(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 1] = (100, 100, 100)
    path = tmp_path / "c.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    array, _ = read_image(path)
    assert array.shape == (3, 2)
    assert array[1, 0] == 100


def test_read_channels_stacks_last_and_checks_geometry(tmp_path):
    a, b = np.ones((5, 4, 3)), 2 * np.ones((5, 4, 3))
    write_image(tmp_path / "c_0000.nii.gz", a, GEOMETRY_3D)
    write_image(tmp_path / "c_0001.nii.gz", b, GEOMETRY_3D)
    array, geometry = read_channels(
        [tmp_path / "c_0000.nii.gz", tmp_path / "c_0001.nii.gz"], case="c"
    )
    assert array.shape == (5, 4, 3, 2)
    np.testing.assert_array_equal(array[..., 1], 2)
    assert geometry.shape == (5, 4, 3)
    shifted = Geometry(
        GEOMETRY_3D.shape, GEOMETRY_3D.spacing, (-10.0, 3.0, 7.6), GEOMETRY_3D.direction
    )
    write_image(tmp_path / "c_0002.nii.gz", b, shifted)
    with pytest.raises(DatasetError, match=r"Case c: origin of c_0002.nii.gz"):
        read_channels([tmp_path / "c_0000.nii.gz", tmp_path / "c_0002.nii.gz"], case="c")


@pytest.mark.parametrize(
    ("field", "value", "passes"),
    [
        ("spacing", (0.5 + 5e-4, 0.8, 2.5), True),  # within atol 1e-3
        ("spacing", (0.5 + 5e-3, 0.8, 2.5), False),
        ("origin", (-10.0, 3.0, 7.5 + 2e-3), False),
        ("shape", (5, 4, 4), False),
    ],
)
def test_geometry_tolerance(field, value, passes):
    other = Geometry(**{**vars(GEOMETRY_3D), field: value})
    if passes:
        check_same_geometry(GEOMETRY_3D, other, case="k", reference_name="a", other_name="b")
    else:
        name = "size" if field == "shape" else field
        with pytest.raises(DatasetError, match=rf"Case k: {name} of b"):
            check_same_geometry(GEOMETRY_3D, other, case="k", reference_name="a", other_name="b")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        read_image(tmp_path / "none.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"bad.nii.gz: cannot be read"):
        read_image(bad)


def test_png_write_round_trip_and_range(tmp_path):
    label = np.zeros((7, 3), np.uint8)  # (x = columns, y = rows)
    label[5, 1] = 2
    geometry = Geometry.identity((7, 3), (1.0, 1.0))
    write_image(tmp_path / "p.png", label, geometry)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.png")))[1, 5] == 2
    read, _ = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(read, label)
    with pytest.raises(ValueError, match=r"PNG values must be in \[0, 255\]"):
        write_image(tmp_path / "q.png", label.astype(np.int32) * 200, geometry)


def _nifti1(order: str, data: np.ndarray, vox_offset: float = 352.0) -> bytes:
    """A hand-written single-file NIfTI-1 (byte order ``order``) holding ``data`` as float32."""
    header = bytearray(int(vox_offset))
    struct.pack_into(f"{order}i", header, 0, 348)
    struct.pack_into(f"{order}8h", header, 40, 3, *data.shape, 1, 1, 1, 1)
    struct.pack_into(f"{order}hh", header, 70, 16, 32)  # datatype FLOAT32, bitpix
    struct.pack_into(f"{order}8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)  # pixdim
    struct.pack_into(f"{order}ff", header, 108, vox_offset, 1.0)  # vox_offset, scl_slope
    header[344:348] = b"n+1\0"
    return bytes(header) + data.astype(f"{order}f4").tobytes(order="F")


def _nifti2(data: np.ndarray) -> bytes:
    """A little-endian single-file NIfTI-2 (540-byte header) holding ``data`` as float64."""
    header = bytearray(544)
    struct.pack_into("<i", header, 0, 540)
    header[4:12] = b"n+2\0\r\n\x1a\n"
    struct.pack_into("<hh", header, 12, 64, 64)  # datatype FLOAT64, bitpix
    struct.pack_into("<8q", header, 16, 3, *data.shape, 1, 1, 1, 1)
    struct.pack_into("<q", header, 168, 544)  # vox_offset
    return bytes(header) + data.astype("<f8").tobytes(order="F")


def _with_nonfinite(shape=(4, 3, 2)):
    data = np.ones(shape, np.float32)
    data[0, 0, 0], data[3, 2, 1], data[1, 1, 0] = np.nan, np.inf, -np.inf
    return data


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_nifti_is_found_although_itk_reads_zero(tmp_path, suffix, dtype):
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(_with_nonfinite().astype(dtype)), str(path))
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # ITK: 0
    assert nifti_nonfinite_count(path) == 3
    with pytest.raises(DatasetError, match=rf"scan{suffix}: 3 NaN or infinite values"):
        read_sitk_image(path)
    with pytest.raises(DatasetError, match=rf"scan{suffix}: 3 NaN or infinite values"):
        read_image(path)


def test_nonfinite_count_of_hand_written_headers(tmp_path):
    data = _with_nonfinite((5, 3, 2))
    (tmp_path / "be.nii").write_bytes(_nifti1(">", data))
    (tmp_path / "le.nii.gz").write_bytes(gzip.compress(_nifti1("<", data, vox_offset=400.0)))
    (tmp_path / "two.nii").write_bytes(_nifti2(data))
    assert nifti_nonfinite_count(tmp_path / "be.nii") == 3
    assert nifti_nonfinite_count(tmp_path / "le.nii.gz") == 3
    assert nifti_nonfinite_count(tmp_path / "two.nii") == 3
    # ITK reads the big-endian file with the NaN/inf as 0 (the layout is what ITK reads).
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "be.nii"))).T
    np.testing.assert_array_equal(itk, np.where(np.isfinite(data), data, 0))


def test_nonfinite_count_is_zero_for_integers_other_formats_and_junk(tmp_path):
    image = sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    sitk.WriteImage(image, str(tmp_path / "int.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(_with_nonfinite()), str(tmp_path / "nan.mha"))
    (tmp_path / "junk.nii.gz").write_bytes(b"\x1f\x8bjunk")
    (tmp_path / "short.nii").write_bytes(_nifti1("<", _with_nonfinite())[:360])
    assert nifti_nonfinite_count(tmp_path / "int.nii.gz") == 0
    assert nifti_nonfinite_count(tmp_path / "nan.mha") == 0  # checked on ITK's array
    assert nifti_nonfinite_count(tmp_path / "junk.nii.gz") == 0  # left to the reader
    assert nifti_nonfinite_count(tmp_path / "short.nii") == 1  # what is there is checked
    with pytest.raises(DatasetError, match=r"junk.nii.gz: cannot be read"):
        read_image(tmp_path / "junk.nii.gz")


def test_nonfinite_in_a_4d_nifti(tmp_path):
    volumes = [np.full((2, 3, 4), np.nan, np.float32), np.ones((2, 3, 4), np.float32)]
    image = sitk.JoinSeries([sitk.GetImageFromArray(v) for v in volumes])
    sitk.WriteImage(image, str(tmp_path / "msd.nii.gz"))
    assert nifti_nonfinite_count(tmp_path / "msd.nii.gz") == 24


def test_a_file_name_that_is_not_utf8_is_refused_before_simpleitk(tmp_path, not_utf8):
    # SimpleITK aborts the whole process (std::logic_error) when given such a name.
    good = tmp_path / "good.nii.gz"
    write_image(good, np.zeros(GEOMETRY_3D.shape, np.float32), GEOMETRY_3D)
    bad = not_utf8(tmp_path, b"case\xff.nii.gz")
    bad.write_bytes(good.read_bytes())
    assert bad.name == "case\udcff.nii.gz" and bad in tmp_path.iterdir()
    message = re.escape(
        f"{bad}: the file name is not valid UTF-8 ('case\\udcff.nii.gz', bytes "
        "b'case\\xff.nii.gz'), which SimpleITK cannot open: rename it to a UTF-8 name."
    )
    for read in (read_image, read_sitk_image, read_header):
        with pytest.raises(DatasetError, match=f"^{message}$"):
            read(bad)
    with pytest.raises(DatasetError, match=r"case\\udcff.nii.gz'.*rename it"):
        write_image(bad, np.zeros(GEOMETRY_3D.shape, np.float32), GEOMETRY_3D)
    folder = tmp_path / os.fsdecode(b"out\xff") / "label.nii.gz"
    with pytest.raises(DatasetError, match=r"the folder name 'out\\udcff' in the path"):
        write_image(folder, np.zeros(GEOMETRY_3D.shape, np.uint8), GEOMETRY_3D)
    assert not folder.parent.exists()
