"""Peak temporary memory of attention forward + backward: memory-efficient vs plain.

For each token count, compiles `grad(sum(attention(q, k, v)))` w.r.t. q, k, v (batch 1, 8 heads
of dimension 64, the U-Net bottom at 256 channels) and reads XLA's
`compiled.memory_analysis().temp_size_in_bytes`: nothing is executed, so 64k tokens of plain
attention (a 128 GiB logits tensor) can be measured too. Efficient attention
(Rabe & Staats 2021, chunks of 1024) must grow about linearly; plain attention grows
quadratically.

    uv run python bench/bench_attention.py [--quick] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

import imgx_nets

HEADS, HEAD_DIM = 8, 64
IMPLEMENTATIONS = {
    "efficient": imgx_nets.efficient_dot_product_attention,
    "plain": imgx_nets.dot_product_attention_reference,
}


def temp_bytes(attention, length: int) -> tuple[int, float]:
    """(temporary bytes, compile seconds) of the compiled forward + backward."""
    shape = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.float32)
    grad = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v)), argnums=(0, 1, 2))
    t0 = time.perf_counter()
    compiled = jax.jit(grad).lower(shape, shape, shape).compile()
    return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - t0


def run(quick: bool = False) -> dict:
    lengths = (1024, 4096) if quick else (4096, 16384, 65536)
    rows = []
    for length in lengths:
        row = {"tokens": length}
        for name, attention in IMPLEMENTATIONS.items():
            row[f"{name}_bytes"], row[f"{name}_compile_s"] = temp_bytes(attention, length)
        rows.append(row)
    for row in rows:
        scale = row["tokens"] / rows[0]["tokens"]
        for name in IMPLEMENTATIONS:
            # growth relative to the first length, divided by the growth in tokens: 1 = linear
            row[f"{name}_growth_per_token_growth"] = (
                row[f"{name}_bytes"] / rows[0][f"{name}_bytes"] / scale
            )
    return {
        "benchmark": "attention_memory",
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "chunk_size": 1024,
        "quick": quick,
        "rows": rows,
    }


def _table(report: dict) -> str:
    mib = 2.0**20
    lines = [
        f"forward + backward temp memory, batch 1, {report['heads']} heads x "
        f"{report['head_dim']}, float32 (growth: memory ratio / token ratio, 1 = linear)",
        f"{'tokens':>7} {'efficient MiB':>14} {'growth':>7} {'plain MiB':>12} {'growth':>7}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['tokens']:>7} {r['efficient_bytes'] / mib:>14.1f} "
            f"{r['efficient_growth_per_token_growth']:>7.2f} {r['plain_bytes'] / mib:>12.1f} "
            f"{r['plain_growth_per_token_growth']:>7.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k and 4k tokens only")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args()
    report = run(args.quick)
    print(_table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
