"""`imgx predict`: segment new scans with a trained run, in each scan's own geometry.

Each input case (a file, or `<case>_0000`, `_0001`, ... channel files) is put on the
dataset's spacing and intensities exactly as at training, predicted (whole image or
Gaussian-blended sliding windows, stitched on the host so device memory stays bounded),
and resampled back onto its own grid. Diffusion runs with `num_samples` S > 1 give an
ensemble: the label of the mean probabilities plus uncertainty maps (predictive entropy
and the variance across samples averaged over classes). A bad input is reported and
skipped; the other cases are still written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

import imgx_data
import imgx_diffusion as idf
from imgx_train import evaluation

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png", ".mha", ".nrrd")


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[:-5] if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit() else name


def _cases(inputs: Path, num_channels: int) -> dict[str, list[Path]]:
    if not inputs.exists():
        raise FileNotFoundError(f"input {inputs} does not exist")
    if inputs.is_dir():
        return imgx_data.find_scans(inputs, num_channels)
    if num_channels > 1:
        # A single channel file of a multi-channel case: take its siblings.
        case = _case_name(inputs)
        scans = imgx_data.find_scans(inputs.parent, num_channels)
        if case not in scans:
            raise imgx_data.DatasetError(
                f"{inputs}: the model needs {num_channels} channels as {case}_0000 ... "
                f"{case}_{num_channels - 1:04d} next to each other"
            )
        return {case: scans[case]}
    return {_case_name(inputs): [inputs]}


def _write(path: Path, array: np.ndarray, geometry: imgx_data.Geometry) -> Path:
    """Writes atomically: a crash never leaves a half-written file under the final name."""
    tmp = path.with_name(f".{path.name}.partial{''.join(path.suffixes)}")
    imgx_data.write_image(tmp, array, geometry)
    os.replace(tmp, path)
    return path


def predict(
    run_dir: str | Path,
    inputs: str | Path,
    output_dir: str | Path,
    *,
    sampler: str | None = None,
    num_steps: int | None = None,
    checkpoint: str | int = "best",
    num_samples: int = 1,
    save_probabilities: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Predicts every case of `inputs` (a file or a folder) into `output_dir`.

    Writes `<case>.nii.gz` (labels, the input's own grid), with S > 1 samples also
    `<case>_entropy.nii.gz` and `<case>_variance.nii.gz`, and with `save_probabilities`
    `<case>_probabilities.nii.gz` (float32, classes on the last axis).

    Returns:
      {"written": [paths], "failures": [(input path, message)]}.
    """
    restored = evaluation.restore_run(run_dir, checkpoint)
    cfg, task, info = restored.cfg, restored.task, restored.task.info
    sampler = sampler or cfg.eval.sampler
    num_steps = num_steps or cfg.eval.num_steps
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if num_samples > 1 and not task.is_diffusion:
        raise ValueError("num_samples > 1 needs a diffusion run: a seg model is deterministic")
    cases = _cases(Path(inputs), info.num_channels)
    predict_fn = task.predict_fn(sampler, num_steps, cfg.eval.eta)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    base_key = jax.random.key(seed)

    written: list[str] = []
    failures: list[tuple[str, str]] = []
    for index, (case, paths) in enumerate(cases.items()):
        try:
            scan = imgx_data.prepare_scan(
                paths,
                spacing=info.spacing,
                num_channels=info.num_channels,
                intensity=info.intensity,
                case=case,
            )
            if scan.image.ndim - 1 != info.num_spatial_dims:
                raise imgx_data.DatasetError(
                    f"{paths[0]}: a {scan.image.ndim - 1}D image, but the model of "
                    f"{restored.run_dir.name} segments {info.num_spatial_dims}D images"
                )
            key = jax.random.fold_in(base_key, index)
            samples = np.stack(
                [
                    evaluation.case_probabilities(
                        task, predict_fn, restored.params, jax.random.fold_in(key, s), scan.image
                    )[..., -1]
                    for s in range(num_samples)
                ]
            )
            ensemble = idf.ensemble_from_probabilities(samples, overlapping=task.overlapping)
            label = np.asarray(ensemble.label).astype(np.uint8)
            label = imgx_data.postprocess(info.name, label, scan.grid.spacing)
            outputs = {f"{case}.nii.gz": (imgx_data.restore_scan_label(label, scan), False)}
            if num_samples > 1:
                outputs[f"{case}_entropy.nii.gz"] = (np.asarray(ensemble.entropy), True)
                outputs[f"{case}_variance.nii.gz"] = (np.asarray(ensemble.variance), True)
            for name, (array, resample) in outputs.items():
                if resample:
                    array = imgx_data.resample_to_geometry(
                        array.astype(np.float32), scan.grid, scan.original, is_label=False
                    )
                written.append(str(_write(output_dir / name, array, scan.original)))
            if save_probabilities:
                probabilities = np.stack(
                    [
                        imgx_data.resample_to_geometry(
                            np.asarray(ensemble.probabilities[..., c], np.float32),
                            scan.grid,
                            scan.original,
                            is_label=False,
                        )
                        for c in range(task.num_channels)
                    ],
                    axis=-1,
                )
                path = output_dir / f"{case}_probabilities.nii.gz"
                written.append(str(_write(path, probabilities, scan.original)))
        except (imgx_data.DatasetError, ValueError, OSError, RuntimeError) as e:
            failures.append((str(paths[0]), str(e)))
    return {"written": written, "failures": failures}
