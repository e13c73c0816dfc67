"""Validation and test: predictions over a split, metrics per case, files a user opens.

`Validator` runs during training (mean foreground Dice on the validation split with the
configured sampler). `evaluate` is `imgx valid` / `imgx test`: it restores a checkpoint,
predicts every case of a split (sliding windows when the dataset trains on patches), and
writes `per_case.csv`, `summary.json`, predictions in the original geometry and overlays.

Results never overwrite other results: the folder is named by every setting that changes
the numbers (`results_name`: checkpoint step, sampler, sampling steps, DDIM's eta, number
of samples, seed), and a folder that already holds results of the same settings is only
replaced with `overwrite=True` (`ResultsExist` otherwise).
"""

from __future__ import annotations

import dataclasses
import shutil
import weakref
from collections.abc import Callable, Iterator
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
) -> np.ndarray:
    """Probabilities `(*spatial, C, K)` of one image `(*spatial, channels)`.

    Whole images go through the network at once; datasets trained on patches use
    Gaussian-blended sliding windows stitched on the host (bounded device memory). With
    `num_samples` S > 1 the probabilities are the mean over S samples (an ensemble), sample
    s drawn with the key `fold_in(key, s)`. With `last_step_only` only the final sampling
    step is copied back and stitched: `(*spatial, C, 1)`, K times less host memory.
    """
    cfg = task.cfg
    patch_shape = cfg.data.patch_shape
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
) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """Yields (example, probabilities (*spatial, C, K)) for the cases of a source in order.

    Case i is predicted with the key `fold_in(key(seed), i)` (as `case_probabilities`
    uses it) whatever the batching, so the same seed gives the same predictions and they
    do not depend on the batch size. Whole-image datasets are predicted in batches of
    `batch_size` (default `data.eval_batch_size`) cases.
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
    batch_size = batch_size or task.cfg.data.eval_batch_size
    batched = _batched(predict)
    for start in range(0, n, batch_size):
        indices = list(range(start, min(start + batch_size, n)))
        examples = [source[i] for i in indices]
        images = np.stack([e["image"] for e in examples])
        indices += [indices[-1]] * (batch_size - len(examples))  # pad to one compiled shape
        if len(examples) < batch_size:
            pad = np.repeat(images[-1:], batch_size - len(examples), axis=0)
            images = np.concatenate([images, pad])
        # The key of case_probabilities(key=fold_in(base, i), num_samples=1): sample 0.
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base_key, i), 0))(
            np.asarray(indices, np.uint32)
        )
        probs = np.asarray(batched(params, keys, images))
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
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluates a run's checkpoint on a split; returns the `summary.json` content.

    Writes `<run>/<split>/<results_name>/`, e.g. `test/step_100-ddpm_5steps-1sample-seed0/`
    (diffusion) or `test/step_100/` (seg), with `per_case.csv`, `summary.json`,
    `predictions/<uid>.nii.gz` (original geometry; also `.png` for 2D) and
    `overlays/<uid>.png`; the directory is written to a temporary name and moved in place
    when complete (nothing is left of a failed evaluation). Results of other settings are
    never touched; those of the same settings are replaced only with `overwrite`, else
    `ResultsExist` is raised before any case is predicted. The summary gets `output_dir`
    and `checkpoint`.
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
    name = results_name(
        step=restored.step,
        is_diffusion=task.is_diffusion,
        sampler=sampler,
        num_steps=num_steps,
        num_samples=num_samples,
        seed=seed,
        eta=cfg.eval.eta,
    )
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
        rows = []
        cases = iterate_cases(
            task, predict, restored.params, source, seed=seed, num_samples=num_samples
        )
        for i, (example, probs) in enumerate(cases):
            uid = str(example["uid"])
            label, final, per_step = case_metrics(task, example, probs, cfg.eval.tolerance_mm)
            rows.append(reports.case_row(uid, final, per_step))
            if main and save_predictions:
                _write_prediction(tmp_dir / "predictions", uid, label, example)
            if main and i < cfg.eval.num_overlays:
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


def _write_prediction(folder: Path, uid: str, label: np.ndarray, example: dict) -> None:
    original, geometry = imgx_data.restore_to_original(label, example)
    original = original.astype(np.uint8)
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
