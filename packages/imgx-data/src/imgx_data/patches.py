"""Sliding-window inference: a patch grid covering the volume, batched prediction, blending.

The volume is cut into overlapping patches, ``predict_fn`` runs on batches of them, and the
outputs are blended back by a weighted mean per voxel,

    out(v) = Σ_k w(v − s_k) · y_k(v − s_k) / Σ_k w(v − s_k)

over the patches ``k`` (start ``s_k``) that contain ``v``, with ``w`` constant (``"mean"``)
or a Gaussian centred on the patch (``"gaussian"``, which down-weights patch borders where the
network sees less context; Isensee et al., nnU-Net, Nat. Methods 2021). The sums live in
host memory (numpy), so the device only ever holds one batch of patches; the next batch is
dispatched before the previous result is copied back, so device and host work overlap.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np


def _per_axis(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, int | np.integer) else tuple(value)
    if len(values) != ndim:
        raise ValueError(f"{name} {value} must have one entry per spatial axis ({ndim}).")
    return tuple(int(v) for v in values)


def patch_grid(
    image_shape: Sequence[int], patch_shape: Sequence[int], overlap: int | Sequence[int] = 0
) -> np.ndarray:
    """Start indices of patches that cover the whole image.

    Per axis the starts are ``0, stride, 2·stride, …`` with ``stride = patch − overlap``,
    plus a last patch flush with the border (start ``n − patch``), without duplicates. An
    axis shorter than the patch has the single start 0: the caller pads the image to the
    patch size.

    Args:
        image_shape: spatial shape ``(n_0, …)``.
        patch_shape: spatial patch shape, same number of axes.
        overlap: voxels shared by neighbouring patches, an int or one per axis, in
            ``[0, patch)``.

    Returns:
        ``(num_patches, ndim)`` int64, in C order of the per-axis starts.
    """
    ndim = len(image_shape)
    patch_shape = _per_axis(patch_shape, ndim, "patch_shape")
    overlap = _per_axis(overlap, ndim, "overlap")
    axes = []
    for n, p, o in zip(image_shape, patch_shape, overlap, strict=True):
        if p < 1 or not 0 <= o < p:
            raise ValueError(
                f"Patch size {p} with overlap {o} is invalid: "
                "need patch ≥ 1 and 0 ≤ overlap < patch."
            )
        if n <= p:
            axes.append([0])
            continue
        starts = list(range(0, n - p, p - o))
        axes.append([*starts, n - p])
    return np.asarray(list(itertools.product(*axes)), dtype=np.int64).reshape(-1, ndim)


def gaussian_weight(patch_shape: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian blending weights ``exp(−Σ_i (x_i − c_i)² / (2 σ_i²))``, ``σ_i = sigma_scale · p_i``.

    ``c = (p − 1) / 2`` is the patch centre; the maximum is 1 and values are floored at the
    smallest positive weight so every voxel keeps a non-zero weight (nnU-Net's choice).

    Args:
        patch_shape: spatial patch shape.
        sigma_scale: standard deviation as a fraction of the patch size.

    Returns:
        float32 ``patch_shape``.
    """
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be positive, got {sigma_scale}.")
    log_weight = np.zeros(tuple(patch_shape), np.float64)
    for axis, p in enumerate(patch_shape):
        x = np.arange(p, dtype=np.float64) - (p - 1) / 2
        shape = [1] * len(patch_shape)
        shape[axis] = p
        log_weight = log_weight - (x.reshape(shape) ** 2) / (2 * (sigma_scale * p) ** 2)
    weight = np.exp(log_weight - log_weight.max()).astype(np.float32)
    return np.maximum(weight, weight[weight > 0].min())


def sliding_window_inference(
    predict_fn: Callable[[np.ndarray], Any],
    image: Any,
    *,
    patch_shape: Sequence[int],
    overlap: int | Sequence[int] = 0,
    batch_size: int = 1,
    blend: Literal["gaussian", "mean"] = "gaussian",
    sigma_scale: float = 0.125,
) -> np.ndarray:
    """Predicts a whole image patch by patch and blends the patch outputs.

    The image is padded with zeros (symmetrically) where it is smaller than the patch; the
    last batch is filled up by repeating its last patch so ``predict_fn`` sees one shape
    (compiles once); padded outputs are discarded.

    Args:
        predict_fn: maps patches ``(batch_size, *patch_shape, channels_in)`` (numpy) to
            per-class outputs ``(batch_size, *patch_shape, classes)`` (probabilities or
            logits; blended as given), numpy or ``jax.Array``.
        image: ``(*spatial, channels_in)``.
        patch_shape: spatial patch shape.
        overlap: voxels shared by neighbouring patches (see ``patch_grid``).
        batch_size: patches per ``predict_fn`` call.
        blend: ``"gaussian"`` weights (``gaussian_weight``) or ``"mean"`` (uniform).
        sigma_scale: Gaussian width as a fraction of the patch size.

    Returns:
        float32 ``(*spatial, classes)`` on the host.
    """
    image = np.asarray(image)
    ndim = image.ndim - 1
    patch_shape = _per_axis(patch_shape, ndim, "patch_shape")
    if blend not in ("gaussian", "mean"):
        raise ValueError(f"blend must be 'gaussian' or 'mean', got {blend!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    spatial = image.shape[:-1]
    pad_low = [max(p - n, 0) // 2 for n, p in zip(spatial, patch_shape, strict=True)]
    pad_high = [
        max(p - n, 0) - low for n, p, low in zip(spatial, patch_shape, pad_low, strict=True)
    ]
    padded = np.pad(image, [*zip(pad_low, pad_high, strict=True), (0, 0)])
    padded_spatial = padded.shape[:-1]
    starts = patch_grid(padded_spatial, patch_shape, overlap)
    if blend == "gaussian":
        weight = gaussian_weight(patch_shape, sigma_scale)
    else:
        weight = np.ones(patch_shape, np.float32)

    weight_sum = np.zeros(padded_spatial, np.float32)
    output: np.ndarray | None = None

    def windows(start: np.ndarray) -> tuple[slice, ...]:
        return tuple(slice(s, s + p) for s, p in zip(start, patch_shape, strict=True))

    def accumulate(batch_starts: np.ndarray, prediction: Any) -> None:
        nonlocal output
        prediction = np.asarray(prediction, dtype=np.float32)
        if prediction.shape[:-1] != (batch_size, *patch_shape):
            raise ValueError(
                f"predict_fn returned shape {prediction.shape}; expected "
                f"({batch_size}, *{patch_shape}, classes)."
            )
        if output is None:
            output = np.zeros((*padded_spatial, prediction.shape[-1]), np.float32)
        for start, patch_output in zip(batch_starts, prediction, strict=False):
            window = windows(start)
            output[window] += weight[..., None] * patch_output
            weight_sum[window] += weight

    pending = None
    for first in range(0, len(starts), batch_size):
        batch_starts = starts[first : first + batch_size]
        patches = [padded[windows(s)] for s in batch_starts]
        patches += [patches[-1]] * (batch_size - len(patches))
        prediction = predict_fn(np.stack(patches))
        if pending is not None:
            accumulate(*pending)
        pending = (batch_starts, prediction)
    accumulate(*pending)

    assert output is not None
    result = output / weight_sum[..., None]
    crop = tuple(slice(low, low + n) for low, n in zip(pad_low, spatial, strict=True))
    return result[crop]
