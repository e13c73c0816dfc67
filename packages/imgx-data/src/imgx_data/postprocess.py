"""Post-processing of predicted label maps before metrics.

Muscle ultrasound: the MuscleNet post-processing of Marzola et al., "Deep learning
segmentation of transverse musculoskeletal ultrasound images for neuromuscular disease
assessment", Computers in Biology and Medicine 135 (2021), re-implemented with
scikit-image/scipy.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import morphology

# Second-largest component kept instead of the largest only if it is larger than this
# fraction of the largest and lies more superficially (Marzola et al. 2021).
COMPONENT_AREA_RATIO = 0.75


def select_muscle_component(mask: np.ndarray) -> np.ndarray:
    """Keeps one 8-connected component of a 2D binary mask in ``(x, y)`` order.

    The largest component is kept unless the second largest has more than 0.75 of its
    area; then the more superficial of the two is kept: the one with the smaller minimum
    row ``y`` (nearer the probe at the top of the image).
    """
    components, num = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if num <= 1:
        return mask.astype(bool)
    areas = np.bincount(components.ravel())[1:]
    largest, second = np.argsort(areas)[::-1][:2] + 1
    keep = largest
    if areas[second - 1] > COMPONENT_AREA_RATIO * areas[largest - 1]:
        rows = np.nonzero(components == largest)[1].min(), np.nonzero(components == second)[1].min()
        keep = largest if rows[0] <= rows[1] else second
    return components == keep


def _erode(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    # The image border counts as foreground, as in MATLAB's imerode, so that a muscle
    # touching the border is not eaten from outside the field of view.
    return ndimage.binary_erosion(mask, footprint, border_value=1)


def postprocess_muscle_mask(mask: np.ndarray) -> np.ndarray:
    """Muscle cross-section post-processing of one 2D binary mask ``(x, y)``.

    fill holes -> erode (5x5 square; the border counts as foreground) -> dilate (disk of
    diameter 9, ``disk(4)``) -> open (disk of diameter 19, ``disk(9)``) -> keep one
    8-connected component (:func:`select_muscle_component`) -> fill holes.

    Returns:
        Mask of the same shape and dtype with values {0, 1}.
    """
    if mask.ndim != 2:
        raise ValueError(f"Muscle post-processing takes a 2D mask (x, y), got shape {mask.shape}.")
    binary = ndimage.binary_fill_holes(mask > 0)
    binary = _erode(binary, np.ones((5, 5), dtype=bool))
    binary = ndimage.binary_dilation(binary, morphology.disk(4))
    opening = morphology.disk(9)
    binary = ndimage.binary_dilation(_erode(binary, opening), opening)
    binary = ndimage.binary_fill_holes(select_muscle_component(binary))
    return binary.astype(mask.dtype)


POSTPROCESSORS = {"muscle_mask": postprocess_muscle_mask}
