"""Validation and test: predictions over a split, metrics per case, files a user opens.

`Validator` runs during training (mean foreground Dice on the validation split with the
configured sampler). `evaluate` is `imgx valid` / `imgx test`: it restores a checkpoint,
predicts every case of a split (sliding windows when the dataset trains on patches), and
writes `per_case.csv`, `summary.json`, predictions in the original geometry and overlays.
Its metrics are those of the prediction restored onto the original grid against the label
file (`scored_case`); the stored-grid ones are kept as `<metric>_resampled`.

Results never overwrite other results: the folder is named by every setting that changes
the numbers (`results_name`: checkpoint step, sampler, sampling steps, DDIM's eta, number
of samples, seed), and a folder that already holds results of the same settings is only
replaced with `overwrite=True` (`ResultsExist` otherwise).

Ensembles: `evaluate(run, ensemble_with=[other runs])` averages the class probabilities
of several runs (`Member`s) case by case — cross-validation folds of one model, or the
MELBA paper's segmentation + diffusion ensemble. Each run weighs the same; a diffusion run
contributes the mean over its samples of the final sampling step. The runs must share
the dataset, its classes and geometry (`check_ensemble`). The summary reports the
ensemble's metrics and, under `runs`, each run's alone; the folder name gets
`-ensemble_<n>runs_<hash>` (`ensemble_name`), so it never replaces single-run results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import imgx_data
from imgx_train import checkpoint as ckpt_lib
from imgx_train import config as config_lib
from imgx_train import devices, distributed, metrics, optim, portable, reports, runs, tasks

ProbabilityFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def case_probabilities(
    task: tasks.Task,
    predict: ProbabilityFn,
    params: Any,
    key: jax.Array,
    image: np.ndarray,
    *,
    num_samples: int = 1,
    last_step_only: bool = False,
    patch_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Probabilities `(*spatial, C, K)` of one image `(*spatial, channels)`.

    Whole images go through the network at once; datasets trained on patches use
    Gaussian-blended sliding windows stitched on the host (bounded device memory). With
    `num_samples` S > 1 the probabilities are the mean over S samples (an ensemble), sample
    s drawn with the key `fold_in(key, s)`. With `last_step_only` only the final sampling
    step is copied back and stitched: `(*spatial, C, 1)`, K times less host memory.
    `patch_shape` gives the windows when the dataset has none (`data.patch_shape` None):
    a case stored whole, larger than the images the network was trained on. Windows
    overlap by `data.inference_overlap`, by default half a window on every axis.
    """
    cfg = task.cfg
    patch_shape = cfg.data.patch_shape or patch_shape
    steps = slice(-1, None) if last_step_only else slice(None)
    total = None
    for s in range(num_samples):
        sample_key = jax.random.fold_in(key, s)
        if patch_shape is None:
            probs = np.asarray(predict(params, sample_key, image[None])[0, ..., steps])
        else:

            def patches_fn(patches, sample_key=sample_key):
                out = predict(params, sample_key, patches)[..., steps]
                return out.reshape(*out.shape[:-2], -1)  # fold (C, K) into channels

            overlap = cfg.data.inference_overlap
            if overlap is None:  # nnU-Net's step of half a window (Isensee et al. 2021)
                overlap = tuple(int(p) // 2 for p in patch_shape)
            flat = imgx_data.sliding_window_inference(
                patches_fn,
                image,
                patch_shape=patch_shape,
                overlap=overlap,
                batch_size=max(1, cfg.data.eval_batch_size // 2),
            )
            probs = flat.reshape(*flat.shape[:-1], task.num_channels, -1)
        total = probs if total is None else total + probs
    return total / num_samples


_BATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _batched(predict: ProbabilityFn) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """`predict` over a batch of images with one key per image (compiled once per shape)."""
    if predict not in _BATCHED:
        ref = weakref.ref(predict)  # a strong one would keep the cache entry alive

        def one(params, key, image):
            return ref()(params, key, image[None])[0]

        _BATCHED[predict] = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
    return _BATCHED[predict]


def iterate_cases(
    task: tasks.Task,
    predict: ProbabilityFn,
    params: Any,
    source: Any,
    *,
    seed: int,
    num_samples: int = 1,
    max_cases: int | None = None,
    batch_size: int | None = None,
    last_step_only: bool = False,
) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """Yields (example, probabilities (*spatial, C, K)) for the cases of a source in order.

    Case i is predicted with the key `fold_in(key(seed), i)` (as `case_probabilities`
    uses it) whatever the batching, so the same seed gives the same predictions and they
    do not depend on the batch size. Whole-image datasets are predicted in batches of
    `batch_size` (default `data.eval_batch_size`) cases; a case of another shape than the
    dataset's (a test case stored whole) goes alone through sliding windows of the
    dataset's shape. `last_step_only`: K = 1, the final sampling step (see
    `case_probabilities`).
    """
    n = len(source) if max_cases is None else min(len(source), max_cases)
    base_key = jax.random.key(seed)
    stored_shape = tuple(task.info.image_shape)

    def alone(i: int, example: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
        key = jax.random.fold_in(base_key, i)
        return example, case_probabilities(
            task,
            predict,
            params,
            key,
            example["image"],
            num_samples=num_samples,
            last_step_only=last_step_only,
            patch_shape=stored_shape,
        )

    if task.cfg.data.patch_shape is not None or num_samples > 1:
        for i in range(n):
            yield alone(i, source[i])
        return
    batch_size = batch_size or task.cfg.data.eval_batch_size
    batched = _batched(predict)
    for start in range(0, n, batch_size):
        indices = list(range(start, min(start + batch_size, n)))
        examples = [source[i] for i in indices]
        if any(np.shape(e["image"])[:-1] != stored_shape for e in examples):
            for i, example in zip(indices, examples, strict=True):
                yield alone(i, example)
            continue
        images = np.stack([e["image"] for e in examples])
        indices += [indices[-1]] * (batch_size - len(examples))  # pad to one compiled shape
        if len(examples) < batch_size:
            pad = np.repeat(images[-1:], batch_size - len(examples), axis=0)
            images = np.concatenate([images, pad])
        # The key of case_probabilities(key=fold_in(base, i), num_samples=1): sample 0.
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base_key, i), 0))(
            np.asarray(indices, np.uint32)
        )
        probs = batched(params, keys, images)
        probs = np.asarray(probs[..., -1:] if last_step_only else probs)
        yield from zip(examples, probs[: len(examples)], strict=True)


def case_metrics(
    task: tasks.Task, example: dict[str, Any], probabilities: np.ndarray, tolerance_mm: float
) -> tuple[np.ndarray, dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Final label, its metrics, and the metrics of every sampling step (diffusion)."""
    spacing = tuple(float(s) for s in example["spacing"])
    reference = np.asarray(example["label"]).astype(np.int32)
    steps = []
    num_steps = probabilities.shape[-1]
    for k in range(num_steps):
        label = np.asarray(task.labels_from_probabilities(probabilities[..., k]))
        label = imgx_data.postprocess(task.info.name, label, spacing)
        steps.append(
            (
                label,
                metrics.per_class_metrics(
                    label,
                    reference,
                    num_classes=task.info.num_classes,
                    spacing=spacing,
                    tolerance_mm=tolerance_mm,
                    overlapping=task.overlapping,
                ),
            )
        )
    final_label, final = steps[-1]
    per_step = [m for _, m in steps] if num_steps > 1 else []
    return final_label, final, per_step


def original_label_of(
    task: tasks.Task, example: dict[str, Any], probabilities: np.ndarray, step: int = -1
) -> tuple[np.ndarray, imgx_data.Geometry]:
    """The label on the original file's grid: the probabilities of sampling step `step`
    (default the final one) resampled linearly onto that grid, then the argmax (nested
    regions: p >= 0.5) and the dataset's post-processing with that grid's spacing
    (`imgx_data.restore_probabilities`)."""
    restored, grid = imgx_data.restore_probabilities(probabilities[..., step], example)
    label = np.asarray(task.labels_from_probabilities(restored))
    return imgx_data.postprocess(task.info.name, label, grid.spacing).astype(np.uint8), grid


def scored_case(
    task: tasks.Task, example: dict[str, Any], probabilities: np.ndarray, tolerance_mm: float
) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """(label on the stored grid, label on the original grid, the case's metrics, per-step
    metrics) as `imgx test` reports them.

    The metrics are those of the label on the original grid against the label file
    (`original_label`), in mm of that grid (`original_spacing`): foreground the stored crop
    dropped counts as missed. So are the per-step metrics (diffusion: every sampling
    step's probabilities restored alike; the last step's are the case's metrics). The
    stored-grid metrics of the final step (`case_metrics`) are kept as
    `<metric>_resampled`. Datasets built before `original_label` was stored give the
    stored-grid metrics alone, and None for the label on the original grid
    (`original_label_of` makes it).
    """
    stored_label, stored, per_step = case_metrics(task, example, probabilities, tolerance_mm)
    if "original_label" not in example:
        return stored_label, None, stored, per_step
    reference = np.asarray(example["original_label"]).astype(np.int32)

    def on_original_grid(step: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        label, grid = original_label_of(task, example, probabilities, step)
        return label, metrics.per_class_metrics(
            label,
            reference,
            num_classes=task.info.num_classes,
            spacing=grid.spacing,
            tolerance_mm=tolerance_mm,
            overlapping=task.overlapping,
        )

    label, original = on_original_grid(-1)
    if per_step:
        per_step = [on_original_grid(k)[1] for k in range(len(per_step) - 1)] + [original]
    resampled = {f"{k}_resampled": v for k, v in stored.items()}
    return stored_label, label, original | resampled, per_step


def split_source(cfg: config_lib.Config, split: str) -> imgx_data.DataSource:
    """A split of the run's dataset; `train`/`valid` of its fold when `data.fold` is set."""
    return imgx_data.data_source(
        cfg.data.name,
        split,
        data_dir=cfg.data.data_dir,
        fold=cfg.data.fold,
        num_folds=cfg.data.num_folds,
    )


def training_windows(cfg: config_lib.Config) -> dict[str, Any] | None:
    """What the training windows of the run's train split (of its fold) drop
    (`imgx_data.window_drops`: cases, cases dropping foreground, voxels, voxels by case);
    None for a build that did not record it, or a dataset that is not built here."""
    try:
        return imgx_data.window_drops(
            cfg.data.name,
            "train",
            cfg.data.data_dir,
            fold=cfg.data.fold,
            num_folds=cfg.data.num_folds,
        )
    except imgx_data.DatasetError as exc:
        logging.info("no training window count for %s: %s", cfg.data.name, exc)
        return None


def warn_about_training_windows(
    cfg: config_lib.Config, image_shape: Sequence[int]
) -> dict[str, Any] | None:
    """Logs a warning when the training windows (`image_shape`) drop foreground; returns
    the count (`training_windows`)."""
    drops = training_windows(cfg)
    if drops and drops["voxels"]:
        logging.warning(
            "%s: %s (summary.json training_windows); a larger data shape keeps them.",
            cfg.data.name,
            imgx_data.describe_window_drops(drops, image_shape, "train"),
        )
    return drops


class Validator:
    """Mean foreground Dice on (part of) the validation split during training."""

    def __init__(self, cfg: config_lib.Config, task: tasks.Task, mesh):
        self.cfg = cfg
        self.task = task
        self.source = split_source(cfg, "valid")
        self.predict = task.predict_fn(cfg.eval.sampler, cfg.eval.num_steps, cfg.eval.eta)
        self.mesh = mesh

    def run(self, state: dict[str, Any], step: int) -> dict[str, float]:
        params = devices.host_local(state.get("ema", state["params"]))
        rows = []
        for example, probs in iterate_cases(
            self.task,
            self.predict,
            params,
            self.source,
            seed=self.cfg.train.seed,
            max_cases=self.cfg.train.max_valid_cases,
        ):
            _, final, _ = case_metrics(self.task, example, probs, self.cfg.eval.tolerance_mm)
            rows.append(reports.case_row(str(example["uid"]), final))
        summary = reports.summarize(rows, self.task.class_names)
        fg = summary["foreground_mean"]
        dice = fg["dice"] if fg["dice"] is not None and np.isfinite(fg["dice"]) else 0.0
        return {
            "dice": float(dice),
            "dice_foreground_mean": float(dice),
            "hd95": _finite_or_none(fg["hd95"]),
            "num_cases": len(rows),
        }


def _finite_or_none(value: Any) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


@dataclasses.dataclass
class RestoredRun:
    """A run's checkpoint in memory; `run_dir` is the run folder or the model file."""

    run_dir: Path
    cfg: config_lib.Config
    task: tasks.Task
    params: Any
    step: int


def restore_run(run_dir: str | Path, checkpoint: str | int = "best") -> RestoredRun:
    """Config, task and parameters (EMA if kept) of a run's checkpoint.

    `run_dir` is a run folder or a model file made by `imgx export` (`model.zip`, which
    holds one checkpoint: `best` and `last` are it). The dataset's grid, intensity rule,
    channels and classes come from the run's `preprocess.json`, not from the data dir
    (older runs without it: from the data dir, see `portable.run_dataset_info`).
    """
    if portable.is_model_file(run_dir):
        with portable.extracted_model(run_dir) as folder:
            restored = _restore(folder, checkpoint)
        return dataclasses.replace(restored, run_dir=Path(run_dir).resolve())
    return _restore(runs.check_run_dir(run_dir), checkpoint)


def _restore(run_dir: Path, checkpoint: str | int) -> RestoredRun:
    cfg = config_lib.load(run_dir / "config.json")
    devices.setup(cfg)
    task = tasks.Task(cfg, portable.run_dataset_info(run_dir, cfg))
    mngr = ckpt_lib.manager(run_dir, read_only=True)
    records = runs.read_jsonl(run_dir / "metrics" / "valid.jsonl")
    step = ckpt_lib.select_step(mngr, checkpoint, ckpt_lib.best_step(mngr, records))
    target = tasks.init_state(cfg, task, optim.optimizer(cfg.optimizer))
    step, state, _ = ckpt_lib.restore(mngr, step, target)
    mngr.close()
    params = state.get("ema", state["params"])
    return RestoredRun(run_dir, cfg, task, params, step)


class ResultsExist(FileExistsError):
    """`evaluate` found results of the same settings and was not asked to replace them."""

    def __init__(self, output_dir: Path):
        super().__init__(
            f"{output_dir} already holds the results of these settings (checkpoint, sampler, "
            "steps, samples, seed); pass overwrite=True (imgx test/valid --overwrite) to "
            "replace them, or change a setting to keep both"
        )
        self.output_dir = output_dir


def results_name(
    *,
    step: int,
    is_diffusion: bool,
    sampler: str,
    num_steps: int,
    num_samples: int,
    seed: int,
    eta: float = 0.0,
) -> str:
    """The folder name of an evaluation's results: every setting that changes the numbers.

    `step_100` for seg (deterministic: the checkpoint alone decides), and for diffusion
    `step_100-ddim_10steps-5samples-seed0` (`1sample`; DDIM with eta ≠ 0 adds `_eta0.5`
    after the steps). The dataset, tolerance and the other `eval` fields come from the
    run's config.json, which does not change between evaluations of a run.
    """
    name = f"step_{step}"
    if not is_diffusion:
        return name
    steps = f"{sampler}_{num_steps}steps"
    if sampler == "ddim" and eta:
        steps += f"_eta{eta:g}"
    samples = f"{num_samples}sample" + ("s" if num_samples != 1 else "")
    return f"{name}-{steps}-{samples}-seed{seed}"


class EnsembleMismatch(config_lib.ConfigError):
    """Runs whose probabilities cannot be averaged (another dataset, classes or grid)."""


@dataclasses.dataclass
class Member:
    """One run of an ensemble with the sampling settings it is predicted with.

    `num_samples` is 1 for a seg run (deterministic); `sampler` and `num_steps` are those
    of a diffusion run (None for seg).
    """

    restored: RestoredRun
    predict: ProbabilityFn
    sampler: str | None
    num_steps: int | None
    num_samples: int


def check_ensemble(restored: Sequence[RestoredRun], split: str = "test") -> None:
    """Checks that runs can be ensembled: one dataset, its classes and its grid.

    Raises:
      EnsembleMismatch: a run listed twice, or two runs that differ in dataset, classes,
        spacing, shape, channels or intensities (naming both runs and the difference),
        or, on a split other than test, in their cross-validation fold (other cases).
    """
    first = restored[0]
    seen: dict[Path, Path] = {}
    for run in restored:
        where = run.run_dir.resolve()
        if where in seen:
            raise EnsembleMismatch(f"run {run.run_dir} is listed twice in the ensemble")
        seen[where] = run.run_dir
    a = first.task.info
    for other in restored[1:]:
        b = other.task.info
        fields = [
            ("dataset", a.name, b.name),
            ("classes", tuple(a.class_names), tuple(b.class_names)),
            ("spacing (mm)", tuple(a.spacing), tuple(b.spacing)),
            ("shape", tuple(a.image_shape), tuple(b.image_shape)),
            ("channels", a.num_channels, b.num_channels),
            ("intensities", a.intensity, b.intensity),
        ]
        if split != "test":
            # Other folds validate on other cases: folds are ensembled on the test split.
            folds = (first.cfg.data.fold, other.cfg.data.fold)
            fields.append((f"fold (of the {split} cases)", *folds))
        differences = [f"{what} {x!r} vs {y!r}" for what, x, y in fields if x != y]
        if differences:
            raise EnsembleMismatch(
                f"runs {first.run_dir} and {other.run_dir} cannot be ensembled: "
                f"{'; '.join(differences)}; ensemble runs trained on the same dataset build"
            )


def ensemble_members(
    run_dirs: Sequence[str | Path],
    *,
    checkpoint: str | int = "best",
    sampler: str | None = None,
    num_steps: int | None = None,
    num_samples: int = 1,
    split: str = "test",
) -> list[Member]:
    """Restores runs (`restore_run`) and checks them (`check_ensemble`).

    `sampler`, `num_steps` (default: each run's config) and `num_samples` apply to the
    diffusion runs; a seg run is predicted once.
    """
    if num_samples < 1:
        raise config_lib.ConfigError(f"num_samples must be at least 1, got {num_samples}")
    restored = [restore_run(run_dir, checkpoint) for run_dir in run_dirs]
    check_ensemble(restored, split)
    members = []
    for run in restored:
        cfg, task = run.cfg, run.task
        run_sampler = sampler or cfg.eval.sampler
        run_steps = num_steps or cfg.eval.num_steps
        predict = task.predict_fn(run_sampler, run_steps, cfg.eval.eta)
        if task.is_diffusion:
            members.append(Member(run, predict, run_sampler, run_steps, num_samples))
        else:
            members.append(Member(run, predict, None, None, 1))
    return members


def ensemble_name(members: Sequence[Member], seed: int) -> str:
    """`ensemble_<n>runs_<hash>`: the hash (8 hex digits of SHA-1) of, per run in order,
    its resolved path, checkpoint step and sampling settings (and of the seed when a run
    samples), so that other runs or settings never share a folder; `summary.json` lists
    them in full under `runs`."""
    ids = [
        [
            str(m.restored.run_dir.resolve()),
            m.restored.step,
            m.sampler,
            m.num_steps,
            m.num_samples,
            m.restored.cfg.eval.eta if m.sampler else None,
        ]
        for m in members
    ]
    if any(m.sampler for m in members):
        ids.append(seed)
    digest = hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:8]
    return f"ensemble_{len(members)}runs_{digest}"


def evaluate(
    run_dir: str | Path,
    *,
    ensemble_with: Sequence[str | Path] = (),
    split: str = "test",
    sampler: str | None = None,
    num_steps: int | None = None,
    checkpoint: str | int = "best",
    num_samples: int = 1,
    seed: int = 0,
    save_predictions: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluates a run's checkpoint on a split; returns the `summary.json` content.

    Writes `<run>/<split>/<results_name>/`, e.g. `test/step_100-ddpm_5steps-1sample-seed0/`
    (diffusion) or `test/step_100/` (seg), with `per_case.csv`, `summary.json`,
    `predictions/<uid>.nii.gz` (original geometry; also `.png` for 2D) and
    `overlays/<uid>.png`; the directory is written to a temporary name and moved in place
    when complete (nothing is left of a failed evaluation). Results of other settings are
    never touched; those of the same settings are replaced only with `overwrite`, else
    `ResultsExist` is raised before any case is predicted. The summary gets `output_dir`,
    `checkpoint` and the run's cross-validation `fold` (None without).

    With `ensemble_with` (other run directories), the label is that of the mean of the
    runs' probabilities (module docstring); the results go to `<run>/<split>/<results_name
    of run>-<ensemble_name>/`, and the summary adds `runs`: per run its `run_dir`, `task`,
    `checkpoint`, `fold`, sampling settings and its own metrics (`num_cases`,
    `foreground_mean`, `per_class`, `empty`). Checkpoint and sampling settings apply to
    every run (`ensemble_members`); per-step metrics are the single run's only.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be valid or test, got {split!r}")
    members = ensemble_members(
        [run_dir, *ensemble_with],
        checkpoint=checkpoint,
        sampler=sampler,
        num_steps=num_steps,
        num_samples=num_samples,
        split=split,
    )
    first = members[0]
    restored, cfg, task = first.restored, first.restored.cfg, first.restored.task
    sampler = sampler or cfg.eval.sampler
    num_steps = num_steps or cfg.eval.num_steps
    source = split_source(cfg, split)
    name = results_name(
        step=restored.step,
        is_diffusion=any(m.sampler for m in members),
        sampler=sampler,
        num_steps=num_steps,
        num_samples=num_samples,
        seed=seed,
        eta=cfg.eval.eta,
    )
    if len(members) > 1:
        name += f"-{ensemble_name(members, seed)}"
    out_dir = restored.run_dir / split / name
    if out_dir.exists() and not overwrite:
        raise ResultsExist(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    # Every process evaluates (on its own copy of the parameters); process 0 writes.
    main = devices.is_main_process()
    if main:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        if main:
            (tmp_dir / "predictions").mkdir(parents=True)
            (tmp_dir / "overlays").mkdir()
        rows: list[dict[str, Any]] = []
        member_rows: list[list[dict[str, Any]]] = [[] for _ in members]
        tolerance = cfg.eval.tolerance_mm
        if len(members) == 1:
            cases = iterate_cases(
                task, first.predict, restored.params, source, seed=seed, num_samples=num_samples
            )
        else:
            cases = _ensemble_probabilities(members, source, seed, member_rows, tolerance)
        cropped = {"num_cases": 0, "voxels": 0}
        grid = "stored"
        for i, (example, probs) in enumerate(cases):
            uid = str(example["uid"])
            stored_label, label, final, per_step = scored_case(task, example, probs, tolerance)
            rows.append(reports.case_row(uid, final, per_step))
            grid = "original" if "original_label" in example else "stored"
            # A case stored whole (window_start recorded) loses nothing to its window here.
            dropped = 0 if "window_start" in example else int(example.get("cropped_foreground", 0))
            cropped["num_cases"] += dropped > 0
            cropped["voxels"] += dropped
            if main and save_predictions:
                if label is None:
                    label, _ = original_label_of(task, example, probs)
                _write_prediction(tmp_dir / "predictions", uid, label, example)
            if main and i < cfg.eval.num_overlays:
                reports.save_overlay(
                    tmp_dir / "overlays" / f"{_safe(uid)}.png",
                    np.asarray(example["image"]),
                    np.asarray(example["label"]),
                    stored_label,
                    class_names=task.class_names,
                    spacing=tuple(float(s) for s in example["spacing"]),
                )
        summary = reports.summarize(rows, task.class_names)
        sampling = any(m.sampler for m in members)
        summary.update(
            {
                "split": split,
                "checkpoint": restored.step,
                "fold": cfg.data.fold,
                "sampler": sampler if sampling else None,
                "num_steps": num_steps if sampling else None,
                "num_samples": num_samples,
                "seed": seed,
                "metrics_grid": grid,
                "cropped_foreground": cropped,
                "training_windows": training_windows(cfg),
            }
        )
        if grid == "stored":
            logging.warning(
                "dataset %s was built by an older imgx, without the original label files: "
                "these metrics are on the stored (cropped, resampled) grid; rebuild it with "
                "`imgx build ... --overwrite` for metrics on the original grid",
                cfg.data.name,
            )
        if cropped["voxels"]:
            logging.warning(
                "%s split: the stored crops of %d cases drop %d foreground voxels (a build "
                "older than whole cases); they count as missed in the metrics on the "
                "original grid (summary.json cropped_foreground).",
                split,
                cropped["num_cases"],
                cropped["voxels"],
            )
        if len(members) > 1:
            summary["runs"] = [
                _member_summary(m, r, task.class_names)
                for m, r in zip(members, member_rows, strict=True)
            ]
        if main:
            reports.write_per_case_csv(tmp_dir / "per_case.csv", rows, task.class_names)
            reports.write_summary_json(tmp_dir / "summary.json", summary)
            _move_in_place(tmp_dir, out_dir, overwrite)
    except BaseException:  # nothing of a failed or interrupted evaluation is left
        if main:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    distributed.barrier("imgx-evaluate-written")  # no process returns before the files exist
    summary["output_dir"] = str(out_dir)
    return summary


def _ensemble_probabilities(
    members: Sequence[Member],
    source: Any,
    seed: int,
    member_rows: list[list[dict[str, Any]]],
    tolerance_mm: float,
) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """(example, Σ_r p_r / R (*spatial, C, 1)) per case, p_r the final-step probabilities
    of run r (its samples' mean); each run's own metrics of the case are appended to
    `member_rows` on the way.

    The runs predict the cases side by side: a batch of cases per run is held, whatever
    the split's size.
    """
    streams = [
        iterate_cases(
            m.restored.task,
            m.predict,
            m.restored.params,
            source,
            seed=seed,
            num_samples=m.num_samples,
            last_step_only=True,
        )
        for m in members
    ]
    for cases in zip(*streams, strict=True):
        example = cases[0][0]
        uid = str(example["uid"])
        total = None
        for m, rows, (_, p) in zip(members, member_rows, cases, strict=True):
            _, _, final, _ = scored_case(m.restored.task, example, p, tolerance_mm)
            rows.append(reports.case_row(uid, final))
            total = p.astype(np.float32) if total is None else total + p
        yield example, total / len(members)


def _member_summary(
    member: Member, rows: list[dict[str, Any]], class_names: Sequence[str]
) -> dict[str, Any]:
    run = member.restored
    alone = reports.summarize(rows, class_names)
    return {
        "run_dir": str(run.run_dir),
        "task": run.cfg.train.task,
        "checkpoint": run.step,
        "fold": run.cfg.data.fold,
        "sampler": member.sampler,
        "num_steps": member.num_steps,
        "num_samples": member.num_samples,
        **{key: alone[key] for key in ("num_cases", "foreground_mean", "per_class", "empty")},
    }


def _move_in_place(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Renames the finished `tmp_dir` to `out_dir`, replacing it only with `overwrite`."""
    if not out_dir.exists():
        tmp_dir.rename(out_dir)
        return
    if not overwrite:  # written by another evaluation meanwhile
        raise ResultsExist(out_dir)
    old = out_dir.with_name(out_dir.name + ".replaced")
    shutil.rmtree(old, ignore_errors=True)
    out_dir.rename(old)
    tmp_dir.rename(out_dir)
    shutil.rmtree(old)


def _safe(uid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in uid)


def _write_prediction(folder: Path, uid: str, original: np.ndarray, example: dict) -> None:
    """Writes a label on the original grid (`original_label_of`) as NIfTI (and PNG for 2D)."""
    _, geometry = imgx_data.example_geometry(example)
    imgx_data.write_image(folder / f"{_safe(uid)}.nii.gz", original, geometry)
    if geometry.ndim == 2:
        imgx_data.write_image(folder / f"{_safe(uid)}.png", original, geometry)


def describe_run(run_dir: str | Path) -> dict[str, Any]:
    """Config, checkpoints, best checkpoint (with its validation) and last logged step of a run."""
    path = runs.check_run_dir(run_dir)
    cfg = config_lib.load(path / "config.json")
    train_records = runs.read_jsonl(path / "metrics" / "train.jsonl")
    valid_records = runs.read_jsonl(path / "metrics" / "valid.jsonl")
    steps, best = [], None
    if (path / "checkpoints").is_dir():
        mngr = ckpt_lib.manager(path, read_only=True)
        steps = sorted(mngr.all_steps())
        # The checkpoint `imgx test --checkpoint best` restores, with its validation.
        step = ckpt_lib.best_step(mngr, valid_records)
        mngr.close()
        if step is not None:
            logged = [r for r in valid_records if r.get("step") == step]
            best = logged[-1] if logged else {"step": step}
    return {
        "run_dir": str(path),
        "data": cfg.data.name,
        "task": cfg.train.task,
        "strategy": cfg.diffusion.strategy if cfg.train.task == "diffusion" else None,
        "steps": cfg.train.steps,
        "last_logged_step": train_records[-1]["step"] if train_records else 0,
        "last_loss": train_records[-1].get("loss") if train_records else None,
        "checkpoints": steps,
        "best": best,
        "config": config_lib.to_dict(cfg),
    }
