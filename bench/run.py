"""Runs every imgx benchmark and writes `bench/results/<date>-<machine>.json`.

    uv run python bench/run.py            # full (about 15 minutes on a 2-core CPU)
    uv run python bench/run.py --quick    # a smoke run of every benchmark
    uv run python bench/run.py --only unet,sampling
    uv run python bench/run.py --dtype bfloat16   # on a GPU: the U-Net step in bfloat16

Each benchmark prints its own table; the JSON holds all results plus the machine, and the
wall time of the default `imgx train` (fresh data dir, persistent compilation cache off,
then a second run with it on to show the cached start).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = ("unet", "attention", "sampling", "loading", "datasets", "metrics", "train", "plan")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_train_wall_time() -> dict:
    """`imgx train` with no arguments, as a new user runs it, then again with the cache."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(
            os.environ, IMGX_DATA_DIR=f"{tmp}/data", IMGX_COMPILATION_CACHE_DIR=f"{tmp}/cache"
        )
        for name in ("first_run_s", "cached_run_s"):
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "imgx_cli.main", "train"],  # as a new user runs it
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
            )
            results[name] = time.perf_counter() - start
            if out.returncode != 0:
                raise RuntimeError(f"imgx train failed:\n{out.stderr[-3000:]}")
            if name == "first_run_s":
                results_dir = "step_*-ddpm_5steps-1sample-seed0"  # the best checkpoint's
                summary = json.loads(
                    next(Path(tmp, "runs").glob(f"*/test/{results_dir}/summary.json")).read_text()
                )
                results["test_foreground_dice"] = summary["foreground_mean"]["dice"]
                results["test_foreground_hd95_mm"] = summary["foreground_mean"]["hd95"]
    print(
        f"imgx train: {results['first_run_s']:.0f} s (Dice {results['test_foreground_dice']:.3f}),"
        f" second run with the compilation cache {results['cached_run_s']:.0f} s"
    )
    return results


def _numbers(value, prefix=""):
    """(path, number) for every numeric leaf of a benchmark's result."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            label = item.get("name", item.get("case", i)) if isinstance(item, dict) else i
            yield from _numbers(item, f"{prefix}[{label}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield prefix, value


def print_table(results: dict) -> None:
    print(f"\n{'benchmark':<12} {'measure':<58} {'value':>12}")
    for name, result in results.items():
        for path, number in _numbers(result):
            print(f"{name:<12} {path[:58]:<58} {number:>12.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(BENCHMARKS))
    parser.add_argument("--skip-imgx-train", action="store_true")
    parser.add_argument("--out", help="JSON path (default bench/results/<date>-<machine>.json)")
    parser.add_argument(
        "--dtype",
        default="float32",
        help="computation dtype of the U-Net train-step benchmark (bfloat16 on a GPU)",
    )
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    machine = f"{platform.machine()}-{os.cpu_count()}cpu-{jax.default_backend()}"
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "processor": platform.processor(),
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "quick": args.quick,
        "unet_dtype": args.dtype,
        "results": {},
    }
    for name in names:
        print(f"\n== {name} ==", flush=True)
        start = time.perf_counter()
        kwargs = {"dtype": args.dtype} if name == "unet" else {}
        report["results"][name] = _module(name).run(args.quick, **kwargs)
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)
    if not args.skip_imgx_train and not args.only:
        print("\n== imgx train (default) ==", flush=True)
        report["results"]["imgx_train_default"] = default_train_wall_time()
    print_table(report["results"])
    out = (
        Path(args.out)
        if args.out
        else (
            BENCH_DIR
            / "results"
            / (
                f"{report['date']}-{machine}"
                f"{'' if args.dtype == 'float32' else '-' + args.dtype}"
                f"{'-quick' if args.quick else ''}.json"
            )
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
