"""Prediction and evaluation plumbing on stand-in models (no training): bad inputs per case,
the ensemble's running sums against closed forms, sliding windows against whole images,
keys independent of the batch size, and the best checkpoint orbax keeps."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imgx_data
import imgx_diffusion as idf
from imgx_train import checkpoint as ckpt_lib
from imgx_train import config as config_lib
from imgx_train import evaluation
from imgx_train.predict import RunningEnsemble, predict

NUM_CLASSES, NUM_STEPS = 3, 3
PARAMS = {
    # Distinct values per (class, step): a (C, K) fold/unfold mix-up changes the result.
    "a": jnp.asarray(np.arange(NUM_CLASSES * NUM_STEPS).reshape(NUM_CLASSES, NUM_STEPS) - 4.0),
    "b": jnp.asarray(np.linspace(-1.0, 1.0, NUM_CLASSES * NUM_STEPS).reshape(3, 3)),
}


def per_voxel_model(params, key, image):
    """Probabilities (batch, *spatial, C, K) of each voxel from its own value only, plus a
    per-sample random offset per (class, step) from `key` (the same for every voxel): the
    output is translation-equivariant, so stitched windows must equal the whole image."""
    value = image.sum(axis=-1)[..., None, None]
    noise = jax.random.normal(key, (NUM_CLASSES, NUM_STEPS))
    return jax.nn.softmax(value * params["a"] + params["b"] + noise, axis=-2)


def stub_task(
    *,
    ndim=2,
    num_channels=1,
    patch_shape=None,
    overlap=None,
    model=per_voxel_model,
    image_shape=None,
):
    data = SimpleNamespace(patch_shape=patch_shape, inference_overlap=overlap, eval_batch_size=4)
    cfg = SimpleNamespace(eval=SimpleNamespace(sampler="ddim", num_steps=NUM_STEPS, eta=0.0))
    cfg.data = data
    info = SimpleNamespace(
        name="stub",
        num_channels=num_channels,
        spacing=(1.0,) * ndim,
        intensity="identity",
        num_spatial_dims=ndim,
        image_shape=image_shape or (8,) * ndim,  # the stored shape the network trained on
    )
    return SimpleNamespace(
        cfg=cfg,
        info=info,
        is_diffusion=True,
        overlapping=False,
        num_channels=NUM_CLASSES,
        predict_fn=lambda sampler, num_steps, eta: model,
    )


@pytest.fixture
def use_stub(monkeypatch, tmp_path):
    """Makes `predict` restore the given stand-in task instead of a trained run."""

    def use(task):
        restored = evaluation.RestoredRun(tmp_path / "run", task.cfg, task, PARAMS, 0)
        monkeypatch.setattr(evaluation, "restore_run", lambda run_dir, checkpoint: restored)

    return use


def _write(path, array, spacing=None):
    array = np.asarray(array)
    geometry = imgx_data.Geometry.identity(array.shape, spacing or (1.0,) * array.ndim)
    imgx_data.write_image(path, array, geometry)


# ---------------------------------------------------------------------------------------
# Bad inputs: listed per case, the others still predicted, nothing partial written.


def test_channel_problems_are_listed_and_good_cases_written(use_stub, tmp_path):
    use_stub(stub_task(num_channels=2))
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a_0000", "a_0001", "b_0000", "c_0000", "c_0001", "c_0002", "plain"):
        _write(scans / f"{name}.nii.gz", rng.random((9, 7)).astype(np.float32))
    result = predict(tmp_path / "run", scans, tmp_path / "out")
    assert [Path(p).name for p in result["written"]] == ["a.nii.gz"]
    failed = {Path(path).name: message for path, message in result["failures"]}
    assert set(failed) == {"b_0000.nii.gz", "c_0002.nii.gz", "plain.nii.gz"}
    assert failed["b_0000.nii.gz"].startswith(f"{scans / 'b_0000.nii.gz'}: case b has channels")
    assert "b_0001 missing" in failed["b_0000.nii.gz"]
    assert "the model takes 2 channels, files b_0000 to b_0001" in failed["b_0000.nii.gz"]
    assert "c_0002.nii.gz too many" in failed["c_0002.nii.gz"]
    assert "no channel suffix" in failed["plain.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz"]

    # A single file looks at its own case only: b's missing channel is not its problem.
    single = predict(tmp_path / "run", scans / "a_0001.nii.gz", tmp_path / "single")
    assert single["failures"] == [] and [Path(p).name for p in single["written"]] == ["a.nii.gz"]
    label_folder, _ = imgx_data.read_image(tmp_path / "out" / "a.nii.gz")
    label_single, _ = imgx_data.read_image(tmp_path / "single" / "a.nii.gz")
    np.testing.assert_array_equal(label_folder, label_single)  # the case key is its name
    bad = predict(tmp_path / "run", scans / "b_0000.nii.gz", tmp_path / "bad")
    assert bad["written"] == [] and "b_0001 missing" in bad["failures"][0][1]
    assert not list((tmp_path / "bad").iterdir())


def test_2d_inputs_for_a_3d_model(use_stub, tmp_path):
    use_stub(stub_task(ndim=3))
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(0)
    _write(scans / "volume.nii.gz", rng.random((6, 5, 4)).astype(np.float32))
    _write(scans / "flat.nii.gz", rng.random((6, 5, 1)).astype(np.float32))
    _write(scans / "picture.png", (255 * rng.random((6, 5))).astype(np.uint8))
    result = predict(tmp_path / "run", scans, tmp_path / "out")
    assert [Path(p).name for p in result["written"]] == ["volume.nii.gz"]
    failed = dict(result["failures"])
    assert failed[str(scans / "flat.nii.gz")] == (
        f"{scans / 'flat.nii.gz'}: shape (6, 5, 1) is a 2D image stored as a 3D volume, but "
        "the model segments 3D volumes: give a volume of at least 2 voxels along each axis "
        "(or use a 2D model)."
    )
    assert failed[str(scans / "picture.png")] == (
        f"{scans / 'picture.png'}: a 2D image of shape (6, 5), but the model segments 3D "
        "images: give a 3D volume of at least 2 voxels along each axis."
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["volume.nii.gz"]


def test_a_failed_write_leaves_nothing_of_the_case(use_stub, tmp_path, monkeypatch):
    use_stub(stub_task())
    _write(tmp_path / "x.nii.gz", np.random.default_rng(0).random((9, 7)).astype(np.float32))
    real = imgx_data.write_image

    def full_disk(path, array, geometry):
        if "_variance" in Path(path).name:
            raise OSError(28, "No space left on device")
        real(path, array, geometry)

    monkeypatch.setattr(imgx_data, "write_image", full_disk)
    result = predict(tmp_path / "run", tmp_path / "x.nii.gz", tmp_path / "out", num_samples=2)
    assert result["written"] == []
    assert "No space left on device" in result["failures"][0][1]
    assert list((tmp_path / "out").iterdir()) == []  # label and entropy removed, no .partial


# ---------------------------------------------------------------------------------------
# Outputs never overwrite (or mix with) the inputs: refused before anything is loaded.


def _snapshot(folder):
    """Every path below `folder`: a file's bytes, a link's target, or a folder."""

    def content(path):
        if path.is_symlink():
            return ("link", os.readlink(path))
        return path.read_bytes() if path.is_file() else "folder"

    return {p.relative_to(folder): content(p) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(
    ("inputs", "output", "named"),
    [
        ("scans", "scans", "the folder of the inputs (scans): the predictions would overwrite"),
        ("scans", "scans/../scans/.", "would overwrite scans/a.nii.gz, scans/b.nii.gz and be"),
        ("scans", "linked", "linked is the folder of the inputs (scans)"),  # a symlink
        ("scans/a.nii.gz", "scans", "would overwrite scans/a.nii.gz and be read"),  # one file
        ("scans/m_0001.nii.gz", "scans", "predictions would be read as scans by"),  # no clash
        ("scans/a.nii.gz", "scans/a.nii.gz", "is an input scan, not a folder"),
        ("other/a.nii.gz", "scans", "would overwrite the input(s) other/a.nii.gz (a link"),
    ],
)
def test_outputs_never_overwrite_the_inputs(tmp_path, monkeypatch, inputs, output, named):
    def no_model(*args):
        raise AssertionError("the run must not be loaded")

    monkeypatch.setattr(evaluation, "restore_run", no_model)
    monkeypatch.chdir(tmp_path)
    scans = tmp_path / "scans"
    scans.mkdir()
    image = np.random.default_rng(0).random((9, 7)).astype(np.float32)
    for name in ("a", "b", "m_0000", "m_0001"):
        _write(scans / f"{name}.nii.gz", image)
    (tmp_path / "linked").symlink_to(scans)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.nii.gz").symlink_to(scans / "a.nii.gz")
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError) as error:
        predict(tmp_path / "run", inputs, output)
    message = str(error.value)
    assert "choose another output folder (-o)" in message
    assert named in message
    assert _snapshot(tmp_path) == before  # input bytes unchanged, nothing created


def test_outputs_elsewhere_or_below_the_inputs_are_fine(use_stub, tmp_path):
    use_stub(stub_task())
    scans = tmp_path / "scans"
    scans.mkdir()
    _write(scans / "a.nii.gz", np.random.default_rng(0).random((9, 7)).astype(np.float32))
    for output in (scans / "predictions", tmp_path / "out"):
        result = predict(tmp_path / "run", scans, output)
        assert result["failures"] == [] and [Path(p).name for p in result["written"]] == [
            "a.nii.gz"
        ]


# ---------------------------------------------------------------------------------------
# The ensemble: running sums on the host against the closed forms.


@pytest.mark.parametrize("overlapping", [False, True])
def test_running_ensemble_matches_the_closed_form(overlapping):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 4, 6, 3)) * 3
    if overlapping:
        samples = 1 / (1 + np.exp(-logits))
    else:
        samples = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    samples = samples.astype(np.float32)
    running = RunningEnsemble(overlapping=overlapping)
    for sample in samples:
        running.add(sample)
    result = running.result()
    s = samples.astype(np.float64)
    mean = s.mean(axis=0)
    np.testing.assert_allclose(result.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(
        result.variance, ((s - mean) ** 2).mean(axis=0).mean(axis=-1), rtol=1e-4, atol=1e-7
    )
    if overlapping:
        entropy = -(mean * np.log(mean) + (1 - mean) * np.log(1 - mean)).sum(axis=-1)
        label = (mean >= 0.5).sum(axis=-1)
    else:
        entropy = -(mean * np.log(mean)).sum(axis=-1)
        label = mean.argmax(axis=-1)
    np.testing.assert_allclose(result.entropy, entropy, rtol=1e-5)
    np.testing.assert_array_equal(result.label, label)
    # The same as the former all-samples-at-once summary of imgx_diffusion.
    stacked = idf.ensemble_from_probabilities(samples, overlapping=overlapping)
    np.testing.assert_array_equal(result.label, np.asarray(stacked.label))
    np.testing.assert_allclose(result.entropy, stacked.entropy, rtol=1e-5)
    np.testing.assert_allclose(result.variance, stacked.variance, rtol=1e-4, atol=1e-7)


def test_predict_ensemble_maps_are_the_closed_form_of_the_final_step(use_stub, tmp_path):
    recorded = []

    def recording_model(params, key, image):
        out = per_voxel_model(params, key, image)
        recorded.append(np.asarray(out))
        return out

    use_stub(stub_task(model=recording_model))
    image = np.random.default_rng(2).random((9, 7)).astype(np.float32)
    _write(tmp_path / "x.nii.gz", image)
    result = predict(
        tmp_path / "run",
        tmp_path / "x.nii.gz",
        tmp_path / "out",
        num_samples=3,
        save_probabilities=True,
    )
    assert result["failures"] == []
    assert len(recorded) == 3 and recorded[0].shape == (1, 9, 7, NUM_CLASSES, NUM_STEPS)
    final = np.stack(recorded)[:, 0, ..., -1].astype(np.float64)  # (S, x, y, C): last step
    mean = final.mean(axis=0)

    def read(name):
        return imgx_data.read_image(tmp_path / "out" / name)[0]

    np.testing.assert_array_equal(read("x.nii.gz"), mean.argmax(axis=-1))
    np.testing.assert_allclose(read("x_probabilities.nii.gz"), mean, rtol=1e-5, atol=1e-6)
    entropy = -(mean * np.log(mean)).sum(axis=-1)
    np.testing.assert_allclose(read("x_entropy.nii.gz"), entropy, rtol=1e-5, atol=1e-6)
    variance = ((final - mean) ** 2).mean(axis=0).mean(axis=-1)
    np.testing.assert_allclose(read("x_variance.nii.gz"), variance, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Sliding windows: stitched patches equal one whole-image call of a per-voxel model.


@pytest.mark.parametrize(("overlap", "num_windows"), [(None, 4 * 1), ((0, 0), 3 * 1)])
def test_windows_overlap_by_half_a_window_by_default(overlap, num_windows):
    """A whole (20, 8) case, windows (8, 8): half-window overlap (nnU-Net's step 0.5)
    starts at x = 0, 4, 8, 12 (4 windows); no overlap at 0, 8, 12 (3)."""
    seen = []

    def counting_model(params, key, image):
        seen.append(image.shape[0])
        return per_voxel_model(params, key, image)

    task = stub_task(patch_shape=(8, 8), overlap=overlap, model=counting_model)
    task.cfg.data.eval_batch_size = 2  # one window per call
    image = np.random.default_rng(0).normal(size=(20, 8, 1)).astype(np.float32)
    evaluation.case_probabilities(task, counting_model, PARAMS, jax.random.key(0), image)
    assert seen == [1] * num_windows


@pytest.mark.parametrize(
    ("shape", "patch_shape", "overlap"),
    [((20, 17), (8, 8), (3, 2)), ((10, 9, 7), (4, 5, 4), (1, 2, 0))],
)
def test_sliding_windows_equal_the_whole_image(shape, patch_shape, overlap):
    image = np.random.default_rng(3).normal(size=(*shape, 2)).astype(np.float32)
    key = jax.random.key(7)
    whole_task = stub_task(ndim=len(shape))
    patch_task = stub_task(ndim=len(shape), patch_shape=patch_shape, overlap=overlap)
    whole = evaluation.case_probabilities(whole_task, per_voxel_model, PARAMS, key, image)
    stitched = evaluation.case_probabilities(patch_task, per_voxel_model, PARAMS, key, image)
    assert whole.shape == stitched.shape == (*shape, NUM_CLASSES, NUM_STEPS)
    np.testing.assert_allclose(stitched, whole, rtol=1e-5, atol=1e-6)
    last = evaluation.case_probabilities(
        patch_task, per_voxel_model, PARAMS, key, image, last_step_only=True
    )
    assert last.shape == (*shape, NUM_CLASSES, 1)
    np.testing.assert_allclose(last, whole[..., -1:], rtol=1e-5, atol=1e-6)
    # Evaluation over a split goes the same way, one case at a time.
    source = [{"image": image}, {"image": image[::-1].copy()}]
    for i, (_, probs) in enumerate(
        evaluation.iterate_cases(patch_task, per_voxel_model, PARAMS, source, seed=5)
    ):
        expected = evaluation.case_probabilities(
            whole_task,
            per_voxel_model,
            PARAMS,
            jax.random.fold_in(jax.random.key(5), i),
            source[i]["image"],
        )
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Seeds: case i has its own key, whatever the batch size.


def test_iterate_cases_does_not_depend_on_the_batch_size():
    task = stub_task(image_shape=(6, 5))
    rng = np.random.default_rng(4)
    source = [{"image": rng.random((6, 5, 1)).astype(np.float32)} for _ in range(5)]
    model = jax.jit(per_voxel_model)

    def run(batch_size, seed=11):
        return [
            p
            for _, p in evaluation.iterate_cases(
                task, model, PARAMS, source, seed=seed, batch_size=batch_size
            )
        ]

    one, three = run(1), run(3)
    for i in range(5):
        single = evaluation.case_probabilities(
            task, model, PARAMS, jax.random.fold_in(jax.random.key(11), i), source[i]["image"]
        )
        np.testing.assert_allclose(one[i], single, rtol=1e-6)
        np.testing.assert_allclose(three[i], single, rtol=1e-6)
    assert not np.allclose(run(3, seed=12)[0], three[0])


# ---------------------------------------------------------------------------------------
# "best": the checkpoint the retention policy keeps, never a deleted one.


def test_best_step_is_the_checkpoint_orbax_keeps(tmp_path):
    mngr = ckpt_lib.manager(tmp_path, keep=1)
    state = {"w": jnp.zeros(2)}
    for step, dice in ((1, 0.7), (2, 0.7), (3, 0.5)):
        ckpt_lib.save(mngr, step, state, {}, valid_dice=dice)
        mngr.wait_until_finished()
    mngr.close()
    records = [{"step": 1, "dice": 0.7}, {"step": 2, "dice": 0.7}, {"step": 3, "dice": 0.5}]
    mngr = ckpt_lib.manager(tmp_path, read_only=True)
    # orbax kept the latest (3) and one of the tied best (1 or 2): the other is deleted.
    kept = sorted(mngr.all_steps())
    assert len(kept) == 2 and kept[-1] == 3 and kept[0] in (1, 2)
    assert ckpt_lib.best_step(mngr, records) == kept[0]
    assert ckpt_lib.select_step(mngr, "best", ckpt_lib.best_step(mngr, records)) == kept[0]
    mngr.close()


def test_best_step_from_the_validation_log_when_checkpoints_carry_no_metric(tmp_path):
    mngr = ckpt_lib.manager(tmp_path, keep=4)
    for step in (1, 2, 3, 4):
        ckpt_lib.save(mngr, step, {"w": jnp.zeros(2)}, {})
        mngr.wait_until_finished()
    records = [
        {"step": 1, "dice": 0.5},
        {"step": 2, "dice": 0.6},
        {"step": 3, "dice": 0.6},  # equal: the earliest, as the retention policy keeps it
        {"step": 4, "dice": None},
        {"step": 9, "dice": 0.9},  # no checkpoint kept for it
    ]
    assert ckpt_lib.best_step(mngr, records) == 2
    assert ckpt_lib.best_step(mngr, []) is None
    mngr.close()


def test_info_reports_the_best_checkpoint_that_test_restores(tmp_path):
    """One record of the best checkpoint: `imgx info` names the one `--checkpoint best`
    restores, also when the best logged validation has no checkpoint any more (here step
    4, e.g. set aside as corrupt)."""
    config_lib.save(config_lib.Config(), tmp_path / "config.json")
    mngr = ckpt_lib.manager(tmp_path, keep=4)
    for step, dice in ((1, 0.5), (2, 0.8), (3, 0.6)):
        ckpt_lib.save(mngr, step, {"w": jnp.zeros(2)}, {}, valid_dice=dice)
        mngr.wait_until_finished()
    mngr.close()
    (tmp_path / "metrics").mkdir()
    records = [{"step": s, "dice": d} for s, d in ((1, 0.5), (2, 0.8), (3, 0.6), (4, 0.9))]
    (tmp_path / "metrics" / "valid.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records)
    )
    described = evaluation.describe_run(tmp_path)
    assert described["checkpoints"] == [1, 2, 3]
    assert described["best"] == {"step": 2, "dice": 0.8}
    mngr = ckpt_lib.manager(tmp_path, read_only=True)
    assert ckpt_lib.select_step(mngr, "best", ckpt_lib.best_step(mngr, records)) == 2
    mngr.close()


def test_iterate_cases_predicts_a_whole_test_case_with_windows_of_the_stored_shape():
    """A (13, 7) case (stored whole) of a (6, 5) whole-image dataset goes through (6, 5)
    sliding windows; the per-voxel model makes them equal one whole-image call."""
    task = stub_task(image_shape=(6, 5))
    rng = np.random.default_rng(8)
    shapes = [(6, 5), (13, 7), (6, 5)]
    source = [{"image": rng.random((*s, 1)).astype(np.float32)} for s in shapes]
    calls = []

    def model(params, key, image):
        calls.append(image.shape[1:-1])
        return per_voxel_model(params, key, image)

    got = [
        p for _, p in evaluation.iterate_cases(task, model, PARAMS, source, seed=2, batch_size=3)
    ]
    assert (13, 7) not in calls and set(calls) == {(6, 5)}
    for i, example in enumerate(source):
        key = jax.random.fold_in(jax.random.key(2), i)
        expected = evaluation.case_probabilities(
            task, per_voxel_model, PARAMS, key, example["image"]
        )
        assert got[i].shape == (*shapes[i], NUM_CLASSES, NUM_STEPS)
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6)
