"""Tests of preparing new scans for prediction and writing predictions back."""

import numpy as np
import pytest

import imgx_data
from imgx_data import DatasetError, Geometry, write_image

GEOMETRY = Geometry(
    shape=(20, 16, 6),
    spacing=(0.75, 0.75, 2.5),
    origin=(10.0, -5.0, 3.0),
    direction=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
)


def _touch(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"")


def test_find_scans_groups_channels(tmp_path):
    _touch(tmp_path, "b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz", "x.txt")
    found = imgx_data.find_scans(tmp_path, num_channels=2)
    assert list(found.cases) == ["a", "b"] and found.problems == []
    assert [p.name for p in found.cases["b"]] == ["b_0000.nii.gz", "b_0001.nii.gz"]


def test_find_scans_lists_bad_cases_and_keeps_the_good_ones(tmp_path):
    _touch(tmp_path, "a_0000.nii.gz", "a_0001.nii.gz", "c_0000.nii.gz", "d_0000.nii.gz")
    _touch(tmp_path, "d_0001.nii.gz", "d_0002.nii.gz", "plain.nii.gz", "e_0000.nii", "e_0001.nii")
    _touch(tmp_path, "e_0001.nii.gz")
    found = imgx_data.find_scans(tmp_path, num_channels=2)
    assert list(found.cases) == ["a"]
    problems = {path.name: message for path, message in found.problems}
    assert set(problems) == {"c_0000.nii.gz", "d_0002.nii.gz", "plain.nii.gz", "e_0001.nii.gz"}
    assert problems["c_0000.nii.gz"] == (
        f"{tmp_path / 'c_0000.nii.gz'}: case c has channels [0] (c_0001 missing); the model "
        "takes 2 channels, files c_0000 to c_0001."
    )
    assert problems["d_0002.nii.gz"].startswith(str(tmp_path / "d_0002.nii.gz"))
    assert "channels [0, 1, 2] (d_0002.nii.gz too many)" in problems["d_0002.nii.gz"]
    assert "no channel suffix, but the model takes 2 channels" in problems["plain.nii.gz"]
    assert "plain_0000 to plain_0001" in problems["plain.nii.gz"]
    assert "several files for one channel (e_0001.nii, e_0001.nii.gz)" in problems["e_0001.nii.gz"]


def test_find_scans_extra_channel_for_a_one_channel_model(tmp_path):
    _touch(tmp_path, "a.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz")
    found = imgx_data.find_scans(tmp_path, num_channels=1)
    assert found.cases == {"a": [tmp_path / "a.nii.gz"]}
    [(path, message)] = found.problems
    assert path == tmp_path / "b_0001.nii.gz"
    assert "b_0001.nii.gz too many); the model takes 1 channel, files b_0000" in message


def test_find_scans_of_one_case(tmp_path):
    _touch(tmp_path, "a_0000.nii.gz", "a_0001.nii.gz", "ab_0000.nii.gz", "b_0000.nii.gz")
    found = imgx_data.find_scans(tmp_path, num_channels=2, case="a")
    assert list(found.cases) == ["a"] and found.problems == []  # ab and b are not looked at
    assert imgx_data.scans.case_of(tmp_path / "ab_0000.nii.gz") == "ab"
    assert imgx_data.scans.case_of(tmp_path / "notes.txt") is None
    with pytest.raises(DatasetError, match="no image files of case z"):
        imgx_data.find_scans(tmp_path, num_channels=2, case="z")


def test_find_scans_plain_names_for_one_channel(tmp_path):
    (tmp_path / "scan1.nii.gz").write_bytes(b"")
    (tmp_path / "scan2.png").write_bytes(b"")
    assert list(imgx_data.find_scans(tmp_path, num_channels=1).cases) == ["scan1", "scan2"]
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"folder: no image files \(\.nii\.gz"):
        imgx_data.find_scans(tmp_path / "folder", num_channels=1)


def test_prepare_scan_resamples_and_restores(tmp_path):
    label = np.zeros(GEOMETRY.shape, np.uint8)
    label[4:12, 4:10, 2:6] = 1  # aligned with the 2x coarser grid: restoring is exact
    write_image(tmp_path / "s_0000.nii.gz", (1000.0 * label - 500).astype(np.float32), GEOMETRY)
    scan = imgx_data.prepare_scan(
        [tmp_path / "s_0000.nii.gz"],
        spacing=(1.5, 1.5, 5.0),
        num_channels=1,
        intensity=(-991.0, 362.0),
    )
    assert scan.image.shape == (10, 8, 3, 1) and scan.original == GEOMETRY
    assert scan.image.min() == 0.0 and scan.image.max() == 1.0
    predicted = (scan.image[..., 0] > 0.5).astype(np.uint8)
    restored = imgx_data.restore_scan_label(predicted, scan)
    assert restored.shape == GEOMETRY.shape
    np.testing.assert_array_equal(restored, label)


@pytest.mark.parametrize(
    ("value", "message"),
    [(0.0, "every voxel has the value 0: a constant image"), (np.nan, "NaN or infinite")],
)
def test_prepare_scan_refuses_a_constant_or_non_finite_image(tmp_path, value, message):
    """Normalised, either would be an image of zeros and a confident prediction of nothing."""
    write_image(tmp_path / "s.mha", np.full(GEOMETRY.shape, value, np.float32), GEOMETRY)
    with pytest.raises(DatasetError, match=f"s.mha: .*{message}"):
        imgx_data.prepare_scan(
            [tmp_path / "s.mha"], spacing=(1, 1, 1), num_channels=1, intensity="percentile"
        )


def test_prepare_scan_checks_channels(tmp_path):
    image = np.random.default_rng(0).normal(size=GEOMETRY.shape).astype(np.float32)
    write_image(tmp_path / "s.nii.gz", image, GEOMETRY)
    path = str(tmp_path / "s.nii.gz")
    with pytest.raises(
        DatasetError, match="s.nii.gz: case .* has 1 image channels, the model takes 2"
    ):
        imgx_data.prepare_scan([path], spacing=(1, 1, 1), num_channels=2, intensity="percentile")
    with pytest.raises(DatasetError) as error:
        imgx_data.prepare_scan([path], spacing=(1, 1), num_channels=1, intensity="percentile")
    assert str(error.value) == (
        f"{path}: a 3D image of shape (20, 16, 6), but the model segments 2D images: give a "
        "2D image (PNG, or NIfTI with one slice)."
    )


def test_prepare_scan_2d_image_for_a_3d_model(tmp_path):
    one_slice = Geometry.identity((12, 10, 1), (1.0, 1.0, 1.0))
    ramp = np.arange(120).reshape(12, 10)
    write_image(tmp_path / "flat.nii.gz", ramp[..., None].astype(np.float32), one_slice)
    png = Geometry.identity((12, 10), (1.0, 1.0))
    write_image(tmp_path / "flat.png", ramp.astype(np.uint8), png)
    args = {"spacing": (1.0, 1.0, 1.0), "num_channels": 1, "intensity": "percentile"}
    with pytest.raises(DatasetError) as error:
        imgx_data.prepare_scan([tmp_path / "flat.nii.gz"], **args)
    assert str(error.value).startswith(
        f"{tmp_path / 'flat.nii.gz'}: shape (12, 10, 1) is a 2D image stored as a 3D volume"
    )
    assert "at least 2 voxels along each axis" in str(error.value)
    with pytest.raises(DatasetError) as error:
        imgx_data.prepare_scan([tmp_path / "flat.png"], **args)
    assert str(error.value).startswith(f"{tmp_path / 'flat.png'}: a 2D image of shape (12, 10)")
    assert "segments 3D images: give a 3D volume of at least 2 voxels" in str(error.value)
    # The same single-slice NIfTI is a valid 2D scan.
    scan = imgx_data.prepare_scan(
        [tmp_path / "flat.nii.gz"], spacing=(1.0, 1.0), num_channels=1, intensity="identity"
    )
    assert scan.image.shape == (12, 10, 1)


def test_find_scans_reports_a_file_name_that_is_not_utf8(tmp_path, not_utf8):
    # SimpleITK would abort the process on it; it is one case's problem, the others go on.
    _touch(tmp_path, "a_0000.nii.gz")
    bad = not_utf8(tmp_path, b"case\xff_0000.nii.gz")
    folder = imgx_data.find_scans(tmp_path, num_channels=1)
    alone = imgx_data.find_scans(tmp_path, 1, case=imgx_data.scans.case_of(bad))  # bad given alone
    assert list(folder.cases) == ["a"] and alone.cases == {}
    for found in (folder, alone):
        [(path, message)] = found.problems
        assert path == bad
        assert message.startswith(f"{bad}: the file name is not valid UTF-8")
        assert "('case\\udcff_0000.nii.gz', bytes b'case\\xff_0000.nii.gz')" in message
        assert message.endswith("rename it to a UTF-8 name.")
