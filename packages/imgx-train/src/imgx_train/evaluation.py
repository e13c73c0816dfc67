"""Validation and test: predictions over a split, metrics per case, files a user opens.

`Validator` runs during training (mean foreground Dice on the validation split with the
configured sampler). `evaluate` is `imgx valid` / `imgx test`: it restores a checkpoint,
predicts every case of a split (sliding windows when the dataset trains on patches), and
writes `per_case.csv`, `summary.json`, predictions in the original geometry and overlays.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

import imgx_data
from imgx_train import checkpoint as ckpt_lib
from imgx_train import config as config_lib
from imgx_train import devices, metrics, optim, reports, runs, tasks

ProbabilityFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def case_probabilities(
    task: tasks.Task,
    predict: ProbabilityFn,
    params: Any,
    key: jax.Array,
    image: np.ndarray,
    *,
    num_samples: int = 1,
) -> np.ndarray:
    """Probabilities `(*spatial, C, K)` of one image `(*spatial, channels)`.

    Whole images go through the network at once; datasets trained on patches use
    Gaussian-blended sliding windows stitched on the host (bounded device memory). With
    `num_samples` S > 1 the probabilities are the mean over S samples (an ensemble).
    """
    cfg = task.cfg
    patch_shape = cfg.data.patch_shape
    total = None
    for s in range(num_samples):
        sample_key = jax.random.fold_in(key, s)
        if patch_shape is None:
            probs = np.asarray(predict(params, sample_key, image[None]))[0]
        else:

            def patches_fn(patches, sample_key=sample_key):
                out = predict(params, sample_key, patches)
                return out.reshape(*out.shape[:-2], -1)  # fold steps into channels

            overlap = cfg.data.inference_overlap or 0
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


def iterate_cases(
    task: tasks.Task,
    predict: ProbabilityFn,
    params: Any,
    source: Any,
    *,
    seed: int,
    num_samples: int = 1,
    max_cases: int | None = None,
) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """Yields (example, probabilities (*spatial, C, K)) for the cases of a source in order.

    Case i uses the key fold_in(key(seed), i): the same seed gives the same predictions.
    Whole-image datasets are predicted in batches of `data.eval_batch_size`.
    """
    n = len(source) if max_cases is None else min(len(source), max_cases)
    base_key = jax.random.key(seed)
    if task.cfg.data.patch_shape is not None or num_samples > 1:
        for i in range(n):
            example = source[i]
            key = jax.random.fold_in(base_key, i)
            yield (
                example,
                case_probabilities(
                    task, predict, params, key, example["image"], num_samples=num_samples
                ),
            )
        return
    batch_size = task.cfg.data.eval_batch_size
    for start in range(0, n, batch_size):
        examples = [source[i] for i in range(start, min(start + batch_size, n))]
        images = np.stack([e["image"] for e in examples])
        if len(examples) < batch_size:  # pad to one compiled shape
            pad = np.repeat(images[-1:], batch_size - len(examples), axis=0)
            images = np.concatenate([images, pad])
        key = jax.random.fold_in(base_key, start)
        probs = np.asarray(predict(params, key, images))
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


class Validator:
    """Mean foreground Dice on (part of) the validation split during training."""

    def __init__(self, cfg: config_lib.Config, task: tasks.Task, mesh):
        self.cfg = cfg
        self.task = task
        self.source = imgx_data.data_source(cfg.data.name, "valid", data_dir=cfg.data.data_dir)
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
    run_dir: Path
    cfg: config_lib.Config
    task: tasks.Task
    params: Any
    step: int


def restore_run(run_dir: str | Path, checkpoint: str | int = "best") -> RestoredRun:
    """Config, task and parameters (EMA if kept) of a run's checkpoint."""
    run_dir = runs.check_run_dir(run_dir)
    cfg = config_lib.load(run_dir / "config.json")
    devices.setup(cfg)
    info = imgx_data.dataset_info(cfg.data.name, data_dir=cfg.data.data_dir)
    task = tasks.Task(cfg, info)
    mngr = ckpt_lib.manager(run_dir, read_only=True)
    best = None
    for record in runs.read_jsonl(run_dir / "metrics" / "valid.jsonl"):
        if record.get("dice") is not None and (best is None or record["dice"] > best[1]):
            best = (record["step"], record["dice"])
    step = ckpt_lib.select_step(mngr, checkpoint, best[0] if best else None)
    target = tasks.init_state(cfg, task, optim.optimizer(cfg.optimizer))
    step, state, _ = ckpt_lib.restore(mngr, step, target)
    mngr.close()
    params = state.get("ema", state["params"])
    return RestoredRun(run_dir, cfg, task, params, step)


def evaluate(
    run_dir: str | Path,
    *,
    split: str = "test",
    sampler: str | None = None,
    num_steps: int | None = None,
    checkpoint: str | int = "best",
    num_samples: int = 1,
    seed: int = 0,
    save_predictions: bool = True,
) -> dict[str, Any]:
    """Evaluates a run's checkpoint on a split; returns the `summary.json` content.

    Writes `<run>/<split>/<sampler>-<K>/` (diffusion) or `<run>/<split>/` (seg) with
    `per_case.csv`, `summary.json`, `predictions/<uid>.nii.gz` (original geometry; also
    `.png` for 2D) and `overlays/<uid>.png`; the directory is written to a temporary
    name and moved in place when complete. The summary gets `output_dir` and `checkpoint`.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be valid or test, got {split!r}")
    restored = restore_run(run_dir, checkpoint)
    cfg, task = restored.cfg, restored.task
    sampler = sampler or cfg.eval.sampler
    num_steps = num_steps or cfg.eval.num_steps
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    predict = task.predict_fn(sampler, num_steps, cfg.eval.eta)
    source = imgx_data.data_source(cfg.data.name, split, data_dir=cfg.data.data_dir)
    name = f"{sampler}-{num_steps}" if task.is_diffusion else ""
    out_dir = restored.run_dir / split / name if name else restored.run_dir / split
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    (tmp_dir / "predictions").mkdir(parents=True)
    (tmp_dir / "overlays").mkdir()

    rows = []
    for i, (example, probs) in enumerate(
        iterate_cases(task, predict, restored.params, source, seed=seed, num_samples=num_samples)
    ):
        uid = str(example["uid"])
        label, final, per_step = case_metrics(task, example, probs, cfg.eval.tolerance_mm)
        rows.append(reports.case_row(uid, final, per_step))
        if save_predictions:
            _write_prediction(tmp_dir / "predictions", uid, label, example)
        if i < cfg.eval.num_overlays:
            reports.save_overlay(
                tmp_dir / "overlays" / f"{_safe(uid)}.png",
                np.asarray(example["image"]),
                np.asarray(example["label"]),
                label,
                class_names=task.class_names,
                spacing=tuple(float(s) for s in example["spacing"]),
            )
    summary = reports.summarize(rows, task.class_names)
    summary.update(
        {
            "split": split,
            "checkpoint": restored.step,
            "sampler": sampler if task.is_diffusion else None,
            "num_steps": num_steps if task.is_diffusion else None,
            "num_samples": num_samples,
            "seed": seed,
        }
    )
    reports.write_per_case_csv(tmp_dir / "per_case.csv", rows, task.class_names)
    reports.write_summary_json(tmp_dir / "summary.json", summary)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    summary["output_dir"] = str(out_dir)
    return summary


def _safe(uid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in uid)


def _write_prediction(folder: Path, uid: str, label: np.ndarray, example: dict) -> None:
    original, geometry = imgx_data.restore_to_original(label, example)
    original = original.astype(np.uint8)
    imgx_data.write_image(folder / f"{_safe(uid)}.nii.gz", original, geometry)
    if geometry.ndim == 2:
        imgx_data.write_image(folder / f"{_safe(uid)}.png", original, geometry)
