"""``brats2021_mr`` / ``brats2021_mr_wt``: brain tumour MR, 4 sequences (3D).

Baid et al., "The RSNA-ASNR-MICCAI BraTS 2021 Benchmark on Brain Tumor Segmentation and
Radiogenomic Classification", arXiv 2107.02314. Raw layout:
``BraTS2021_Training_Data/<uid>/<uid>_{t1,t1ce,t2,flair,seg}.nii.gz``, labels
1 = necrotic tumour core (NCR), 2 = peritumoral oedema (ED), 4 = enhancing tumour (ET).
All volumes are 240x240x155 at 1 mm; the brain lies in [37, 216) x [10, 229) x [0, 155),
so the stored grid is that box, 179x219x155, without resampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import SimpleITK as sitk
import tensorflow_datasets as tfds

from imgx_data.datasets.base import (
    ImgxBuilder,
    preprocess_case,
    read_case,
    require_dir,
)
from imgx_data.errors import DatasetError
from imgx_data.io import read_header
from imgx_data.preprocess import PreprocessedCase

MODALITIES = ("t1", "t1ce", "t2", "flair")
RAW_LABELS = (0, 1, 2, 4)
BRAIN_BOX_START = (37, 10, 0)
# Every BraTS 2021 volume is on this grid (x, y, z), 1 mm; the brain box assumes it.
RAW_SHAPE = (240, 240, 155)
# Published split of the 1251 training cases (sorted uids): 938 / 31 / 282.
NUM_CASES, NUM_TRAIN, NUM_TEST = 1251, 938, 282


def split_sorted_uids(uids: Sequence[str]) -> dict[str, list[str]]:
    """Sorted uids: first round(938 n / 1251) train, last round(282 n / 1251) test, rest
    valid (exactly 938 / 31 / 282 for the 1251 cases of the release)."""
    uids = sorted(uids)
    num_train = round(len(uids) * NUM_TRAIN / NUM_CASES)
    num_test = round(len(uids) * NUM_TEST / NUM_CASES)
    return {
        "train": uids[:num_train],
        "valid": uids[num_train : len(uids) - num_test],
        "test": uids[len(uids) - num_test :],
    }


def nested_regions(seg: np.ndarray) -> np.ndarray:
    """BraTS labels to nested regions: region i = (label >= i).

    1 = whole tumour (NCR, ED, ET), 2 = tumour core (NCR, ET), 3 = enhancing tumour (ET);
    so ED -> 1, NCR -> 2, ET -> 3.
    """
    out = np.zeros(seg.shape, dtype=np.uint8)
    out[seg == 2] = 1
    out[seg == 1] = 2
    out[seg == 4] = 3
    return out


def whole_tumour(seg: np.ndarray) -> np.ndarray:
    """BraTS labels to the binary whole tumour (NCR, ED, ET) mask."""
    return (seg > 0).astype(np.uint8)


class Brats2021Mr(ImgxBuilder, skip_registration=True):
    """BraTS 2021 with nested WT/TC/ET regions (sigmoid), 4 channels t1, t1ce, t2, flair,
    cropped to the brain box 179x219x155 at 1 mm, percentile-normalised per channel."""

    name = "brats2021_mr"
    CLASS_NAMES = ("background", "whole tumour", "tumour core", "enhancing tumour")
    OVERLAPPING = True
    NUM_CHANNELS = len(MODALITIES)
    CHANNEL_NAMES = MODALITIES
    TARGET_SHAPE = (179, 219, 155)
    TARGET_SPACING = (1.0, 1.0, 1.0)
    MANUAL_DIR: ClassVar[str] = "the folder holding BraTS2021_Training_Data/"
    DESCRIPTION = __doc__ or ""
    HOMEPAGE = "https://www.synapse.org/brats2021"
    CITATION = "Baid et al., arXiv 2107.02314 (2021)."

    def __init__(
        self,
        *,
        window_start: Sequence[int] = BRAIN_BOX_START,
        raw_shape: Sequence[int] = RAW_SHAPE,
        **kwargs: Any,
    ) -> None:
        """``window_start``/``raw_shape``: the crop start and the grid every raw volume
        must have (the release's defaults; other values for tests and experiments)."""
        self.window_start = tuple(int(s) for s in window_start)
        self.raw_shape = tuple(int(s) for s in raw_shape)
        super().__init__(**kwargs)
        end = np.add(self.window_start, self.target_shape)
        if np.any(np.less(self.window_start, 0)) or np.any(end > self.raw_shape):
            raise DatasetError(
                f"{self.name}: window start {self.window_start} + shape {self.target_shape} "
                f"does not fit in the raw grid {self.raw_shape}."
            )

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        """The target grid, ``window_start`` and ``raw_shape``."""
        defaults = super().default_options()
        return {**defaults, "window_start": BRAIN_BOX_START, "raw_shape": RAW_SHAPE}

    def convert_label(self, seg: np.ndarray) -> np.ndarray:
        """Raw BraTS labels to the stored labels (:func:`nested_regions`)."""
        return nested_regions(seg)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        data_dir = require_dir(
            self.raw_dir(dl_manager) / "BraTS2021_Training_Data", "folder BraTS2021_Training_Data/"
        )
        uids = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
        if not uids:
            raise DatasetError(f"{data_dir}: no case folders <uid>/ found.")
        for uid in uids:
            for suffix in (*MODALITIES, "seg"):
                path = data_dir / uid / f"{uid}_{suffix}.nii.gz"
                if not path.is_file():
                    raise DatasetError(f"{path}: file of case {uid} not found.")
        # Check every grid from the headers before writing anything: the fixed brain box
        # would silently pad or cut a volume of another size.
        for uid in uids:
            for suffix in (*MODALITIES, "seg"):
                path = data_dir / uid / f"{uid}_{suffix}.nii.gz"
                shape = read_header(path).shape
                if shape != self.raw_shape:
                    raise DatasetError(
                        f"{path}: size {shape} is not the BraTS 2021 grid {self.raw_shape} "
                        "(x, y, z); the brain-box crop assumes it. Use the files of the "
                        "BraTS 2021 release as published (not resampled or cropped)."
                    )
        splits = split_sorted_uids(uids)
        return self._split_examples(
            {split: [data_dir / uid for uid in items] for split, items in splits.items()}
        )

    def _load(self, case_dir: Path) -> tuple[str, PreprocessedCase]:
        uid = case_dir.name
        images = [case_dir / f"{uid}_{m}.nii.gz" for m in MODALITIES]
        image, label, seg = read_case(uid, images, case_dir / f"{uid}_seg.nii.gz", RAW_LABELS)
        converted = sitk.GetImageFromArray(self.convert_label(np.asarray(seg)))
        converted.CopyInformation(label)
        case = preprocess_case(
            self, image, converted, resample=False, window_start=self.window_start
        )
        return uid, case


class Brats2021MrWt(Brats2021Mr, skip_registration=True):
    """BraTS 2021 as binary whole-tumour segmentation (softmax, 2 classes)."""

    name = "brats2021_mr_wt"
    CLASS_NAMES = ("background", "whole tumour")
    OVERLAPPING = False

    def convert_label(self, seg: np.ndarray) -> np.ndarray:
        """Raw BraTS labels to the whole tumour mask (:func:`whole_tumour`)."""
        return whole_tumour(seg)
