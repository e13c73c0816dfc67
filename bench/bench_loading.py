"""Benchmark of training input: loader throughput and on-device augmentation per batch,
compared with the train step they feed, all measured in one run.

For the built-in phantoms (2D ``phantom`` 96×96×1 at batch 32, 3D ``phantom_3d`` 64×64×32×1
at batch 2; built on first use into the imgx data dir), times

- ``loader``: ``imgx_data.TrainIterator`` batches placed on the default device (reading the
  array_record source, stacking, transfer), in samples/s and ms per batch;
- ``augment``: ``imgx_data.augment_batch`` with the published default ranges, jitted, after
  warm-up, in ms per batch on the device;
- ``train_step``: the jitted train step of imgx-train's preset for that dataset
  (``imgx_train.trainer.make_train_step``: augmentation, forward, backward, optimizer, EMA)
  at the same batch size, on a fixed batch, median after compilation. The segmentation
  task is used: its step is the cheapest (a diffusion step adds the recycling forward
  pass), so the ratio below is the conservative one;
- ``input_to_step_ratio`` = (loader + augment ms per batch) / train step ms. Loading runs
  in background threads while the device steps, so input is not the bottleneck while the
  ratio stays well below 1 (it counts the augmentation twice: the step includes it).

Imports ``imgx_train`` (bench/ is outside the package boundaries; imgx-data itself does not).

Usage: ``uv run python bench/bench_loading.py [--quick] [--data-dir DIR] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def _time_train_step(name: str, batch: dict, data_dir: str | None, steps: int) -> float:
    """Median seconds of imgx-train's jitted seg train step for ``name``'s preset at the
    batch's size, after compilation."""
    from imgx_train import optim, presets, tasks, trainer

    batch_size = int(batch["image"].shape[0])
    cfg = presets.make_config(
        name,
        task="seg",
        overrides={"data.global_batch_size": batch_size, "data.data_dir": data_dir},
    )
    task = tasks.Task(cfg, imgx_data.dataset_info(name, data_dir))
    tx = optim.optimizer(cfg.optimizer)
    num_micro = trainer.accumulation_steps(batch_size, 1, cfg.data.max_batch_per_device)
    state = jax.jit(lambda: tasks.init_state(cfg, task, tx))()
    step = jax.jit(trainer.make_train_step(cfg, task, tx, num_micro), donate_argnums=(0,))
    arrays = {field: batch[field] for field in ("image", "label", "spacing")}
    state, metrics = step(state, arrays)  # compiles
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, arrays)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
        step_s = _time_train_step(name, batch, data_dir, 3 if quick else 10)
        results["cases"][name] = {
            "shape": list(source[0]["image"].shape),
            "batch_size": batch_size,
            "loader_samples_per_s": batch_size / loader_s,
            "loader_ms_per_batch": 1e3 * loader_s,
            "augment_ms_per_batch": 1e3 * augment_s,
            "train_step_ms": 1e3 * step_s,
            "input_to_step_ratio": (loader_s + augment_s) / step_s,
        }
    return results


def _print_table(results: dict) -> None:
    print(f"device: {results['device']}")
    header = (
        f"{'dataset':<12}{'shape':<14}{'batch':>6}{'samples/s':>11}{'load ms':>9}"
        f"{'aug ms':>9}{'step ms':>10}{'(load+aug)/step':>17}"
    )
    print(header)
    print("-" * len(header))
    for name, case in results["cases"].items():
        shape = "×".join(str(n) for n in case["shape"])
        print(
            f"{name:<12}{shape:<14}{case['batch_size']:>6}"
            f"{case['loader_samples_per_s']:>11.1f}{case['loader_ms_per_batch']:>9.2f}"
            f"{case['augment_ms_per_batch']:>9.2f}{case['train_step_ms']:>10.1f}"
            f"{case['input_to_step_ratio']:>17.3f}"
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
