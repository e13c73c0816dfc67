"""Run configuration: nested frozen dataclasses, dotted-key overrides, JSON round trip.

The schema is the shared one of `shared/spec/overview.md`: `data`, `model`, `diffusion`,
`loss`, `optimizer`, `train`, `eval`, `logging`. Every field is addressed by a dotted key
(`optimizer.peak_lr`), which is how presets and the command line change it. The resolved
config is saved as `config.json` in the run directory and is enough to rebuild the model,
the data pipeline and the task.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

DEFAULT_EMA_DECAY = 0.999


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Dataset and batching.

    Attributes:
      name: dataset name (`phantom`, `phantom_3d`, `amos_ct`, ..., or a `nifti_folder` name).
      data_dir: TFDS data dir; None means $IMGX_DATA_DIR, else $TFDS_DATA_DIR, else
        ~/tensorflow_datasets.
      patch_shape: spatial shape of training patches; None trains on whole images.
      inference_overlap: sliding-window overlap in voxels per axis at inference; None:
        half a window on every axis (nnU-Net's step of 0.5), for cases larger than it.
      global_batch_size: samples per optimizer update over all devices and hosts.
      max_batch_per_device: larger per-device batches are split into gradient-accumulation
        micro-batches, so the update does not depend on the device count; None = no limit.
      eval_batch_size: samples per evaluation batch (over all devices).
      foreground_oversampling: fraction of training patches centred on a foreground voxel.
      augmentation: apply the random augmentations below during training.
      rotation: maximum rotation in degrees (each axis).
      zoom: maximum relative zoom (0.2 = ±20 %).
      shear: maximum shear angle in degrees.
      shift: maximum |shift|, one value for every axis or one per spatial axis, in units of
        `shift_unit`.
      shift_unit: `fraction` of the image size along the axis, or `voxel`.
      keep_foreground_in_view: clip each sample's shift so that the label's foreground
        bounding box stays inside the (patch) view after the affine (the paper presets).
      gamma: maximum |log γ| of the intensity gamma.
      probability: probability of applying each scalar augmentation parameter.
      flip: random flips along every spatial axis.
      fold: cross-validation fold i (`imgx train --fold i`): train on the other folds'
        cases of the build's train+valid splits, validate on fold i's (nnU-Net's
        `splits_final.json` beside the build, see `imgx_data.cross_validation_folds`);
        the test split stays the test split. None: the build's own train/valid splits.
      num_folds: number of cross-validation folds (5, as nnU-Net).
    """

    name: str = "phantom"
    data_dir: str | None = None
    patch_shape: tuple[int, ...] | None = None
    inference_overlap: tuple[int, ...] | None = None
    global_batch_size: int = 8
    max_batch_per_device: int | None = None
    eval_batch_size: int = 8
    foreground_oversampling: float = 0.0
    augmentation: bool = True
    rotation: float = 30.0
    zoom: float = 0.2
    shear: float = 30.0
    shift: float | tuple[float, ...] = 0.3
    shift_unit: str = "fraction"
    keep_foreground_in_view: bool = False
    gamma: float = 0.3
    probability: float = 0.5
    flip: bool = False
    fold: int | None = None
    num_folds: int = 5


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """U-Net of `imgx_nets.UNet` (defaults: the published model).

    `dtype` "auto" computes in bfloat16 on GPU/TPU and float32 on CPU; parameters are
    always float32. `decoder` "mirrored" or "original" (the published ImgX-DiffSeg
    decoder, used by the paper presets; see `imgx_nets.UNet`).
    """

    num_channels: tuple[int, ...] = (32, 64, 128, 256)
    num_res_blocks: int = 2
    kernel_size: int = 3
    patch_size: tuple[int, ...] | int = 2
    scale_factor: tuple[int, ...] | int = 2
    num_heads: int = 8
    widening_factor: int = 4
    num_transformer_layers: int = 1
    dropout: float = 0.1
    skip: str = "add"
    decoder: str = "mirrored"
    remat: bool | None = None
    dtype: str = "auto"


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """Gaussian diffusion segmentation (`imgx_diffusion`).

    Attributes:
      num_timesteps: N, steps of the base beta schedule every process is respaced from.
      beta_schedule: `linear`, `quadratic` or `cosine`.
      num_train_steps: T, the respaced number of training steps (5 in the MELBA paper).
      model_output: `x0`, `epsilon` or `v`.
      variance: `fixed_small`, `fixed_large` or `learned_range`.
      strategy: `standard`, `recycle_next`, `recycle_last`, `self_cond_same`,
        `self_cond_next`.
      timestep_sampler: `importance` or `uniform`.
      recycle_posterior_mean: `recycle_next` only: the final pass sees the posterior mean
        q(x_t | x_{t+1}, x̂_0), one reverse step from the first pass's input, instead of
        q(x̂_0, ε, t) (the original toolkit's `reverse_step`).
      recycle_next_clipped: `recycle_next` only: t from [0, T) with the first pass at
        min(t + 1, T − 1), so t = T − 1 is trained too (the DGM4MICCAI 2023 code); default
        t from [0, T − 1).
      self_cond_probability: probability per sample that the second pass of a
        self-conditioning strategy sees the first pass's estimate (else zeros).
    """

    num_timesteps: int = 1001
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_steps: int = 5
    model_output: str = "x0"
    variance: str = "fixed_small"
    strategy: str = "recycle_last"
    timestep_sampler: str = "importance"
    recycle_posterior_mean: bool = False
    recycle_next_clipped: bool = False
    self_cond_probability: float = 0.5


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms (imgx default: Dice 1 + focal 1).

    Attributes:
      dice, cross_entropy, focal: weights of the segmentation losses of the final pass.
      focal_gamma: focusing parameter of the focal loss.
      mse: weight of the per-sample mean squared error of the final pass.
      mse_target: what that MSE compares. `output`: the network's estimate with the target
        of `diffusion.model_output` (x̂_0 vs x_0, ε̂ vs ε or v̂ vs v); `epsilon`: ε̂ vs ε
        whatever the parameterisation, with ε = (x_t − √ᾱ_t x_0)/√(1 − ᾱ_t) from the true
        x_0 and ε̂ the same expression with x̂_0 (the MSE(ε) of the DGM4MICCAI paper).
      vlb: weight of the variational bound (needed by `learned_range`).
      aux: weight of the segmentation loss of the first pass of two-pass strategies.
    """

    dice: float = 1.0
    cross_entropy: float = 0.0
    focal: float = 1.0
    focal_gamma: float = 2.0
    mse: float = 0.0
    mse_target: str = "output"
    vlb: float = 0.0
    aux: float = 0.0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up and cosine decay, global-norm clipping, optional EMA.

    EMA of the parameters is off by default; `ema=true` turns it on with decay 0.999
    (shared/spec/presets.md), and giving `ema_decay` turns it on with that decay.
    """

    init_lr: float = 1e-5
    peak_lr: float = 8e-4
    warmup_steps: int = 100
    decay_steps: int = 10_000
    end_lr: float = 5e-5
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 1e-8
    clip_norm: float = 1.0
    ema: bool = False
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        # Keep the switch and the decay consistent: either one turns the EMA on.
        if self.ema and self.ema_decay is None:
            object.__setattr__(self, "ema_decay", DEFAULT_EMA_DECAY)
        elif self.ema_decay is not None and not self.ema:
            object.__setattr__(self, "ema", True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training run.

    `steps` is a total number of optimizer updates, also when resuming.
    """

    task: str = "diffusion"
    steps: int = 10_000
    seed: int = 0
    eval_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    early_stopping_patience: int = 10
    early_stopping_min_delta: float = 1e-4
    max_valid_cases: int | None = None


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Validation, test and prediction."""

    sampler: str = "ddpm"
    num_steps: int = 5
    eta: float = 0.0
    num_samples: int = 1
    tolerance_mm: float = 1.0
    checkpoint: str = "best"
    num_overlays: int = 4


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Local metrics files always; wandb `offline` (default), `online` or `disabled`."""

    log_every: int = 10
    wandb: str = "offline"
    progress: bool = True
    compilation_cache: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""


def to_dict(config: Any) -> dict[str, Any]:
    """Nested dict of plain JSON values (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """`{"optimizer.peak_lr": 8e-4, ...}` for every leaf field."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def valid_keys(config: Any = None) -> list[str]:
    return sorted(flatten(config if config is not None else Config()))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Converts a parsed JSON value (or string) to the field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot use {value!r}: " + "; ".join(errors))
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list such as [1,2], got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, key) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            try:
                return int(str(value))
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        return int(value)
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def replace(config: Any, updates: dict[str, Any], _prefix: str = "") -> Any:
    """Returns a copy with dotted-key updates, e.g. `{"optimizer.peak_lr": 1e-4}`.

    Raises:
      ConfigError: for an unknown key (listing the valid keys) or a value of the wrong type.
    """
    known = set(valid_keys(config))
    for key in updates:
        if key not in known:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(known))}")
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for key, value in updates.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    if isinstance(config, OptimizerConfig) and "ema" in direct and "ema_decay" not in direct:
        # `optimizer.ema=false` alone switches the EMA off, whatever decay was set before.
        if not _coerce(direct["ema"], bool, _prefix + "ema"):
            direct["ema_decay"] = None
    hints = _field_types(type(config))
    changes = {k: _coerce(v, hints[k], _prefix + k) for k, v in direct.items()}
    for head, sub in nested.items():
        changes[head] = replace(getattr(config, head), sub, f"{_prefix}{head}.")
    return dataclasses.replace(config, **changes)


def parse_overrides(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """Parses `"optimizer.peak_lr=1e-4,model.num_channels=[16,32,64]"` into a dict.

    Values are read as JSON where possible (numbers, lists, true/false/null), else kept as
    strings. Commas inside brackets belong to the value.
    """
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    items, depth, current = [], 0, ""
    for char in str(text):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        items.append(current)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        value = value.strip()
        try:
            parsed = json.loads(value.replace("(", "[").replace(")", "]"))
        except json.JSONDecodeError:
            parsed = value
        out[key.strip()] = parsed
    return out


def from_dict(data: dict[str, Any], cls: type = Config, _prefix: str = "") -> Any:
    """Rebuilds a config from `to_dict` output; unknown keys and wrong types are errors.

    Only the types are checked here; `load` also runs `validate`.
    """
    if not isinstance(data, dict):
        where = f"{_prefix.rstrip('.')} " if _prefix else ""
        raise ConfigError(f"{where}must be a JSON object of {cls.__name__} fields, got {data!r}")
    hints = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {_prefix + key!r} for {cls.__name__}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = from_dict(value, annotation, f"{_prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, annotation, _prefix + key)
    return cls(**kwargs)


#: The `config.json` key of what made the run (package versions, git commit); not a field.
PROVENANCE_KEY = "provenance"


def save(config: Config, path: str | Path, *, provenance: dict[str, Any] | None = None) -> None:
    """Writes `config.json` atomically, with `provenance` under its own key when given."""
    path = Path(path)
    data = to_dict(config)
    if provenance is not None:
        data[PROVENANCE_KEY] = provenance
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def load(path: str | Path) -> Config:
    """Reads and validates a `config.json` (a hand-edited one is checked like `--set`).

    Raises:
      ConfigError: unreadable JSON, an unknown key, a wrong type or a value `validate`
        rejects; the message starts with the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); fix the file") from None
    if isinstance(data, dict):
        data.pop(PROVENANCE_KEY, None)  # a record of the run, not a setting
    try:
        cfg = from_dict(data)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}; fix the file") from None
    return cfg


TASKS = ("seg", "diffusion")
CHOICES: dict[str, tuple[str, ...]] = {
    "train.task": TASKS,
    "diffusion.strategy": (
        "standard",
        "recycle_next",
        "recycle_last",
        "self_cond_same",
        "self_cond_next",
    ),
    "diffusion.model_output": ("x0", "epsilon", "v"),
    "diffusion.variance": ("fixed_small", "fixed_large", "learned_range"),
    "diffusion.timestep_sampler": ("importance", "uniform"),
    "diffusion.beta_schedule": ("linear", "quadratic", "cosine"),
    "loss.mse_target": ("output", "epsilon"),
    "data.shift_unit": ("fraction", "voxel"),
    "eval.sampler": ("ddpm", "ddim", "dpm_solver_2m"),
    "model.skip": ("add", "concat"),
    "model.decoder": ("mirrored", "original"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "logging.wandb": ("offline", "online", "disabled"),
}
# Counts of at least 1 (None allowed where the field is optional); tuples: every entry.
POSITIVE = (
    "data.global_batch_size",
    "data.eval_batch_size",
    "data.max_batch_per_device",
    "data.patch_shape",
    "model.num_channels",
    "model.kernel_size",
    "model.patch_size",
    "model.scale_factor",
    "model.num_heads",
    "model.widening_factor",
    "optimizer.decay_steps",
    "train.steps",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.early_stopping_patience",
    "train.max_valid_cases",
    "eval.num_steps",
    "eval.num_samples",
    "logging.log_every",
)
NON_NEGATIVE = (
    "data.inference_overlap",
    "data.rotation",
    "data.zoom",
    "data.shear",
    "data.shift",
    "data.gamma",
    "model.num_res_blocks",
    "model.num_transformer_layers",
    "loss.dice",
    "loss.cross_entropy",
    "loss.focal",
    "loss.focal_gamma",
    "loss.mse",
    "loss.vlb",
    "loss.aux",
    "optimizer.init_lr",
    "optimizer.end_lr",
    "optimizer.warmup_steps",
    "optimizer.weight_decay",
    "train.early_stopping_min_delta",
    "eval.eta",
    "eval.num_overlays",
)
# Finite numbers in [low, high), or [low, high] where the flag is True.
RANGES: dict[str, tuple[float, float, bool]] = {
    "data.foreground_oversampling": (0.0, 1.0, True),
    "data.probability": (0.0, 1.0, True),
    "model.dropout": (0.0, 1.0, False),
    "diffusion.beta_start": (0.0, 1.0, False),
    "diffusion.beta_end": (0.0, 1.0, False),
    "diffusion.self_cond_probability": (0.0, 1.0, True),
    "optimizer.b1": (0.0, 1.0, False),
    "optimizer.b2": (0.0, 1.0, False),
}
STRICTLY_POSITIVE_NUMBERS = ("optimizer.peak_lr", "optimizer.clip_norm", "eval.tolerance_mm")


def validate(cfg: Config) -> None:
    """Checks what the types alone do not: choices, counts, finite and in-range numbers.

    Run on every config that is made (`presets.make_config`, the `--set` path) and loaded
    (`load`, so `resume`, `evaluate`, `predict` and `describe_run`), so that a bad value
    stops the command at once instead of training the wrong task or failing mid-run.

    Raises:
      ConfigError: naming the key, the bad value and what is allowed.
    """
    values = flatten(cfg)

    def bad(key: str, allowed: str) -> ConfigError:
        return ConfigError(f"{key}={values[key]!r} is not valid; {allowed}")

    for key, allowed in CHOICES.items():
        if values[key] not in allowed:
            raise bad(key, f"choose one of {', '.join(allowed)}")
    checkpoint = cfg.eval.checkpoint
    if checkpoint not in ("best", "last") and not checkpoint.isdigit():
        raise bad("eval.checkpoint", "choose best, last or a step number")

    def numbers(key: str) -> tuple[Any, ...]:
        value = values[key]
        return () if value is None else value if isinstance(value, tuple) else (value,)

    for key in POSITIVE:
        if any(not math.isfinite(v) or v < 1 for v in numbers(key)):
            raise bad(key, "it must be at least 1")
        if key == "model.num_channels" and not numbers(key):
            raise bad(key, "give at least one level, e.g. [32,64,128,256]")
    for key in NON_NEGATIVE:
        if any(not math.isfinite(v) or v < 0 for v in numbers(key)):
            raise bad(key, "it must be a finite number ≥ 0")
    for key in STRICTLY_POSITIVE_NUMBERS:
        if any(not math.isfinite(v) or v <= 0 for v in numbers(key)):
            raise bad(key, "it must be a finite number > 0")
    for key, (low, high, closed) in RANGES.items():
        value = values[key]
        below_high = value <= high if closed else value < high
        if not (math.isfinite(value) and low <= value and below_high):
            raise bad(key, f"it must lie in [{low}, {high}{']' if closed else ')'}")
    decay = cfg.optimizer.ema_decay
    if decay is not None and not 0.0 <= decay < 1.0:
        raise bad("optimizer.ema_decay", "it must lie in [0, 1) (the spec's value is 0.999)")
    if cfg.data.num_folds < 2:
        raise bad("data.num_folds", "it must be at least 2")
    if cfg.data.fold is not None and not 0 <= cfg.data.fold < cfg.data.num_folds:
        raise bad("data.fold", f"folds are numbered 0 to {cfg.data.num_folds - 1}")
    d = cfg.diffusion
    if d.num_timesteps < 2:
        raise bad("diffusion.num_timesteps", "it must be at least 2")
    if not 2 <= d.num_train_steps <= d.num_timesteps:
        raise bad(
            "diffusion.num_train_steps",
            f"it must lie in [2, diffusion.num_timesteps={d.num_timesteps}]",
        )
    if d.variance == "learned_range" and cfg.loss.vlb <= 0:
        raise ConfigError(
            "diffusion.variance=learned_range needs loss.vlb > 0: nothing else trains the "
            "variance (e.g. --set loss.vlb=1)"
        )
    if d.variance != "learned_range" and cfg.loss.vlb > 0:
        # The VLB's mean is stop-gradiented (it trains the variance only): with a fixed
        # variance it would be logged and weighted but train nothing.
        raise ConfigError(
            f"loss.vlb={cfg.loss.vlb!r} has no gradient with diffusion.variance={d.variance}: "
            "the bound trains only a learned variance; set loss.vlb=0 or "
            "diffusion.variance=learned_range"
        )
    for key in ("diffusion.recycle_posterior_mean", "diffusion.recycle_next_clipped"):
        if values[key] and d.strategy != "recycle_next":
            raise bad(key, f"it applies to diffusion.strategy=recycle_next, not {d.strategy}")
    if d.recycle_posterior_mean and d.recycle_next_clipped:
        raise ConfigError(
            "diffusion.recycle_posterior_mean and diffusion.recycle_next_clipped cannot both be "
            "true: at t = T − 1 the first pass runs at t itself; choose one"
        )
