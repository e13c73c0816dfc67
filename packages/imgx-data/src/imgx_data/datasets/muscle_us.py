"""``muscle_us``: transverse musculoskeletal ultrasound, muscle cross-sectional area (2D).

Marzola et al., "Deep learning segmentation of transverse musculoskeletal ultrasound
images for neuromuscular disease assessment", Computers in Biology and Medicine 135
(2021); data https://data.mendeley.com/datasets/3jykz7wz8d/1. Split by the folders of the
release: train/val/test (2531/666/713 images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import SimpleITK as sitk
import tensorflow_datasets as tfds

from imgx_data.datasets.base import (
    ImgxBuilder,
    preprocess_case,
    require_dir,
)
from imgx_data.errors import DatasetError
from imgx_data.io import Geometry, check_intensities, check_same_geometry, read_sitk_image
from imgx_data.preprocess import PNG, PreprocessedCase

# split -> (image folder, annotation folder) below MuscleCNN/.
MUSCLE_FOLDERS = {
    "train": ("train", "trainannot"),
    "valid": ("val", "valannot"),
    "test": ("test", "testannot"),
}


def find_muscle_dir(root: Path) -> Path:
    """The unique ``MuscleCNN`` folder below ``root`` (the extracted Mendeley tree)."""
    found = sorted(p for p in root.rglob("MuscleCNN") if p.is_dir())
    if len(found) != 1:
        raise DatasetError(
            f"{root}: expected one MuscleCNN folder below it (from the extracted Mendeley "
            f"3jykz7wz8d download), found {len(found)}: {[str(p) for p in found]}."
        )
    return found[0]


def pair_images_and_masks(image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    """Sorted (image, mask) PNG pairs with the same file name; every image needs a mask."""
    require_dir(image_dir, "image folder")
    require_dir(mask_dir, "annotation folder")
    pairs = []
    for image in sorted(image_dir.glob("*.png")):
        mask = mask_dir / image.name
        if not mask.is_file():
            raise DatasetError(f"{image}: image has no label; expected {mask}.")
        pairs.append((image, mask))
    return pairs


class MuscleUs(ImgxBuilder, skip_registration=True):
    """Muscle ultrasound PNGs, grayscale / 255, masks -> {0, 1}, padded/cropped to
    480 rows x 512 columns (stored ``(x, y)`` = (512, 480)), spacing 1 (pixels)."""

    name = "muscle_us"
    CLASS_NAMES = ("background", "muscle cross-sectional area")
    TARGET_SHAPE = (512, 480)
    TARGET_SPACING = (1.0, 1.0)
    POSTPROCESS = "muscle_mask"
    INTENSITY = PNG
    MANUAL_DIR: ClassVar[str] = (
        "the extracted Mendeley 3jykz7wz8d download (a folder tree with "
        ".../MuscleCNN/{train,trainannot,val,valannot,test,testannot}/*.png below it)"
    )
    DESCRIPTION = __doc__ or ""
    HOMEPAGE = "https://data.mendeley.com/datasets/3jykz7wz8d/1"
    CITATION = "Marzola et al., Computers in Biology and Medicine 135 (2021) 104623."

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        muscle_dir = find_muscle_dir(self.raw_dir(dl_manager))
        pairs = {
            split: pair_images_and_masks(muscle_dir / images, muscle_dir / masks)
            for split, (images, masks) in MUSCLE_FOLDERS.items()
        }
        return self._split_examples(pairs)

    def _load(self, pair: tuple[Path, Path]) -> tuple[str, PreprocessedCase]:
        image_path, mask_path = pair
        image, mask = read_sitk_image(image_path), read_sitk_image(mask_path)
        check_same_geometry(
            Geometry.of(mask),
            Geometry.of(image),
            case=image_path.stem,
            reference_name=f"label {mask_path}",
            other_name=f"image {image_path}",
        )
        check_intensities(image, image_path)
        binary = sitk.GetImageFromArray((sitk.GetArrayViewFromImage(mask) > 0).astype(np.uint8))
        binary.CopyInformation(mask)
        case = preprocess_case(self, sitk.Cast(image, sitk.sitkFloat32), binary, resample=False)
        return image_path.stem, case
