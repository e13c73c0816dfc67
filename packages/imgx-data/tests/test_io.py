"""Tests of image I/O and the (x, y[, z]) axis convention."""

import numpy as np
import pytest
import SimpleITK as sitk

from imgx_data import DatasetError, Geometry, read_channels, read_image, write_image
from imgx_data.io import check_same_geometry

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
