"""Train-step benchmark of the imgx-nets U-Net (published configuration) on this machine.

One step = forward + backward + optax AdamW with global-norm clipping, jitted with donated
parameters and optimiser state. Cases (3 classes, float32 unless --dtype):
  2d           batch 8 x 128 x 128 x 1, segmentation
  3d           batch 1 x 64 x 64 x 32 x 1, segmentation
  diffusion2d  batch 8 x 128 x 128: image + 3 noisy-mask channels + time
  diffusion3d  batch 1 x 64 x 64 x 32: image + 3 noisy-mask channels + time
Each case runs with both decoders of `imgx_nets.UNet` (`--decoders`): "mirrored" (the
default of imgx-train) and "original" (the published ImgX-DiffSeg network, used by the paper
presets; the original toolkit's 2D step is 336 GFLOP), so step times compare on the same FLOPs.
Reports the parameter count, compile time, median step time, FLOPs per step (XLA cost
analysis) and achieved GFLOP/s, as a fraction of the CPU's nominal fp32 peak and of a float32
matmul measured in the same run (the machine is shared: the matmul calibrates for contention).

    uv run python bench/bench_unet.py [--steps 10] [--cases 2d,3d] [--decoders original]
        [--quick] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import imgx_nets

# 2 cores x 2 FMA units x 16 fp32 lanes (AVX-512) x 2 flops x 2.3 GHz.
CPU_PEAK_GFLOPS = 294.0
PUBLISHED = dict(
    num_channels=(32, 64, 128, 256),
    num_res_blocks=2,
    num_transformer_layers=1,
    num_heads=8,
    widening_factor=4,
    patch_size=2,
    dropout=0.1,
)
CASES = {
    "2d": dict(num_spatial_dims=2, shape=(8, 128, 128), diffusion=False),
    "3d": dict(num_spatial_dims=3, shape=(1, 64, 64, 32), diffusion=False),
    "diffusion2d": dict(num_spatial_dims=2, shape=(8, 128, 128), diffusion=True),
    "diffusion3d": dict(num_spatial_dims=3, shape=(1, 64, 64, 32), diffusion=True),
}
QUICK_SHAPES = {
    "2d": (2, 64, 64),
    "3d": (1, 32, 32, 16),
    "diffusion2d": (2, 64, 64),
    "diffusion3d": (1, 32, 32, 16),
}
NUM_CLASSES = 3
DECODERS = imgx_nets.DECODERS


def _flops(stage) -> float:
    cost = stage.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


def step_flops(graphdef, optimizer, diffusion: bool, args) -> float:
    """FLOPs of one step from XLA's cost analysis of the lowered step (loop-free)."""
    return _flops(make_step(graphdef, optimizer, diffusion).lower(*args))


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved float32 GFLOP/s of an n x n matmul now (a contention reference)."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def make_step(graphdef, optimizer, diffusion: bool):
    def loss_fn(state, batch, key):
        model_fn = imgx_nets.as_model_fn(graphdef, state)
        mask_input = batch["mask_input"] if diffusion else None
        t = batch["t"] if diffusion else None
        logits = model_fn(batch["image"], mask_input, t, key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    def step(state, opt_state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(state, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def bench_case(
    name: str, steps: int, quick: bool, dtype=jnp.float32, remat=False, decoder="mirrored"
) -> dict:
    case = CASES[name]
    shape = QUICK_SHAPES[name] if quick else case["shape"]
    net = imgx_nets.UNet(
        num_spatial_dims=case["num_spatial_dims"],
        in_channels=1,
        out_channels=NUM_CLASSES,
        mask_channels=NUM_CLASSES if case["diffusion"] else 0,
        time_conditioned=case["diffusion"],
        remat=remat,
        decoder=decoder,
        dtype=dtype,
        rngs=nnx.Rngs(0),
        **PUBLISHED,
    )
    graphdef, state = nnx.split(net, nnx.Param)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))
    opt_state = optimizer.init(state)
    keys = jax.random.split(jax.random.key(1), 4)
    batch = {
        "image": jax.random.normal(keys[0], (*shape, 1)),
        "label": jax.random.randint(keys[1], shape, 0, NUM_CLASSES),
    }
    if case["diffusion"]:
        batch["mask_input"] = jax.random.uniform(keys[2], (*shape, NUM_CLASSES))
        batch["t"] = jax.random.uniform(keys[3], (shape[0],))
    step = make_step(graphdef, optimizer, case["diffusion"])

    t0 = time.perf_counter()
    lowered = step.lower(state, opt_state, batch, keys[0])
    trace_s = time.perf_counter() - t0
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    if steps == 0:  # --compile-only
        return {"case": name, "decoder": decoder, "compile_s": compile_s, "trace_s": trace_s}
    flops = step_flops(graphdef, optimizer, case["diffusion"], (state, opt_state, batch, keys[0]))

    state, opt_state, loss = compiled(state, opt_state, batch, keys[0])  # warm-up
    loss.block_until_ready()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, opt_state, loss = compiled(state, opt_state, batch, jax.random.key(i))
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    gflops = flops / median / 1e9
    return {
        "case": name,
        "decoder": decoder,
        "shape": list(shape),
        "parameters": imgx_nets.parameter_count(state),
        "compile_s": compile_s,
        "step_s": median,
        "gflop_per_step": flops / 1e9,
        "gflops": gflops,
        "fraction_of_peak": gflops / CPU_PEAK_GFLOPS,
        "loss": float(loss),
    }


def cached_compile_s(
    name: str, quick: bool, dtype: str = "float32", decoder: str = "mirrored"
) -> float:
    """Compile time of the step in a new process whose persistent compilation cache already
    holds it, as for a second `imgx train` with the same shapes: two fresh processes share
    a cache dir, the second one's time is returned."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(
            os.environ,
            JAX_COMPILATION_CACHE_DIR=cache,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
        command = [sys.executable, __file__, "--compile-only", "--cases", name, "--dtype", dtype]
        command += ["--decoders", decoder]
        for _ in range(2):
            out = subprocess.run(
                command + (["--quick"] if quick else []),
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
        return json.loads(out.stdout.strip().splitlines()[-1])["compile_s"]


def run(
    quick: bool = False,
    steps: int | None = None,
    cases=tuple(CASES),
    dtype: str = "float32",
    remat: bool = False,
    decoders=DECODERS,
) -> dict:
    steps = steps or (2 if quick else 10)
    reference = matmul_gflops()
    results = []
    for name in cases:
        for decoder in decoders:
            r = bench_case(name, steps, quick, jnp.dtype(dtype), remat, decoder)
            r["fraction_of_matmul"] = r["gflops"] / reference
            r["cached_compile_s"] = cached_compile_s(name, quick, dtype, decoder)
            results.append(r)
    return {
        "benchmark": "unet_train_step",
        "backend": jax.default_backend(),
        "dtype": dtype,
        "remat": remat,
        "steps": steps,
        "quick": quick,
        "cpu_peak_gflops": CPU_PEAK_GFLOPS,
        "matmul_gflops": reference,
        "results": results,
    }


def _table(report: dict) -> str:
    lines = [
        f"backend {report['backend']}, {report['dtype']}, remat={report['remat']}, "
        f"median of {report['steps']} steps; f32 matmul now: {report['matmul_gflops']:.0f} GFLOP/s",
        f"{'case':<12} {'decoder':<9} {'params':>11} {'compile s':>9} {'step s':>8} "
        f"{'GFLOP':>8} {'GFLOP/s':>8} {'% peak':>7} {'% matmul':>8} {'cached compile s':>16}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['case']:<12} {r['decoder']:<9} {r['parameters']:>11,} "
            f"{r['compile_s']:>9.1f} {r['step_s']:>8.3f} "
            f"{r['gflop_per_step']:>8.1f} {r['gflops']:>8.1f} "
            f"{100 * r['fraction_of_peak']:>6.1f}% {100 * r['fraction_of_matmul']:>7.1f}% "
            f"{r['cached_compile_s']:>16.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 steps")
    parser.add_argument(
        "--decoders", default=",".join(DECODERS), help="comma-separated UNet decoders"
    )
    parser.add_argument("--dtype", default="float32", help="computation dtype")
    parser.add_argument("--remat", action="store_true", help="rematerialise blocks")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    parser.add_argument(
        "--compile-only", action="store_true", help="print one case's compile time as JSON"
    )
    args = parser.parse_args()
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"--cases: unknown {sorted(unknown)}; choose from {sorted(CASES)}")
    decoders = tuple(args.decoders.split(","))
    if set(decoders) - set(DECODERS):
        parser.error(f"--decoders: choose from {', '.join(DECODERS)}, got {args.decoders!r}")
    if args.compile_only:
        for name in args.cases.split(","):
            for decoder in decoders:
                r = bench_case(name, 0, args.quick, jnp.dtype(args.dtype), args.remat, decoder)
                print(json.dumps(r))
        return
    report = run(
        args.quick, args.steps, tuple(args.cases.split(",")), args.dtype, args.remat, decoders
    )
    print(_table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
