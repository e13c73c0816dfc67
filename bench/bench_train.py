"""End-to-end training throughput on the 2D phantom preset (imgx-train).

For seg and diffusion (xT-recycling), on 1 and 2 (fake CPU) devices: steps/s of the real
training loop (`imgx_train.train`, data loading, augmentation, logging included) and the
time of the bare jitted step on a fixed batch; the difference is the share of time spent
outside the jitted step (data, logging, host syncs), which should stay under 10 %.

    uv run python bench/bench_train.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

WORKER = textwrap.dedent(
    """
    import json, statistics, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import imgx_data
    from imgx_train import devices, optim, presets, runs, tasks, trainer

    task_name, steps, data_dir, run_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    cfg = presets.make_config("phantom", task=task_name, overrides=(
        f"logging.wandb=disabled,logging.progress=false,logging.log_every=10,"
        f"train.steps={steps},train.eval_every=100000,train.checkpoint_every=100000,"
        f"train.max_valid_cases=1,data.data_dir={data_dir}"))
    trainer.train(cfg, run_dir=run_dir)
    records = runs.read_jsonl(__import__("pathlib").Path(run_dir) / "metrics" / "train.jsonl")
    loop = statistics.median(r["steps_per_s"] for r in records[2:] if "steps_per_s" in r)

    info = imgx_data.dataset_info("phantom", data_dir=data_dir)
    task = tasks.Task(cfg, info)
    tx = optim.optimizer(cfg.optimizer)
    mesh = devices.data_mesh()
    rep = NamedSharding(mesh, P())
    state = jax.jit(lambda: trainer.init_state(cfg, task, tx), out_shardings=rep)()
    it = imgx_data.TrainIterator(imgx_data.data_source("phantom", "train", data_dir=data_dir),
                                 global_batch_size=cfg.data.global_batch_size, seed=0, mesh=mesh)
    batch = {k: v for k, v in next(it).items() if k in ("image", "label", "spacing")}
    step = jax.jit(trainer.make_train_step(cfg, task, tx, 1), donate_argnums=(0,))
    state, m = step(state, batch); jax.block_until_ready(m)
    times = []
    for _ in range(20):
        t0 = time.perf_counter(); state, m = step(state, batch); jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    bare = statistics.median(times)
    print(json.dumps({"loop_steps_per_s": loop, "bare_step_s": bare,
                      "outside_share": max(0.0, 1.0 - bare * loop)}))
    """
)


def measure(task: str, num_devices: int, steps: int, data_dir: str) -> dict:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
        JAX_PLATFORMS="cpu",
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", WORKER, task, str(steps), data_dir, f"{tmp}/run"],
            env=env,
            capture_output=True,
            text=True,
        )
    if out.returncode != 0:
        raise RuntimeError(
            f"bench worker failed ({task}, {num_devices} devices):\n{out.stderr[-3000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    steps = 60 if quick else 200
    results = {}
    with tempfile.TemporaryDirectory() as data_dir:
        for task in ("seg", "diffusion"):
            for num_devices in (1, 2):
                results[f"{task}_{num_devices}dev"] = measure(task, num_devices, steps, data_dir)
    print(f"{'case':<16}{'loop steps/s':>14}{'bare step ms':>14}{'outside jit':>13}")
    for name, r in results.items():
        print(
            f"{name:<16}{r['loop_steps_per_s']:>14.2f}{1000 * r['bare_step_s']:>14.1f}"
            f"{100 * r['outside_share']:>12.1f}%"
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    result = run(args.quick)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
