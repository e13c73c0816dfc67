"""Pure-function adapters, slice-wise application and parameter accounting."""

from __future__ import annotations

import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from flax import nnx

ModelFn = Callable[
    [chex.Array, chex.Array | None, chex.Array | None, chex.PRNGKey | None], chex.Array
]


def apply(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    image: chex.Array,
    mask_input: chex.Array | None = None,
    t: chex.Array | None = None,
    key: chex.PRNGKey | None = None,
) -> chex.Array:
    """Rebuild the network from `(graphdef, state)` (from `nnx.split`) and call it.

    Pure in `state`: usable under `jax.jit`, `jax.grad` and `jax.vmap`.
    """
    return nnx.merge(graphdef, state)(image, mask_input, t, key)


def as_model_fn(graphdef: nnx.GraphDef, state: nnx.State) -> ModelFn:
    """The shared model-function signature `model_fn(image, mask_input, t, key) -> logits`.

    Build it inside the traced function when differentiating w.r.t. `state`, e.g.
    `jax.grad(lambda s: loss(as_model_fn(graphdef, s)(image, None, None, key)))(state)`.
    """

    def model_fn(image, mask_input, t, key):
        return apply(graphdef, state, image, mask_input, t, key)

    return model_fn


class SliceWise(nnx.Module):
    """Apply a 2D network to 3D volumes slice by slice along the last spatial axis (z).

    `(batch, x, y, z, ch)` is folded into `(batch * z, x, y, ch)`, `t (batch,)` repeated per
    slice, and the output unfolded to `(batch, x, y, z, out)`. Same call signature as `UNet`.
    """

    def __init__(self, network: nnx.Module):
        if getattr(network, "num_spatial_dims", 2) != 2:
            raise ValueError("SliceWise: the wrapped network must be 2D (num_spatial_dims=2).")
        self.network = network

    def __call__(self, image, mask_input=None, t=None, key=None):
        chex.assert_rank(image, 5)
        b, _, _, z, _ = image.shape

        def fold(v):
            return None if v is None else jnp.moveaxis(v, 3, 1).reshape(b * z, *v.shape[1:3], -1)

        t_slices = None if t is None else jnp.repeat(t, z)
        out = self.network(fold(image), fold(mask_input), t_slices, key)
        return jnp.moveaxis(out.reshape(b, z, *out.shape[1:]), 1, 3)


def parameter_count(module_or_state: nnx.Module | nnx.State) -> int:
    """Number of scalar parameters (`nnx.Param`) of a module, or of all leaves of a state."""
    if isinstance(module_or_state, nnx.Module):
        module_or_state = nnx.state(module_or_state, nnx.Param)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(module_or_state))


def summary(module: nnx.Module) -> str:
    """A table of parameter counts per part of a `UNet` (or `SliceWise(UNet)`) and the total."""
    network = module.network if isinstance(module, SliceWise) else module
    rows: list[tuple[str, str, int]] = []

    def add(part: str, shape: str, *parts):
        rows.append((part, shape, sum(parameter_count(p) for p in parts if p is not None)))

    channels = network.num_channels
    if network.time_embedding is not None:
        add("time embedding", f"{channels[-1]}", network.time_embedding)
    add("stem", f"{network.in_channels + network.mask_channels}->{channels[0]}", network.stem)
    for level, c in enumerate(channels):
        add(f"encoder {level}", f"{c}", *network.encoder[level])
        if level < len(network.down):
            add(f"down {level}->{level + 1}", f"{network.factors[level]}", network.down[level])
    add("transformer", f"{len(network.transformer)} layer(s)", *network.transformer)
    for level in reversed(range(len(channels))):
        if level < len(network.up):
            add(f"up {level + 1}->{level}", f"{network.factors[level]}", network.up[level])
        add(f"decoder {level}", f"{channels[level]}", *network.decoder[level])
    add("head", f"{channels[0]}->{network.out_channels}", network.head)
    total = parameter_count(module)
    width = max(len(r[0]) for r in rows)
    lines = [f"{'part':<{width}}  {'channels/factor':>16}  {'parameters':>12}"]
    lines += [f"{p:<{width}}  {s:>16}  {n:>12,}" for p, s, n in rows]
    lines.append(f"{'total':<{width}}  {'':>16}  {total:>12,}")
    return "\n".join(lines)
