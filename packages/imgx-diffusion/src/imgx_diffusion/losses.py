"""Segmentation losses, one value per sample (batch,).

All take logits (batch, *spatial, C) and integer labels (batch, *spatial). Exclusive classes
use softmax with class 0 as background; overlapping regions (``overlapping=True``) use a
sigmoid per region, region c being ``label ≥ c + 1`` (see ``segmentation.mask_from_label``).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp

from imgx_diffusion.gaussian_diffusion import compute_dtype
from imgx_diffusion.segmentation import mask_from_label


def _spatial_axes(x: chex.Array) -> tuple[int, ...]:
    """Axes between batch and classes."""
    return tuple(range(1, x.ndim - 1))


def _checked_logits(logits: chex.Array, label: chex.Array) -> jax.Array:
    """Check shapes; return the logits in at least float32 (losses are never bfloat16)."""
    chex.assert_rank(logits, label.ndim + 1)
    chex.assert_equal_shape_prefix([logits, label], label.ndim)
    return logits.astype(compute_dtype(logits.dtype))


def dice_loss(logits: chex.Array, label: chex.Array, *, overlapping: bool = False) -> jax.Array:
    """1 − mean Dice over the foreground classes present in each sample's ground truth.

    Dice_c = 2 Σ p_c y_c/(Σ p_c + Σ y_c) with soft probabilities p (Milletari et al. 2016).
    Foreground: classes 1 … C−1 (exclusive) or every region (overlapping). Classes absent
    from the ground truth are left out; a sample with no foreground contributes 0, never NaN.

    Returns:
        (batch,) in [0, 1].
    """
    logits = _checked_logits(logits, label)
    num_classes = logits.shape[-1]
    mask = mask_from_label(label, num_classes, overlapping=overlapping, dtype=logits.dtype)
    if overlapping:
        probs = jax.nn.sigmoid(logits)
    else:
        probs, mask = jax.nn.softmax(logits, axis=-1)[..., 1:], mask[..., 1:]
    axes = _spatial_axes(logits)
    intersection = jnp.sum(probs * mask, axis=axes)
    label_volume = jnp.sum(mask, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + label_volume
    present = label_volume > 0
    dice = jnp.where(present, 2.0 * intersection / jnp.where(present, denominator, 1.0), 0.0)
    num_present = jnp.sum(present, axis=-1)
    mean_dice = jnp.sum(dice, axis=-1) / jnp.maximum(num_present, 1)
    return jnp.where(num_present > 0, 1.0 - mean_dice, 0.0)


def _log_p_true(logits: chex.Array, mask: chex.Array, overlapping: bool):
    """log p of the true outcome per element and that probability p."""
    if overlapping:
        # log σ(z) for y = 1, log σ(−z) for y = 0.
        signed = jnp.where(mask > 0, logits, -logits)
        log_p = jax.nn.log_sigmoid(signed)
    else:
        log_p = jnp.sum(mask * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    return log_p, jnp.exp(log_p)


def cross_entropy_loss(
    logits: chex.Array, label: chex.Array, *, overlapping: bool = False
) -> jax.Array:
    """Cross-entropy −log p_y averaged over voxels (and regions if overlapping), (batch,)."""
    logits = _checked_logits(logits, label)
    mask = mask_from_label(label, logits.shape[-1], overlapping=overlapping, dtype=logits.dtype)
    log_p, _ = _log_p_true(logits, mask, overlapping)
    return -jnp.mean(log_p.reshape(log_p.shape[0], -1), axis=1)


def focal_loss(
    logits: chex.Array, label: chex.Array, *, gamma: float = 2.0, overlapping: bool = False
) -> jax.Array:
    """Focal loss −(1 − p_y)^γ log p_y (Lin et al. 2017) averaged like cross-entropy, (batch,).

    γ = 0 gives the cross-entropy.
    """
    logits = _checked_logits(logits, label)
    mask = mask_from_label(label, logits.shape[-1], overlapping=overlapping, dtype=logits.dtype)
    log_p, p = _log_p_true(logits, mask, overlapping)
    focal = -((1.0 - p) ** gamma) * log_p
    return jnp.mean(focal.reshape(focal.shape[0], -1), axis=1)


@dataclasses.dataclass(frozen=True)
class SegmentationLossWeights:
    """Weights of the segmentation loss terms (imgx default: Dice 1 + focal 1)."""

    dice: float = 1.0
    cross_entropy: float = 0.0
    focal: float = 1.0
    focal_gamma: float = 2.0


def segmentation_loss(
    logits: chex.Array,
    label: chex.Array,
    *,
    weights: SegmentationLossWeights = SegmentationLossWeights(),
    overlapping: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of Dice, cross-entropy and focal losses per sample.

    Returns:
        (total (batch,), {"dice", "cross_entropy", "focal"} each (batch,), for logging).
    """
    terms = {
        "dice": dice_loss(logits, label, overlapping=overlapping),
        "cross_entropy": cross_entropy_loss(logits, label, overlapping=overlapping),
        "focal": focal_loss(logits, label, gamma=weights.focal_gamma, overlapping=overlapping),
    }
    total = (
        weights.dice * terms["dice"]
        + weights.cross_entropy * terms["cross_entropy"]
        + weights.focal * terms["focal"]
    )
    return total, terms
