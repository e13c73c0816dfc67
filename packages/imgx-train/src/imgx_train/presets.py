"""Presets: per-dataset defaults, the papers' configurations and `debug`.

A preset is a dict of dotted-key overrides applied on top of `Config()`, in this order:
dataset preset (for a `nifti_folder` build: its `plan.json`, see `plan_overrides`) →
named preset (`melba2023`, `dgm4miccai2023`, `debug`) → the user's overrides. Values
follow `shared/spec/presets.md`, except that the paper presets are the settings of the
papers' code wherever the two differ (the tables of README.md).
"""

from __future__ import annotations

from typing import Any

import imgx_data
from imgx_train import config as config_lib

DATASET_PRESETS: dict[str, dict[str, Any]] = {
    # Sized so that `imgx train` (diffusion, xT-recycling) finishes in a few minutes on a
    # 2-core CPU and reaches a working model on the phantom test split.
    "phantom": {
        "data.global_batch_size": 8,
        "data.eval_batch_size": 16,
        "data.rotation": 15.0,
        "data.shear": 5.0,
        "data.zoom": 0.1,
        "data.shift": 0.1,
        "model.num_channels": (8, 16, 32, 64),
        "model.num_res_blocks": 1,
        "model.num_heads": 4,
        "model.dropout": 0.0,
        "optimizer.peak_lr": 3e-3,
        "optimizer.warmup_steps": 50,
        "optimizer.decay_steps": 800,
        "optimizer.end_lr": 1e-4,
        "train.steps": 800,
        "train.eval_every": 200,
        "train.checkpoint_every": 200,
        "train.max_valid_cases": 24,
        "logging.log_every": 20,
    },
    "phantom_3d": {
        "data.global_batch_size": 2,
        "data.eval_batch_size": 2,
        "model.num_channels": (8, 16, 32, 64),
        "model.num_res_blocks": 1,
        "model.num_heads": 4,
        "model.patch_size": (2, 2, 1),
        "model.dropout": 0.0,
        "optimizer.peak_lr": 2e-3,
        "optimizer.warmup_steps": 50,
        "optimizer.decay_steps": 1000,
        "train.steps": 1000,
        "train.eval_every": 250,
        "train.checkpoint_every": 250,
        "eval.tolerance_mm": 2.0,
    },
    "muscle_us": {
        "data.global_batch_size": 64,
        "model.patch_size": 2,
        "train.steps": 8_000,  # 512 000 samples / 64
    },
    "male_pelvic_mr": {
        "data.patch_shape": (256, 256, 32),
        "data.inference_overlap": (0, 0, 16),
        "data.global_batch_size": 8,
        "model.patch_size": (2, 2, 1),
        "train.steps": 12_500,  # 100 000 samples / 8
    },
    "amos_ct": {
        "data.patch_shape": (128, 128, 128),
        "data.inference_overlap": (64, 0, 0),
        "data.global_batch_size": 8,
        "model.patch_size": (2, 2, 2),
        "train.steps": 12_500,
    },
    "brats2021_mr": {
        "data.patch_shape": (128, 128, 128),
        "data.inference_overlap": (0, 0, 32),
        "data.global_batch_size": 8,
        "model.patch_size": (2, 2, 2),
        "train.steps": 12_500,
    },
}
DATASET_PRESETS["brats2021_mr_wt"] = DATASET_PRESETS["brats2021_mr"]

# Augmentation shift of both paper presets, in voxels per spatial axis
# (shared/spec/presets.md: ±10 voxels per axis, male pelvic MR 20, 20, 4). Datasets not
# listed (e.g. a `nifti_folder` build) get 10 voxels along every axis.
PAPER_SHIFT_VOXELS: dict[str, tuple[float, ...]] = {
    "phantom": (10.0, 10.0),
    "phantom_3d": (10.0, 10.0, 10.0),
    "muscle_us": (10.0, 10.0),
    "male_pelvic_mr": (20.0, 20.0, 4.0),
    "amos_ct": (10.0, 10.0, 10.0),
    "brats2021_mr": (10.0, 10.0, 10.0),
    "brats2021_mr_wt": (10.0, 10.0, 10.0),
}
_DEFAULT_PAPER_SHIFT_VOXELS = 10.0
_PAPER_PRESETS = ("melba2023", "dgm4miccai2023")


def paper_shift(data: str) -> float | tuple[float, ...]:
    """The paper presets' maximum shift for a dataset, in voxels (per axis or for all)."""
    return PAPER_SHIFT_VOXELS.get(data, _DEFAULT_PAPER_SHIFT_VOXELS)


NAMED_PRESETS: dict[str, dict[str, Any]] = {
    # The papers' settings, read from their code (ImgX-DiffSeg); every row, and what imgx
    # does differently on purpose, is in the "Paper presets" tables of README.md.
    # Fu et al., MELBA 2023, arXiv 2308.16355 (xT-recycling).
    "melba2023": {
        "train.task": "diffusion",
        "diffusion.num_timesteps": 1001,
        "diffusion.num_train_steps": 1001,  # trained on every base step, sampled with 5
        "diffusion.variance": "fixed_small",
        "diffusion.model_output": "x0",
        "diffusion.strategy": "recycle_last",
        "diffusion.timestep_sampler": "importance",
        "loss.dice": 1.0,
        "loss.focal": 20.0,
        "loss.cross_entropy": 0.0,
        "loss.mse": 0.0,
        "loss.vlb": 0.0,
        "data.rotation": 5.0,  # 0.088 rad
        "data.zoom": 0.15,
        "data.shear": 0.0,
        "data.gamma": 0.0,
        "data.probability": 1.0,  # every affine parameter drawn for every sample
        "data.shift_unit": "voxel",  # data.shift: paper_shift(dataset)
        "data.keep_foreground_in_view": True,
        "train.early_stopping_patience": 5,
        "model.patch_size": 2,
        "model.decoder": "original",  # the published network, its FLOPs and parameters
    },
    # Fu et al., DGM4MICCAI 2023, arXiv 2303.06040 (xt-recycling), code v0.1.0.
    "dgm4miccai2023": {
        "train.task": "diffusion",
        "diffusion.num_timesteps": 1001,
        "diffusion.num_train_steps": 5,
        "diffusion.variance": "fixed_large",
        "diffusion.model_output": "x0",
        "diffusion.strategy": "recycle_next",
        "diffusion.recycle_next_clipped": True,  # t ∈ [0, T), first pass at min(t + 1, T − 1)
        "diffusion.timestep_sampler": "uniform",
        "loss.dice": 1.0,
        "loss.cross_entropy": 1.0,
        "loss.focal": 0.0,
        # The paper's 0.1·MSE(ε) was added for ε-predicting models only: none on x_0.
        "loss.mse": 0.0,
        "loss.vlb": 0.0,
        "optimizer.peak_lr": 1e-4,
        "optimizer.end_lr": 1e-6,
        "data.rotation": 5.0,
        "data.zoom": 0.15,
        "data.shear": 0.0,
        "data.gamma": 0.0,
        "data.probability": 1.0,
        "data.shift_unit": "voxel",  # data.shift: paper_shift(dataset)
        "data.keep_foreground_in_view": True,
        "model.decoder": "original",
    },
    # Seconds-long runs for tests and smoke checks.
    "debug": {
        "model.num_channels": (4, 8, 16),
        "model.num_res_blocks": 1,
        "model.num_heads": 2,
        "model.dropout": 0.0,
        "data.global_batch_size": 2,
        "data.eval_batch_size": 4,
        "train.steps": 4,
        "train.eval_every": 2,
        "train.checkpoint_every": 2,
        "train.max_valid_cases": 4,
        "optimizer.warmup_steps": 1,
        "optimizer.decay_steps": 10,
        "logging.log_every": 1,
        "eval.num_overlays": 2,
    },
}


def plan_overrides(plan: imgx_data.planning.Plan) -> dict[str, Any]:
    """The dotted-key overrides of a dataset's training plan (`imgx plan NAME`).

    Windows slide at inference with the default overlap, half a window on every axis
    (cases are stored whole, so they can exceed the stored shape along any axis).
    """
    return {
        "data.patch_shape": plan.patch_shape,
        "data.inference_overlap": None,
        "data.global_batch_size": plan.batch_size,
        "data.eval_batch_size": plan.batch_size,
        "data.foreground_oversampling": plan.foreground_oversampling,
        "model.num_channels": plan.num_channels,
        "model.num_res_blocks": plan.num_res_blocks,
        "model.num_heads": plan.num_heads,
        "model.dropout": plan.dropout,
        "model.patch_size": plan.first_downsampling,
    }


def dataset_preset(data: str, data_dir: str | None = None) -> dict[str, Any]:
    """The per-dataset defaults: the preset of a published/built-in dataset, else the
    plan of a `nifti_folder` build (its `plan.json`), else none."""
    if data in DATASET_PRESETS:
        return dict(DATASET_PRESETS[data])
    plan = imgx_data.dataset_plan(data, data_dir)
    return {} if plan is None else plan_overrides(plan)


def make_config(
    data: str = "phantom",
    task: str | None = None,
    preset: str | None = None,
    overrides: str | dict[str, Any] | None = None,
) -> config_lib.Config:
    """The resolved config for a dataset, task, preset and user overrides.

    Args:
      data: dataset name; a `nifti_folder` build uses its plan (`dataset_preset`), other
        datasets without a preset start from the defaults.
      task: `seg` or `diffusion`; None keeps the preset's (default `diffusion`).
      preset: None, `melba2023`, `dgm4miccai2023` or `debug`.
      overrides: dotted-key overrides, a dict or a `"a.b=1,c.d=[1,2]"` string.

    Raises:
      ConfigError: unknown preset, task or key (listing the valid choices).
    """
    user = config_lib.parse_overrides(overrides)
    updates: dict[str, Any] = {"data.name": data}
    updates.update(dataset_preset(data, user.get("data.data_dir")))
    if preset is not None:
        if preset not in NAMED_PRESETS:
            raise config_lib.ConfigError(
                f"unknown preset {preset!r}; choose one of {', '.join(sorted(NAMED_PRESETS))}"
            )
        updates.update(NAMED_PRESETS[preset])
        if preset in _PAPER_PRESETS:
            updates["data.shift"] = paper_shift(data)
    if task is not None:
        updates["train.task"] = task
    updates.update(user)
    cfg = config_lib.replace(config_lib.Config(), updates)
    config_lib.validate(cfg)
    return cfg
