"""``amos_ct``: abdominal CT with 15 organs (3D), the CT part of AMOS 2022.

Ji et al., "AMOS: A Large-Scale Abdominal Multi-Organ Benchmark for Versatile Medical
Image Segmentation", NeurIPS 2022 Datasets and Benchmarks; data
https://zenodo.org/record/7262581 (``amos22/dataset.json`` with ``training`` and
``validation`` lists of ``{"image": "./imagesTr/amos_0001.nii.gz", "label": ...}``).
Case ids <= 500 are CT, > 500 MRI. The labelled validation CTs (test labels are not
public) are split in ``dataset.json`` order: the first int(0.1 n) valid, the rest test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from imgx_data.datasets.base import (
    ImgxBuilder,
    check_unique_case_ids,
    preprocess_case,
    read_case,
    read_json,
    require_dir,
)
from imgx_data.errors import DatasetError
from imgx_data.preprocess import PreprocessedCase

MAX_CT_ID = 500
VALID_FRACTION = 0.1
# nnU-Net's CT clipping for AMOS (Ji et al. 2022, appendix C.1), HU.
HU_RANGE = (-991.0, 362.0)

Case = tuple[str, Path, Path]


def amos_case_id(path: str) -> int:
    """``./imagesTr/amos_0507.nii.gz`` -> 507."""
    stem = Path(path).name.split(".")[0]
    try:
        return int(stem.split("_")[-1])
    except ValueError as exc:
        raise DatasetError(f"AMOS file name {path!r} is not amos_<id>.nii.gz.") from exc


def amos_ct_splits(metadata: dict[str, Any], root: Path, json_path: Path) -> dict[str, list[Case]]:
    """train = CT of ``training``; CT of ``validation`` -> first int(0.1 n) valid, rest test."""
    lists = {}
    for key in ("training", "validation"):
        entries = metadata.get(key)
        if not isinstance(entries, list):
            raise DatasetError(f"{json_path}: missing the list {key!r} of image/label pairs.")
        cases = []
        for entry in entries:
            if not isinstance(entry, dict) or not {"image", "label"} <= entry.keys():
                raise DatasetError(f"{json_path}: {key} entry {entry!r} lacks image/label.")
            if amos_case_id(entry["image"]) <= MAX_CT_ID:
                uid = Path(entry["image"]).name.split(".")[0]
                cases.append((uid, root / entry["image"], root / entry["label"]))
        lists[key] = cases
    check_unique_case_ids(
        ((uid, image) for cases in lists.values() for uid, image, _ in cases), json_path
    )
    num_valid = int(len(lists["validation"]) * VALID_FRACTION)
    return {
        "train": lists["training"],
        "valid": lists["validation"][:num_valid],
        "test": lists["validation"][num_valid:],
    }


class AmosCt(ImgxBuilder, skip_registration=True):
    """AMOS CT resampled to 1.5x1.5x5 mm, 192x128x128, HU clipped to [-991, 362]."""

    name = "amos_ct"
    CLASS_NAMES = (
        "background",
        "spleen",
        "right kidney",
        "left kidney",
        "gallbladder",
        "esophagus",
        "liver",
        "stomach",
        "aorta",
        "inferior vena cava",
        "pancreas",
        "right adrenal gland",
        "left adrenal gland",
        "duodenum",
        "urinary bladder",
        "prostate or uterus",
    )
    TARGET_SHAPE = (192, 128, 128)
    TARGET_SPACING = (1.5, 1.5, 5.0)
    INTENSITY = HU_RANGE
    MANUAL_DIR: ClassVar[str] = "the zenodo 7262581 download: amos22/ with dataset.json"
    DESCRIPTION = __doc__ or ""
    HOMEPAGE = "https://zenodo.org/record/7262581"
    CITATION = "Ji et al., NeurIPS 2022 Datasets and Benchmarks, 35:36722-36732."

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = require_dir(self.raw_dir(dl_manager) / "amos22", "folder amos22/ of the download")
        json_path = root / "dataset.json"
        splits = amos_ct_splits(read_json(json_path), root, json_path)
        for cases in splits.values():
            for uid, image, label in cases:
                for path in (image, label):
                    if not path.is_file():
                        raise DatasetError(
                            f"{path}: file of case {uid} listed in {json_path} not found."
                        )
        return self._split_examples(splits)

    def _load(self, case: Case) -> tuple[str, PreprocessedCase]:
        uid, image_path, label_path = case
        image, label, _ = read_case(uid, [image_path], label_path, range(len(self.CLASS_NAMES)))
        return uid, preprocess_case(self, image, label)
