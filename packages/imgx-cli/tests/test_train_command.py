"""`imgx train`: flags -> config, resume, test after training, interruption."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import imgx_data
import imgx_train
from imgx_cli import printing
from imgx_train import config as config_lib
from imgx_train import tasks


def test_flags_reach_the_config(api, imgx):
    code, out, _ = imgx(
        "train", "--data", "phantom", "--task", "seg", "--steps", "7",
        "--set", "optimizer.peak_lr=1e-4,model.num_channels=[16,32,64]",
    )  # fmt: skip
    assert code == 0
    (cfg,), kwargs = api.call("train")
    assert cfg.data.name == "phantom"
    assert cfg.train.task == "seg"
    assert cfg.train.steps == 7
    assert cfg.optimizer.peak_lr == 1e-4
    assert cfg.model.num_channels == (16, 32, 64)
    assert kwargs == {"run_dir": None}
    assert "train.steps" in out and "optimizer.peak_lr" in out  # the printed changes


def test_the_whole_resolved_config_is_printed_at_the_start(api, imgx):
    code, out, _ = imgx("train", "--preset", "debug", "--set", "optimizer.peak_lr=1e-4")
    assert code == 0
    (cfg,), _ = api.call("train")
    head, rest = out.split("config (resolved; saved as <run>/config.json):\n", 1)
    assert head.startswith("imgx train: data=phantom task=diffusion strategy=recycle_last")
    block, changes = rest.split("changes from the defaults:\n", 1)
    assert block.splitlines() == printing.config_sections(cfg)
    printed = " ".join(block.split())
    for key in config_lib.flatten(cfg):
        field = key.split(".")[1]
        assert f" {field}=" in f" {printed}", key
    assert "peak_lr=0.0001" in printed and "num_channels=[4,8,16]" in printed
    assert "  optimizer.peak_lr" in changes


def test_named_flags_and_dashed_or_underscored_spellings(api, imgx, tmp_path):
    code, _, _ = imgx(
        "train", "--strategy", "self_cond_next", "--batch-size", "4", "--seed=3",
        "--wandb", "disabled", "--preset", "debug", "--run_dir", "runs/mine",
    )  # fmt: skip
    assert code == 0
    (cfg,), kwargs = api.call("train")
    assert cfg.train.task == "diffusion"
    assert cfg.diffusion.strategy == "self_cond_next"
    assert cfg.data.global_batch_size == 4
    assert cfg.train.seed == 3
    assert cfg.logging.wandb == "disabled"
    assert cfg.model.num_channels == (4, 8, 16)  # from the debug preset
    assert kwargs == {"run_dir": Path("runs/mine")}


def test_default_run_tests_best_checkpoint_and_prints_where_things_are(api, imgx):
    code, out, _ = imgx("train")
    assert code == 0
    assert api.names() == ["train", "evaluate"]
    (run,), kwargs = api.call("evaluate")
    assert kwargs == {"split": "test", "checkpoint": "best"}
    assert "muscle" in out and "0.900 ± 0.010" in out and "2.00 ± 0.20" in out
    assert "background" not in out
    assert f"run:       {run}" in out
    assert str(run / "plots" / "curves.png") in out
    assert str(run / "test" / api.results) in out


def test_resume_with_the_best_checkpoint_tested_before_does_not_fail(api, imgx, run_dir):
    message = f"{run_dir}/test/{api.results} already holds the results of these settings"
    api.evaluate_error = FileExistsError(message)
    code, out, _ = imgx("train", "--resume", str(run_dir))
    assert code == 0 and api.names() == ["resume", "evaluate"]
    assert f"not tested again: {message}" in out
    assert f"run:       {run_dir}" in out


def test_no_test_skips_evaluation(api, imgx):
    assert imgx("train", "--no-test")[0] == 0
    assert api.names() == ["train"]


def test_resume_continues_to_a_total_number_of_steps(api, imgx, run_dir):
    code, out, _ = imgx("train", "--resume", str(run_dir), "--steps", "20", "--no-test")
    assert code == 0
    assert api.calls == [("resume", (run_dir,), {"steps": 20})]
    assert "resuming" in out and "up to step 20" in out


def test_resume_refuses_options_that_would_change_the_run(api, imgx, run_dir, one_line_error):
    code, _, err = imgx("train", "--resume", str(run_dir), "--data", "amos_ct", "--set", "a=1")
    one_line_error(code, err, "--data", "--set")
    assert api.calls == []


def test_interrupted_training_says_how_to_resume(api, imgx):
    api.train_error = imgx_train.TrainingInterrupted(Path("runs/r1"), 12)
    code, _, err = imgx("train")
    assert code == 130
    assert err.strip() == "imgx: interrupted at step 12; resume with: imgx train --resume runs/r1"


def test_ctrl_c_outside_training_exits_130(api, imgx):
    api.train_error = KeyboardInterrupt()
    code, _, err = imgx("train")
    assert (code, err.strip()) == (130, "imgx: interrupted")


def test_ctrl_c_while_testing_says_training_is_done(api, imgx, monkeypatch):
    def interrupted(run_dir, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(imgx_train, "evaluate", interrupted)
    code, _, err = imgx("train", "--run-dir", "runs/r2")
    assert code == 130
    assert err.strip() == (
        "imgx: interrupted while testing; training is done: imgx test --run runs/r2"
    )


def test_device_cpu_runs_on_the_cpu(api, imgx):
    assert imgx("train", "--device", "cpu", "--no-test")[0] == 0
    assert api.names() == ["train"]


# Each switch of a library feature, from `--set` to the call into imgx-diffusion that uses
# it: the command's config builds a Task whose loss (or prediction) is traced
# (jax.eval_shape: nothing compiles) with the real library function wrapped by a recorder.
SWITCHES = [
    ("diffusion.strategy=recycle_next,diffusion.recycle_posterior_mean=true",
     "apply_strategy", {"recycle_with_posterior_mean": True}),
    ("diffusion.strategy=recycle_next,diffusion.recycle_next_clipped=true",
     "apply_strategy", {"recycle_next_clipped": True}),
    ("diffusion.strategy=self_cond_same,diffusion.self_cond_probability=0.25",
     "apply_strategy", {"self_conditioning_probability": 0.25}),
    ("eval.sampler=dpm_solver_2m", "sample", {"sampler": "dpm_solver_2m"}),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "function", "expected"), SWITCHES)
def test_diffusion_switches_reach_the_library_call(
    api, imgx, monkeypatch, tmp_path, overrides, function, expected
):
    tiny = "model.num_channels=[4],model.num_res_blocks=1,model.num_transformer_layers=0"
    code, _, err = imgx("train", "--preset", "debug", "--set", f"{tiny},{overrides}")
    assert code == 0, err
    (cfg,), _ = api.call("train")
    info = dataclasses.replace(
        imgx_data.dataset_info("phantom", data_dir=tmp_path), image_shape=(8, 8)
    )
    task = tasks.Task(cfg, info)
    seen = {}
    real = getattr(tasks.idf, function)

    def recorder(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.idf, function, recorder)
    params = task.init_params(jax.random.key(0))
    image, label = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 8, 8), jnp.int32)
    if function == "sample":
        predict = task.predict_fn(cfg.eval.sampler, cfg.eval.num_steps)
        jax.eval_shape(predict, params, jax.random.key(1), image)
    else:
        jax.eval_shape(task.loss, params, jax.random.key(1), image, label, task.init_aux())
    assert {k: seen[k] for k in expected} == expected


def test_fold_reaches_the_config(api, imgx, one_line_error, run_dir):
    code, out, _ = imgx("train", "--task", "seg", "--fold", "3")
    assert code == 0
    (cfg,), _ = api.call("train")
    assert cfg.data.fold == 3 and cfg.data.num_folds == 5
    assert "data.fold" in out  # printed among the changes, saved in config.json
    one_line_error(*imgx("train", "--fold", "1", "--set", "data.fold=2")[::2], "given twice")
    one_line_error(*imgx("train", "--fold", "5")[::2], "data.fold=5 is not valid")
    one_line_error(*imgx("train", "--resume", str(run_dir), "--fold", "1")[::2], "drop --fold")
