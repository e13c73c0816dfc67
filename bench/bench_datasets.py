"""Benchmark of imgx-data dataset building, random access and preprocessing.

Times, each in a fresh temporary data dir:

- ``build_phantom`` / ``build_phantom_3d``: generating and writing the default built-in
  datasets (312 images 96×96; 72 volumes 64×64×32), seconds;
- ``read_phantom_3d``: random-access reads from ``data_source`` (decode included), per s;
- ``preprocess_ct``: one CT-like case (512×512×100 at 0.8×0.8×2.5 mm; quick: 256×256×50)
  resampled to 1.5×1.5×5 mm, HU-clipped, normalised and cropped to 192×128×128, seconds;
- ``restore_ct``: putting its label back on the original grid, seconds.

Usage: ``uv run python bench/bench_datasets.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

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
    return results


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
