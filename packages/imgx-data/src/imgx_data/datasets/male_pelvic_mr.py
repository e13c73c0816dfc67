"""``male_pelvic_mr``: T2-weighted prostate MR from seven institutions, 8 structures (3D).

Li et al., "Prototypical few-shot segmentation for cross-institution male pelvic
structures with spatial registration", Medical Image Analysis (2023), arXiv 2209.05160;
data https://zenodo.org/record/7013610 (``data/<uid>_img.nii(.gz)``,
``data/<uid>_mask.nii(.gz)``, ``institution.txt`` with lines ``<uid> <institution>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from imgx_data.datasets.base import (
    ImgxBuilder,
    find_nifti,
    preprocess_case,
    read_case,
    require_dir,
    require_file,
)
from imgx_data.errors import DatasetError
from imgx_data.preprocess import PreprocessedCase

# Per institution: the first 2 cases are valid, [2, k) train and [k, n) test with
# k = int(0.75 n) - 2 (as in the published split).
VALID_PER_INSTITUTION = 2
TRAIN_FRACTION = 0.75


def read_institutions(path: Path) -> dict[str, list[str]]:
    """Institution -> uids in file order, from lines ``<uid> <institution>``."""
    require_file(path, "institution list (lines '<uid> <institution>')")
    institutions: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DatasetError(f"{path}:{number}: expected '<uid> <institution>', got {line!r}.")
        institutions.setdefault(fields[1], []).append(fields[0])
    if not institutions:
        raise DatasetError(f"{path}: no cases listed.")
    return institutions


def split_by_institution(institutions: dict[str, Sequence[str]]) -> dict[str, list[str]]:
    """The published per-institution split (institutions in sorted order).

    With n cases of an institution: valid = [0, 2), train = [2, k), test = [k, n),
    k = max(int(0.75 n) - 2, 2) (the max only matters for n < 6, never in the real data).
    """
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for name in sorted(institutions):
        uids = list(institutions[name])
        k = max(int(len(uids) * TRAIN_FRACTION) - VALID_PER_INSTITUTION, VALID_PER_INSTITUTION)
        splits["valid"] += uids[:VALID_PER_INSTITUTION]
        splits["train"] += uids[VALID_PER_INSTITUTION:k]
        splits["test"] += uids[k:]
    return splits


class MalePelvicMr(ImgxBuilder, skip_registration=True):
    """Male pelvic MR resampled to 0.75x0.75x2.5 mm, 256x256x48, percentile-normalised."""

    name = "male_pelvic_mr"
    CLASS_NAMES = (
        "background",
        "bladder",
        "bone",
        "obturator internus",
        "transition zone",
        "central gland",
        "rectum",
        "seminal vesicle",
        "neurovascular bundle",
    )
    TARGET_SHAPE = (256, 256, 48)
    TARGET_SPACING = (0.75, 0.75, 2.5)
    MANUAL_DIR: ClassVar[str] = "the zenodo 7013610 download: data/ and institution.txt"
    DESCRIPTION = __doc__ or ""
    HOMEPAGE = "https://zenodo.org/record/7013610"
    CITATION = "Li et al., Medical Image Analysis (2023), arXiv 2209.05160."

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = self.raw_dir(dl_manager)
        data_dir = require_dir(root / "data", "folder data/ of the zenodo 7013610 download")
        splits = split_by_institution(read_institutions(root / "institution.txt"))
        # Resolve every file before writing anything, so a missing one fails early.
        cases = {
            split: [
                (uid, find_nifti(data_dir, f"{uid}_img"), find_nifti(data_dir, f"{uid}_mask"))
                for uid in uids
            ]
            for split, uids in splits.items()
        }
        return self._split_examples(cases)

    def _load(self, case: tuple[str, Path, Path]) -> tuple[str, PreprocessedCase]:
        uid, image_path, label_path = case
        image, label, _ = read_case(uid, [image_path], label_path, range(len(self.CLASS_NAMES)))
        return uid, preprocess_case(self, image, label)
