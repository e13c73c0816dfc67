"""Benchmark of the per-case evaluation metrics (imgx_train.metrics) on a CT-sized volume.

A 192×128×128 label volume with 15 foreground classes of organ-like blobs (ellipsoids with
smooth, irregular boundaries, radii 4-30 voxels, anisotropic spacing) is compared with a
prediction made by perturbing every blob (centre jitter of up to 2 voxels, radii ±10 %,
a different boundary texture). Times:

- ``per_class_metrics``: all metrics for the 16 classes (background included), surface
  distances on each class's cropped box;
- ``surface_distances_uncropped``: the surface distances alone for the 15 foreground
  classes on the full grid, i.e. what the box crop saves.

Usage: ``uv run python bench/bench_metrics.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import ndimage

from imgx_train.metrics import per_class_metrics, surface_distances

SHAPE = (192, 128, 128)
SPACING = (0.8, 0.8, 2.0)
NUM_CLASSES = 16


def _paint_blob(
    labels: np.ndarray, label: int, centre: np.ndarray, radii: np.ndarray, rng: np.random.Generator
) -> None:
    """Paints an ellipsoid with a smooth irregular boundary, inside its bounding box only."""
    reach = np.ceil(radii * 1.3).astype(int)
    lo = np.maximum(centre.astype(int) - reach, 0)
    hi = np.minimum(centre.astype(int) + reach + 1, labels.shape)
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")
    level = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True))
    texture = ndimage.gaussian_filter(rng.standard_normal(level.shape), sigma=3.0)
    texture /= texture.std() + 1e-12
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    labels[box][level + 0.15 * texture < 1.0] = label


def make_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reference and perturbed prediction label volumes, int32 `SHAPE`."""
    rng = np.random.default_rng(seed)
    reference = np.zeros(SHAPE, dtype=np.int32)
    prediction = np.zeros(SHAPE, dtype=np.int32)
    for label in range(1, NUM_CLASSES):
        radii = rng.uniform(4.0, 30.0) * rng.uniform(0.6, 1.0, size=3)
        centre = rng.uniform(radii, np.asarray(SHAPE) - radii)
        _paint_blob(reference, label, centre, radii, rng)
        jitter = rng.uniform(-2.0, 2.0, size=3)
        scale = rng.uniform(0.9, 1.1, size=3)
        _paint_blob(prediction, label, centre + jitter, radii * scale, rng)
    return reference, prediction


def _best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(quick: bool) -> dict:
    """Times the metrics on one synthetic case; ``quick`` runs each timing once."""
    repeats = 1 if quick else 3
    reference, prediction = make_case()

    def cropped():
        return per_class_metrics(
            prediction, reference, num_classes=NUM_CLASSES, spacing=SPACING, tolerance_mm=1.0
        )

    def uncropped():
        for k in range(1, NUM_CLASSES):
            surface_distances(prediction == k, reference == k, SPACING)

    metrics = cropped()
    t_cropped = _best_time(cropped, repeats)
    t_uncropped = _best_time(uncropped, repeats)
    return {
        "shape": list(SHAPE),
        "num_classes": NUM_CLASSES,
        "repeats": repeats,
        "per_class_metrics_s": t_cropped,
        "surface_distances_uncropped_s": t_uncropped,
        "uncropped_over_cropped": t_uncropped / t_cropped,
        "foreground_dice_mean": float(np.nanmean(metrics["dice"][1:])),
        "foreground_hd95_mean_mm": float(np.nanmean(metrics["hd95"][1:])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat instead of three")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args()
    result = run(args.quick)
    shape = "×".join(map(str, result["shape"]))
    print(f"metrics on {shape}, {result['num_classes']} classes (best of {result['repeats']})")
    rows = [
        ("per_class_metrics, all metrics, 16 classes (s)", result["per_class_metrics_s"]),
        ("surface distances uncropped, 15 classes (s)", result["surface_distances_uncropped_s"]),
        ("uncropped / cropped", result["uncropped_over_cropped"]),
        ("foreground Dice mean", result["foreground_dice_mean"]),
        ("foreground HD95 mean (mm)", result["foreground_hd95_mean_mm"]),
    ]
    print(f"{'what':<50}{'value':>10}")
    for what, value in rows:
        print(f"{what:<50}{value:>10.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
