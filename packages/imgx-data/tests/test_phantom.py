"""Tests of the built-in phantom datasets."""

import time

import numpy as np

import imgx_data
from imgx_data.datasets.phantom import phantom_2d, phantom_3d


def test_phantom_2d_is_deterministic_and_labelled():
    a = phantom_2d(np.random.default_rng([1, 0, 3]))
    b = phantom_2d(np.random.default_rng([1, 0, 3]))
    np.testing.assert_array_equal(a[0], b[0])
    image, label = a
    assert image.shape == (96, 96, 1) and image.dtype == np.float32
    assert label.shape == (96, 96) and set(np.unique(label)) <= {0, 1, 2}
    assert 0 <= image.min() and image.max() <= 1


def _best_threshold_dice(image, mask):
    """Best Dice of ``image > t`` (or < t) over thresholds: an intensity-only segmenter."""
    best = 0.0
    for t in np.quantile(image, np.linspace(0.02, 0.98, 49)):
        for pred in (image > t, image < t):
            best = max(best, 2 * np.sum(pred & mask) / (pred.sum() + mask.sum()))
    return best


def test_phantom_2d_is_not_trivial():
    """Some images miss a structure; thresholding cannot segment the muscle well."""
    samples = [phantom_2d(np.random.default_rng([7, 0, i])) for i in range(40)]
    present = np.array([[np.any(label == c) for c in (1, 2)] for _, label in samples])
    assert not present.all(axis=0).any()  # each structure is absent somewhere
    dices = [
        _best_threshold_dice(image[..., 0], label == 1)
        for image, label in samples
        if np.any(label == 1)
    ]
    assert np.mean(dices) < 0.85


def test_phantom_3d_classes_and_intensity_overlap():
    image, label = phantom_3d(np.random.default_rng([2, 0, 0]))
    assert image.shape == (64, 64, 32, 1) and label.shape == (64, 64, 32)
    assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    # Neighbouring organ intensity distributions overlap under the noise.
    spleen, kidney = image[label == 2, 0], image[label == 3, 0]
    assert np.quantile(spleen, 0.9) > np.quantile(kidney, 0.1)
    right, left = image[label == 3, 0], image[label == 4, 0]
    assert np.quantile(right, 0.9) > np.quantile(left, 0.1)
    # ... yet every organ has its own mean intensity (spec: distinct means)
    means = [float(np.median(image[label == k, 0])) for k in range(1, 5)]
    assert np.all(np.diff(means) > 0.02), means


def test_reduced_phantom_build_and_source(tmp_path):
    info = imgx_data.build("phantom_3d", data_dir=tmp_path, split_sizes=(3, 1, 2))
    assert info.split_sizes == {"train": 3, "valid": 1, "test": 2}
    assert info.num_classes == 5 and info.spacing == (1.5, 1.5, 5.0)
    source = imgx_data.data_source("phantom_3d", "test", tmp_path)
    example = source[1]
    assert example["uid"] == "test_0001"
    assert example["image"].shape == (64, 64, 32, 1)
    np.testing.assert_array_equal(example["spacing"], [1.5, 1.5, 5.0])
    expected = phantom_3d(np.random.default_rng([imgx_data.datasets.Phantom3d.SEED, 2, 1]))
    np.testing.assert_array_equal(example["label"], expected[1])


def test_default_phantom_builds_in_seconds(tmp_path):
    start = time.perf_counter()
    info = imgx_data.ensure_built("phantom", tmp_path)
    seconds = time.perf_counter() - start
    assert info.split_sizes == {"train": 240, "valid": 24, "test": 48}
    assert info.image_shape == (96, 96) and info.class_names == ("background", "muscle", "vessel")
    assert seconds < 30, seconds
    source = imgx_data.data_source("phantom", "train", tmp_path)
    assert len(source) == 240 and source[0]["uid"] == "train_0000"
