"""`imgx export`: one file that predicts on another machine, without the data or the run.

`model.zip` holds

    config.json        the run's config (with its provenance: package versions, git commit)
    preprocess.json    spacing, shape, intensity rule, channels, classes, orientation
                       (see `imgx_train.portable`)
    checkpoints/<step>/  the chosen checkpoint (orbax), `best` by default
    model.stablehlo    `jax.export.Exported.serialize()` of the probability function
    model.json         the step and the signature of `model.stablehlo`

`imgx predict --model model.zip` reads only this file (it is extracted to a temporary
folder). `model.stablehlo` serves without the Python model code: deserialize it with
`jax.export.deserialize(data)` and call `exported.call(key_data, image)`:

    key_data  uint32 `jax.random.key_data(jax.random.key(seed))` (the default threefry key)
    image     float32 `(B, *spatial, channels)`, B any batch size, `spatial` fixed: the
              training patch (`data.patch_shape`) or the whole stored image shape
    returns   float32 `(B, *spatial, C)` class probabilities (softmax; nested regions:
              sigmoids, no background channel)

It is one pass over one window with the parameters (EMA when kept) as constants: the seg
network's forward, or for diffusion the whole sampler with the exported `sampler` and
`num_steps` (all K denoising steps from noise drawn with `key_data`), the probabilities of
the final x̂_0. Images go in prepared as `preprocess.json` says (resampled to its
spacing, intensities by its rule); the per-image min-max rescaling is inside. Larger
images are tiled by the caller (imgx uses Gaussian-blended sliding windows). It is lowered
for `platforms` (default cpu, cuda and tpu) with the compute dtype of the exporting
machine (float32 on CPU).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from imgx_train import evaluation, portable

STABLEHLO_FILE = "model.stablehlo"
MODEL_JSON = "model.json"
PLATFORMS = ("cpu", "cuda", "tpu")


def export_predict(
    restored: evaluation.RestoredRun,
    *,
    sampler: str | None = None,
    num_steps: int | None = None,
    platforms: tuple[str, ...] = PLATFORMS,
) -> jax.export.Exported:
    """`jax.export` of `f(key_data, image) -> probabilities` (see module doc)."""
    task, cfg = restored.task, restored.cfg
    predict = task.predict_fn(
        sampler or cfg.eval.sampler, num_steps or cfg.eval.num_steps, cfg.eval.eta
    )
    params = restored.params

    def probabilities(key_data, image):
        return predict(params, jax.random.wrap_key_data(key_data), image)[..., -1]

    spatial = cfg.data.patch_shape or task.info.image_shape
    (batch,) = jax.export.symbolic_shape("batch")
    image = jax.ShapeDtypeStruct((batch, *spatial, task.info.num_channels), jnp.float32)
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return jax.export.export(jax.jit(probabilities), platforms=platforms)(key_data, image)


def export_run(
    run_dir: str | Path,
    output: str | Path,
    *,
    checkpoint: str | int = "best",
    sampler: str | None = None,
    num_steps: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes the model file `output` of a run's checkpoint (see module doc).

    The file is written under a temporary name and renamed when complete: an interrupted
    export leaves nothing under `output`.

    Raises:
      FileExistsError: `output` exists (and `overwrite` is False) or is a folder.

    Returns:
      {"output": path, "step": the checkpoint's step, "files": names in the zip}.
    """
    output = Path(output)
    if output.is_dir():
        raise FileExistsError(f"output {output} is a folder; give a file name, e.g. model.zip")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    if portable.is_model_file(run_dir):
        raise portable.RunError(f"{run_dir} is already a model file; export a run folder")
    restored = evaluation.restore_run(run_dir, checkpoint)
    run, step, cfg = restored.run_dir, restored.step, restored.cfg
    sampler, num_steps = sampler or cfg.eval.sampler, num_steps or cfg.eval.num_steps
    exported = export_predict(restored, sampler=sampler, num_steps=num_steps)
    signature = {
        "step": step,
        "stablehlo": {
            "file": STABLEHLO_FILE,
            "inputs": [str(a) for a in exported.in_avals],
            "output": str(exported.out_avals[0]),
            "platforms": list(exported.platforms),
            "sampler": sampler if restored.task.is_diffusion else None,
            "num_steps": num_steps if restored.task.is_diffusion else None,
        },
    }
    checkpoint_dir = run / "checkpoints" / str(step)
    tmp = output.with_name(f".{output.name}.partial")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.write(run / "config.json", "config.json")
            preprocess = portable.preprocessing(restored.task.info)  # also for older runs
            archive.writestr(portable.PREPROCESS_FILE, json.dumps(preprocess, indent=2) + "\n")
            for path in sorted(checkpoint_dir.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(run).as_posix())
            archive.writestr(STABLEHLO_FILE, exported.serialize())
            archive.writestr(MODEL_JSON, json.dumps(signature, indent=2) + "\n")
            names = archive.namelist()
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return {"output": str(output), "step": step, "files": names}


def load_stablehlo(model_file: str | Path) -> jax.export.Exported:
    """The exported probability function of a model file (`exported.call(key_data, image)`)."""
    with zipfile.ZipFile(model_file) as archive:
        return jax.export.deserialize(bytearray(archive.read(STABLEHLO_FILE)))
