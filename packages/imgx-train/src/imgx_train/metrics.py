"""Segmentation metrics of one case in physical units (mm, ml), voxel-based as MONAI.

All functions work on host numpy arrays in the imgx axis order (x, y[, z]); ``spacing[i]``
is the voxel size in mm along array axis i.

Definitions (Maier-Hein et al., "Metrics reloaded", Nat. Methods 2024; MONAI
``monai.metrics``; Nikolov et al., arXiv 1809.04430 for the normalised surface Dice):

- Dice ``D = 2|P ∩ R| / (|P| + |R|)``, IoU ``J = |P ∩ R| / |P ∪ R| = D / (2 - D)``.
- The surface of a mask is the mask XOR its binary erosion with the cross-shaped
  (connectivity-1) structuring element; voxels outside the array count as background, so
  mask voxels on the image border are surface (scipy's ``border_value=0``, as MONAI).
- ``d_pr``: for each surface voxel of the prediction, the Euclidean distance in mm to the
  nearest surface voxel of the reference (``scipy.ndimage.distance_transform_edt`` with
  ``sampling=spacing``); ``d_rp`` the reverse.
- HD95 ``= max(P95(d_pr), P95(d_rp))`` (percentile with linear interpolation, as
  ``numpy.percentile`` and MONAI).
- ASSD ``= (Σ d_pr + Σ d_rp) / (|d_pr| + |d_rp|)``.
- NSD at tolerance τ ``= (#{d_pr ≤ τ} + #{d_rp ≤ τ}) / (|d_pr| + |d_rp|)``, where
  ``d ≤ τ`` holds up to float rounding (relative 1e-9): with spacing 0.6 mm a distance of
  two voxels is within τ = 1.2 mm however its sum was rounded.
- Volume in ml ``= |M| · Π spacing / 1000`` (1 ml = 1000 mm³).
- Centroid distance: Euclidean distance in mm between the centres of mass of P and R.

Empty-mask policy (per class and case):

- Both masks empty: every agreement metric (Dice, IoU, HD95, ASSD, NSD, centroid
  distance) is NaN, so the class is excluded from NaN-aware means for that case; the two
  volumes are 0 ml. ``imgx_train.reports.summarize`` counts these cases (``both_empty``).
- Exactly one mask empty (a missed structure, or a pure false positive): Dice, IoU and NSD
  are 0; HD95, ASSD and the centroid distance are the worst case, the diagonal of the case's
  image grid in mm ``sqrt(Σ (shape_i · spacing_i)²)`` — the field of view, longer than any
  distance measurable inside it. Never NaN, so a missed structure always pulls the mean
  down instead of silently dropping out of it. Counted as ``prediction_empty`` or
  ``reference_empty``.

Speed: surface distances are computed on the bounding box of ``P ∪ R`` grown by one voxel
(as MONAI's ``get_mask_edges(crop=True)``). The values are identical to the uncropped
computation: every voxel outside the box is background in both masks, erosion treats voxels
outside the array as background either way, and the Euclidean distance between two surface
voxels does not depend on what lies around them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: Metrics where higher is better (in [0, 1]).
OVERLAP_METRICS = ("dice", "iou", "nsd")
#: Distances in mm, lower is better.
DISTANCE_METRICS = ("hd95", "assd", "centroid_distance")
#: Volumes in ml.
VOLUME_METRICS = ("volume_prediction", "volume_reference")
#: Every key returned by :func:`binary_metrics` and :func:`per_class_metrics`, in order.
METRIC_NAMES = OVERLAP_METRICS + DISTANCE_METRICS + VOLUME_METRICS

_MM3_PER_ML = 1000.0
_HD_PERCENTILE = 95.0
_TOLERANCE_RTOL = 1e-9

Box = tuple[slice, ...]


def _as_spacing(spacing: Sequence[float] | np.ndarray, ndim: int) -> np.ndarray:
    """Validates ``spacing`` (mm, one value per array axis) and returns it as float64."""
    values = np.asarray(spacing, dtype=np.float64)
    if values.shape != (ndim,):
        raise ValueError(
            f"spacing must hold one voxel size in mm per array axis, i.e. shape ({ndim},) "
            f"for {ndim}D masks; got shape {values.shape}."
        )
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing must be positive and finite (mm); got {values.tolist()}.")
    return values


def _check_tolerance(tolerance_mm: float) -> float:
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be finite and >= 0 (mm); got {tolerance_mm}.")
    return float(tolerance_mm)


def _check_same_shape(prediction: np.ndarray, reference: np.ndarray) -> None:
    if prediction.shape != reference.shape:
        raise ValueError(
            f"prediction and reference must have the same shape; got {prediction.shape} and "
            f"{reference.shape}. Resample the prediction onto the reference grid first."
        )
    if prediction.ndim not in (2, 3):
        raise ValueError(
            f"masks must be 2D (x, y) or 3D (x, y, z) arrays of one case; got shape "
            f"{prediction.shape}. Evaluate a batch case by case."
        )


def grid_diagonal(shape: Sequence[int], spacing: Sequence[float] | np.ndarray) -> float:
    """Diagonal of the image grid in mm, ``sqrt(Σ (shape_i · spacing_i)²)``.

    The worst-case distance assigned when exactly one of the two masks is empty.
    """
    extent = np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    return float(np.sqrt(np.sum(extent**2)))


def _crop_box(union: Box | None, shape: Sequence[int], margin: int = 1) -> Box:
    """The box of ``P ∪ R`` grown by ``margin`` voxels per side and clipped to the array.

    An empty union gives an empty box, so both cropped masks are empty.
    """
    if union is None:
        return tuple(slice(0, 0) for _ in shape)
    return tuple(
        slice(max(s.start - margin, 0), min(s.stop + margin, n))
        for s, n in zip(union, shape, strict=True)
    )


def _union_box(boxes: Sequence[Box | None]) -> Box | None:
    """Smallest box containing every non-None box, or None if there is none."""
    present = [b for b in boxes if b is not None]
    if not present:
        return None
    return tuple(
        slice(min(b[i].start for b in present), max(b[i].stop for b in present))
        for i in range(len(present[0]))
    )


def _mask_box(mask: np.ndarray) -> Box | None:
    """Bounding box of the True voxels of ``mask``, or None if it is empty."""
    found = ndimage.find_objects(mask.astype(np.int8, copy=False))
    return found[0] if found else None


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a boolean mask: ``mask XOR erosion(mask)``.

    The erosion uses the cross-shaped (connectivity-1) structuring element and treats
    voxels outside the array as background, so mask voxels on the array border are surface.

    Args:
      mask: boolean array `(*spatial)`.

    Returns:
      Boolean array `(*spatial)`, True on the surface.
    """
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm between the surfaces of two non-empty boolean masks.

    Computed on the arrays as given (no cropping): pass the box of ``P ∪ R`` for speed, as
    :func:`binary_metrics` does.

    Args:
      pred_mask: boolean `(*spatial)`, non-empty.
      ref_mask: boolean `(*spatial)`, non-empty, same shape.
      spacing: voxel size in mm per array axis, `(ndim,)`.

    Returns:
      ``(d_pr, d_rp)``: float64 `(n_pred_surface,)` distances from each predicted surface
      voxel to the nearest reference surface voxel, and `(n_ref_surface,)` the reverse.
    """
    _check_same_shape(pred_mask, ref_mask)
    spacing = _as_spacing(spacing, pred_mask.ndim)
    pred_mask = np.asarray(pred_mask, dtype=bool)
    ref_mask = np.asarray(ref_mask, dtype=bool)
    if not pred_mask.any() or not ref_mask.any():
        raise ValueError(
            "surface_distances needs two non-empty masks; binary_metrics applies the "
            "empty-mask policy."
        )
    pred_surface = surface(pred_mask)
    ref_surface = surface(ref_mask)
    # The EDT gives each voxel's distance to the nearest zero, here a surface voxel.
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_ref[pred_surface], to_pred[ref_surface]


def _metrics_in_box(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: np.ndarray,
    tolerance_mm: float,
    diagonal_mm: float,
) -> dict[str, float]:
    """Metrics of two boolean masks cropped to a box holding all their True voxels."""
    voxel_ml = float(np.prod(spacing)) / _MM3_PER_ML
    n_pred = int(np.count_nonzero(pred_mask))
    n_ref = int(np.count_nonzero(ref_mask))
    volumes = {"volume_prediction": n_pred * voxel_ml, "volume_reference": n_ref * voxel_ml}
    if n_pred == 0 and n_ref == 0:
        return {name: math.nan for name in OVERLAP_METRICS + DISTANCE_METRICS} | volumes
    if n_pred == 0 or n_ref == 0:
        return (
            {name: 0.0 for name in OVERLAP_METRICS}
            | {name: diagonal_mm for name in DISTANCE_METRICS}
            | volumes
        )

    n_both = int(np.count_nonzero(pred_mask & ref_mask))
    dice = 2.0 * n_both / (n_pred + n_ref)
    iou = n_both / (n_pred + n_ref - n_both)

    d_pr, d_rp = surface_distances(pred_mask, ref_mask, spacing)
    n_surface = d_pr.size + d_rp.size
    hd95 = max(np.percentile(d_pr, _HD_PERCENTILE), np.percentile(d_rp, _HD_PERCENTILE))
    assd = (d_pr.sum() + d_rp.sum()) / n_surface
    # A distance equal to τ counts whichever way its last bit was rounded.
    within = tolerance_mm * (1.0 + _TOLERANCE_RTOL)
    nsd = (np.count_nonzero(d_pr <= within) + np.count_nonzero(d_rp <= within)) / n_surface
    # The box offset cancels in the difference of the two centres.
    offset = np.subtract(ndimage.center_of_mass(pred_mask), ndimage.center_of_mass(ref_mask))
    centroid_distance = float(np.linalg.norm(offset * spacing))
    return {
        "dice": dice,
        "iou": iou,
        "nsd": float(nsd),
        "hd95": float(hd95),
        "assd": float(assd),
        "centroid_distance": centroid_distance,
    } | volumes


def binary_metrics(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: Sequence[float] | np.ndarray,
    tolerance_mm: float = 1.0,
) -> dict[str, float]:
    """All metrics of one structure given as two boolean masks of one case.

    See the module docstring for the definitions and the empty-mask policy.

    Args:
      pred_mask: predicted mask, boolean `(x, y)` or `(x, y, z)`.
      ref_mask: reference (ground-truth) mask, same shape.
      spacing: voxel size in mm per array axis, `(ndim,)`.
      tolerance_mm: tolerance τ of the normalised surface Dice, in mm.

    Returns:
      ``{name: float}`` for every name in :data:`METRIC_NAMES`: ``dice``, ``iou``, ``nsd``
      (in [0, 1]), ``hd95``, ``assd``, ``centroid_distance`` (mm), ``volume_prediction``,
      ``volume_reference`` (ml).
    """
    pred_mask = np.asarray(pred_mask)
    ref_mask = np.asarray(ref_mask)
    _check_same_shape(pred_mask, ref_mask)
    if pred_mask.dtype != bool or ref_mask.dtype != bool:
        raise ValueError(
            f"binary_metrics takes boolean masks; got {pred_mask.dtype} and {ref_mask.dtype}. "
            "Use per_class_metrics for label arrays, or pass `labels == k`."
        )
    spacing = _as_spacing(spacing, pred_mask.ndim)
    tolerance_mm = _check_tolerance(tolerance_mm)
    box = _crop_box(_union_box([_mask_box(pred_mask), _mask_box(ref_mask)]), pred_mask.shape)
    return _metrics_in_box(
        pred_mask[box],
        ref_mask[box],
        spacing,
        tolerance_mm,
        grid_diagonal(pred_mask.shape, spacing),
    )


def _check_labels(labels: np.ndarray, name: str, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name} must be an integer label array (x, y[, z]); got dtype {labels.dtype}. "
            "Take the argmax over the class axis first."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} labels must lie in [0, num_classes={num_classes}); got range "
            f"[{labels.min()}, {labels.max()}]. Check num_classes against the dataset."
        )
    return labels


def per_class_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    *,
    num_classes: int,
    spacing: Sequence[float] | np.ndarray,
    tolerance_mm: float = 1.0,
    overlapping: bool = False,
) -> dict[str, np.ndarray]:
    """All metrics per class of one case from two integer label arrays.

    Class k compares the masks ``prediction == k`` and ``reference == k``. With
    ``overlapping=True`` (nested regions such as BraTS WT ⊃ TC ⊃ ET coded as one label),
    index k ≥ 1 compares the regions ``label ≥ k`` instead; index 0 stays the background
    ``label == 0``. Definitions and the empty-mask policy are in the module docstring.

    Args:
      prediction: predicted labels, integer `(x, y)` or `(x, y, z)`, values in
        ``[0, num_classes)``.
      reference: reference labels, same shape and range.
      num_classes: number of classes including the background.
      spacing: voxel size in mm per array axis, `(ndim,)`, in the arrays' axis order.
      tolerance_mm: tolerance τ of the normalised surface Dice, in mm.
      overlapping: nested-region mode (region k = ``label ≥ k``).

    Returns:
      ``{name: float64 (num_classes,)}`` for every name in :data:`METRIC_NAMES`; index 0 is
      the background.
    """
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    _check_same_shape(prediction, reference)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (background included); got {num_classes}.")
    prediction = _check_labels(prediction, "prediction", num_classes)
    reference = _check_labels(reference, "reference", num_classes)
    spacing = _as_spacing(spacing, prediction.ndim)
    tolerance_mm = _check_tolerance(tolerance_mm)
    shape = prediction.shape
    diagonal = grid_diagonal(shape, spacing)

    # One pass over each array gives every label's bounding box.
    pred_boxes = ndimage.find_objects(prediction, max_label=num_classes - 1)
    ref_boxes = ndimage.find_objects(reference, max_label=num_classes - 1)
    full = tuple(slice(0, n) for n in shape)

    results = {name: np.empty(num_classes, dtype=np.float64) for name in METRIC_NAMES}
    for k in range(num_classes):
        if k == 0:
            # The background usually spans the image; its box is the whole grid.
            box = full
            pred_mask = prediction == 0
            ref_mask = reference == 0
        else:
            # find_objects lists labels 1, 2, ...; region k >= 1 nests labels k..C-1.
            labels = slice(k - 1, num_classes - 1) if overlapping else slice(k - 1, k)
            box = _crop_box(_union_box(pred_boxes[labels] + ref_boxes[labels]), shape)
            if overlapping:
                pred_mask = prediction[box] >= k
                ref_mask = reference[box] >= k
            else:
                pred_mask = prediction[box] == k
                ref_mask = reference[box] == k
        values = _metrics_in_box(pred_mask, ref_mask, spacing, tolerance_mm, diagonal)
        for name, value in values.items():
            results[name][k] = value
    return results
