"""Finding, describing, building and reading imgx datasets by name.

Datasets live in the data dir as ``<data_dir>/<name>/<version>/`` (TFDS array_record).
Published and built-in names: see :data:`imgx_data.datasets.BUILDERS`; user datasets
built from a NIfTI folder are found by scanning the data dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from imgx_data import planning
from imgx_data.datasets import (
    BUILDERS,
    GENERATED,
    ImgxBuilder,
    NiftiFolder,
    nifti_folder_builder,
)
from imgx_data.datasets.base import DATASET_VERSION, METADATA_KEY, SPLITS, DatasetSpec
from imgx_data.datasets.nifti_folder import read_layout
from imgx_data.errors import DatasetError
from imgx_data.folds import DEVELOPMENT_SPLITS, NUM_FOLDS, Folds, load_or_make_folds
from imgx_data.postprocess import POSTPROCESSORS
from imgx_data.preprocess import PERCENTILE, Intensity, training_window

logger = logging.getLogger(__name__)

NIFTI_FOLDER = "nifti_folder"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a dataset holds, for training and evaluation code.

    Attributes:
        name: dataset name.
        num_spatial_dims: 2 or 3.
        image_shape: stored spatial shape ``(x, y[, z])``.
        num_channels: image channels (last axis of ``image``).
        class_names: full class names, background first.
        overlapping: classes are nested regions (region i = label >= i, sigmoid) rather
            than exclusive classes (softmax).
        spacing: stored voxel size per axis, mm.
        split_sizes: examples per split (empty when not built).
        is_built: the dataset exists in the data dir.
        postprocess: post-processing applied before metrics (:func:`postprocess`) or None.
        manual_dir: what ``--manual-dir`` points at (None for generated data).
        path: the dataset's folder ``<data_dir>/<name>/<version>``.
        intensity: intensity policy of the images (``"percentile"``, ``"png"``,
            ``"identity"`` or a ``(low, high)`` clipping range), see
            :func:`imgx_data.preprocess.scale_intensity`; new scans are prepared alike.
        channel_names: a name per image channel (empty for datasets built before it was
            recorded).
    """

    name: str
    num_spatial_dims: int
    image_shape: tuple[int, ...]
    num_channels: int
    class_names: tuple[str, ...]
    overlapping: bool
    spacing: tuple[float, ...]
    split_sizes: dict[str, int]
    is_built: bool
    postprocess: str | None
    manual_dir: str | None
    path: Path
    intensity: Intensity = PERCENTILE
    channel_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.class_names)


def _resolve_data_dir(path: str | Path | None) -> Path:
    if path is None:
        path = os.environ.get("IMGX_DATA_DIR") or os.environ.get("TFDS_DATA_DIR")
    return Path(path or Path.home() / "tensorflow_datasets").expanduser()


def data_dir(data_dir: str | Path | None = None) -> Path:
    """The data dir: the argument, else ``$IMGX_DATA_DIR``, else ``$TFDS_DATA_DIR``, else
    ``~/tensorflow_datasets``."""
    return _resolve_data_dir(data_dir)


def _dataset_path(name: str, root: Path) -> Path:
    return root / name / DATASET_VERSION


def _is_built(path: Path) -> bool:
    """An imgx dataset (TFDS info plus imgx metadata) is complete in ``path``."""
    if not (path / "dataset_info.json").is_file() or not (path / "metadata.json").is_file():
        return False
    try:
        return METADATA_KEY in json.loads((path / "metadata.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _user_dataset_names(root: Path) -> list[str]:
    """Names of datasets in ``root`` built from NIfTI folders."""
    names = []
    for path in sorted(root.glob(f"*/{DATASET_VERSION}/metadata.json")):
        name = path.parent.parent.name
        if name not in BUILDERS and _is_built(path.parent):
            names.append(name)
    return names


def _info_from_disk(name: str, path: Path) -> DatasetInfo:
    spec = DatasetSpec.from_json(json.loads((path / "metadata.json").read_text())[METADATA_KEY])
    splits = json.loads((path / "dataset_info.json").read_text()).get("splits", [])
    sizes = {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in splits}
    return _make_info(name, spec, {k: sizes.get(k, 0) for k in SPLITS}, path)


def _make_info(name: str, spec: DatasetSpec, sizes: dict[str, int], path: Path) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        num_spatial_dims=spec.num_spatial_dims,
        image_shape=spec.image_shape,
        num_channels=spec.num_channels,
        class_names=spec.class_names,
        overlapping=spec.overlapping,
        spacing=spec.spacing,
        split_sizes=sizes,
        is_built=bool(sizes),
        postprocess=spec.postprocess,
        manual_dir=spec.manual_dir,
        path=path,
        intensity=spec.intensity,
        channel_names=spec.channel_names,
    )


def dataset_names(data_dir: str | Path | None = None) -> list[str]:
    """Published/built-in names followed by the user datasets built in the data dir."""
    return [*BUILDERS, *_user_dataset_names(_resolve_data_dir(data_dir))]


def dataset_info(name: str, data_dir: str | Path | None = None) -> DatasetInfo:
    """Describes a dataset, built or not (then with the default target grid).

    Raises:
        ValueError: unknown name (the message lists the valid names).
    """
    root = _resolve_data_dir(data_dir)
    path = _dataset_path(name, root)
    if _is_built(path):
        return _info_from_disk(name, path)
    if name in BUILDERS:
        return _make_info(name, BUILDERS[name].default_spec(), {}, path)
    raise DatasetError(
        f"Unknown dataset {name!r}; valid names: {', '.join(dataset_names(root))} "
        f"(or build your own with `imgx build {NIFTI_FOLDER} --manual-dir DIR --name NAME`)."
    )


def list_datasets(data_dir: str | Path | None = None) -> list[DatasetInfo]:
    """Every known dataset (published, built-in and the user's), built or not."""
    return [dataset_info(name, data_dir) for name in dataset_names(data_dir)]


@contextlib.contextmanager
def _extracted(manual_dir: str | Path | None) -> Iterator[Path | None]:
    """The manual dir, or a temporary folder holding the extracted zip file given."""
    if manual_dir is None:
        yield None
        return
    manual_dir = Path(manual_dir).expanduser()
    if manual_dir.is_file() and zipfile.is_zipfile(manual_dir):
        with tempfile.TemporaryDirectory(prefix="imgx-extract-") as tmp:
            with zipfile.ZipFile(manual_dir) as archive:
                archive.extractall(tmp)
            yield Path(tmp)
        return
    if not manual_dir.is_dir():
        raise DatasetError(f"{manual_dir}: manual dir not found (a folder or a .zip file).")
    if not any(manual_dir.iterdir()):
        raise DatasetError(f"{manual_dir}: manual dir is empty.")
    yield manual_dir


def build_command(name: str) -> str:
    """The ``imgx build`` command for a published or built-in dataset."""
    if name in GENERATED:
        return f"imgx build {name}"
    return f"imgx build {name} --manual-dir DIR  # DIR: {BUILDERS[name].MANUAL_DIR}"


#: The file in each dataset folder that records how imgx built it (see :func:`build`).
BUILD_RECORD = "imgx_build.json"
#: What the examples hold, recorded as the build parameter ``format``. 3: every case stored
#: whole with its training window (``window_start``), its label on the original grid
#: (``original_label``) and the foreground the window drops; 2: the same, but train and
#: valid cases stored as their window; builds without the parameter are format 1 (windows
#: only, no label file).
BUILD_FORMAT = 3


def _plain(value: Any) -> Any:
    """An option value as JSON holds it (sequences and numpy values as lists/numbers)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value


def _build_request(
    name: str, manual_dir: str | Path | None, options: dict[str, Any]
) -> tuple[str, type[ImgxBuilder], dict[str, Any]]:
    """The dataset name, its builder class and the build parameters of a build request.

    The parameters are what :data:`BUILD_RECORD` stores: the builder name, the absolute
    manual dir and every option of the builder (the given value, else its default).
    """
    options = dict(options)
    if name == NIFTI_FOLDER:
        dataset_name = options.pop("name", None)
        if not dataset_name:
            raise DatasetError(
                f"{NIFTI_FOLDER} needs a name: build('{NIFTI_FOLDER}', name=NAME, ...)."
            )
        if dataset_name in BUILDERS or dataset_name == NIFTI_FOLDER:
            raise DatasetError(
                f"Name {dataset_name!r} is taken by a built-in dataset; choose another."
            )
        if manual_dir is None:
            raise DatasetError(f"{NIFTI_FOLDER} needs --manual-dir: {NiftiFolder.MANUAL_DIR}.")
        builder: type[ImgxBuilder] = nifti_folder_builder(dataset_name)
    elif name in BUILDERS:
        dataset_name, builder = name, BUILDERS[name]
        if name not in GENERATED and manual_dir is None:
            raise DatasetError(f"{name} needs the raw files: {build_command(name)}")
    else:
        raise DatasetError(
            f"Unknown dataset {name!r}; buildable: {', '.join([*BUILDERS, NIFTI_FOLDER])}."
        )
    defaults = builder.default_options()
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise DatasetError(
            f"{name}: unknown build option(s) {', '.join(unknown)}; it takes {', '.join(defaults)}."
        )
    parameters: dict[str, Any] = {
        "format": BUILD_FORMAT,
        "dataset": name,
        "manual_dir": None if manual_dir is None else str(Path(manual_dir).expanduser().resolve()),
    }
    for key, default in defaults.items():
        value = options.get(key)
        parameters[key] = _plain(default if value is None else value)
    return dataset_name, builder, json.loads(json.dumps(parameters))


def _stored_parameters(path: Path) -> dict[str, Any] | None:
    """The build parameters recorded in a dataset folder, None if there is no record."""
    try:
        stored = json.loads((path / BUILD_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def _show(value: Any) -> str:
    return "default" if value is None else json.dumps(value)


def _kept_build(
    dataset_name: str, path: Path, parameters: dict[str, Any], overwrite: bool
) -> DatasetInfo | None:
    """What is at ``path``: the build to keep, or None when a build may be written there.

    None: nothing is there, or an imgx build that ``overwrite`` replaces. An imgx build is
    a folder whose ``metadata.json`` holds imgx's dataset description (``_is_built``);
    imgx writes it, complete, by renaming a finished temporary folder into place.

    Raises:
        DatasetError: ``path`` (or its parent) is something imgx did not write, which is
            never replaced; or, without ``overwrite``, an imgx build with other (or
            unrecorded) parameters.
    """
    for folder in (path.parent, path):
        if os.path.lexists(folder) and not folder.is_dir():
            raise DatasetError(
                f"{folder}: is a file, not an imgx dataset folder; imgx never deletes what "
                "it did not write: choose another --data-dir"
                + (" or --name" if dataset_name not in BUILDERS else "")
                + ", or remove it yourself."
            )
    if not os.path.lexists(path):
        return None
    if not _is_built(path):
        raise DatasetError(
            f"{path}: exists but is not an imgx build (no imgx dataset description in its "
            "metadata.json; the data dir may be shared with other TFDS datasets), and imgx "
            "never deletes what it did not write: choose another --data-dir"
            + (" or --name" if dataset_name not in BUILDERS else "")
            + ", or remove the folder yourself."
        )
    if overwrite:
        return None
    rebuild = "rebuild it with --overwrite (build(..., overwrite=True))"
    stored = _stored_parameters(path)
    if stored is None:
        raise DatasetError(
            f"{path}: dataset {dataset_name} is built, but without a record of its build "
            f"parameters ({BUILD_RECORD}, written since imgx records them), so imgx cannot "
            f"tell whether it matches this request; {rebuild}."
        )
    changes = [
        f"{key} {_show(stored.get(key))} -> {_show(parameters.get(key))}"
        for key in dict.fromkeys([*parameters, *stored])
        if stored.get(key) != parameters.get(key)
    ]
    if changes:
        raise DatasetError(
            f"{path}: dataset {dataset_name} is built with other parameters "
            f"({'; '.join(changes)}); {rebuild}, or build it under another "
            + ("--name or " if dataset_name not in BUILDERS else "")
            + "--data-dir."
        )
    return _info_from_disk(dataset_name, path)


def existing_build(
    name: str,
    /,
    *,
    manual_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    **options: Any,
) -> DatasetInfo | None:
    """The build that :func:`build` with these arguments would keep, or None.

    None when nothing is built under the name yet. Arguments as for :func:`build`.

    Raises:
        DatasetError: as :func:`build` does before building: a bad request, a folder
            there that imgx did not write, or a build with other parameters (the message
            names each one, old -> new).
    """
    dataset_name, _, parameters = _build_request(name, manual_dir, options)
    path = _dataset_path(dataset_name, _resolve_data_dir(data_dir))
    return _kept_build(dataset_name, path, parameters, overwrite=False)


def build(
    name: str,
    /,
    *,
    manual_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    **options: Any,
) -> DatasetInfo:
    """Builds a dataset into the data dir and describes it.

    The dataset folder ``<data_dir>/<name>/<version>`` records the build parameters
    (builder, manual dir, options with their defaults) in :data:`BUILD_RECORD`. When the
    dataset is already built with the same parameters it is kept as it is; with other
    ones this raises, naming them, unless ``overwrite``. A folder there that is not an
    imgx build (the data dir may be TFDS's, shared with other datasets) is never
    replaced or deleted, not even with ``overwrite``.

    Args:
        name: a published/built-in name, or ``"nifti_folder"`` with the keyword option
            ``name=NAME`` (positional-only, so the two names do not clash).
        manual_dir: folder (or zip file) with the raw files; see :class:`DatasetInfo`'s
            ``manual_dir`` for what it must hold. Not needed for the phantoms.
        data_dir: see :func:`data_dir`.
        overwrite: rebuild an imgx build of this name, whatever its parameters; it is
            replaced only once the new build is complete.
        **options: builder options: ``target_spacing``/``target_shape`` for every builder,
            ``split_sizes`` for the phantoms, ``window_start``/``raw_shape`` for BraTS;
            for ``nifti_folder``: ``name`` (required), ``spacing``, ``shape``.

    Returns:
        The built (or kept) dataset's DatasetInfo.

    Raises:
        DatasetError: bad raw input (nothing is left in the data dir), a folder in the
            way that imgx did not write, or a build with other parameters without
            ``overwrite``.
    """
    root = _resolve_data_dir(data_dir)
    dataset_name, builder_class, parameters = _build_request(name, manual_dir, options)
    options = {k: v for k, v in options.items() if k != "name"}
    path = _dataset_path(dataset_name, root)
    kept = _kept_build(dataset_name, path, parameters, overwrite)
    if kept is not None:
        return kept
    # Build into a temporary data dir next to the datasets and swap it in at the end, so
    # that a failed (re)build leaves the data dir as it was: no half-written dataset, and
    # an existing build survives a failed overwrite (TFDS itself deletes it first).
    root_existed = root.exists()
    with _extracted(manual_dir) as raw:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".imgx-build-{dataset_name}-", dir=root))
        try:
            if name == NIFTI_FOLDER:
                builder = builder_class(root=raw, data_dir=staging, **options)
            else:
                builder = builder_class(data_dir=staging, **options)
            # TFDS' progress bars (carriage returns, escape codes) only on a terminal; in
            # a log file its plain lines remain.
            tfds.display_progress_bar(sys.stdout.isatty() and sys.stderr.isatty())
            with tempfile.TemporaryDirectory(prefix="imgx-dl-") as dl:
                builder.download_and_prepare(
                    download_dir=dl,
                    download_config=tfds.download.DownloadConfig(
                        manual_dir=None if raw is None else str(raw),
                        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
                    ),
                )
            built = _dataset_path(dataset_name, staging)
            if not _is_built(built):
                raise DatasetError(f"{dataset_name}: the build wrote no dataset to {built}.")
            (built / BUILD_RECORD).write_text(json.dumps(parameters, indent=2) + "\n")
            index = _read_case_index(_info_from_disk(dataset_name, built))
            (built / CASE_INDEX).write_text(json.dumps(index) + "\n")
            if name == NIFTI_FOLDER:
                fingerprint = planning.fingerprint_layout(read_layout(raw))
                _write_plan(_info_from_disk(dataset_name, built), fingerprint, None, None)
            # Checked again: another process may have written there meanwhile.
            if _kept_build(dataset_name, path, parameters, overwrite) is None:
                _swap_in(built, path, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if not root_existed and not any(root.iterdir()):
                root.rmdir()
    return _info_from_disk(dataset_name, path)


def _write_plan(
    info: DatasetInfo,
    fingerprint: planning.Fingerprint,
    memory_gb: float | None,
    device: str | None,
) -> planning.Plan:
    device = device or planning.default_device()
    num_train = info.split_sizes.get("train", 0)
    development = num_train + info.split_sizes.get("valid", 0)
    fold_train = development - -(-development // NUM_FOLDS)  # the largest fold held out
    plan = planning.make_plan(
        fingerprint,
        spacing=info.spacing,
        stored_shape=info.image_shape,
        num_train_cases=num_train,
        device=device,
        memory_gb=planning.default_memory_gb(device) if memory_gb is None else memory_gb,
        max_batch=max(1, min(num_train, fold_train) if development >= NUM_FOLDS else num_train),
    )
    planning.write_plan(info.path, fingerprint, plan)
    return plan


def plan(
    name: str,
    data_dir: str | Path | None = None,
    *,
    memory_gb: float | None = None,
    device: str | None = None,
    refingerprint: bool = False,
) -> tuple[planning.Fingerprint, planning.Plan]:
    """(Re)plans a built ``nifti_folder`` dataset and writes its ``plan.json``.

    The fingerprint is the one in ``plan.json`` (written by the build), else, or with
    ``refingerprint``, read again from the raw folder recorded in the build record.

    Args:
        name: the dataset's name.
        data_dir: see :func:`data_dir`.
        memory_gb: activation budget, GB; default :func:`planning.default_memory_gb`.
        device: ``cpu``, ``gpu``, ``tpu``; default JAX's backend.
        refingerprint: read the raw cases again.

    Raises:
        DatasetError: not built, not a ``nifti_folder`` build, or raw folder gone.
    """
    info = dataset_info(name, data_dir)
    if name not in BUILDERS and not info.is_built:
        raise DatasetError(_not_built_message(name, data_dir))
    stored = _stored_parameters(info.path) or {}
    if name in BUILDERS or stored.get("dataset") != NIFTI_FOLDER:
        raise DatasetError(
            f"{name}: plans are made for `imgx build {NIFTI_FOLDER}` datasets; the published "
            "and built-in datasets have presets (imgx_train.presets)."
        )
    saved = None if refingerprint else planning.read_plan(info.path)
    if saved is not None:
        fingerprint = saved[0]
    else:
        raw = stored.get("manual_dir")
        if not raw or not Path(raw).exists():
            raise DatasetError(
                f"{info.path}: no fingerprint in {planning.PLAN_FILE} and the raw folder "
                f"{raw} recorded in {BUILD_RECORD} is gone; rebuild with `imgx build "
                f"{NIFTI_FOLDER} --manual-dir DIR --name {name} --overwrite`."
            )
        with _extracted(raw) as folder:
            fingerprint = planning.fingerprint_layout(read_layout(folder))
    return fingerprint, _write_plan(info, fingerprint, memory_gb, device)


def dataset_plan(name: str, data_dir: str | Path | None = None) -> planning.Plan | None:
    """The plan in a built dataset's ``plan.json``, None when it has none."""
    path = _dataset_path(name, _resolve_data_dir(data_dir))
    saved = planning.read_plan(path) if _is_built(path) else None
    return None if saved is None else saved[1]


def _swap_in(built: Path, path: Path, staging: Path) -> None:
    """Moves the finished dataset folder ``built`` to ``path``, replacing the imgx build
    there (checked by the caller).

    The old folder is first renamed into ``staging`` (deleted with it) and renamed back
    if the new one cannot be moved in, so ``path`` holds the old or the new dataset
    except for the instant between two renames.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    old = staging / "replaced"
    if os.path.lexists(path):
        path.rename(old)
    try:
        built.rename(path)
    except BaseException:
        if os.path.lexists(old):
            old.rename(path)
        raise


def ensure_built(name: str, data_dir: str | Path | None = None) -> DatasetInfo:
    """The dataset's info, building the phantoms on first use.

    Raises:
        DatasetError: another dataset is not built (the message holds the build command),
            or the name is unknown.
    """
    info = dataset_info(name, data_dir)
    if info.is_built and name not in GENERATED:
        stored = _stored_parameters(info.path) or {}
        if stored.get("format") != BUILD_FORMAT:
            logger.warning(
                "%s: built by an older imgx (format %s, now %d): its valid cases are stored "
                "as training windows, so validation sees less than a real scan%s; rebuild it "
                "with the same `imgx build` command and --overwrite",
                name,
                stored.get("format", 1),
                BUILD_FORMAT,
                "" if stored.get("format") else " and test metrics are on the stored grid",
            )
    if info.is_built and name in GENERATED:
        path = _dataset_path(name, _resolve_data_dir(data_dir))
        stored = _stored_parameters(path) or {}
        if stored.get("format") != BUILD_FORMAT:
            # Generated data, nothing of the user's: rebuilt in the current format.
            logger.warning("%s: built by an older imgx (%s); building it again", name, path)
            options = {k: v for k, v in stored.items() if k not in ("format", "dataset")}
            options.pop("manual_dir", None)
            return build(name, data_dir=data_dir, overwrite=True, **options)
    if info.is_built:
        return info
    if name in GENERATED:
        return build(name, data_dir=data_dir)
    raise DatasetError(_not_built_message(name, data_dir))


def _not_built_message(name: str, data_dir: str | Path | None) -> str:
    command = (
        build_command(name)
        if name in BUILDERS
        else f"imgx build nifti_folder --manual-dir DIR --name {name}"
    )
    return f"Dataset {name!r} is not built in {_resolve_data_dir(data_dir)}; run: {command}"


class DataSource:
    """Random access to one split: ``len(source)``, ``source[i]`` -> dict of numpy arrays.

    ``uid`` is a str, ``image`` float32 ``(*spatial, channels)``, ``label`` uint8
    ``(*spatial)``, geometry fields as stored (see
    :func:`imgx_data.datasets.base.example_features`). ``fold`` is the cross-validation
    fold whose ``train``/``valid`` cases it holds, None for the build's own split. With
    ``window_shape`` each case reads as its training window of that shape
    (:func:`imgx_data.preprocess.training_window`), else whole; ``light``, the same
    examples read without decoding ``image``, ``label`` and ``original_label``, and the
    features that decode them, then reads each case once and decodes the whole arrays
    only when its window is not stored beside them, so that training never decompresses
    a whole case it does not need.
    """

    def __init__(
        self,
        source: Any,
        name: str,
        split: str,
        fold: int | None = None,
        window_shape: tuple[int, ...] | None = None,
        light: tuple[Any, Any] | None = None,
    ) -> None:
        self._source = source
        self._light, self._light_features = (None, None)
        if light is not None and window_shape is not None:
            self._light, self._light_features = light
        self.name = name
        self.split = split
        self.fold = fold
        self.window_shape = window_shape

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._light is not None:
            example = dict(self._light[index])
            for key in _HEAVY:
                raw = example.pop(key, None)  # undecoded: training never needs the label
                # file; image and label only when no stored window serves
                if key != "original_label" and not example.get("window_stored", False):
                    example[key] = self._light_features[key].decode_example_np(raw)
        else:
            example = dict(self._source[index])
        uid = example["uid"]
        example["uid"] = uid.decode("utf-8") if isinstance(uid, bytes) else str(uid)
        if self.window_shape is not None:
            return training_window(example, self.window_shape)
        for key in ("window_stored", "window_image", "window_label"):
            example.pop(key, None)  # the arrays left undecoded: the whole case is read
        return example

    def __repr__(self) -> str:
        fold = "" if self.fold is None else f", fold={self.fold}"
        window = "" if self.window_shape is None else f", window_shape={self.window_shape}"
        return (
            f"DataSource(name={self.name!r}, split={self.split!r}{fold}{window}, len={len(self)})"
        )


class _Selection:
    """The examples at ``(source, index)`` pairs of several sources, in the given order."""

    def __init__(self, picks: list[tuple[Any, int]]) -> None:
        self._picks = picks

    def __len__(self) -> int:
        return len(self._picks)

    def __getitem__(self, index: int) -> Any:
        source, i = self._picks[index]
        return source[i]


def _built_info(name: str, data_dir: str | Path | None) -> DatasetInfo:
    info = dataset_info(name, data_dir)
    if not info.is_built:
        raise DatasetError(_not_built_message(name, data_dir))
    return info


#: The whole-case arrays: left undecoded where only uids, counts or the stored training
#: window are read.
_HEAVY = ("image", "label", "original_label")


def _light_sources(
    info: DatasetInfo, splits: Sequence[str], *, windows: bool = False
) -> dict[str, Any]:
    """Sources of the non-empty ``splits`` that leave the whole-case arrays undecoded, and
    the stored training windows too unless ``windows``."""
    builder = tfds.builder_from_directory(str(info.path))
    heavy = {*_HEAVY, *(() if windows else ("window_image", "window_label"))}
    skip = {key: tfds.decode.SkipDecoding() for key in heavy & set(builder.info.features.keys())}
    return {
        split: builder.as_data_source(split=split, decoders=skip)
        for split in splits
        if info.split_sizes.get(split)
    }


#: Written beside each build: per split the uids in storage order and the foreground each
#: case's training window drops (cases that drop none left out), so that folds and counts
#: need no pass over the records.
CASE_INDEX = "cases.json"


def _read_case_index(info: DatasetInfo) -> dict[str, Any]:
    """The case index from one pass over the records (arrays undecoded): ``{"splits":
    {split: {"uids": [...], "cropped_foreground": {uid: voxels}}}, "counted": bool}``,
    ``counted`` False for builds that did not record the counts (format 1)."""
    index: dict[str, Any] = {"splits": {}, "counted": True}
    for split, source in _light_sources(info, SPLITS).items():
        uids, dropped = [], {}
        for i in range(len(source)):
            example = source[i]
            uids.append(example["uid"].decode("utf-8"))
            if "cropped_foreground" not in example:
                index["counted"] = False
            elif int(example["cropped_foreground"]):
                dropped[uids[-1]] = int(example["cropped_foreground"])
        index["splits"][split] = {"uids": uids, "cropped_foreground": dropped}
    return index


def _case_index(info: DatasetInfo) -> dict[str, Any]:
    """The build's :data:`CASE_INDEX`, or (builds made before it, or an unreadable one)
    the same read from the records."""
    try:
        index = json.loads((info.path / CASE_INDEX).read_text(encoding="utf-8"))
        sizes = {s: len(v["uids"]) for s, v in index["splits"].items()}
        if sizes == {s: n for s, n in info.split_sizes.items() if n}:
            return index
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return _read_case_index(info)


def _development_uids(info: DatasetInfo) -> dict[str, list[str]]:
    """The uids of the build's train and valid splits, in storage order."""
    splits = _case_index(info)["splits"]
    return {split: list(splits.get(split, {}).get("uids", [])) for split in DEVELOPMENT_SPLITS}


def window_drops(
    name: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    *,
    fold: int | None = None,
    num_folds: int = NUM_FOLDS,
) -> dict[str, Any] | None:
    """How much foreground the training windows of a split (of a fold) drop.

    Read from the build's :data:`CASE_INDEX` (older builds: the records, arrays
    undecoded). Returns ``{"num_cases": cases of the split,
    "cases_dropping_foreground": cases whose window drops some, "voxels": foreground
    voxels dropped in all, "by_case": {uid: voxels} of those cases}``, or None for a build
    that did not record it (format 1).
    """
    info = _built_info(name, data_dir)
    index = _case_index(info)
    if not index["counted"]:
        return None
    splits = index["splits"]
    if fold is None or split == "test":
        uids = splits.get(split, {}).get("uids", [])
    else:
        uids = _fold_uids(info, split, fold, num_folds, _development_uids(info))
    dropped = {k: n for v in splits.values() for k, n in v["cropped_foreground"].items()}
    counts = {uid: dropped.get(uid, 0) for uid in uids}
    dropping = {uid: n for uid, n in sorted(counts.items()) if n > 0}
    return {
        "num_cases": len(counts),
        "cases_dropping_foreground": len(dropping),
        "voxels": sum(dropping.values()),
        "by_case": dropping,
    }


def describe_window_drops(drops: dict[str, Any], shape: Sequence[int], cases: str) -> str:
    """One sentence on what training windows drop (``drops`` as :func:`window_drops`
    gives it, ``cases`` naming them, e.g. ``"train"``), the three largest losses named."""
    worst = sorted(drops["by_case"].items(), key=lambda item: -item[1])[:3]
    return (
        f"the {'x'.join(map(str, shape))} training windows of "
        f"{drops['cases_dropping_foreground']} of {drops['num_cases']} {cases} cases drop "
        f"{drops['voxels']} foreground voxels (most: "
        f"{', '.join(f'{uid} {n}' for uid, n in worst)}); training never sees them, "
        "validation and test see the whole cases"
    )


def cross_validation_folds(
    name: str, data_dir: str | Path | None = None, num_folds: int = NUM_FOLDS
) -> Folds:
    """The dataset's cross-validation folds (nnU-Net's ``splits_final.json``).

    Made on first use from the build's train and valid cases and stored beside the build;
    see :mod:`imgx_data.folds`.

    Raises:
        DatasetError: dataset not built, too few cases, or a bad ``splits_final.json``.
    """
    info = _built_info(name, data_dir)
    uids = [u for split in _development_uids(info).values() for u in split]
    return load_or_make_folds(info.path, uids, num_folds)


def data_source(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    *,
    fold: int | None = None,
    num_folds: int = NUM_FOLDS,
    windows: bool | None = None,
) -> DataSource:
    """Random-access source of a built dataset's split (``train``, ``valid``, ``test``).

    Cases are stored whole; ``windows`` (default: for ``train`` only) reads each as its
    training window of the dataset's ``image_shape``, centred on the foreground at build
    time (:func:`imgx_data.preprocess.training_window`), so training batches have one
    shape; validation and test cases come whole (predict them with sliding windows).

    With ``fold`` i (0 <= i < ``num_folds``), ``train`` holds the train cases of
    cross-validation fold i and ``valid`` its ``val`` cases (sorted by uid; see
    :func:`cross_validation_folds`); ``test`` is the build's test split whatever the fold.

    Raises:
        DatasetError: unknown split or dataset, dataset not built, or a fold out of range.
    """
    if split not in SPLITS:
        raise DatasetError(f"Unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")
    info = _built_info(name, data_dir)
    if windows is None:
        windows = split == "train"
    window_shape = tuple(info.image_shape) if windows else None
    builder = tfds.builder_from_directory(str(info.path))
    stores_windows = "window_label" in builder.info.features.keys()
    # Whole cases leave the stored window undecoded.
    skip = {}
    if stores_windows and not windows:
        skip = {key: tfds.decode.SkipDecoding() for key in ("window_image", "window_label")}

    def read(split: str) -> Any:
        return builder.as_data_source(split=split, decoders=skip or None)

    if fold is None or split == "test":
        if not info.split_sizes.get(split):
            raise DatasetError(
                f"Split {split!r} of dataset {name!r} is empty ({info.split_sizes})."
            )
        light = None
        if windows and stores_windows:
            light = (_light_sources(info, [split], windows=True)[split], builder.info.features)
        return DataSource(read(split), name, split, None, window_shape, light)
    uids = _development_uids(info)
    chosen = _fold_uids(info, split, fold, num_folds, uids)
    sources = {s: read(s) for s in DEVELOPMENT_SPLITS if uids[s]}
    where = {u: (s, i) for s in DEVELOPMENT_SPLITS for i, u in enumerate(uids[s])}
    light = None
    if windows and stores_windows:
        lights = _light_sources(info, DEVELOPMENT_SPLITS, windows=True)
        selected = _Selection([(lights[where[u][0]], where[u][1]) for u in chosen])
        light = (selected, builder.info.features)
    selection = _Selection([(sources[where[u][0]], where[u][1]) for u in chosen])
    return DataSource(selection, name, split, fold, window_shape, light)


def _fold_uids(
    info: DatasetInfo,
    split: str,
    fold: int,
    num_folds: int,
    uids: dict[str, list[str]] | None = None,
) -> list[str]:
    """The uids of cross-validation fold ``fold``'s ``train`` or ``valid`` (``val``) cases."""
    if not 0 <= fold < num_folds:
        raise DatasetError(
            f"Fold {fold} of dataset {info.name!r}: folds are numbered 0 to {num_folds - 1} "
            f"(data.num_folds={num_folds})."
        )
    uids = _development_uids(info) if uids is None else uids
    folds = load_or_make_folds(info.path, [u for s in uids.values() for u in s], num_folds)
    chosen = folds[fold]["train" if split == "train" else "val"]
    if not chosen:
        raise DatasetError(f"Fold {fold} of dataset {info.name!r} has no {split} cases.")
    return chosen


def postprocess(name: str, label: np.ndarray, spacing: Any = None) -> np.ndarray:
    """Applies the dataset's post-processing to one predicted label map (or identity).

    Args:
        name: dataset name.
        label: integer labels ``(*spatial)`` in ``(x, y[, z])`` order.
        spacing: voxel size per axis, mm (unused by the current post-processings, which
            follow their papers in pixel units).

    Returns:
        The post-processed label map, same shape and dtype.
    """
    del spacing
    method = BUILDERS[name].POSTPROCESS if name in BUILDERS else None
    if method is None:
        return np.asarray(label)
    return POSTPROCESSORS[method](np.asarray(label))


__all__ = [
    "DataSource",
    "DatasetInfo",
    "build",
    "cross_validation_folds",
    "data_dir",
    "data_source",
    "dataset_info",
    "describe_window_drops",
    "dataset_plan",
    "ensure_built",
    "existing_build",
    "list_datasets",
    "plan",
    "postprocess",
    "window_drops",
]
