"""Training: run layout, exact resume, 1 vs 2 devices, accumulation, non-finite skipping.

One tiny seg run and one tiny diffusion run are shared by the module; the phantom data is
built once into a temporary data dir.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import imgx_data
from imgx_train import checkpoint as ckpt_lib
from imgx_train import config as config_lib
from imgx_train import evaluation, optim, presets, tasks, trainer

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


def _step_setup(data_dir, extra=""):
    cfg = _config(data_dir, "diffusion", extra)
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
    mesh = jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(trainer.init_state(cfg, task, tx), replicated)
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    step = jax.jit(trainer.make_train_step(cfg, task, tx, num_micro))
    return step(state, batch)


def test_one_and_two_devices_give_the_same_update(data_dir):
    assert jax.device_count() >= 2, "tests run with 2 fake CPU devices (conftest)"
    cfg, task, tx, batch = _step_setup(data_dir, "data.global_batch_size=4")
    one, m1 = _run_step(cfg, task, tx, batch, jax.devices()[:1])
    two, m2 = _run_step(cfg, task, tx, batch, jax.devices()[:2])
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(one["aux"].count), np.asarray(two["aux"].count))


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
    # loss weight is what makes the gradient non-finite here.
    cfg, task, tx, batch = _step_setup(data_dir, "loss.focal=NaN")
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


def test_corrupted_latest_checkpoint_falls_back(seg_run, tmp_path, caplog):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(seg_run, copy)
    latest = max(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
    for f in (copy / "checkpoints" / str(latest) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    mngr = ckpt_lib.manager(copy, read_only=True)
    cfg = config_lib.load(copy / "config.json")
    info = imgx_data.dataset_info("phantom", data_dir=cfg.data.data_dir)
    task = tasks.Task(cfg, info)
    target = trainer.init_state(cfg, task, optim.optimizer(cfg.optimizer))
    step, _, meta = ckpt_lib.restore(mngr, None, target)
    assert step < latest
    assert "iterator" in meta


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(data_dir, seg_run, tmp_path, monkeypatch):
    """KeyboardInterrupt at step 3 of 4: a checkpoint of step 3, then resume equals straight."""
    original = imgx_data.TrainIterator.__next__

    def interrupt_before_step_4(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(imgx_data.TrainIterator, "__next__", interrupt_before_step_4)
    cfg = config_lib.load(seg_run / "config.json")
    with pytest.raises(trainer.TrainingInterrupted, match="imgx train --resume") as info:
        trainer.train(cfg, run_dir=tmp_path / "interrupted")
    assert info.value.step == 3
    assert 3 in ckpt_lib.manager(tmp_path / "interrupted", read_only=True).all_steps()
    monkeypatch.setattr(imgx_data.TrainIterator, "__next__", original)
    trainer.resume(tmp_path / "interrupted")
    for a, b in zip(
        jax.tree.leaves(_params(seg_run)),
        jax.tree.leaves(_params(tmp_path / "interrupted")),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
