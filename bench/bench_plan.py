"""Training throughput of a planned `nifti_folder` build vs the phantom preset (issue 14).

Writes an nnU-Net v2 folder of 2D MRI-like slices (90x110 pixels, 2 mm, background + 2
labels), builds it with `imgx_data.build("nifti_folder", ...)` (which writes its
`plan.json`), then times the real training loop (`imgx_train.train`, diffusion with
xT-recycling, data loading and augmentation included), one fresh process per case, the
cases interleaved so that the shared CPU's load hits them alike:

- `phantom`: the default `imgx train` (phantom preset, 8 x 96x96);
- `folder_unplanned`: the folder with the package defaults (what `imgx train --data NAME`
  did before plans: the published network, batch 8);
- `folder_planned`: the folder with its plan (what `imgx train --data NAME` does now).

Pixels per second = steps/s x batch x pixels per image (or patch); the ratio is against
the phantom's of the same run.

    uv run python bench/bench_plan.py [--quick] [--cases 200] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

WORKER = textwrap.dedent(
    """
    import json, math, statistics, sys
    from pathlib import Path
    import imgx_data
    from imgx_train import config as config_lib, presets, runs, trainer

    case, steps, data_dir, run_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    common = {"logging.wandb": "disabled", "logging.progress": False, "logging.log_every": 5,
              "train.steps": steps, "train.eval_every": 10**6, "train.checkpoint_every": 10**6,
              "train.max_valid_cases": 1, "data.data_dir": data_dir}
    if case == "phantom":
        cfg = presets.make_config("phantom", overrides=common)
    elif case == "folder_unplanned":  # Config() defaults: no preset, no plan
        cfg = config_lib.replace(config_lib.Config(), {"data.name": "mri2d", **common})
    else:
        cfg = presets.make_config("mri2d", overrides=common)
    shape = cfg.data.patch_shape or imgx_data.dataset_info(cfg.data.name, data_dir).image_shape
    trainer.train(cfg, run_dir=run_dir)
    records = runs.read_jsonl(Path(run_dir) / "metrics" / "train.jsonl")
    rate = statistics.median(r["steps_per_s"] for r in records[1:] if "steps_per_s" in r)
    print(json.dumps({"steps_per_s": rate, "batch": cfg.data.global_batch_size,
                      "shape": list(shape),
                      "pixels_per_s": rate * cfg.data.global_batch_size * math.prod(shape)}))
    """
)
CASES = ("phantom", "folder_unplanned", "folder_planned")


def write_folder(root: Path, num_cases: int, shape=(90, 110), spacing=2.0) -> None:
    """nnU-Net v2 folder: an ellipse 'organ' with a small 'lesion', Rician-like noise."""
    from imgx_data import Geometry, write_image

    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {
        "channel_names": {"0": "T2"},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    geometry = Geometry.identity(shape, (spacing, spacing))
    for i in range(num_cases):
        cx, cy = shape[0] / 2 + rng.normal(0, 5), shape[1] / 2 + rng.normal(0, 5)
        a, b = rng.uniform(15, 25), rng.uniform(20, 30)
        label = np.zeros(shape, np.uint8)
        label[((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 < 1] = 1
        label[((x - cx - 5) / 6) ** 2 + ((y - cy) / 8) ** 2 < 1] = 2
        image = np.abs(300.0 + 200.0 * label + rng.normal(0, 60, shape))
        write_image(
            root / "imagesTr" / f"case{i:03d}_0000.nii.gz", image.astype(np.float32), geometry
        )
        write_image(root / "labelsTr" / f"case{i:03d}.nii.gz", label, geometry)


def measure(case: str, steps: int, data_dir: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", WORKER, case, str(steps), data_dir, f"{tmp}/run"],
            env=env,
            capture_output=True,
            text=True,
        )
    if out.returncode != 0:
        raise RuntimeError(f"bench worker failed ({case}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False, num_cases: int = 200, repeats: int | None = None) -> dict:
    import imgx_data

    steps = 15 if quick else 30
    repeats = repeats or (1 if quick else 2)
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp) / "raw", num_cases)
        data_dir = f"{tmp}/data"
        imgx_data.build("nifti_folder", manual_dir=f"{tmp}/raw", data_dir=data_dir, name="mri2d")
        plan = imgx_data.dataset_plan("mri2d", data_dir)
        runs_ = {case: [] for case in CASES}
        for _ in range(repeats):
            for case in CASES:
                runs_[case].append(measure(case, steps, data_dir))
    results = {}
    for case, rs in runs_.items():
        best = max(rs, key=lambda r: r["pixels_per_s"])
        results[case] = {**best, "all_pixels_per_s": [r["pixels_per_s"] for r in rs]}
    phantom = results["phantom"]["pixels_per_s"]
    for r in results.values():
        r["ratio_to_phantom"] = r["pixels_per_s"] / phantom
    results["plan"] = plan.to_json()
    print(f"{'case':<18}{'batch x shape':>16}{'steps/s':>10}{'pixels/s':>12}{'vs phantom':>12}")
    for case in CASES:
        r = results[case]
        shape = f"{r['batch']} x {'x'.join(map(str, r['shape']))}"
        print(
            f"{case:<18}{shape:>16}{r['steps_per_s']:>10.2f}{r['pixels_per_s']:>12,.0f}"
            f"{r['ratio_to_phantom']:>12.2f}"
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    result = run(args.quick, args.cases, args.repeats)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
