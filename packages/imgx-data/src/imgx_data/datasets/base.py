"""What all imgx dataset builders share: features, metadata, raw-file checks."""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import SimpleITK as sitk
import tensorflow_datasets as tfds

from imgx_data.errors import DatasetError
from imgx_data.io import (
    Geometry,
    check_intensities,
    check_same_geometry,
    compose_channels,
    image_channels,
    read_sitk_image,
)
from imgx_data.preprocess import PERCENTILE, Intensity, PreprocessedCase, preprocess_volume

SPLITS = ("train", "valid", "test")
DATASET_VERSION = "1.0.0"
METADATA_KEY = "imgx"

Example = tuple[str, dict[str, Any]]


def example_features(
    shape: Sequence[int],
    num_channels: int,
    encoding: tfds.features.Encoding = tfds.features.Encoding.ZLIB,
) -> tfds.features.FeaturesDict:
    """TFDS features of one case: image/label on the stored grid plus both geometries.

    Shapes (ndim = len(shape)): ``image`` float32 ``(*spatial, channels)`` and ``label``
    uint8 ``spatial``, the case stored whole at the target spacing (any spatial shape,
    padded to at least ``shape``); ``spacing``/``origin`` float32 ``(ndim,)`` in mm and
    ``direction`` ``(ndim * ndim,)`` of the stored grid; ``original_*`` the same for the raw
    file plus ``original_shape``; ``crop_start`` int32 ``(ndim,)``, the stored grid's start
    in the resampled grid (negative = padding); ``window_start`` int32 ``(ndim,)``, the
    start of the training window of ``shape`` in the stored arrays; ``original_label``
    uint8 ``original_shape`` (variable), the label file on its own grid;
    ``cropped_foreground`` int64, the foreground voxels the training window drops;
    ``window_image``/``window_label`` the training window's arrays when the case is larger
    than the window (``window_stored``; training reads only them), else a placeholder.
    """
    ndim = len(shape)

    def vector(size: int, dtype: type = np.float32) -> tfds.features.Tensor:
        return tfds.features.Tensor(shape=(size,), dtype=dtype)

    return tfds.features.FeaturesDict(
        {
            "uid": tfds.features.Text(),
            # Cases are stored whole (any shape); training reads the window of `shape`.
            "image": tfds.features.Tensor(
                shape=(*(None,) * ndim, num_channels), dtype=np.float32, encoding=encoding
            ),
            "label": tfds.features.Tensor(shape=(None,) * ndim, dtype=np.uint8, encoding=encoding),
            "original_label": tfds.features.Tensor(
                shape=(None,) * ndim, dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
            ),
            "cropped_foreground": tfds.features.Tensor(shape=(), dtype=np.int64),
            "spacing": vector(ndim),
            "origin": vector(ndim),
            "direction": vector(ndim * ndim),
            "original_shape": vector(ndim, np.int32),
            "original_spacing": vector(ndim),
            "original_origin": vector(ndim),
            "original_direction": vector(ndim * ndim),
            "crop_start": vector(ndim, np.int32),
            "window_start": vector(ndim, np.int32),
            # The training window's arrays when the case is larger than it (window_stored),
            # else a placeholder.
            "window_stored": tfds.features.Tensor(shape=(), dtype=np.bool_),
            "window_image": tfds.features.Tensor(
                shape=(*(None,) * ndim, num_channels), dtype=np.float32, encoding=encoding
            ),
            "window_label": tfds.features.Tensor(
                shape=(None,) * ndim, dtype=np.uint8, encoding=encoding
            ),
        }
    )


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a dataset holds, stored in its ``metadata.json`` under ``"imgx"``.

    Attributes:
        num_spatial_dims: 2 or 3.
        image_shape: stored spatial shape ``(x, y[, z])``.
        num_channels: image channels.
        class_names: full names, background first.
        overlapping: classes are nested regions (region i = label >= i), trained with
            sigmoids, instead of exclusive classes.
        spacing: stored voxel size per axis, mm.
        postprocess: name of the post-processing applied before metrics, or None.
        manual_dir: what ``--manual-dir`` points at, or None for generated data.
        intensity: intensity policy of the images
            (:func:`imgx_data.preprocess.scale_intensity`), to prepare new scans alike.
        channel_names: a name per image channel (empty in datasets built before it was
            recorded).
    """

    num_spatial_dims: int
    image_shape: tuple[int, ...]
    num_channels: int
    class_names: tuple[str, ...]
    overlapping: bool
    spacing: tuple[float, ...]
    postprocess: str | None
    manual_dir: str | None
    intensity: Intensity = PERCENTILE
    channel_names: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetSpec:
        """Inverse of :meth:`to_json`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        )


def _make_spec(source: Any, shape: Sequence[int], spacing: Sequence[float]) -> DatasetSpec:
    """DatasetSpec from a builder class or instance (``source``) and a target grid."""
    return DatasetSpec(
        num_spatial_dims=len(shape),
        image_shape=tuple(shape),
        num_channels=source.NUM_CHANNELS,
        class_names=source.CLASS_NAMES,
        overlapping=source.OVERLAPPING,
        spacing=tuple(spacing),
        postprocess=source.POSTPROCESS,
        manual_dir=source.MANUAL_DIR,
        intensity=source.INTENSITY,
        channel_names=source.CHANNEL_NAMES
        or tuple(f"channel_{c}" for c in range(source.NUM_CHANNELS)),
    )


class ImgxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the imgx builders: array_record files, imgx features and metadata.

    Subclasses set the class attributes and implement ``_split_generators``. The target
    grid defaults to the spec's; ``target_spacing``/``target_shape`` override it (tests,
    experiments), and the stored metadata always records what was built.
    """

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {DATASET_VERSION: "First imgx release."}
    CLASS_NAMES: ClassVar[tuple[str, ...]]
    TARGET_SHAPE: ClassVar[tuple[int, ...]]
    TARGET_SPACING: ClassVar[tuple[float, ...]]
    NUM_CHANNELS: ClassVar[int] = 1
    CHANNEL_NAMES: ClassVar[tuple[str, ...]] = ()  # () = channel_0, channel_1, ...
    OVERLAPPING: ClassVar[bool] = False
    POSTPROCESS: ClassVar[str | None] = None
    MANUAL_DIR: ClassVar[str | None] = None
    INTENSITY: ClassVar[Intensity] = PERCENTILE
    DESCRIPTION: ClassVar[str] = ""
    HOMEPAGE: ClassVar[str] = ""
    CITATION: ClassVar[str] = ""
    # zlib shrinks padded volumes; noisy generated data barely compresses (raw BYTES
    # then; NONE would serialise floats one by one as a slow float_list).
    ENCODING: ClassVar[tfds.features.Encoding] = tfds.features.Encoding.ZLIB

    def __init__(
        self,
        *,
        target_spacing: Sequence[float] | None = None,
        target_shape: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.target_spacing = tuple(
            float(s) for s in (self.TARGET_SPACING if target_spacing is None else target_spacing)
        )
        self.target_shape = tuple(
            int(s) for s in (self.TARGET_SHAPE if target_shape is None else target_shape)
        )
        if len(self.target_spacing) != len(self.target_shape):
            raise DatasetError(
                f"{self.name}: target spacing {self.target_spacing} and target shape "
                f"{self.target_shape} must have one value per spatial axis."
            )
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No code-relative checksum files: nothing is downloaded (and tfds 4.9.10's
        lookup needs ``importlib_resources``, which is not a dependency)."""
        return None

    def _log_download_done(self) -> None:
        """Silent: :func:`imgx_data.build` writes into a temporary data dir and moves the
        dataset into place afterwards, so TFDS's "prepared to <dir>" would name the wrong
        folder."""

    def _log_download_bytes(self) -> None:
        """No TFDS "Downloading and preparing dataset Unknown size ... to <temporary dir>"
        line: imgx downloads nothing, and the folder is the temporary one."""
        logging.info("%s: preparing the examples", self.name)

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        """The options :func:`imgx_data.build` passes to this builder, with their defaults.

        Each build records these values (the given ones, else the defaults) to tell a
        request for the same build from one with other parameters.
        """
        return {"target_spacing": cls.TARGET_SPACING, "target_shape": cls.TARGET_SHAPE}

    @classmethod
    def default_spec(cls) -> DatasetSpec:
        """The spec of the dataset built with the default target grid."""
        return _make_spec(cls, cls.TARGET_SHAPE, cls.TARGET_SPACING)

    @property
    def spec(self) -> DatasetSpec:
        """The spec of this build (instances may set their own classes and channels)."""
        return _make_spec(self, self.target_shape, self.target_spacing)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=example_features(self.target_shape, self.spec.num_channels, self.ENCODING),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            # Keep the generation order (sorted / published order) for reproducible reads.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict({METADATA_KEY: self.spec.to_json()}),
        )

    def _split_examples(self, splits: dict[str, Sequence[Any]]) -> dict[str, Iterator[Example]]:
        """Example generators of the non-empty splits (TFDS cannot write an empty split;
        an empty split reads as 0 examples)."""
        if not any(splits.values()):
            raise DatasetError(f"{self.name}: no cases found in the raw files.")
        return {
            split: self._generate_examples(cases, split) for split, cases in splits.items() if cases
        }

    def _generate_examples(self, cases: Sequence[Any], split: str) -> Iterator[Example]:
        """Yields ``(uid, example)`` per case, preprocessed by :meth:`_load` and stored whole
        (:meth:`PreprocessedCase.whole`); a train or valid case (valid cases train in
        cross-validation folds) whose training window drops foreground is warned about."""
        for case in cases:
            uid, processed = self._load(case)
            if processed.cropped_foreground and split != "test":
                logging.warning(
                    "%s: %s case %s: the %s training window drops %d foreground voxels of the "
                    "label; training never sees them (validation and test see the whole "
                    "case): a larger target_shape keeps them.",
                    self.name,
                    split,
                    uid,
                    self.target_shape,
                    processed.cropped_foreground,
                )
            yield uid, processed.whole().to_example(uid)

    @abc.abstractmethod
    def _load(self, case: Any) -> tuple[str, PreprocessedCase]:
        """Reads and preprocesses one case (the builder's own raw-file description)."""

    def raw_dir(self, dl_manager: tfds.download.DownloadManager) -> Path:
        """The user's ``--manual-dir``, checked to exist and to be non-empty."""
        # The public `manual_dir` property asserts; read the raw value to raise DatasetError.
        directory = dl_manager._manual_dir
        if directory is None:
            raise DatasetError(
                f"{self.name}: no manual dir given; pass --manual-dir pointing at "
                f"{self.MANUAL_DIR}."
            )
        directory = Path(directory)
        if not directory.is_dir():
            raise DatasetError(
                f"{directory}: manual dir not found; it should hold {self.MANUAL_DIR}."
            )
        if not any(directory.iterdir()):
            raise DatasetError(
                f"{directory}: manual dir is empty; it should hold {self.MANUAL_DIR}."
            )
        return directory


def require_file(path: Path, what: str) -> Path:
    """Returns ``path`` or raises DatasetError naming it and what it should be."""
    if not path.is_file():
        raise DatasetError(f"{path}: {what} not found.")
    return path


def require_dir(path: Path, what: str) -> Path:
    """Returns ``path`` or raises DatasetError naming it and what it should be."""
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} not found.")
    return path


def check_label_values(array: np.ndarray, allowed: Sequence[int], path: Path) -> None:
    """Raises DatasetError if a label map holds values outside ``allowed``."""
    values = np.unique(array)
    bad = sorted(set(values.tolist()) - {int(v) for v in allowed})
    if bad or not np.all(np.equal(np.mod(values, 1), 0)):
        raise DatasetError(
            f"{path}: label values {bad or values.tolist()} are not in the class list "
            f"{sorted(int(v) for v in allowed)}."
        )


def read_case(
    case: str,
    image_paths: Sequence[Path],
    label_path: Path,
    allowed_labels: Sequence[int],
) -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    """Reads and checks the image channel files and label file of one case.

    Checks: files exist and are readable, all grids agree with the label's, intensities
    are finite and not constant, label values are in ``allowed_labels``.

    Returns:
        The (vector, if several channels or a 4D file) float32 image, the uint8 label image
        and the raw label array in SimpleITK's ``(z, y, x)`` order.
    """
    label_image = read_sitk_image(label_path)
    label_array = sitk.GetArrayFromImage(label_image)
    check_label_values(label_array, allowed_labels, label_path)
    label_geometry = Geometry.of(label_image)
    channels = []
    for path in image_paths:
        image = read_sitk_image(path)
        check_same_geometry(
            label_geometry,
            Geometry.of(image),
            case=case,
            reference_name=f"label {label_path}",
            other_name=f"image {path}",
        )
        check_intensities(image, path)
        channels += image_channels(image)
    image = compose_channels(channels)
    return image, sitk.Cast(label_image, sitk.sitkUInt8), label_array


def preprocess_case(
    builder: ImgxBuilder,
    image: sitk.Image,
    label: sitk.Image,
    *,
    resample: bool = True,
    window_start: Sequence[int] | None = None,
) -> PreprocessedCase:
    """:func:`imgx_data.preprocess.preprocess_volume` with the builder's target grid."""
    return preprocess_volume(
        image,
        label,
        target_spacing=builder.target_spacing if resample else None,
        target_shape=builder.target_shape,
        intensity=builder.INTENSITY,
        window_start=window_start,
    )


def check_unique_case_ids(cases: Iterable[tuple[str, Path]], listing: Path) -> None:
    """Raises DatasetError naming both files when two cases of ``listing`` share an id.

    Two cases with one id would be one example twice (or one lost), and could land in
    two splits, leaking test data into training.

    Args:
        cases: ``(case id, image file)`` per case.
        listing: what lists the cases (``dataset.json``), named in the message.
    """
    seen: dict[str, Path] = {}
    for uid, path in cases:
        if uid in seen:
            raise DatasetError(
                f"{listing}: case id {uid!r} is given twice, by {seen[uid]} and {path}; "
                "each case needs its own id: remove or rename one of them."
            )
        seen[uid] = path


def find_nifti(directory: Path, stem: str) -> Path:
    """``directory/stem.nii.gz`` or ``directory/stem.nii``, else DatasetError."""
    for suffix in (".nii.gz", ".nii"):
        if (directory / f"{stem}{suffix}").is_file():
            return directory / f"{stem}{suffix}"
    raise DatasetError(f"{directory / stem}.nii.gz: file not found (nor {stem}.nii).")


def read_json(path: Path) -> Any:
    """Parses a JSON file, raising DatasetError naming it when missing or malformed."""
    require_file(path, "JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}).") from exc
