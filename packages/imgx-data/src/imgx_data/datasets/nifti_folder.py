"""``nifti_folder``: the user's own data in the nnU-Net v2 or Medical Segmentation
Decathlon layout, built under a name of the user's choice.

nnU-Net v2 (Isensee et al., Nature Methods 18, 2021)::

    dataset.json   {"channel_names": {"0": "T2"}, "labels": {"background": 0, "tumour": 1},
                    "file_ending": ".nii.gz", ...}
    imagesTr/<case>_0000.nii.gz (+ _0001 ... one file per channel)
    labelsTr/<case>.nii.gz
    splits.json    optional: {"train": [...], "valid": [...], "test": [...]}

Medical Segmentation Decathlon (Antonelli et al., Nature Communications 13, 2022):
``dataset.json`` with ``modality`` {"0": "FLAIR", ...}, ``labels`` {"0": "background", ...}
and ``training`` [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}];
multi-channel images are 4D files.

2D data: PNG files, or NIfTI files with one slice. Target spacing defaults to the median
spacing with nnU-Net's anisotropy rule (:func:`imgx_data.planning.target_spacing`), target
shape to the smallest multiple of 8 per axis covering every resampled case.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import SimpleITK as sitk
import tensorflow_datasets as tfds

from imgx_data.datasets.base import (
    SPLITS,
    ImgxBuilder,
    check_label_values,
    check_unique_case_ids,
    preprocess_case,
    read_json,
    require_dir,
)
from imgx_data.errors import DatasetError
from imgx_data.io import (
    Geometry,
    check_intensities,
    check_same_geometry,
    compose_channels,
    image_channels,
    read_header,
    read_sitk_image,
)
from imgx_data.planning import target_spacing
from imgx_data.preprocess import PreprocessedCase, resampled_grid

SPLIT_SEED = 0
VALID_FRACTION = TEST_FRACTION = 0.1
SHAPE_MULTIPLE = 8
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class NiftiCase:
    """One labelled case: its channel files (one 4D file for MSD) and its label file."""

    uid: str
    image_paths: tuple[Path, ...]
    label_path: Path


@dataclasses.dataclass(frozen=True)
class NiftiFolderLayout:
    """What ``dataset.json`` and the folders describe."""

    root: Path
    class_names: tuple[str, ...]
    channel_names: tuple[str, ...]
    cases: tuple[NiftiCase, ...]


def find_dataset_json(root: Path) -> Path:
    """``root/dataset.json``, or the only ``root/*/dataset.json`` (an extracted zip)."""
    if (root / "dataset.json").is_file():
        return root / "dataset.json"
    found = sorted(root.glob("*/dataset.json"))
    if len(found) != 1:
        raise DatasetError(
            f"{root}: no dataset.json (nnU-Net v2 or Medical Segmentation Decathlon layout) "
            f"in it{' or one level below' if not found else f'; several below: {found}'}."
        )
    return found[0]


def _class_names(value_to_name: dict[int, str], json_path: Path) -> tuple[str, ...]:
    values = sorted(value_to_name)
    if values != list(range(len(values))) or len(values) < 2:
        raise DatasetError(
            f"{json_path}: 'labels' must number background 0 and the classes 1..K without gaps, "
            f"got values {values}."
        )
    return tuple(value_to_name[v] for v in values)


def _nnunet_layout(data: dict[str, Any], root: Path, json_path: Path) -> NiftiFolderLayout:
    channels = data["channel_names"]
    labels = data.get("labels")
    ending = data.get("file_ending")
    if not isinstance(channels, dict) or not channels:
        raise DatasetError(f"{json_path}: 'channel_names' must map '0', '1', ... to names.")
    if not isinstance(labels, dict) or not isinstance(ending, str):
        raise DatasetError(
            f"{json_path}: nnU-Net v2 dataset.json needs 'labels' (name -> int) and "
            "'file_ending' (e.g. '.nii.gz')."
        )
    if not all(isinstance(v, int) for v in labels.values()):
        raise DatasetError(
            f"{json_path}: 'labels' values must be integers (region-based nnU-Net labels "
            "given as lists are not supported)."
        )
    try:
        channel_names = tuple(channels[str(c)] for c in range(len(channels)))
    except KeyError as exc:
        raise DatasetError(
            f"{json_path}: 'channel_names' keys must be '0'..'{len(channels) - 1}'."
        ) from exc
    images_dir = require_dir(root / "imagesTr", "folder imagesTr/")
    labels_dir = require_dir(root / "labelsTr", "folder labelsTr/")
    first = f"_0000{ending}"
    uids = sorted(p.name[: -len(first)] for p in images_dir.glob(f"*{first}"))
    if not uids:
        raise DatasetError(f"{images_dir}: no images <case>{first}.")
    cases = []
    for uid in uids:
        label = labels_dir / f"{uid}{ending}"
        if not label.is_file():
            raise DatasetError(
                f"{images_dir / (uid + first)}: image has no label; expected {label}."
            )
        images = tuple(images_dir / f"{uid}_{c:04d}{ending}" for c in range(len(channel_names)))
        cases.append(NiftiCase(uid, images, label))
    class_names = _class_names({v: k for k, v in labels.items()}, json_path)
    return NiftiFolderLayout(root, class_names, channel_names, tuple(cases))


def _msd_layout(data: dict[str, Any], root: Path, json_path: Path) -> NiftiFolderLayout:
    modality, labels, training = data["modality"], data.get("labels"), data.get("training")
    if not isinstance(labels, dict) or not isinstance(training, list) or not training:
        raise DatasetError(
            f"{json_path}: Decathlon dataset.json needs 'labels' (int -> name) and a non-empty "
            "'training' list of image/label pairs."
        )
    try:
        value_to_name = {int(k): v for k, v in labels.items()}
        channel_names = tuple(modality[str(c)] for c in range(len(modality)))
    except (KeyError, ValueError) as exc:
        raise DatasetError(
            f"{json_path}: 'labels' keys must be integers and 'modality' keys '0', '1', ..."
        ) from exc
    cases = []
    for entry in training:
        if not isinstance(entry, dict) or not {"image", "label"} <= entry.keys():
            raise DatasetError(f"{json_path}: training entry {entry!r} lacks image/label.")
        image, label = root / entry["image"], root / entry["label"]
        if not label.is_file():
            raise DatasetError(f"{image}: image has no label; expected {label}.")
        cases.append(NiftiCase(image.name.split(".")[0], (image,), label))
    check_unique_case_ids(((case.uid, case.image_paths[0]) for case in cases), json_path)
    return NiftiFolderLayout(
        root, _class_names(value_to_name, json_path), channel_names, tuple(cases)
    )


def read_layout(root: Path) -> NiftiFolderLayout:
    """Parses ``dataset.json`` (nnU-Net v2 or Decathlon) and lists the labelled cases."""
    json_path = find_dataset_json(root)
    data = read_json(json_path)
    if not isinstance(data, dict):
        raise DatasetError(f"{json_path}: expected a JSON object.")
    if "channel_names" in data:
        return _nnunet_layout(data, json_path.parent, json_path)
    if "modality" in data:
        return _msd_layout(data, json_path.parent, json_path)
    raise DatasetError(
        f"{json_path}: neither nnU-Net v2 ('channel_names', 'labels', 'file_ending') nor "
        "Medical Segmentation Decathlon ('modality', 'labels', 'training') keys found."
    )


def drop_single_slice(geometry: Geometry) -> Geometry:
    """A 3D grid with one slice as 2D (2D data stored as NIfTI)."""
    if geometry.ndim != 3 or geometry.shape[2] != 1:
        return geometry
    return Geometry(
        shape=geometry.shape[:2],
        spacing=geometry.spacing[:2],
        origin=geometry.origin[:2],
        direction=tuple(geometry.direction_matrix[:2, :2].ravel()),
    )


def default_split(uids: Sequence[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Seeded 80/10/10 split of the sorted uids (valid and test get >= 1 case when n >= 3)."""
    uids = sorted(uids)
    order = [uids[i] for i in np.random.default_rng(seed).permutation(len(uids))]
    minimum = 1 if len(uids) >= 3 else 0
    num_valid = max(round(len(uids) * VALID_FRACTION), minimum)
    num_test = max(round(len(uids) * TEST_FRACTION), minimum)
    return {
        "train": sorted(order[num_valid + num_test :]),
        "valid": sorted(order[:num_valid]),
        "test": sorted(order[num_valid : num_valid + num_test]),
    }


def read_splits(path: Path, uids: Sequence[str]) -> dict[str, list[str]]:
    """The user's ``splits.json`` ``{"train": [...], "valid": [...], "test": [...]}``.

    Cases in no list are left out; a case in two lists or unknown is an error.
    """
    data = read_json(path)
    if not isinstance(data, dict) or not set(data) <= set(SPLITS):
        raise DatasetError(f"{path}: expected an object with keys among {list(SPLITS)}.")
    known, seen = set(uids), set()
    splits = {}
    for split in SPLITS:
        items = data.get(split, [])
        if not isinstance(items, list) or not all(isinstance(u, str) for u in items):
            raise DatasetError(f"{path}: '{split}' must be a list of case names.")
        for uid in items:
            if uid not in known:
                raise DatasetError(f"{path}: case {uid!r} in '{split}' has no image/label pair.")
            if uid in seen:
                raise DatasetError(f"{path}: case {uid!r} is listed in more than one split.")
            seen.add(uid)
        splits[split] = list(items)
    return splits


@dataclasses.dataclass(frozen=True)
class NiftiFolderPlan:
    """Everything decided before writing: layout, target grid, split."""

    layout: NiftiFolderLayout
    spacing: tuple[float, ...]
    shape: tuple[int, ...]
    splits: dict[str, list[str]]


def plan_nifti_folder(
    root: Path,
    spacing: Sequence[float] | None = None,
    shape: Sequence[int] | None = None,
) -> NiftiFolderPlan:
    """Reads the layout and headers, checks each case's grids, picks grid and split.

    Target spacing: ``spacing`` or :func:`imgx_data.planning.target_spacing` (the median,
    the 10th percentile along an anisotropic axis). Target
    shape: ``shape`` or, per axis, the smallest multiple of 8 covering
    ``round(size * spacing / target)`` of every case.
    """
    layout = read_layout(root)
    grids = []
    for case in layout.cases:
        label = drop_single_slice(read_header(case.label_path))
        for path in case.image_paths:
            check_same_geometry(
                label,
                drop_single_slice(read_header(path)),
                case=case.uid,
                reference_name=f"label {case.label_path.name}",
                other_name=f"image {path.name}",
            )
        grids.append(label)
    ndims = {g.ndim for g in grids}
    if len(ndims) != 1:
        raise DatasetError(f"{root}: cases mix 2D and 3D images ({sorted(ndims)}D).")
    ndim = ndims.pop()
    if spacing is None:
        spacing = target_spacing([g.spacing for g in grids], [g.shape for g in grids])
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise DatasetError(f"spacing {spacing} must have {ndim} values for this {ndim}D data.")
    if shape is None:
        sizes = np.max([resampled_grid(g, spacing).shape for g in grids], axis=0)
        shape = tuple(int(np.ceil(s / SHAPE_MULTIPLE) * SHAPE_MULTIPLE) for s in sizes)
    shape = tuple(int(s) for s in shape)
    if len(shape) != ndim:
        raise DatasetError(f"shape {shape} must have {ndim} values for this {ndim}D data.")
    uids = [c.uid for c in layout.cases]
    splits_path = find_dataset_json(root).parent / "splits.json"
    splits = read_splits(splits_path, uids) if splits_path.exists() else default_split(uids)
    return NiftiFolderPlan(layout, spacing, shape, splits)


def _read_2d_or_3d(path: Path, ndim: int) -> sitk.Image:
    image = read_sitk_image(path)
    if ndim == 2 and image.GetDimension() == 3:
        return image[:, :, 0]
    return image


class NiftiFolder(ImgxBuilder, skip_registration=True):
    """A user's NIfTI/PNG folder; use :func:`nifti_folder_builder` for a named build."""

    name = "nifti_folder"
    MANUAL_DIR: ClassVar[str] = (
        "a folder with dataset.json, imagesTr/ and labelsTr/ (nnU-Net v2 or Medical "
        "Segmentation Decathlon layout), optionally splits.json"
    )
    DESCRIPTION = __doc__ or ""

    def __init__(
        self,
        *,
        root: str | Path,
        spacing: Sequence[float] | None = None,
        shape: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.plan = plan_nifti_folder(Path(root), spacing, shape)
        self.CLASS_NAMES = self.plan.layout.class_names
        self.NUM_CHANNELS = len(self.plan.layout.channel_names)
        self.CHANNEL_NAMES = self.plan.layout.channel_names
        super().__init__(target_spacing=self.plan.spacing, target_shape=self.plan.shape, **kwargs)

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        """``spacing`` and ``shape``; None: derived from the data (see module doc)."""
        return {"spacing": None, "shape": None}

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager
        by_uid = {case.uid: case for case in self.plan.layout.cases}
        return self._split_examples(
            {split: [by_uid[u] for u in uids] for split, uids in self.plan.splits.items()}
        )

    def _load(self, case: NiftiCase) -> tuple[str, PreprocessedCase]:
        ndim = len(self.target_shape)
        label = _read_2d_or_3d(case.label_path, ndim)
        check_label_values(
            sitk.GetArrayViewFromImage(label), range(len(self.CLASS_NAMES)), case.label_path
        )
        channels = []
        for path in case.image_paths:
            image = _read_2d_or_3d(path, ndim)
            check_intensities(image, path)
            channels += image_channels(image)
        if len(channels) != self.NUM_CHANNELS:
            raise DatasetError(
                f"Case {case.uid}: {len(channels)} image channels, dataset.json lists "
                f"{self.NUM_CHANNELS}."
            )
        channels[0].CopyInformation(label)
        image = compose_channels(channels)
        return case.uid, preprocess_case(self, image, sitk.Cast(label, sitk.sitkUInt8))


def nifti_folder_builder(name: str) -> type[NiftiFolder]:
    """A NiftiFolder builder class whose dataset is stored under ``name``."""
    if not NAME_PATTERN.match(name):
        raise DatasetError(
            f"Dataset name {name!r}: use lower case letters, digits and _, starting with a letter."
        )
    return types.new_class(
        f"NiftiFolder_{name}",
        (NiftiFolder,),
        {"skip_registration": True},
        lambda namespace: namespace.update({"name": name, "__module__": __name__}),
    )
