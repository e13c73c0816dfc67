"""Benchmark of the diffusion sampling loop (imgx_diffusion.sample): overhead and compiles.

A small conv network in pure jax (4 layers of 3×3 convolutions, 64 channels, ReLU, time
added as a bias; about 0.3 GFLOP per 64×64 image, still far cheaper than a U-Net) stands in
for the network. For each sampler and K steps, times

- ``sample_ms``: one jitted ``sample`` call of K steps (a single ``lax.scan``);
- ``model_ms``: K calls of the jitted bare network on the same input;
- ``overhead``: sample_ms / model_ms − 1, what the loop adds (noise, posterior step,
  softmax, stacking the logits of every step); the target is < 10 %;
- ``overhead_ms_per_step``: the same in ms per step, which does not depend on the network
  (it scales with batch × voxels × classes), so it carries over to a real U-Net;
- ``compiles``: how many times the sampler was traced over all repeats with new keys
  (should be 1: one compile per shape).

All numbers of one run are measured on the same machine within seconds, so read the ratios.

Usage: ``uv run python bench/bench_sampling.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp

import imgx_diffusion as idf

NUM_CLASSES = 4
CHANNELS = 64
NUM_LAYERS = 4


def init_network(key, in_channels: int, out_channels: int) -> list[dict]:
    """He-initialised 3×3 convolutions: in → 64 → 64 → 64 → out."""
    sizes = [in_channels] + [CHANNELS] * (NUM_LAYERS - 1) + [out_channels]
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (3, 3, c_in, c_out)) * (2.0 / (9 * c_in)) ** 0.5,
            "t": jnp.zeros((c_out,)),
        }
        for k, c_in, c_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def network(params, image, mask_input, t, key):
    """f(image, mask_input, t, key) → logits (batch, x, y, classes); NHWC convolutions."""
    del key
    h = jnp.concatenate([image, mask_input], axis=-1)
    for i, layer in enumerate(params):
        h = jax.lax.conv_general_dilated(
            h, layer["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = h + t[:, None, None, None] * layer["t"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return h


def _time_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Fastest seconds of fn_a(i) and fn_b(i) (blocking on results), interleaved.

    Interleaving and taking the minimum keeps the ratio fair on a machine shared with other
    work: both see the same background load, and the minimum is the least disturbed run.
    """
    jax.block_until_ready((fn_a(0), fn_b(0)))  # compile / warm up
    best_a = best_b = float("inf")
    for i in range(1, repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(fn_a(i))
        middle = time.perf_counter()
        jax.block_until_ready(fn_b(i))
        end = time.perf_counter()
        best_a, best_b = min(best_a, middle - start), min(best_b, end - middle)
    return best_a, best_b


def bench_case(sampler: str, num_steps: int, shape: tuple[int, int, int], repeats: int) -> dict:
    """Times one sampler at K steps on images of shape (batch, x, y); fastest of repeats."""
    diffusion = idf.GaussianDiffusion.from_betas(idf.beta_schedule("linear", 1001))
    diffusion = idf.sampling_diffusion(diffusion, num_steps)
    image = jax.random.normal(jax.random.key(0), (*shape, 1))
    params = init_network(jax.random.key(1), 1 + NUM_CLASSES, NUM_CLASSES)
    traces = []

    @jax.jit
    def sample(params, key):
        traces.append(None)  # runs at trace time only
        return idf.sample(
            diffusion,
            functools.partial(network, params),
            key,
            image,
            num_classes=NUM_CLASSES,
            sampler=sampler,
        )

    model = jax.jit(network)
    mask = jnp.full((*shape, NUM_CLASSES), 0.5)
    t = jnp.full((shape[0],), 0.5)

    def k_model_calls(i):
        out = None
        for _ in range(num_steps):
            out = model(params, image, mask, t, None)
        return out

    sample_s, model_s = _time_pair(
        lambda i: sample(params, jax.random.key(i)), k_model_calls, repeats
    )
    return {
        "sampler": sampler,
        "num_steps": num_steps,
        "shape": list(shape),
        "sample_ms": 1e3 * sample_s,
        "model_ms": 1e3 * model_s,
        "overhead": sample_s / model_s - 1.0,
        "overhead_ms_per_step": 1e3 * (sample_s - model_s) / num_steps,
        "compiles": len(traces),
    }


def run(quick: bool) -> dict:
    """Every case; ``quick`` uses fewer repeats and cases."""
    repeats = 5 if quick else 30
    shape = (4, 64, 64)
    cases = (
        [("ddpm", 5)] if quick else [("ddpm", 5), ("ddim", 5), ("dpm_solver_2m", 5), ("ddpm", 20)]
    )
    return {
        "device": jax.devices()[0].device_kind,
        "model": f"{NUM_LAYERS} conv 3x3 layers, {CHANNELS} channels, {NUM_CLASSES} classes",
        "cases": [bench_case(s, k, shape, repeats) for s, k in cases],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and cases")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args()
    results = run(args.quick)
    print(f"device: {results['device']}; model: {results['model']}")
    header = ("sampler", "K", "sample ms", "K×model ms", "overhead", "ms/step", "compiles")
    print(f"{header[0]:<14}{header[1]:>4}" + "".join(f"{h:>12}" for h in header[2:]))
    for c in results["cases"]:
        print(
            f"{c['sampler']:<14}{c['num_steps']:>4}{c['sample_ms']:>12.2f}{c['model_ms']:>12.2f}"
            f"{100 * c['overhead']:>11.1f}%{c['overhead_ms_per_step']:>12.2f}{c['compiles']:>12}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
