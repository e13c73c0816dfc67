"""A trained run works on another machine: preprocess.json, `imgx export`, `predict --model`.

One tiny diffusion run on a phantom built with a non-default grid (spacing 1.5 mm, 32²):
its preprocessing and provenance are recorded at training start, `imgx export` writes the
model file, and after the data dir is gone a new process predicts from that file alone,
writing the same files as the run predicted before. The exported StableHLO function gives
the Python model's probabilities.
"""

import json
import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

import imgx_data
from imgx_cli.main import main
from imgx_train import evaluation, export, portable, presets, trainer
from imgx_train.predict import predict

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPACING, SHAPE = (1.5, 1.5), (32, 32)  # not the phantom's default grid (1 mm, 96²)
FAST = (
    "logging.wandb=disabled,logging.progress=false,model.num_channels=[4,8],"
    "train.max_valid_cases=1,data.eval_batch_size=1,train.steps=2,eval.num_steps=2"
)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data_dir = root / "data"
    imgx_data.build(
        "phantom",
        data_dir=data_dir,
        split_sizes=(2, 1, 1),
        target_spacing=SPACING,
        target_shape=SHAPE,
    )
    cfg = presets.make_config(
        "phantom", task="diffusion", preset="debug", overrides=f"{FAST},data.data_dir={data_dir}"
    )
    run = trainer.train(cfg, run_dir=root / "run")
    scans = root / "scans"
    scans.mkdir()
    rng = np.random.default_rng(0)
    geometry = imgx_data.Geometry.identity((40, 30), (1.0, 1.2))  # one shape: one compile
    for case in ("a", "b"):
        imgx_data.write_image(scans / f"{case}.nii.gz", rng.uniform(0, 100, (40, 30)), geometry)
    return {"root": root, "data_dir": data_dir, "run": run, "scans": scans}


@pytest.fixture(scope="module")
def model(work):
    path = work["root"] / "model.zip"
    assert main(["export", "--run", str(work["run"]), "-o", str(path)]) == 0
    return path


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_run_records_preprocessing_and_provenance(work):
    built = imgx_data.dataset_info("phantom", data_dir=work["data_dir"])
    recorded = json.loads((work["run"] / "preprocess.json").read_text())
    assert recorded["spacing"] == list(SPACING) and recorded["shape"] == list(SHAPE)
    assert recorded["class_names"] == list(built.class_names)
    assert recorded["intensity"] == {"rule": built.intensity}  # the phantom's: identity
    assert recorded["orientation"] == "scan" and recorded["axes"] == ["x", "y"]
    info = portable.info_from_preprocessing(work["run"] / "preprocess.json", "phantom")
    for field in (
        "num_spatial_dims",
        "image_shape",
        "num_channels",
        "class_names",
        "overlapping",
        "spacing",
        "postprocess",
        "intensity",
        "channel_names",
    ):
        assert getattr(info, field) == getattr(built, field), field

    provenance = json.loads((work["run"] / "config.json").read_text())["provenance"]
    assert provenance["versions"]["jax"] == jax.__version__
    assert provenance["versions"]["imgx-train"] == "0.1.0"
    head = subprocess.run(
        ["git", "-C", os.path.dirname(portable.__file__), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
    )
    assert provenance["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)


def test_export_then_predict_without_the_data_in_a_new_process(work, model):
    root, run = work["root"], work["run"]
    before = root / "preds_run"
    predict(run, work["scans"], before)
    names = zipfile.ZipFile(model).namelist()
    assert {"config.json", "preprocess.json", "model.stablehlo", "model.json"} <= set(names)
    assert any(n.startswith("checkpoints/2/") for n in names)
    # An existing model file is kept unless --overwrite.
    stamp = model.stat().st_mtime_ns
    assert main(["export", "--run", str(run), "-o", str(model)]) == 2
    assert model.stat().st_mtime_ns == stamp and not list(root.glob(".model.zip.partial"))

    work["data_dir"].rename(root / "data_elsewhere")  # another machine: no data dir
    try:
        after = root / "preds_model"
        env = {**os.environ, "IMGX_DATA_DIR": str(root / "nowhere")}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "imgx_cli.main",
                "predict",
                "--model",
                str(model),
                "-i",
                str(work["scans"]),
                "-o",
                str(after),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert _snapshot(after) == _snapshot(before)
        assert sorted(_snapshot(after)) == ["a.nii.gz", "b.nii.gz"]
        # The run folder alone works too: preprocess.json, not the data dir.
        restored = evaluation.restore_run(run)
        assert restored.task.info.spacing == SPACING
    finally:
        (root / "data_elsewhere").rename(work["data_dir"])


def test_the_exported_function_gives_the_model_probabilities(model):
    exported = export.load_stablehlo(model)
    assert exported.platforms == export.PLATFORMS
    restored = evaluation.restore_run(model)
    cfg = restored.cfg
    image = np.random.default_rng(1).uniform(size=(3, *SHAPE, 1)).astype(np.float32)
    key = jax.random.key(7)
    served = np.asarray(exported.call(jax.random.key_data(key), image))
    python = restored.task.predict_fn(cfg.eval.sampler, cfg.eval.num_steps, cfg.eval.eta)
    expected = np.asarray(python(restored.params, key, image)[..., -1])
    assert served.shape == (3, *SHAPE, 3)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    np.testing.assert_allclose(served.sum(-1), 1.0, atol=1e-5)


def test_old_runs_without_preprocess_json_need_the_data_dir(work, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((work["run"] / "config.json").read_text())
    cfg = json.loads((old / "config.json").read_text())
    cfg["data"]["data_dir"] = str(tmp_path / "no_data")
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(portable.RunError, match="no preprocess.json .* not built in"):
        evaluation.restore_run(old)
