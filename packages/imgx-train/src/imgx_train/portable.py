"""What a run needs on another machine: its preprocessing, provenance and model files.

A run records, at training start, everything `imgx predict` needs to prepare new scans as
the training images were prepared (`preprocess.json`, see `preprocessing`), so a run (or
the model file `imgx export` makes of it) predicts on a machine that has no data dir:

    {"format": 1, "dataset": "phantom", "num_spatial_dims": 2, "shape": [64, 64],
     "spacing": [1.0, 1.0], "orientation": "scan", "axes": ["x", "y"],
     "intensity": {"rule": "percentile", "percentiles": [0.5, 99.5]},
     "channel_names": ["image"], "class_names": ["background", ...], "overlapping": false,
     "postprocess": null, "source": "<data dir>/phantom/1.0.0"}

`intensity` is the dataset's rule with its statistics: `percentile` (clip each channel of
each scan to its own [0.5, 99.5] percentiles, z-score, rescale to [0, 1]), `range` (clip
to the fixed `range`, e.g. CT HU, then the same), `png` (x / 255) or `identity`.
`orientation: "scan"`: imgx does not reorient; each scan is resampled to `spacing` in its
own direction cosines and its label is written back onto its own grid. Arrays are in
`axes` order (x, y[, z]), the transpose of SimpleITK's.

`config.json` also records `provenance`: the versions of the packages that trained the run
(`importlib.metadata`) and the git commit of the imgx source, when it is a git checkout.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imgx_data
from imgx_data import preprocess as preprocess_lib
from imgx_train import config as config_lib
from imgx_train.runs import RunError

PREPROCESS_FILE = "preprocess.json"
FORMAT = 1
_AXES = ("x", "y", "z")
#: Packages whose versions `provenance` records.
PACKAGES = (
    "imgx-cli",
    "imgx-train",
    "imgx-data",
    "imgx-nets",
    "imgx-diffusion",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "tensorflow-datasets",
    "simpleitk",
)


def _intensity_json(intensity: preprocess_lib.Intensity) -> dict[str, Any]:
    if intensity == preprocess_lib.PERCENTILE:
        return {"rule": "percentile", "percentiles": list(preprocess_lib.PERCENTILES)}
    if intensity in (preprocess_lib.PNG, preprocess_lib.IDENTITY):
        return {"rule": intensity}
    low, high = intensity
    return {"rule": "range", "range": [float(low), float(high)]}


def _intensity_from_json(data: Any, path: Path) -> preprocess_lib.Intensity:
    rule = data.get("rule") if isinstance(data, dict) else None
    if rule == "percentile":
        percentiles = tuple(float(p) for p in data.get("percentiles", ()))
        if percentiles != preprocess_lib.PERCENTILES:
            raise RunError(
                f"{path}: intensity percentiles {list(percentiles)} differ from the "
                f"{list(preprocess_lib.PERCENTILES)} this imgx-data applies; predict with "
                "the imgx version that trained the run (config.json: provenance)"
            )
        return preprocess_lib.PERCENTILE
    if rule in (preprocess_lib.PNG, preprocess_lib.IDENTITY):
        return rule
    if rule == "range" and len(data.get("range", ())) == 2:
        return (float(data["range"][0]), float(data["range"][1]))
    raise RunError(
        f"{path}: intensity {data!r} is not one of the rules percentile, range [low, high], "
        "png or identity; fix the file or export the run again"
    )


def preprocessing(info: imgx_data.DatasetInfo) -> dict[str, Any]:
    """The content of `preprocess.json` for a run trained on `info` (see module doc)."""
    channel_names = info.channel_names or tuple(f"channel_{c}" for c in range(info.num_channels))
    return {
        "format": FORMAT,
        "dataset": info.name,
        "num_spatial_dims": info.num_spatial_dims,
        "shape": list(info.image_shape),
        "spacing": [float(s) for s in info.spacing],
        "orientation": "scan",
        "axes": list(_AXES[: info.num_spatial_dims]),
        "intensity": _intensity_json(info.intensity),
        "channel_names": list(channel_names),
        "class_names": list(info.class_names),
        "overlapping": bool(info.overlapping),
        "postprocess": info.postprocess,
        "source": str(info.path),
    }


def write_preprocessing(run_dir: Path, info: imgx_data.DatasetInfo) -> None:
    """Writes `<run_dir>/preprocess.json` atomically."""
    _write_json(run_dir / PREPROCESS_FILE, preprocessing(info))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def info_from_preprocessing(path: Path, dataset: str) -> imgx_data.DatasetInfo:
    """The `DatasetInfo` a run's `preprocess.json` describes (no data dir is read).

    Raises:
      RunError: unreadable file, another format, a missing field, or a dataset other than
        the run's config names; the message names the file.
    """
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise RunError(
                f"{path}: format {data.get('format')!r} is not {FORMAT}; predict with the "
                "imgx version that trained the run (config.json: provenance)"
            )
        if data["dataset"] != dataset:
            raise RunError(
                f"{path}: dataset {data['dataset']!r} is not the config's data.name "
                f"{dataset!r}; the run folder mixes two runs"
            )
        if data["orientation"] != "scan":
            raise RunError(f"{path}: orientation {data['orientation']!r} is not 'scan'")
        ndim = int(data["num_spatial_dims"])
        shape, spacing = tuple(data["shape"]), tuple(data["spacing"])
        if len(shape) != ndim or len(spacing) != ndim:
            raise RunError(
                f"{path}: shape {list(shape)} and spacing {list(spacing)} need {ndim} values"
            )
        return imgx_data.DatasetInfo(
            name=data["dataset"],
            num_spatial_dims=ndim,
            image_shape=tuple(int(n) for n in shape),
            num_channels=len(data["channel_names"]),
            class_names=tuple(data["class_names"]),
            overlapping=bool(data["overlapping"]),
            spacing=tuple(float(s) for s in spacing),
            split_sizes={},
            is_built=False,
            postprocess=data["postprocess"],
            manual_dir=None,
            path=Path(data["source"]),
            intensity=_intensity_from_json(data["intensity"], path),
            channel_names=tuple(data["channel_names"]),
        )
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RunError(f"{path}: missing or malformed field ({e!r})") from None


def run_dataset_info(run_dir: Path, cfg: config_lib.Config) -> imgx_data.DatasetInfo:
    """A run's dataset as trained: `preprocess.json`, or the data dir for older runs.

    Raises:
      RunError: a run without `preprocess.json` (trained before imgx wrote it) whose
        dataset is not built in the data dir; the message says how to get it back.
    """
    path = run_dir / PREPROCESS_FILE
    if path.is_file():
        return info_from_preprocessing(path, cfg.data.name)
    where = imgx_data.data_dir(cfg.data.data_dir)
    try:
        info = imgx_data.dataset_info(cfg.data.name, data_dir=cfg.data.data_dir)
    except imgx_data.DatasetError as e:
        info, reason = None, str(e)
    else:
        reason = f"dataset {cfg.data.name!r} is not built in {where}"
    if info is None or not info.is_built:
        raise RunError(
            f"{run_dir} has no {PREPROCESS_FILE} (trained before imgx recorded it) and its "
            f"spacing, intensity rule and classes cannot be read from the data dir: {reason}. "
            "Build the dataset there as it was built for training (same spacing and shape), "
            "or predict on the machine that trained the run"
        )
    return info


def provenance() -> dict[str, Any]:
    """`{"versions": {package: version or None}, "git_commit": sha or None, "git_dirty"}`.

    The commit is the one of the imgx source when it is a file tracked in a git checkout
    (an editable install); None otherwise. Never raises.
    """
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    commit, dirty = _git_state(Path(__file__).resolve().with_name("__init__.py"))
    return {"versions": versions, "git_commit": commit, "git_dirty": dirty}


def _git_state(source: Path) -> tuple[str | None, bool | None]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(source.parent), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", source.name)  # imgx's own checkout, not another
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def is_model_file(path: str | Path) -> bool:
    """Whether `path` is a model file made by `imgx export` (a zip with config.json)."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return "config.json" in archive.namelist()


@contextlib.contextmanager
def extracted_model(path: str | Path) -> Iterator[Path]:
    """A temporary run folder holding a model file's config, preprocessing and checkpoint.

    Raises:
      RunError: not a model file made by `imgx export`.
    """
    path = Path(path)
    if not is_model_file(path):
        raise RunError(f"{path} is not a model file made by `imgx export` (a zip with config.json)")
    with tempfile.TemporaryDirectory(prefix="imgx-model-") as tmp:
        with zipfile.ZipFile(path) as archive:
            root = Path(tmp).resolve()
            for member in archive.namelist():  # no member may land outside the folder
                if not (root / member).resolve().is_relative_to(root):
                    raise RunError(f"{path}: member {member!r} points outside the model folder")
            archive.extractall(root)
        yield root
