"""Training: run layout, exact resume, 1 vs 2 devices, accumulation, non-finite skipping,
determinism, wandb offline, Ctrl-C, a full disk, a corrupted checkpoint, early stopping.

Tiny seg runs are shared by the module (one reference run, a second fresh one for
determinism and wandb, one with a NaN batch that stops early); the phantom data is built
once into a temporary data dir.
"""

import errno
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import imgx_data
from imgx_train import checkpoint as ckpt_lib
from imgx_train import config as config_lib
from imgx_train import evaluation, optim, presets, runs, tasks, trainer

FAST = (
    "logging.wandb=disabled,logging.progress=false,model.num_channels=[4,8],"
    "train.max_valid_cases=2,data.eval_batch_size=2"
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    imgx_data.build("phantom", data_dir=path, split_sizes=(8, 2, 2))
    return str(path)


def _config(data_dir, task, extra=""):
    overrides = f"{FAST},data.data_dir={data_dir}" + (f",{extra}" if extra else "")
    return presets.make_config("phantom", task=task, preset="debug", overrides=overrides)


@pytest.fixture(scope="module")
def seg_run(data_dir, tmp_path_factory):
    cfg = _config(data_dir, "seg")
    return trainer.train(cfg, run_dir=tmp_path_factory.mktemp("runs") / "seg")


def _params(run_dir, step="last"):
    return evaluation.restore_run(run_dir, step).params


def _assert_same_params(run_a, run_b):
    for a, b in zip(jax.tree.leaves(_params(run_a)), jax.tree.leaves(_params(run_b)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def seg_run_offline(data_dir, tmp_path_factory):
    """seg_run's config again, fresh, with wandb `offline` (the default) and stdin closed."""
    cfg = config_lib.replace(_config(data_dir, "seg"), {"logging.wandb": "offline"})
    assert config_lib.Config().logging.wandb == "offline"
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdin", None)  # as `imgx train <&-`: any prompt would fail
        for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL"):
            mp.delenv(name, raising=False)
        mp.setenv("NETRC", str(home / "netrc"))  # no key anywhere
        mp.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
        return trainer.train(cfg, run_dir=tmp_path_factory.mktemp("runs") / "seg-offline")


def _poisoned_next(original):
    """`TrainIterator.__next__` with NaN in half the rows of the first batch's first image."""

    def next_batch(self):
        first = self.step == 0
        batch = original(self)
        if first:
            image = np.array(batch["image"])
            rows = image.shape[1]
            image[0, rows // 4 : 3 * rows // 4] = np.nan
            batch = dict(batch, image=jax.device_put(image, batch["image"].sharding))
        return batch

    return next_batch


@pytest.fixture(scope="module")
def nan_run(data_dir, tmp_path_factory):
    """A NaN batch at step 1; validation every step with patience 1 and an unreachable
    min_delta, so early stopping ends the run at step 2 of 4."""
    cfg = _config(
        data_dir,
        "seg",
        "train.eval_every=1,train.early_stopping_patience=1,train.early_stopping_min_delta=1.0",
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            imgx_data.TrainIterator,
            "__next__",
            _poisoned_next(imgx_data.TrainIterator.__next__),
        )
        return trainer.train(cfg, run_dir=tmp_path_factory.mktemp("runs") / "nan")


def test_run_layout(seg_run):
    assert (seg_run / "config.json").exists()
    cfg = config_lib.load(seg_run / "config.json")
    records = [
        json.loads(line) for line in (seg_run / "metrics/train.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == list(range(1, cfg.train.steps + 1))
    assert all(np.isfinite(r["loss"]) for r in records)
    valid = [
        json.loads(line) for line in (seg_run / "metrics/valid.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in valid] == [2, 4]
    assert all(0.0 <= r["dice"] <= 1.0 for r in valid)
    assert (seg_run / "plots/curves.png").stat().st_size > 0
    steps = sorted(int(p.name) for p in (seg_run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == cfg.train.steps
    assert (seg_run.parent / "latest").resolve() == seg_run.resolve()


def test_resume_continues_exactly_and_past_the_budget(data_dir, seg_run, tmp_path):
    """2 steps + resume to 4 equals 4 straight; resume to 6 goes past the first budget."""
    half = trainer.train(
        config_lib.replace(config_lib.load(seg_run / "config.json"), {"train.steps": 2}),
        run_dir=tmp_path / "half",
    )
    trainer.resume(half, steps=4)
    straight, resumed = _params(seg_run), _params(half)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    trainer.resume(half, steps=6)
    assert evaluation.restore_run(half, "last").step == 6


def test_existing_run_dir_is_not_overwritten(seg_run):
    cfg = config_lib.load(seg_run / "config.json")
    with pytest.raises(FileExistsError, match="--resume"):
        trainer.train(cfg, run_dir=seg_run)


def _step_setup(data_dir, extra="", unchecked=None):
    cfg = _config(data_dir, "diffusion", extra)
    if unchecked:  # values `validate` rejects, to reach the step as if they got there
        cfg = config_lib.replace(cfg, unchecked)
    info = imgx_data.dataset_info("phantom", data_dir=data_dir)
    task = tasks.Task(cfg, info)
    tx = optim.optimizer(cfg.optimizer)
    source = imgx_data.data_source("phantom", "train", data_dir=data_dir)
    examples = [source[i] for i in range(4)]
    batch = {
        "image": jnp.stack([e["image"] for e in examples]),
        "label": jnp.stack([e["label"].astype(np.int32) for e in examples]),
        "spacing": jnp.stack([e["spacing"] for e in examples]),
    }
    return cfg, task, tx, batch


def _run_step(cfg, task, tx, batch, devices, num_micro=1):
    states, metrics = _run_steps(cfg, task, tx, batch, devices, 1, num_micro)
    return states[1], metrics[0]


def _run_steps(cfg, task, tx, batch, devices, num_steps, num_micro=1):
    """`num_steps` updates on the same batch; the states (the initial one first) and metrics."""
    mesh = jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(trainer.init_state(cfg, task, tx), replicated)
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    step = jax.jit(trainer.make_train_step(cfg, task, tx, num_micro))
    states, metrics = [jax.device_get(state)], []
    for _ in range(num_steps):
        state, m = step(state, batch)
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return states, metrics


def test_one_and_two_devices_give_the_same_update(data_dir):
    """Same loss and gradient norm at each of 3 steps, and the same parameter change.

    The debug preset warms up in 1 step: steps 2 and 3 run at lr ≈ 3e-3, where Adam's
    update is no longer ±lr·sign(g), so the compared change θ₃ − θ₀ (up to ~6e-3 per
    entry) carries the gradients' values. Entries whose gradient is rounding noise can
    flip sign between reduction orders, so the change is compared in norm, to 1e-3.
    """
    assert jax.device_count() >= 2, "tests run with 2 fake CPU devices (conftest)"
    cfg, task, tx, batch = _step_setup(data_dir, "data.global_batch_size=4")
    assert cfg.optimizer.warmup_steps == 1
    one, m1 = _run_steps(cfg, task, tx, batch, jax.devices()[:1], 3)
    two, m2 = _run_steps(cfg, task, tx, batch, jax.devices()[:2], 3)
    for a, b in zip(m1, m2, strict=True):
        np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(a["grad_norm"]), float(b["grad_norm"]), rtol=1e-5)
    assert float(m1[0]["grad_norm"]) > 0
    for a, b in zip(_leaves(one[0]), _leaves(two[0]), strict=True):
        np.testing.assert_array_equal(a, b)  # the same initial parameters
    delta_one = [p3 - p0 for p0, p3 in zip(_leaves(one[0]), _leaves(one[-1]), strict=True)]
    delta_two = [p3 - p0 for p0, p3 in zip(_leaves(two[0]), _leaves(two[-1]), strict=True)]
    norm = np.sqrt(sum(np.sum(d**2) for d in delta_one))
    diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(delta_one, delta_two, strict=True)))
    assert norm > 1e-2  # the steps past warm-up moved the parameters
    assert diff <= 1e-3 * norm, (diff, norm)
    np.testing.assert_array_equal(one[-1]["aux"].count, two[-1]["aux"].count)


def _leaves(state):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(state["params"])]


def test_gradient_accumulation_keeps_the_effective_batch(data_dir):
    """Two micro-batches of 2 give the gradient of the batch of 4 (seg: per-sample loss)."""
    cfg, _, tx, batch = _step_setup(data_dir, "train.task=seg,data.augmentation=false")
    info = imgx_data.dataset_info("phantom", data_dir=data_dir)
    task = tasks.Task(cfg, info)
    full, m_full = _run_step(cfg, task, tx, batch, jax.devices()[:1], num_micro=1)
    acc, m_acc = _run_step(cfg, task, tx, batch, jax.devices()[:1], num_micro=2)
    np.testing.assert_allclose(float(m_full["grad_norm"]), float(m_acc["grad_norm"]), rtol=1e-4)
    assert trainer.accumulation_steps(8, 2, 2) == 2
    assert trainer.accumulation_steps(8, 2, None) == 1
    with pytest.raises(config_lib.ConfigError, match="multiple"):
        trainer.accumulation_steps(7, 2, None)


def test_non_finite_gradients_skip_the_update(data_dir):
    # The on-device rescaling turns non-finite intensities into finite ones, so a NaN
    # loss weight (which a config never passes validation with) makes the gradient
    # non-finite here.
    cfg, task, tx, batch = _step_setup(data_dir, unchecked={"loss.focal": float("nan")})
    mesh_devices = jax.devices()[:1]
    state = trainer.init_state(cfg, task, tx)
    new_state, metrics = _run_step(cfg, task, tx, batch, mesh_devices)
    assert int(metrics["skipped"]) == 1
    for a, b in zip(
        jax.tree.leaves(state["params"]), jax.tree.leaves(new_state["params"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(new_state["aux"].count), 0)


def test_early_stopping_counts_validations_without_improvement():
    stopper = trainer.EarlyStopping(patience=2, min_delta=0.01)
    assert not stopper.update(0.5, 10)
    assert not stopper.update(0.505, 20)  # not better by min_delta
    assert stopper.update(0.5, 30)
    assert (stopper.best, stopper.best_step) == (0.5, 10)
    restored = trainer.EarlyStopping(patience=2, min_delta=0.01)
    restored.load_json(json.loads(json.dumps(stopper.to_json())))
    assert restored == stopper


def test_corrupted_latest_checkpoint_falls_back_and_resume_finishes(
    seg_run, tmp_path, caplog, capsys
):
    """Checkpoint 4 of 4 garbled: a warning naming it, resume from 2, the same final
    parameters, and the garbled files kept in `checkpoints/corrupt-4-*`."""
    copy = tmp_path / "copy"
    shutil.copytree(seg_run, copy)
    steps = sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    for f in (copy / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    garbled = sorted(
        str(f.relative_to(copy / "checkpoints" / "4"))
        for f in (copy / "checkpoints" / "4").rglob("*")
        if f.is_file()
    )
    with caplog.at_level(logging.WARNING, logger="imgx_train.checkpoint"):
        trainer.resume(copy)
    assert "checkpoints/4 is corrupt (a metadata file is not valid JSON" in caplog.text
    assert f"resumed {copy.resolve()} at step 2" in capsys.readouterr().out
    (aside,) = (copy / "checkpoints").glob("corrupt-4-*")
    assert f"moved to {aside}" in caplog.text
    kept = sorted(str(f.relative_to(aside)) for f in aside.rglob("*") if f.is_file())
    assert kept == garbled
    assert all(f.read_bytes() == b"garbage" for f in (aside / "state").rglob("*") if f.is_file())
    assert evaluation.restore_run(copy, "last").step == 4
    _assert_same_params(seg_run, copy)
    records = runs.read_jsonl(copy / "metrics" / "train.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_a_transient_read_error_stops_the_resume_and_deletes_nothing(
    seg_run, tmp_path, monkeypatch
):
    """An I/O error reading checkpoint 4 (e.g. NFS): resume fails naming it, deletes nothing."""
    copy = tmp_path / "copy"
    shutil.copytree(seg_run, copy)
    before = sorted(str(p.relative_to(copy)) for p in (copy / "checkpoints").rglob("*"))
    real_restore = ckpt_lib.ocp.CheckpointManager.restore

    def flaky(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.EIO, "Input/output error")
        return real_restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "restore", flaky)
    with pytest.raises(ckpt_lib.CheckpointError, match="cannot read checkpoint .*/4: OSError"):
        trainer.resume(copy)
    after = sorted(str(p.relative_to(copy)) for p in (copy / "checkpoints").rglob("*"))
    assert after == before


def _signal_after_step_3(monkeypatch, signum):
    """Sends this process `signum` right after the third train step returns; returns the
    unpatched `_jit_train_step`."""
    original = trainer._jit_train_step

    def signalled_after_step_3(*args, **kwargs):
        step_fn = original(*args, **kwargs)
        calls = []

        def call(state, batch):
            out = step_fn(state, batch)
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signum)
            return out

        return call

    monkeypatch.setattr(trainer, "_jit_train_step", signalled_after_step_3)
    return original


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(
    data_dir, seg_run, tmp_path, monkeypatch, capsys
):
    """SIGINT right after step 3's update, before the loop counts it: checkpoint 3 holds the
    state of step 3 (not the donated input of step 3, nor step 3's state labelled 2), and
    the resume equals the straight run. Step 2's validation was printed when computed and
    the curves drawn then, so the interrupted run has them."""
    original = _signal_after_step_3(monkeypatch, signal.SIGINT)
    cfg = config_lib.load(seg_run / "config.json")
    run_dir = tmp_path / "interrupted"
    with pytest.raises(trainer.TrainingInterrupted, match="imgx train --resume") as info:
        trainer.train(cfg, run_dir=run_dir)
    assert info.value.step == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    dice = runs.read_jsonl(run_dir / "metrics" / "valid.jsonl")[0]["dice"]
    assert f"step 2: validation Dice {dice:.4f}" in capsys.readouterr().out
    assert (run_dir / "plots" / "curves.png").stat().st_size > 0
    mngr = ckpt_lib.manager(run_dir, read_only=True)
    assert sorted(mngr.all_steps()) == [2, 3]
    task = tasks.Task(cfg, imgx_data.dataset_info("phantom", data_dir=data_dir))
    target = trainer.init_state(cfg, task, optim.optimizer(cfg.optimizer))
    step, state, meta = ckpt_lib.restore(mngr, 3, target)
    assert (step, int(state["step"]), meta["iterator"]["step"]) == (3, 3, 3)
    monkeypatch.setattr(trainer, "_jit_train_step", original)
    trainer.resume(run_dir)
    _assert_same_params(seg_run, run_dir)


def test_sigterm_saves_a_checkpoint_like_ctrl_c(data_dir, seg_run, tmp_path, monkeypatch):
    """SIGTERM (preemption, scancel, docker stop) after step 3: checkpoint 3 is saved, the
    error carries the resume command, and both handlers are put back."""
    _signal_after_step_3(monkeypatch, signal.SIGTERM)
    run_dir = tmp_path / "terminated"
    with pytest.raises(trainer.TrainingInterrupted) as info:
        trainer.train(config_lib.load(seg_run / "config.json"), run_dir=run_dir)
    assert (info.value.step, info.value.signum) == (3, signal.SIGTERM)
    assert f"resume with: imgx train --resume {run_dir}" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    mngr = ckpt_lib.manager(run_dir, read_only=True)
    assert sorted(mngr.all_steps()) == [2, 3]
    assert ckpt_lib.read_meta(mngr, 3)["iterator"]["step"] == 3


def test_a_second_ctrl_c_during_validation_leaves_it_pending(seg_run, tmp_path, monkeypatch):
    """Two Ctrl-C inside step 2's validation: checkpoint 2 records no validation (log, early
    stopping, best) and says it is pending; the resume validates step 2 first and ends as the
    straight run."""
    original = evaluation.Validator.run

    def interrupted(self, state, step):
        if step == 2:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # the second one stops at once
        return original(self, state, step)

    monkeypatch.setattr(evaluation.Validator, "run", interrupted)
    run_dir = tmp_path / "interrupted"
    with pytest.raises(trainer.TrainingInterrupted) as info:
        trainer.train(config_lib.load(seg_run / "config.json"), run_dir=run_dir)
    assert info.value.step == 2
    mngr = ckpt_lib.manager(run_dir, read_only=True)
    assert sorted(mngr.all_steps()) == [2]
    meta = ckpt_lib.read_meta(mngr, 2)
    assert meta["validation_pending"] is True
    assert "best" not in meta  # the best has one record: the checkpoint's metric, below
    assert meta["early_stopping"]["best_step"] is None and meta["early_stopping"]["bad"] == 0
    assert mngr.metrics(2) is None or ckpt_lib.METRIC_KEY not in mngr.metrics(2)
    assert runs.read_jsonl(run_dir / "metrics" / "valid.jsonl") == []
    monkeypatch.setattr(evaluation.Validator, "run", original)
    trainer.resume(run_dir)
    valid = runs.read_jsonl(run_dir / "metrics" / "valid.jsonl")
    assert valid == runs.read_jsonl(seg_run / "metrics" / "valid.jsonl")
    assert [r["step"] for r in valid] == [2, 4]
    _assert_same_params(seg_run, run_dir)


def test_a_second_ctrl_c_interrupts_at_once():
    with trainer._DeferredInterrupt() as interrupt:
        signal.raise_signal(signal.SIGINT)
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_same_seed_and_devices_are_bit_identical(seg_run, seg_run_offline):
    """Two fresh runs, same seed, 2 devices: identical logs and parameters, bit for bit."""
    assert jax.device_count() == 2
    logged = []
    for run in (seg_run, seg_run_offline):
        records = runs.read_jsonl(run / "metrics" / "train.jsonl")
        logged.append([(r["step"], r["loss"], r["grad_norm"]) for r in records])
    assert len(logged[0]) == 4 and logged[0] == logged[1]
    valid = [runs.read_jsonl(run / "metrics" / "valid.jsonl") for run in (seg_run, seg_run_offline)]
    assert [r["dice"] for r in valid[0]] == [r["dice"] for r in valid[1]]
    _assert_same_params(seg_run, seg_run_offline)


def test_wandb_logs_offline_by_default_without_a_terminal(seg_run_offline):
    """The default mode needs no key and no input: an offline run to `wandb sync` later."""
    offline = list((seg_run_offline / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("run-*.wandb"))


def test_nan_batch_is_skipped_and_parameters_stay_finite(nan_run):
    records = runs.read_jsonl(nan_run / "metrics" / "train.jsonl")
    assert records[0]["step"] == 1 and records[0]["skipped"] == 1
    assert records[0]["loss"] is None  # NaN, written as null
    assert records[-1]["skipped"] == 1 and np.isfinite(records[-1]["loss"])
    for leaf in jax.tree.leaves(_params(nan_run)):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_early_stopping_ends_the_loop_and_is_recorded(nan_run, capsys):
    """patience 1, min_delta 1: the second validation (step 2) cannot improve, so stop."""
    assert [r["step"] for r in runs.read_jsonl(nan_run / "metrics" / "train.jsonl")] == [1, 2]
    assert [r["step"] for r in runs.read_jsonl(nan_run / "metrics" / "valid.jsonl")] == [1, 2]
    mngr = ckpt_lib.manager(nan_run, read_only=True)
    assert max(mngr.all_steps()) == 2
    meta = ckpt_lib.read_meta(mngr, 2)
    assert meta["early_stopping"]["stopped_step"] == 2
    assert meta["early_stopping"]["best_step"] == 1 and meta["early_stopping"]["bad"] == 1


def test_resume_respects_early_stopping_unless_steps_extend_it(nan_run, tmp_path, capsys):
    """The run stopped at step 2 of 4: a plain resume trains nothing and says so; a resume
    with `steps` trains on with patience counted anew (patience 1: it stops at step 3)."""
    run_dir = tmp_path / "nan"
    shutil.copytree(nan_run, run_dir, ignore=shutil.ignore_patterns(".lock"))
    capsys.readouterr()
    trainer.resume(run_dir)
    assert "ended by early stopping at step 2" in capsys.readouterr().out
    assert [r["step"] for r in runs.read_jsonl(run_dir / "metrics" / "train.jsonl")] == [1, 2]
    assert max(ckpt_lib.manager(run_dir, read_only=True).all_steps()) == 2

    trainer.resume(run_dir, steps=4)
    out = capsys.readouterr().out
    assert "resumed" in out and "early stopping at step 3" in out
    assert [r["step"] for r in runs.read_jsonl(run_dir / "metrics" / "train.jsonl")] == [1, 2, 3]
    meta = ckpt_lib.read_meta(ckpt_lib.manager(run_dir, read_only=True), 3)
    assert meta["early_stopping"]["stopped_step"] == 3


def test_full_disk_while_training_is_a_clear_error(data_dir, tmp_path, monkeypatch):
    """ENOSPC on the third train.jsonl write: a RunError naming the file, steps 1-2 kept."""
    cfg = _config(data_dir, "seg", "train.eval_every=100")
    path = tmp_path / "full" / "metrics" / "train.jsonl"
    real_open = Path.open
    appends = []

    def open_(self, mode="r", *args, **kwargs):
        if self == path and mode == "a":
            appends.append(mode)
            if len(appends) == 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    with pytest.raises(runs.RunError, match="the disk is full") as info:
        trainer.train(cfg, run_dir=tmp_path / "full")
    assert str(path) in str(info.value) and "--resume" in str(info.value)
    assert [r["step"] for r in runs.read_jsonl(path)] == [1, 2]


def test_data_not_built_leaves_no_run_dir(tmp_path):
    cfg = presets.make_config(
        "muscle_us",
        task="seg",
        preset="debug",
        overrides=f"logging.wandb=disabled,data.data_dir={tmp_path / 'data'}",
    )
    with pytest.raises(imgx_data.DatasetError, match="not built"):
        trainer.train(cfg, run_dir=tmp_path / "runs" / "run")
    assert not (tmp_path / "runs").exists()


def test_a_batch_larger_than_the_training_cases_is_a_clear_error_leaving_nothing(
    data_dir, tmp_path
):
    """8 train cases and a batch of 9: no epoch would hold a batch (the iterator's error
    came after the run folder was made, as a traceback)."""
    cfg = _config(data_dir, "seg", "data.global_batch_size=9")
    with pytest.raises(config_lib.ConfigError, match=r"global_batch_size=9 exceeds the 8 train"):
        trainer.train(cfg, run_dir=tmp_path / "runs" / "run")
    assert not (tmp_path / "runs").exists()
    fold = _config(data_dir, "seg", "data.global_batch_size=9,data.fold=0")  # 5 folds of 10
    with pytest.raises(config_lib.ConfigError, match=r"the 8 training cases of phantom \(fold 0\)"):
        trainer.train(fold, run_dir=tmp_path / "runs" / "run")


def test_ema_of_parameters(data_dir):
    """With decay d the EMA after one update is d·θ₀ + (1 − d)·θ₁."""
    cfg, task, tx, batch = _step_setup(data_dir, "optimizer.ema_decay=0.75")
    initial = trainer.init_state(cfg, task, tx)
    new_state, _ = _run_step(cfg, task, tx, batch, jax.devices()[:1])
    for e, p0, p1 in zip(
        jax.tree.leaves(new_state["ema"]),
        jax.tree.leaves(initial["params"]),
        jax.tree.leaves(new_state["params"]),
        strict=True,
    ):
        np.testing.assert_allclose(
            np.asarray(e), 0.75 * np.asarray(p0) + 0.25 * np.asarray(p1), rtol=1e-6, atol=1e-7
        )


def test_a_run_in_use_is_not_resumed(seg_run):
    before = (seg_run / "metrics" / "train.jsonl").read_text()
    with runs.locked(seg_run):
        with pytest.raises(runs.RunError, match=f"in use by pid {os.getpid()} on host"):
            trainer.resume(seg_run, steps=100)
    assert (seg_run / "metrics" / "train.jsonl").read_text() == before
