"""Ensembles of runs (cross-validation folds; MELBA's seg + diffusion) on stand-in models
whose probabilities are known, so the ensemble's average has a closed form; the checks
that the runs fit together; and the fold reaching the data."""

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imgx_data
from imgx_train import config as config_lib
from imgx_train import evaluation, runs
from imgx_train.predict import RunningEnsemble, case_key, predict

CLASSES = ("background", "muscle", "fascia")
SHAPE = (6, 5)
# Each model alone predicts class 0 (seg) or class 2 (diffusion) everywhere; their mean
# (0.3, 0.4, 0.3) predicts class 1, the reference: the ensemble alone is right.
SEG = np.array([0.6, 0.4, 0.0], np.float32)
DIFFUSION = np.array([0.0, 0.4, 0.6], np.float32)
WOBBLE = np.array([0.05, -0.05, 0.0], np.float32)  # a sample's deviation, × u ∈ [-1, 1)


def seg_model(params, key, image):
    """Constant probabilities (batch, *spatial, C, 1), whatever the key."""
    del key
    return jnp.broadcast_to(params["p"][:, None], (*image.shape[:-1], len(CLASSES), 1))


def diffusion_model(params, key, image):
    """params p + u·WOBBLE with u = uniform(key) ∈ [-1, 1): samples differ; 2 steps, the
    first all background (only the final step counts)."""
    u = jax.random.uniform(key, minval=-1.0, maxval=1.0)
    final = params["p"] + u * WOBBLE
    steps = jnp.stack([jnp.asarray([1.0, 0.0, 0.0]), final], axis=-1)
    return jnp.broadcast_to(steps, (*image.shape[:-1], len(CLASSES), 2))


def stub_run(path, *, diffusion, p, fold=None, **info_changes):
    cfg = config_lib.replace(
        config_lib.Config(),
        {
            "data.name": "stub",
            "data.eval_batch_size": 2,
            "data.fold": fold,
            "eval.num_overlays": 0,
            "train.task": "diffusion" if diffusion else "seg",
        },
    )
    info = SimpleNamespace(
        name="stub",
        class_names=CLASSES,
        num_classes=len(CLASSES),
        spacing=(1.0, 1.0),
        image_shape=SHAPE,
        num_channels=1,
        intensity="identity",
        num_spatial_dims=2,
    )
    info.__dict__.update(info_changes)
    model = diffusion_model if diffusion else seg_model
    task = SimpleNamespace(
        cfg=cfg,
        info=info,
        is_diffusion=diffusion,
        overlapping=False,
        num_channels=len(CLASSES),
        class_names=list(CLASSES),
        labels_from_probabilities=lambda probs: np.argmax(probs, axis=-1),
        predict_fn=lambda sampler, num_steps, eta: model,
    )
    path.mkdir(parents=True, exist_ok=True)
    return evaluation.RestoredRun(path, cfg, task, {"p": jnp.asarray(p)}, 7)


CASES = [
    {"uid": f"c{i}", "image": np.zeros((*SHAPE, 1), np.float32),
     "label": np.ones(SHAPE, np.uint8), "spacing": np.ones(2, np.float32)}
    for i in range(3)
]  # fmt: skip


@pytest.fixture
def stub_runs(monkeypatch, tmp_path):
    """`restore_run` answers stand-in runs by folder; the test split is CASES."""
    known = {}

    def add(folder, **kwargs):
        run = stub_run(tmp_path / folder, **kwargs)
        known[run.run_dir.resolve()] = run
        return run.run_dir

    monkeypatch.setattr(
        evaluation, "restore_run", lambda run_dir, checkpoint="best": known[Path(run_dir).resolve()]
    )
    monkeypatch.setattr(imgx_data, "data_source", lambda *args, **kwargs: CASES)
    return add


def test_seg_plus_diffusion_ensemble_reports_each_model_and_the_mean(stub_runs):
    diffusion = stub_runs("diffusion", diffusion=True, p=DIFFUSION)
    seg = stub_runs("seg", diffusion=False, p=SEG)
    alone = evaluation.evaluate(diffusion, save_predictions=False, num_samples=2)
    summary = evaluation.evaluate(
        diffusion, ensemble_with=[seg], save_predictions=False, num_samples=2
    )
    out = Path(summary["output_dir"])
    assert out.parent == diffusion / "test" and out != Path(alone["output_dir"])
    assert out.name.startswith("step_7-ddpm_5steps-2samples-seed0-ensemble_2runs_")
    assert Path(alone["output_dir"]).is_dir()  # the single run's results are kept
    # The ensemble predicts class 1 everywhere: Dice 1 (fascia: both empty, NaN, left out).
    assert summary["foreground_mean"]["dice"] == 1.0
    assert summary["per_class"]["muscle"]["dice"]["mean"] == 1.0
    assert summary["empty"]["fascia"]["both_empty"] == 3
    assert alone["foreground_mean"]["dice"] == 0.0
    by_task = {r["task"]: r for r in summary["runs"]}
    assert [r["run_dir"] for r in summary["runs"]] == [str(diffusion), str(seg)]
    assert by_task["seg"]["foreground_mean"]["dice"] == 0.0  # class 0 everywhere
    assert by_task["diffusion"]["foreground_mean"]["dice"] == 0.0  # class 2 everywhere
    assert by_task["diffusion"]["num_samples"] == 2 and by_task["seg"]["num_samples"] == 1
    assert by_task["seg"]["sampler"] is None and by_task["diffusion"]["sampler"] == "ddpm"
    written = json.loads((out / "summary.json").read_text())
    assert written["runs"][1]["per_class"]["muscle"]["dice"]["mean"] == 0.0
    assert summary["per_step"] == {}  # only the ensemble's final prediction
    # Another member list or order is another folder; the same one again is refused.
    with pytest.raises(evaluation.ResultsExist):
        evaluation.evaluate(diffusion, ensemble_with=[seg], save_predictions=False, num_samples=2)
    other = evaluation.evaluate(seg, ensemble_with=[diffusion], save_predictions=False)
    assert Path(other["output_dir"]).parent == seg / "test"


def test_fold_runs_record_their_fold_and_average(stub_runs):
    # Folds of one seg model: p_k with mean (0.3, 0.4, 0.3), each alone wrong.
    ps = [SEG, DIFFUSION, np.array([0.3, 0.4, 0.3], np.float32)]
    folds = [stub_runs(f"f{k}", diffusion=False, p=p, fold=k) for k, p in enumerate(ps)]
    single = evaluation.evaluate(folds[0], save_predictions=False)
    assert single["fold"] == 0 and "runs" not in single
    summary = evaluation.evaluate(folds[0], ensemble_with=folds[1:], save_predictions=False)
    assert Path(summary["output_dir"]).name.startswith("step_7-ensemble_3runs_")
    assert summary["fold"] == 0 and [r["fold"] for r in summary["runs"]] == [0, 1, 2]
    assert summary["foreground_mean"]["dice"] == 1.0
    assert [r["foreground_mean"]["dice"] for r in summary["runs"]] == [0.0, 0.0, 1.0]
    # Other folds validate on other cases: no ensemble on the valid split.
    with pytest.raises(evaluation.EnsembleMismatch, match=r"fold \(of the valid cases\) 0 vs 1"):
        evaluation.evaluate(folds[0], ensemble_with=folds[1:], split="valid")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "other"}, "dataset 'stub' vs 'other'"),
        ({"class_names": ("background", "muscle", "bone")}, "classes"),
        ({"spacing": (2.0, 2.0)}, r"spacing \(mm\) \(1.0, 1.0\) vs \(2.0, 2.0\)"),
        ({"image_shape": (8, 8)}, r"shape \(6, 5\) vs \(8, 8\)"),
        ({"num_channels": 2}, "channels 1 vs 2"),
    ],
)
def test_runs_that_do_not_fit_together_are_refused(stub_runs, tmp_path, change, message):
    a = stub_runs("a", diffusion=True, p=DIFFUSION)
    b = stub_runs("b", diffusion=False, p=SEG, **change)
    for call in (
        lambda: evaluation.evaluate(a, ensemble_with=[b]),
        lambda: predict(a, tmp_path / "scans", tmp_path / "out", ensemble_with=[b]),
    ):
        (tmp_path / "scans").mkdir(exist_ok=True)
        with pytest.raises(evaluation.EnsembleMismatch, match=message) as error:
            call()
        assert f"runs {a} and {b} cannot be ensembled" in str(error.value)
    assert not (a / "test").exists() and not (tmp_path / "out").exists()
    with pytest.raises(evaluation.EnsembleMismatch, match="listed twice"):
        evaluation.evaluate(a, ensemble_with=[tmp_path / "x" / ".." / "a"])


def test_predict_ensemble_probabilities_are_the_runs_mean(stub_runs, tmp_path):
    diffusion = stub_runs("diffusion", diffusion=True, p=DIFFUSION)
    seg = stub_runs("seg", diffusion=False, p=SEG)
    scans = tmp_path / "scans"
    scans.mkdir()
    geometry = imgx_data.Geometry.identity(SHAPE, (1.0, 1.0))
    image = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)  # not constant
    imgx_data.write_image(scans / "x.nii.gz", image, geometry)
    result = predict(
        diffusion, scans, tmp_path / "out", ensemble_with=[seg], num_samples=3,
        save_probabilities=True, seed=5,
    )  # fmt: skip
    assert result["failures"] == []
    # Sample s of case x: case_probabilities(key=fold_in(case_key, s)) draws with its
    # fold_in(key, 0).
    key = case_key(jax.random.key(5), "x")
    us = [
        float(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, s), 0), minval=-1))
        for s in range(3)
    ]
    diffusion_mean = DIFFUSION + np.mean(us) * WOBBLE  # the samples' mean
    mean = (SEG + diffusion_mean) / 2  # each run weighs the same
    # The mixture's variance: each run's samples weigh 1/S_r.
    samples = [(DIFFUSION + u * WOBBLE, 1 / 3) for u in us] + [(SEG, 1.0)]
    variance = sum(w * (p - mean) ** 2 for p, w in samples) / 2

    def read(name):
        return imgx_data.read_image(tmp_path / "out" / name)[0]

    np.testing.assert_allclose(read("x_probabilities.nii.gz"), np.broadcast_to(mean, (*SHAPE, 3)),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(read("x.nii.gz"), np.ones(SHAPE))
    np.testing.assert_allclose(read("x_variance.nii.gz"), variance.mean(), rtol=1e-4)
    entropy = -sum(m * np.log(m) for m in mean)
    np.testing.assert_allclose(read("x_entropy.nii.gz"), entropy, rtol=1e-5)


def test_weighted_running_ensemble_matches_the_closed_form():
    rng = np.random.default_rng(0)
    samples = rng.dirichlet(np.ones(3), size=(4, 5, 2)).astype(np.float32)
    weights = np.array([0.5, 2.0, 1.0, 0.25])
    running = RunningEnsemble(overlapping=False)
    for sample, weight in zip(samples, weights, strict=True):
        running.add(sample, weight=weight)
    result = running.result()
    s, w = samples.astype(np.float64), weights[:, None, None, None]
    mean = (w * s).sum(axis=0) / weights.sum()
    np.testing.assert_allclose(result.mean, mean, rtol=1e-6)
    variance = ((w * (s - mean) ** 2).sum(axis=0) / weights.sum()).mean(axis=-1)
    np.testing.assert_allclose(result.variance, variance, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="weight must be > 0"):
        running.add(samples[0], weight=0.0)


def test_the_fold_reaches_the_data_and_the_run_name(tmp_path):
    data_dir = tmp_path / "data"
    imgx_data.build("phantom", data_dir=data_dir, split_sizes=(4, 1, 1))
    cfg = config_lib.replace(config_lib.Config(), {"data.data_dir": str(data_dir), "data.fold": 2})
    folds = imgx_data.cross_validation_folds("phantom", data_dir)
    for split, part in (("train", "train"), ("valid", "val")):
        source = evaluation.split_source(cfg, split)
        assert [source[i]["uid"] for i in range(len(source))] == folds[2][part]
    assert runs.new_run_dir(cfg, tmp_path / "runs").name.endswith("-phantom-diffusion-fold2")
    with pytest.raises(config_lib.ConfigError, match=r"data.fold=5 is not valid; folds are"):
        config_lib.validate(config_lib.replace(cfg, {"data.fold": 5}))
