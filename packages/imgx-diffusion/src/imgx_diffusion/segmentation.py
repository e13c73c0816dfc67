"""Segmentation masks as diffusion variables, and network outputs as x̂₀ and logits.

Exclusive classes (softmax): a label of C classes (background = class 0) is the one-hot
mask (batch, *spatial, C). Overlapping regions (sigmoid), e.g. BraTS WT/TC/ET with nested
integer labels: C regions, region c (0-based) is ``label ≥ c + 1``.

x_0 = 2·mask − 1 ∈ {−1, 1}; the network sees a noisy x as the soft mask (clip(x, −1, 1) + 1)/2.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from imgx_diffusion.gaussian_diffusion import GaussianDiffusion, compute_dtype

_EPS = 1e-5


def mask_from_label(
    label: chex.Array, num_classes: int, *, overlapping: bool = False, dtype=jnp.float32
) -> jax.Array:
    """Mask (batch, *spatial, C) from integer labels (batch, *spatial).

    Exclusive: one-hot over C classes. Overlapping: channel c is label ≥ c + 1.
    """
    if overlapping:
        regions = jnp.arange(1, num_classes + 1, dtype=label.dtype)
        return (label[..., None] >= regions).astype(dtype)
    return jax.nn.one_hot(label, num_classes, dtype=dtype)


def x_from_mask(mask: chex.Array) -> jax.Array:
    """x = 2·mask − 1, mapping {0, 1} to {−1, 1}."""
    return 2.0 * mask - 1.0


def mask_from_x(x: chex.Array) -> jax.Array:
    """Soft mask (clip(x, −1, 1) + 1)/2 ∈ [0, 1]: what the network sees of a noisy x."""
    return (jnp.clip(x, -1.0, 1.0) + 1.0) / 2.0


def probabilities_from_logits(logits: chex.Array, *, overlapping: bool = False) -> jax.Array:
    """Class probabilities: softmax over the last axis, or sigmoid per region."""
    return jax.nn.sigmoid(logits) if overlapping else jax.nn.softmax(logits, axis=-1)


def x0_from_logits(logits: chex.Array, *, overlapping: bool = False) -> jax.Array:
    """x̂_0 = 2·p − 1 with p = softmax(logits) (or sigmoid(logits) if overlapping)."""
    return x_from_mask(probabilities_from_logits(logits, overlapping=overlapping))


def logits_from_x(x: chex.Array, *, overlapping: bool = False) -> jax.Array:
    """Logits whose probabilities are the soft mask of x.

    Exclusive: log(clip((x + 1)/2, 1e-5, 1)) (softmax logits up to a constant).
    Overlapping: logit(clip((x + 1)/2, 1e-5, 1 − 1e-5)).
    """
    if overlapping:
        p = jnp.clip((x + 1.0) / 2.0, _EPS, 1.0 - _EPS)
        return jnp.log(p) - jnp.log1p(-p)
    return jnp.log(jnp.clip((x + 1.0) / 2.0, _EPS, 1.0))


def label_from_probabilities(probabilities: chex.Array, *, overlapping: bool = False):
    """Integer label (batch, *spatial) from probabilities (batch, *spatial, C).

    Exclusive: argmax. Overlapping: the number of regions with probability ≥ 0.5, which is
    the nested label code (region i = label ≥ i) when the predicted regions are nested.
    """
    if overlapping:
        return jnp.sum(probabilities >= 0.5, axis=-1).astype(jnp.int32)
    return jnp.argmax(probabilities, axis=-1).astype(jnp.int32)


class ModelPrediction(NamedTuple):
    """A network output read under the process's parameterisation.

    Attributes:
        x0: x̂_0 ∈ [−1, 1], (batch, *spatial, C).
        logits: class logits (batch, *spatial, C); the network output itself for ``x0``.
        estimate: the network's estimate of its training target (x̂_0, ε̂ or v̂), compared
            with ``GaussianDiffusion.training_target`` by the MSE loss.
        log_variance: log σ² of p(x_{t−1}|x_t) for ``learned_range``, else None.
    """

    x0: jax.Array
    logits: jax.Array
    estimate: jax.Array
    log_variance: jax.Array | None


def read_model_output(
    diffusion: GaussianDiffusion,
    output: chex.Array,
    xt: chex.Array,
    t: chex.Array,
    *,
    overlapping: bool = False,
) -> ModelPrediction:
    """Interpret a network output for x_t at step t.

    ``x0``: the output is class logits and x̂_0 = 2·softmax − 1 (sigmoid if overlapping).
    ``epsilon`` / ``v``: x̂_0 is recovered from (x_t, ε̂) or (x_t, v̂) and clipped to [−1, 1].
    ``learned_range``: the output has 2C channels, the last C give the variance interpolation.

    Args:
        diffusion: the process.
        output: network output (batch, *spatial, C) or (batch, *spatial, 2C).
        xt: noisy x (batch, *spatial, C).
        t: step indices (batch,).
        overlapping: sigmoid regions instead of softmax classes.
    """
    num_classes = xt.shape[-1]
    expected = 2 * num_classes if diffusion.variance == "learned_range" else num_classes
    if output.shape[-1] != expected or output.shape[:-1] != xt.shape[:-1]:
        raise ValueError(
            f"model output has shape {output.shape}; expected {xt.shape[:-1] + (expected,)} "
            f"for {num_classes} classes with variance={diffusion.variance!r} "
            "(learned_range needs 2C output channels)."
        )
    # A network computing in bfloat16 hands over to float32 diffusion arithmetic here.
    output = output.astype(compute_dtype(output.dtype))
    log_variance = None
    if diffusion.variance == "learned_range":
        output, u = output[..., :num_classes], output[..., num_classes:]
        log_variance = diffusion.learned_log_variance(u, t)
    if diffusion.model_output == "x0":
        x0 = x0_from_logits(output, overlapping=overlapping)
        return ModelPrediction(x0, output, x0, log_variance)
    if diffusion.model_output == "epsilon":
        x0 = diffusion.predict_x0_from_epsilon(xt, output, t)
    else:
        x0 = diffusion.predict_x0_from_v(xt, output, t)
    x0 = jnp.clip(x0, -1.0, 1.0)
    return ModelPrediction(x0, logits_from_x(x0, overlapping=overlapping), output, log_variance)
