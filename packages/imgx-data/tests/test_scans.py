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


def test_find_scans_groups_channels(tmp_path):
    for name in ("b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz", "x.txt"):
        (tmp_path / name).write_bytes(b"")
    scans = imgx_data.find_scans(tmp_path, num_channels=2)
    assert list(scans) == ["a", "b"]
    assert [p.name for p in scans["b"]] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    (tmp_path / "c_0000.nii.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"case c has channels \[0\], the model needs \[0, 1\]"):
        imgx_data.find_scans(tmp_path, num_channels=2)


def test_find_scans_plain_names_for_one_channel(tmp_path):
    (tmp_path / "scan1.nii.gz").write_bytes(b"")
    (tmp_path / "scan2.png").write_bytes(b"")
    assert list(imgx_data.find_scans(tmp_path, num_channels=1)) == ["scan1", "scan2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: no image files"):
        imgx_data.find_scans(tmp_path / "empty", num_channels=1)


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


def test_prepare_scan_checks_channels(tmp_path):
    write_image(tmp_path / "s.nii.gz", np.ones(GEOMETRY.shape, np.float32), GEOMETRY)
    with pytest.raises(DatasetError, match="1 channels, the dataset has 2"):
        imgx_data.prepare_scan(
            [tmp_path / "s.nii.gz"], spacing=(1, 1, 1), num_channels=2, intensity="percentile"
        )
    with pytest.raises(DatasetError, match="a 3D scan for a 2D dataset"):
        imgx_data.prepare_scan(
            [tmp_path / "s.nii.gz"], spacing=(1, 1), num_channels=1, intensity="percentile"
        )
