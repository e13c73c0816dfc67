"""Benchmark of training input: loader throughput and on-device augmentation per batch.

For the built-in phantoms (2D ``phantom`` 96×96×1 at batch 32, 3D ``phantom_3d`` 64×64×32×1
at batch 2; built on first use into the imgx data dir), times

- ``loader``: ``imgx_data.TrainIterator`` batches placed on the default device (reading the
  array_record source, stacking, transfer), in samples/s and ms per batch;
- ``augment``: ``imgx_data.augment_batch`` with the published default ranges, jitted, after
  warm-up, in ms per batch on the device.

``bench/run.py`` compares these with the train step time: input is not the bottleneck while
``loader_ms_per_batch`` and ``augment_ms_per_batch`` stay well below the step time.

Usage: ``uv run python bench/bench_loading.py [--quick] [--data-dir DIR] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

import imgx_data
from imgx_data.augmentation import AugmentationConfig, augment_batch
from imgx_data.loading import TrainIterator

CASES = (("phantom", 32), ("phantom_3d", 2))


def _time_loader(iterator: TrainIterator, num_batches: int) -> float:
    """Seconds per batch, the image on device."""
    jax.block_until_ready(next(iterator)["image"])  # starts the reader threads
    start = time.perf_counter()
    for _ in range(num_batches):
        jax.block_until_ready(next(iterator)["image"])
    return (time.perf_counter() - start) / num_batches


def _time_augmentation(batch: dict, repeats: int) -> float:
    """Seconds per jitted ``augment_batch`` call after compilation."""
    augment = jax.jit(augment_batch, static_argnums=2)
    arrays = {field: batch[field] for field in ("image", "label", "spacing")}
    config = AugmentationConfig()
    key = jax.random.key(0)
    jax.block_until_ready(augment(key, arrays, config))
    start = time.perf_counter()
    for _ in range(repeats):
        key, subkey = jax.random.split(key)
        jax.block_until_ready(augment(subkey, arrays, config))
    return (time.perf_counter() - start) / repeats


def run(quick: bool, data_dir: str | None = None) -> dict:
    """Times every case; ``quick`` uses a few batches only."""
    num_batches = 5 if quick else 40
    results = {"device": jax.devices()[0].device_kind, "cases": {}}
    for name, batch_size in CASES:
        imgx_data.ensure_built(name, data_dir)
        source = imgx_data.data_source(name, "train", data_dir)
        iterator = TrainIterator(source, global_batch_size=batch_size, seed=0)
        loader_s = _time_loader(iterator, num_batches)
        batch = next(iterator)
        iterator.close()  # no reads in the background while timing the device
        augment_s = _time_augmentation(batch, num_batches)
        results["cases"][name] = {
            "shape": list(source[0]["image"].shape),
            "batch_size": batch_size,
            "loader_samples_per_s": batch_size / loader_s,
            "loader_ms_per_batch": 1e3 * loader_s,
            "augment_ms_per_batch": 1e3 * augment_s,
        }
    return results


def _print_table(results: dict) -> None:
    print(f"device: {results['device']}")
    header = (
        f"{'dataset':<12}{'shape':<18}{'batch':>6}{'samples/s':>12}{'load ms':>10}{'aug ms':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, case in results["cases"].items():
        shape = "×".join(str(n) for n in case["shape"])
        print(
            f"{name:<12}{shape:<18}{case['batch_size']:>6}"
            f"{case['loader_samples_per_s']:>12.1f}{case['loader_ms_per_batch']:>10.2f}"
            f"{case['augment_ms_per_batch']:>10.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few batches only")
    parser.add_argument("--data-dir", default=None, help="imgx data dir (default: $IMGX_DATA_DIR)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = parser.parse_args()
    results = run(args.quick, args.data_dir)
    _print_table(results)
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
