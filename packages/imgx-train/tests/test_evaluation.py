"""Test-split evaluation and prediction on new files, from a tiny diffusion run."""

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import imgx_data
from imgx_train import evaluation, presets, trainer
from imgx_train.predict import predict

FAST = (
    "logging.wandb=disabled,logging.progress=false,model.num_channels=[4,8],"
    "train.max_valid_cases=2,data.eval_batch_size=2,train.steps=2"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    imgx_data.build("phantom", data_dir=data_dir, split_sizes=(4, 2, 3))
    cfg = presets.make_config(
        "phantom", task="diffusion", preset="debug", overrides=f"{FAST},data.data_dir={data_dir}"
    )
    return trainer.train(cfg, run_dir=tmp_path_factory.mktemp("runs") / "diffusion")


@pytest.fixture(scope="module")
def summary(run):
    return evaluation.evaluate(run, split="test", sampler="ddim", num_steps=3, seed=3)


def test_evaluate_writes_what_a_user_opens(run, summary):
    out = run / "test" / f"step_{summary['checkpoint']}-ddim_3steps-1sample-seed3"
    assert summary["output_dir"] == str(out)
    assert summary["num_cases"] == 3
    assert set(summary["foreground_mean"]) >= {"dice", "iou", "hd95", "assd", "nsd"}
    assert 0.0 <= summary["foreground_mean"]["dice"] <= 1.0
    assert set(summary["per_step"]) == {"step_0", "step_1", "step_2"}
    written = json.loads((out / "summary.json").read_text())
    assert written["num_cases"] == 3 and written["sampler"] == "ddim"
    with (out / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and "dice_muscle" in rows[0]
    source = imgx_data.data_source("phantom", "test", data_dir=written_data_dir(run))
    for i in range(3):
        example = source[i]
        label, geometry = imgx_data.read_image(out / "predictions" / f"{example['uid']}.nii.gz")
        assert label.shape == tuple(example["original_shape"])
        np.testing.assert_allclose(geometry.spacing, example["original_spacing"], rtol=1e-5)
        assert set(np.unique(label)) <= {0, 1, 2}
        assert (out / "predictions" / f"{example['uid']}.png").exists()
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert not list(run.glob("test/*.partial"))


def written_data_dir(run):
    return json.loads((run / "config.json").read_text())["data"]["data_dir"]


def test_same_seed_same_result(run, summary):
    again = evaluation.evaluate(
        run, split="test", sampler="ddim", num_steps=3, seed=3, overwrite=True
    )
    assert again["per_class"] == summary["per_class"]
    assert again["output_dir"] == summary["output_dir"]


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_other_settings_never_replace_earlier_results(run, summary, monkeypatch):
    first = Path(summary["output_dir"])
    before = _snapshot(first)
    other_seed = evaluation.evaluate(run, split="test", sampler="ddim", num_steps=3, seed=4)
    # The tiny run keeps one checkpoint: another step stands in for another checkpoint.
    other = summary["checkpoint"] + 7
    restore = evaluation.restore_run
    with monkeypatch.context() as patch:
        patch.setattr(
            evaluation,
            "restore_run",
            lambda run_dir, checkpoint: dataclasses.replace(
                restore(run_dir, summary["checkpoint"]), step=checkpoint
            ),
        )
        other_step = evaluation.evaluate(
            run, split="test", sampler="ddim", num_steps=3, seed=3, checkpoint=other
        )
    assert Path(other_seed["output_dir"]).name == (
        f"step_{summary['checkpoint']}-ddim_3steps-1sample-seed4"
    )
    assert Path(other_step["output_dir"]).name == f"step_{other}-ddim_3steps-1sample-seed3"
    assert len({summary["output_dir"], other_seed["output_dir"], other_step["output_dir"]}) == 3
    assert _snapshot(first) == before
    # The same settings again: refused before any case is predicted, nothing touched.
    with pytest.raises(evaluation.ResultsExist, match=r"already holds .* --overwrite"):
        evaluation.evaluate(run, split="test", sampler="ddim", num_steps=3, seed=3)
    assert _snapshot(first) == before
    assert sorted(p.name for p in (run / "test").iterdir()) == sorted(
        Path(s["output_dir"]).name for s in (summary, other_seed, other_step)
    )


def test_results_name_holds_every_setting():
    def name(**changes):
        settings = dict(
            step=100, is_diffusion=True, sampler="ddim", num_steps=10, num_samples=5, seed=0
        )
        return evaluation.results_name(**(settings | changes))

    assert name() == "step_100-ddim_10steps-5samples-seed0"
    assert name(num_samples=1, sampler="ddpm", eta=0.5) == "step_100-ddpm_10steps-1sample-seed0"
    assert name(eta=0.5) == "step_100-ddim_10steps_eta0.5-5samples-seed0"
    assert name(is_diffusion=False, seed=3) == "step_100"  # seg: the checkpoint decides
    changes = [{}, dict(step=200), dict(sampler="ddpm"), dict(num_steps=5), dict(eta=1.0),
               dict(num_samples=1), dict(seed=1)]  # fmt: skip
    assert len({name(**c) for c in changes}) == len(changes)


def test_number_of_sampling_steps_is_checked(run):
    with pytest.raises(ValueError, match=r"\[2, 3, 5\]"):
        evaluation.evaluate(run, split="test", num_steps=4)


def test_missing_checkpoint_is_a_clear_error(tmp_path, run):
    import shutil

    copy = tmp_path / "no_ckpt"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluation.evaluate(copy)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluation.evaluate(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def scans(run, tmp_path_factory):
    """A folder of new 2D scans: a NIfTI with its own geometry, a PNG and bad files."""
    folder = tmp_path_factory.mktemp("scans")
    source = imgx_data.data_source("phantom", "test", data_dir=written_data_dir(run))
    image = source[0]["image"][..., 0]
    geometry = imgx_data.Geometry(
        shape=(80, 70), spacing=(1.2, 1.1), origin=(5.0, -3.0), direction=(1.0, 0.0, 0.0, 1.0)
    )
    imgx_data.write_image(folder / "case_a.nii.gz", image[:80, :70], geometry)
    png = (255 * (image - image.min()) / np.ptp(image)).astype(np.uint8)
    imgx_data.write_image(
        folder / "case_b.png", png, imgx_data.Geometry.identity(png.shape, (1, 1))
    )
    volume = imgx_data.Geometry.identity((8, 8, 4), (1.0, 1.0, 1.0))
    imgx_data.write_image(folder / "case_c.nii.gz", np.zeros((8, 8, 4), np.float32), volume)
    (folder / "case_d.nii.gz").write_bytes(b"not a nifti file")
    # Two channels for a one-channel model: listed, the other cases still predicted.
    for channel in ("0000", "0001"):
        imgx_data.write_image(folder / f"case_e_{channel}.nii.gz", image[:80, :70], geometry)
    return folder


def test_predict_writes_each_scan_on_its_own_grid_and_lists_failures(run, scans, tmp_path):
    out = tmp_path / "preds"
    result = predict(run, scans, out, num_samples=2, save_probabilities=True, seed=1)
    failed = {path.split("/")[-1]: message for path, message in result["failures"]}
    assert set(failed) == {"case_c.nii.gz", "case_d.nii.gz", "case_e_0001.nii.gz"}
    assert "3D" in failed["case_c.nii.gz"] and "2D" in failed["case_c.nii.gz"]
    assert failed["case_e_0001.nii.gz"].startswith(f"{scans / 'case_e_0001.nii.gz'}: case case_e")
    assert "the model takes 1 channel, files case_e_0000" in failed["case_e_0001.nii.gz"]
    assert not list(out.glob("case_e*")) and not list(out.glob("case_c*"))
    label, geometry = imgx_data.read_image(out / "case_a.nii.gz")
    assert label.shape == (80, 70)
    np.testing.assert_allclose(geometry.spacing, (1.2, 1.1), rtol=1e-6)
    np.testing.assert_allclose(geometry.origin, (5.0, -3.0), rtol=1e-6)
    entropy, _ = imgx_data.read_image(out / "case_a_entropy.nii.gz")
    assert (
        entropy.shape == (80, 70) and np.all(entropy >= 0) and np.all(entropy <= np.log(3) + 1e-5)
    )
    probabilities, _ = imgx_data.read_image(out / "case_a_probabilities.nii.gz")
    assert probabilities.shape[-1] == 3
    assert (out / "case_b.nii.gz").exists() and (out / "case_b_variance.nii.gz").exists()
    assert not list(out.glob(".*partial*"))
    again = predict(run, scans / "case_a.nii.gz", tmp_path / "again", num_samples=2, seed=1)
    label_again, _ = imgx_data.read_image(tmp_path / "again" / "case_a.nii.gz")
    np.testing.assert_array_equal(label, label_again)
    assert again["failures"] == []
    # Same seed: the same ensemble, alone or in a folder; another seed: other samples.
    entropy_again, _ = imgx_data.read_image(tmp_path / "again" / "case_a_entropy.nii.gz")
    np.testing.assert_array_equal(entropy, entropy_again)
    predict(run, scans / "case_a.nii.gz", tmp_path / "other", num_samples=2, seed=2)
    entropy_other, _ = imgx_data.read_image(tmp_path / "other" / "case_a_entropy.nii.gz")
    assert np.max(np.abs(entropy_other - entropy)) > 1e-3


def test_predict_empty_folder_is_a_clear_error(run, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no image files \(\.nii\.gz, \.nii, \.png"):
        predict(run, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        predict(run, tmp_path / "nowhere", tmp_path / "out")


def test_batch_size_does_not_change_the_predictions(run):
    restored = evaluation.restore_run(run)
    predict_fn = restored.task.predict_fn("ddim", 3)
    source = imgx_data.data_source("phantom", "test", data_dir=written_data_dir(run))

    def probabilities(batch_size):
        cases = evaluation.iterate_cases(
            restored.task, predict_fn, restored.params, source, seed=3, batch_size=batch_size
        )
        return np.stack([p for _, p in cases])

    one, two = probabilities(1), probabilities(2)  # 3 cases: [0], [1], [2] vs [0, 1], [2]
    assert one.shape[-1] == 3  # every sampling step
    np.testing.assert_allclose(one, two, atol=1e-5)


def test_ensemble_of_a_run_with_its_copy_equals_the_run_alone(run, summary, tmp_path):
    # Same model, same seed: the mean of two equal probability maps is that map.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("test", "valid"))
    ensemble = evaluation.evaluate(
        run, ensemble_with=[copy], sampler="ddim", num_steps=3, seed=3, save_predictions=False
    )
    assert Path(ensemble["output_dir"]).name.startswith(
        f"step_{summary['checkpoint']}-ddim_3steps-1sample-seed3-ensemble_2runs_"
    )
    assert [r["run_dir"] for r in ensemble["runs"]] == [str(run), str(copy)]
    for alone in (ensemble, *ensemble["runs"]):
        assert alone["foreground_mean"] == pytest.approx(summary["foreground_mean"], nan_ok=True)


def test_test_metrics_are_on_the_original_grid_with_resampled_columns(run, summary):
    assert summary["metrics_grid"] == "original"
    assert summary["cropped_foreground"] == {"num_cases": 0, "voxels": 0}
    # Phantoms are generated on the stored grid (no resampling, no crop): both agree.
    for metric in ("dice", "hd95"):
        assert summary["foreground_mean_resampled"][metric] == pytest.approx(
            summary["foreground_mean"][metric], nan_ok=True
        )
    with (Path(summary["output_dir"]) / "per_case.csv").open() as f:
        row = next(csv.DictReader(f))
    assert float(row["dice_resampled_muscle"]) == pytest.approx(float(row["dice_muscle"]))


def test_structure_outside_the_crop_counts_as_missed_on_the_original_grid(run):
    """A perfect prediction of the stored (16, 8) crop of a (32, 8) label whose second
    structure lies outside the crop (test_preprocess.outside_crop_case): 8 of the 44
    foreground voxels are stored. The crop's Dice is 1 (the old metric never sees the rest);
    on the label file it is 2 * 8 / (8 + 44)."""
    task = evaluation.restore_run(run).task
    label, example, whole = outside_crop_example()
    probs = np.eye(task.num_channels, dtype=np.float32)[example["label"]][..., None]
    stored_label, restored, scores, _ = evaluation.scored_case(task, example, probs, 1.0)
    np.testing.assert_array_equal(stored_label, example["label"])
    assert scores["dice_resampled"][1] == pytest.approx(1.0)
    assert scores["dice"][1] == pytest.approx(2 * 8 / (8 + 44))
    volumes = scores["volume_reference"][1] / scores["volume_reference_resampled"][1]
    assert volumes == pytest.approx(44 / 8)
    assert int(restored.sum()) == 8 and restored.shape == label.shape
    # Stored whole (test cases), a perfect prediction finds all 44 voxels: Dice 1.
    whole_probs = np.eye(task.num_channels, dtype=np.float32)[whole["label"]][..., None]
    _, restored, scores, _ = evaluation.scored_case(task, whole, whole_probs, 1.0)
    np.testing.assert_array_equal(restored, label)
    assert scores["dice"][1] == pytest.approx(1.0)


def test_per_step_metrics_are_on_the_original_grid_too(run):
    """Two sampling steps on the (16, 8) crop: step 0 all background, step 1 the stored
    label. On the label file step 1 scores 2 * 8 / 52 (the case's Dice), not the crop's 1."""
    task = evaluation.restore_run(run).task
    _, example, _ = outside_crop_example()
    eye = np.eye(task.num_channels, dtype=np.float32)
    probs = np.stack([eye[np.zeros_like(example["label"])], eye[example["label"]]], axis=-1)
    _, _, scores, per_step = evaluation.scored_case(task, example, probs, 1.0)
    assert len(per_step) == 2
    assert per_step[0]["dice"][1] == pytest.approx(0.0)
    assert per_step[1]["dice"][1] == pytest.approx(2 * 8 / (8 + 44)) == scores["dice"][1]
    assert scores["dice_resampled"][1] == pytest.approx(1.0)


def test_whole_test_case_of_another_shape_goes_through_sliding_windows(run, monkeypatch):
    """A (32, 8) whole case with a (96, 96) network: padded into one window, scored on
    the label file (no foreground cropped)."""
    _, _, whole = outside_crop_example()
    monkeypatch.setattr(evaluation, "split_source", lambda cfg, split: [whole, whole])
    summary = evaluation.evaluate(run, split="test", sampler="ddim", num_steps=2, seed=6)
    assert summary["num_cases"] == 2 and summary["cropped_foreground"]["voxels"] == 0
    label, _ = imgx_data.read_image(Path(summary["output_dir"]) / "predictions" / "outside.nii.gz")
    assert label.shape == (32, 8)


def outside_crop_example():
    """The label file (32, 8), the example of its (16, 8) crop as builds before whole cases
    stored it (8 of 44 foreground voxels kept, no window_start;
    test_preprocess.outside_crop_case) and the example stored whole."""
    label = np.zeros((32, 8), np.uint8)
    label[4:12, 2:6] = 1
    label[28:31, 2:6] = 1
    grid = imgx_data.Geometry.identity(label.shape, (1.0, 1.0))
    case = imgx_data.preprocess.preprocess_volume(
        imgx_data.io.array_to_sitk(label.astype(np.float32), grid),
        imgx_data.io.array_to_sitk(label, grid),
        target_spacing=None,
        target_shape=(16, 8),
        intensity="identity",
    )
    crop = {k: v for k, v in case.to_example("outside").items() if k != "window_start"}
    return label, crop, case.whole().to_example("outside")


def test_summary_counts_the_foreground_the_crops_drop(run, monkeypatch, caplog):
    """`imgx test` on a split of one case whose crop drops 36 foreground voxels."""
    _, example, _ = outside_crop_example()
    monkeypatch.setattr(evaluation, "split_source", lambda cfg, split: [example])
    with caplog.at_level("WARNING"):
        summary = evaluation.evaluate(
            run, split="test", sampler="ddim", num_steps=2, seed=5, save_predictions=False
        )
    assert summary["cropped_foreground"] == {"num_cases": 1, "voxels": 36}
    assert "drop 36 foreground voxels" in caplog.text
    written = json.loads((Path(summary["output_dir"]) / "summary.json").read_text())
    assert written["cropped_foreground"] == {"num_cases": 1, "voxels": 36}
    assert written["metrics_grid"] == "original"
    # At most the 8 stored voxels can be found of the 44: Dice <= 2 * 8 / (8 + 44).
    assert written["per_class"]["muscle"]["dice"]["mean"] <= 16 / 52 + 1e-6


def test_summary_counts_what_the_training_windows_drop(run, summary, tmp_path, caplog):
    """The phantom's windows are its whole images (nothing dropped); a build whose (32, 8)
    cases hold two structures too far apart for the (16, 8) window drops 36 voxels of each
    of its 3 train cases, which training warns about (and the summary counts)."""
    assert summary["training_windows"] == {
        "num_cases": 4, "cases_dropping_foreground": 0, "voxels": 0, "by_case": {}
    }  # fmt: skip
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    label, _, _ = outside_crop_example()
    grid = imgx_data.Geometry.identity(label.shape, (1.0, 1.0))
    for i in range(5):
        image = 50.0 * label + np.random.default_rng(i).normal(0, 5, label.shape)
        imgx_data.write_image(raw / "imagesTr" / f"c{i}_0000.nii.gz", image, grid)
        imgx_data.write_image(raw / "labelsTr" / f"c{i}.nii.gz", label, grid)
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "US"}, "labels": {"background": 0, "muscle": 1},
        "numTraining": 5, "file_ending": ".nii.gz"}))  # fmt: skip
    splits = {"train": ["c0", "c1", "c2"], "valid": ["c3"], "test": ["c4"]}
    (raw / "splits.json").write_text(json.dumps(splits))
    imgx_data.build("nifti_folder", manual_dir=raw, data_dir=tmp_path / "data", name="wide",
                    spacing=(1.0, 1.0), shape=(16, 8))  # fmt: skip
    cfg = evaluation.restore_run(run).cfg
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, name="wide", data_dir=str(tmp_path / "data"))
    )
    with caplog.at_level("WARNING"):
        drops = evaluation.warn_about_training_windows(cfg, (16, 8))
    assert drops == {
        "num_cases": 3, "cases_dropping_foreground": 3, "voxels": 108,
        "by_case": {"c0": 36, "c1": 36, "c2": 36},
    }  # fmt: skip
    assert "16x8 training windows of 3 of 3 train cases drop 108 foreground voxels" in caplog.text
