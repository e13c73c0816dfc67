"""Benchmark of imgx-data dataset building, random access and preprocessing.

Times, each in a fresh temporary data dir:

- ``build_phantom`` / ``build_phantom_3d``: generating and writing the default built-in
  datasets (312 images 96×96; 72 volumes 64×64×32), seconds;
- ``read_phantom_3d``: random-access reads from ``data_source`` (decode included), per s;
- ``preprocess_ct``: one CT-like case (512×512×100 at 0.8×0.8×2.5 mm; quick: 256×256×50)
  resampled to 1.5×1.5×5 mm, HU-clipped, normalised and cropped to 192×128×128, seconds;
- ``restore_ct``: putting its label back on the original grid, seconds;
- ``read_window_whole_ct`` / ``read_window_only_ct``: training reads per second of the
  128×128×32 window of that case at 1.5×1.5×5 mm, from the case stored whole (as builds
  store every case since format 3) and from a build of the window's field of view only
  (what earlier builds stored for training), and their ratio ``window_read_ratio``.

Usage: ``uv run python bench/bench_datasets.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import imgx_data
from imgx_data import Geometry
from imgx_data.io import array_to_sitk
from imgx_data.preprocess import preprocess_volume, restore_to_original


def _seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _ct_case(shape: tuple[int, int, int]) -> tuple[object, object]:
    rng = np.random.default_rng(0)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij", sparse=True)
    label = ((grid[0] / 0.5) ** 2 + (grid[1] / 0.4) ** 2 + (grid[2] / 0.6) ** 2 < 1).astype(
        np.uint8
    )
    image = (60.0 * label + rng.normal(0, 20, size=shape) - 50).astype(np.float32)
    geometry = Geometry.identity(shape, (0.8, 0.8, 2.5))
    return array_to_sitk(image, geometry), array_to_sitk(label, geometry)


def run(quick: bool) -> dict[str, float]:
    """Runs the benchmark; returns seconds (and reads per second)."""
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as data_dir:
        results["build_phantom_s"], _ = _seconds(
            lambda: imgx_data.build("phantom", data_dir=data_dir)
        )
        results["build_phantom_3d_s"], _ = _seconds(
            lambda: imgx_data.build("phantom_3d", data_dir=data_dir)
        )
        source = imgx_data.data_source("phantom_3d", "train", data_dir)
        order = np.random.default_rng(0).permutation(len(source))
        reads = 48 if quick else 480
        elapsed, _ = _seconds(lambda: [source[int(order[i % len(order)])] for i in range(reads)])
        results["read_phantom_3d_per_s"] = reads / elapsed
    shape = (256, 256, 50) if quick else (512, 512, 100)
    image, label = _ct_case(shape)
    results["preprocess_ct_s"], case = _seconds(
        lambda: preprocess_volume(
            image,
            label,
            target_spacing=(1.5, 1.5, 5.0),
            target_shape=(192, 128, 128),
            intensity=(-991.0, 362.0),
        )
    )
    example = case.to_example("ct")
    results["restore_ct_s"], _ = _seconds(lambda: restore_to_original(example["label"], example))
    whole = _window_reads(image, label, None, reads=10 if quick else 40)
    only = _window_reads(image, label, case.crop_start, reads=10 if quick else 40)
    results["read_window_whole_ct_per_s"] = whole
    results["read_window_only_ct_per_s"] = only
    results["window_read_ratio"] = only / whole
    return results


WINDOW = (128, 128, 32)
WINDOW_SPACING = (1.5, 1.5, 5.0)


def _window_reads(image, label, window_start, reads: int) -> float:
    """Training reads per second of the CT case's window from a nifti_folder build of the
    whole case (``window_start`` None) or of the raw region under the window (its start in
    the resampled grid given): three copies, train/valid/test."""
    import SimpleITK as sitk

    if window_start is not None:
        # The raw voxels under the window: its start and size in raw (0.8, 0.8, 2.5) voxels.
        factor = np.divide(WINDOW_SPACING, image.GetSpacing())
        start = np.maximum(np.round(np.multiply(window_start, factor)), 0).astype(int)
        size = np.minimum(
            np.round(np.multiply(WINDOW, factor)), np.subtract(image.GetSize(), start)
        )
        image = sitk.RegionOfInterest(image, [int(v) for v in size], [int(v) for v in start])
        label = sitk.RegionOfInterest(label, [int(v) for v in size], [int(v) for v in start])
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        (raw / "imagesTr").mkdir(parents=True)
        (raw / "labelsTr").mkdir()
        for i in range(3):
            sitk.WriteImage(image, str(raw / "imagesTr" / f"c{i}_0000.nii.gz"))
            sitk.WriteImage(
                sitk.Cast(label, sitk.sitkUInt8), str(raw / "labelsTr" / f"c{i}.nii.gz")
            )
        meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
                "file_ending": ".nii.gz"}  # fmt: skip
        (raw / "dataset.json").write_text(json.dumps(meta))
        splits = {"train": ["c0"], "valid": ["c1"], "test": ["c2"]}
        (raw / "splits.json").write_text(json.dumps(splits))
        data = Path(tmp) / "data"
        imgx_data.build("nifti_folder", manual_dir=raw, data_dir=data, name="ct",
                        spacing=WINDOW_SPACING, shape=WINDOW)  # fmt: skip
        source = imgx_data.data_source("ct", "train", data)
        assert source[0]["image"].shape[:-1] == WINDOW
        elapsed, _ = _seconds(lambda: [source[0] for _ in range(reads)])
    return reads / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller CT case, fewer reads")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args()
    results = run(args.quick)
    print(f"{'measure':<24} {'value':>10}")
    for key, value in results.items():
        print(f"{key:<24} {value:>10.3f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
