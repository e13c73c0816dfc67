"""`imgx predict`: segment new scans with a trained run, in each scan's own geometry.

Each input case (a file, or `<case>_0000`, `_0001`, ... channel files) is put on the
dataset's spacing and intensities exactly as at training (from the run's
`preprocess.json`; `run_dir` may also be a model file made by `imgx export`), predicted
(whole image or Gaussian-blended sliding windows, stitched on the host), and resampled
back onto its own grid: the class probabilities linearly, the label taken after (as
nnU-Net does). Diffusion runs with `num_samples` S > 1 give an ensemble: the label of the
mean probabilities plus uncertainty maps (predictive entropy and the variance across
samples averaged over classes). Several runs (`ensemble_with`:
cross-validation folds, or a seg and a diffusion run as in the MELBA paper) are ensembled
alike, each run weighing the same.

Memory stays bounded: only the final sampling step of each sample is copied back and
stitched (not the K intermediate ones), and the S samples are summed on the host in
running sums (`RunningEnsemble`), never stacked. Case keys come from the seed and the
case name, so a case gets the same prediction alone or in a folder.

Predictions never overwrite the inputs: `check_outputs` refuses, before the model is
loaded or anything is written, an output folder that is the inputs' folder (in any
spelling: a symlink, `..`, another path to the same folder) or where an output would
replace an input file (an input that is a symlink into the output folder). Predictions
written next to the scans would also be read as scans by the next `imgx predict` of that
folder, so the inputs' own folder is refused even when no name clashes.

A bad input (a channel missing or too many, a file that does not fit the naming, a 2D
image for a 3D model, an unreadable file) is listed in `failures` with a message naming
the file and what is expected, and nothing is written for it; the other cases are still
written.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

import imgx_data
from imgx_data import scans as scans_lib
from imgx_train import devices, distributed, evaluation
from imgx_train.config import ConfigError


def _cases(inputs: Path, num_channels: int) -> tuple[dict[str, list[Path]], list[tuple[Path, str]]]:
    """The cases of a file or folder, and the files that cannot be predicted."""
    if not inputs.exists():
        raise FileNotFoundError(f"input {inputs} does not exist")
    if inputs.is_dir():
        found = scans_lib.find_scans(inputs, num_channels)
        return found.cases, found.problems
    case = scans_lib.case_of(inputs)
    if case is None:
        return {}, [
            (
                inputs,
                f"{inputs}: not an image file; the model reads "
                f"{', '.join(scans_lib.IMAGE_ENDINGS)}.",
            )
        ]
    # A single file: its own case only (with its sibling channel files).
    found = scans_lib.find_scans(inputs.parent, num_channels, case=case)
    return found.cases, found.problems


_OUTPUT_SUFFIXES = ("", "_entropy", "_variance", "_probabilities")


def _input_files(inputs: Path) -> list[Path]:
    """The image files predicting `inputs` may read: a folder's, or a file's case's."""
    folder = inputs if inputs.is_dir() else inputs.parent
    case = None if inputs.is_dir() else scans_lib.case_of(inputs)
    files = [
        path
        for path in sorted(folder.iterdir())
        if path.is_file()
        and (name := scans_lib.case_of(path)) is not None
        and (case is None or name == case)
    ]
    return files if inputs.is_dir() else sorted({inputs, *files})


def _output_names(case: str) -> list[str]:
    """The files `predict` may write for a case, with their temporary names."""
    names = [f"{case}{suffix}.nii.gz" for suffix in _OUTPUT_SUFFIXES]
    return names + [f".{name}.partial.nii.gz" for name in names]


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name one file or folder (symlinks, `..`, hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_outputs(inputs: str | Path, output_dir: str | Path) -> None:
    """Refuses an output folder where predictions would overwrite or mix with the inputs.

    Raises:
      FileNotFoundError: `inputs` does not exist.
      FileExistsError: `output_dir` is the folder of the inputs, is a file, or an output
        would replace an input file; the message names the clashing files and the fix.
    """
    inputs, output_dir = Path(inputs), Path(output_dir)
    if not inputs.exists():
        raise FileNotFoundError(f"input {inputs} does not exist")
    folder = inputs if inputs.is_dir() else inputs.parent
    files = _input_files(inputs)
    fix = f"choose another output folder (-o), e.g. {folder.name or 'scans'}_predictions"
    if output_dir.exists() and not output_dir.is_dir():
        what = "an input scan" if any(_same(output_dir, f) for f in files) else "a file"
        raise FileExistsError(
            f"output {output_dir} is {what}, not a folder: predictions go into a folder; {fix}"
        )
    target = output_dir.resolve()
    cases = {scans_lib.case_of(path) for path in files} - {None}
    planned = {target / name for case in sorted(cases) for name in _output_names(case)}
    clashes = [str(path) for path in files if path.resolve() in planned]
    if _same(output_dir, folder):
        overwritten = f"overwrite {', '.join(clashes)} and " if clashes else ""
        raise FileExistsError(
            f"output folder {output_dir} is the folder of the inputs ({folder}): the "
            f"predictions would {overwritten}be read as scans by the next prediction of that "
            f"folder; {fix}"
        )
    if clashes:
        raise FileExistsError(
            f"output folder {output_dir}: predictions would overwrite the input(s) "
            f"{', '.join(clashes)} (a link into that folder); {fix}"
        )


class Ensemble(NamedTuple):
    """Summary of weighted samples of class probabilities (*spatial, C) on the prediction
    grid (weights w_s, W = Σ_s w_s; all 1 for one run's S samples).

    Attributes:
      mean: Σ_s w_s p_s / W, (*spatial, C).
      label: the task's label of `mean` (argmax, or nested regions: #{regions ≥ 0.5}).
      entropy: predictive entropy of `mean`, −Σ_c m log m (nested regions: binary entropy
        summed over regions), (*spatial).
      variance: population variance over the samples, Σ_s w_s (p_s − mean)² / W,
        averaged over classes, (*spatial). For runs weighted equally (w = 1/S_r) it is
        the variance of the runs' mixture: the mean within-run variance plus the variance
        of the runs' means.
    """

    mean: np.ndarray
    label: np.ndarray
    entropy: np.ndarray
    variance: np.ndarray


class RunningEnsemble:
    """Accumulates samples on the host in running sums: memory does not grow with S.

    Holds two arrays of one sample's size (the weighted sum and the weighted form of
    Welford's sum of squared deviations, West 1979, which avoids the cancellation of
    Σp² − W·mean²), in float32 like the samples.
    """

    def __init__(self, *, overlapping: bool):
        self.overlapping = overlapping
        self.weight = 0.0
        self._total: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    def add(self, probabilities: np.ndarray, weight: float = 1.0) -> None:
        """Adds one sample's probabilities (*spatial, C) with weight w > 0."""
        if not weight > 0:
            raise ValueError(f"RunningEnsemble.add: the weight must be > 0, got {weight}")
        x = np.asarray(probabilities, np.float32)
        if self._total is None:
            self.weight = weight
            self._total = x * np.float32(weight)
            self._m2 = np.zeros_like(x)
            return
        previous = self._total / self.weight
        self.weight += weight
        self._total += x * np.float32(weight)
        self._m2 += np.float32(weight) * (x - previous) * (x - self._total / self.weight)

    def result(self) -> Ensemble:
        # The same maps as `imgx_diffusion.ensemble_from_probabilities`, computed here in
        # numpy on the host so that a whole volume never has to fit on the accelerator.
        if self._total is None:
            raise ValueError("RunningEnsemble.result: no sample was added.")
        mean = self._total / self.weight

        def plogp(p):
            return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)

        if self.overlapping:
            entropy = -np.sum(plogp(mean) + plogp(1.0 - mean), axis=-1)
        else:
            entropy = -np.sum(plogp(mean), axis=-1)
        variance = np.mean(self._m2 / self.weight, axis=-1)
        return Ensemble(mean, labels_of(mean, overlapping=self.overlapping), entropy, variance)


def labels_of(probabilities: np.ndarray, *, overlapping: bool) -> np.ndarray:
    """uint8 labels of probabilities (..., C): the argmax, or for nested regions (region i
    = label >= i, as imgx_diffusion derives it) the number of regions with p >= 0.5."""
    if overlapping:
        return np.sum(probabilities >= 0.5, axis=-1).astype(np.uint8)
    return np.argmax(probabilities, axis=-1).astype(np.uint8)


def case_key(base_key: jax.Array, case: str) -> jax.Array:
    """The key of a case: from its name, so it does not depend on the other inputs."""
    return jax.random.fold_in(base_key, zlib.crc32(case.encode()) & 0x7FFFFFFF)


def _write(path: Path, array: np.ndarray, geometry: imgx_data.Geometry) -> Path:
    """Writes atomically: a crash never leaves a half-written file under the final name."""
    tmp = path.with_name(f".{path.name}.partial{''.join(path.suffixes)}")
    try:
        imgx_data.write_image(tmp, array, geometry)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def predict(
    run_dir: str | Path,
    inputs: str | Path,
    output_dir: str | Path,
    *,
    ensemble_with: Sequence[str | Path] = (),
    sampler: str | None = None,
    num_steps: int | None = None,
    checkpoint: str | int = "best",
    num_samples: int = 1,
    save_probabilities: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Predicts every case of `inputs` (a file or a folder) into `output_dir`.

    Writes `<case>.nii.gz` (labels, the input's own grid), with S > 1 samples (or an
    ensemble) also `<case>_entropy.nii.gz` and `<case>_variance.nii.gz`, and with
    `save_probabilities` `<case>_probabilities.nii.gz` (float32, classes on the last axis).

    With `ensemble_with` (other run directories, checked by
    `evaluation.check_ensemble`), the label is that of the runs' mean probabilities, each
    run weighing the same: run r's S_r samples (1 for seg) get weight 1/S_r, summed in one
    `RunningEnsemble` (the variance map is then that of the runs' mixture). Checkpoint and
    sampling settings apply to every run (`evaluation.ensemble_members`).

    Nothing is loaded or written when `output_dir` could overwrite or mix with the
    inputs (`check_outputs`).

    Returns:
      {"written": [paths], "failures": [(input path, message)]}.
    """
    check_outputs(inputs, output_dir)
    if num_samples < 1:
        raise ConfigError(f"num_samples must be at least 1, got {num_samples}")
    members = evaluation.ensemble_members(
        [run_dir, *ensemble_with],
        checkpoint=checkpoint,
        sampler=sampler,
        num_steps=num_steps,
        num_samples=num_samples,
    )
    task, info = members[0].restored.task, members[0].restored.task.info
    if num_samples > 1 and not any(m.restored.task.is_diffusion for m in members):
        raise ConfigError("num_samples > 1 needs a diffusion run: a seg model is deterministic")
    # Each run weighs the same; max S / S_r keeps one run's weights at exactly 1.
    most = max(m.num_samples for m in members)
    uncertainty = sum(m.num_samples for m in members) > 1
    cases, problems = _cases(Path(inputs), info.num_channels)
    output_dir = Path(output_dir)
    # With several processes, each predicts every case and process 0 writes.
    main = devices.is_main_process()
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
    base_key = jax.random.key(seed)

    written: list[str] = []
    failures: list[tuple[str, str]] = [(str(path), message) for path, message in problems]
    for case, paths in cases.items():
        try:
            scan = imgx_data.prepare_scan(
                paths,
                spacing=info.spacing,
                num_channels=info.num_channels,
                intensity=info.intensity,
                case=case,
            )
            key = case_key(base_key, case)
            running = RunningEnsemble(overlapping=task.overlapping)
            for m in members:
                for s in range(m.num_samples):
                    probabilities = evaluation.case_probabilities(
                        m.restored.task,
                        m.predict,
                        m.restored.params,
                        jax.random.fold_in(key, s),
                        scan.image,
                        last_step_only=True,  # the other steps are never copied or stitched
                    )
                    running.add(probabilities[..., 0], weight=most / m.num_samples)
            ensemble = running.result()
            # Probabilities back onto the scan's grid (linear), then the labels: as nnU-Net,
            # and as `imgx test` restores its predictions (not nearest-neighbour labels).
            mean = np.stack(
                [_resample(ensemble.mean[..., c], scan) for c in range(task.num_channels)],
                axis=-1,
            )
            label = labels_of(mean, overlapping=task.overlapping)
            label = imgx_data.postprocess(info.name, label, scan.original.spacing)
            outputs = {f"{case}.nii.gz": label}
            if uncertainty:
                outputs[f"{case}_entropy.nii.gz"] = _resample(ensemble.entropy, scan)
                outputs[f"{case}_variance.nii.gz"] = _resample(ensemble.variance, scan)
            if save_probabilities:
                outputs[f"{case}_probabilities.nii.gz"] = mean
            if main:
                written += _write_case(output_dir, outputs, scan.original)
        except (imgx_data.DatasetError, ValueError, OSError, RuntimeError) as e:
            failures.append((str(paths[0]), str(e)))
    distributed.barrier("imgx-predict-written")  # no process returns before the files exist
    return {"written": written, "failures": sorted(failures)}


def _write_case(
    output_dir: Path, outputs: dict[str, np.ndarray], geometry: imgx_data.Geometry
) -> list[str]:
    """Writes all of a case's files or none."""
    done: list[Path] = []
    try:
        for name, array in outputs.items():
            done.append(_write(output_dir / name, array, geometry))
    except BaseException:
        for path in done:
            path.unlink(missing_ok=True)
        raise
    return [str(path) for path in done]


def _resample(array: np.ndarray, scan: imgx_data.PreparedScan) -> np.ndarray:
    """A float map on the prediction grid, linearly resampled onto the scan's own grid."""
    return imgx_data.resample_to_geometry(
        np.asarray(array, np.float32), scan.grid, scan.original, is_label=False
    )
