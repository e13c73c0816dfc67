"""The training loop: data parallel `jit` over a device mesh, exact resume, validation.

One readable loop (big_vision style). The train state is a pytree replicated over the
mesh's `data` axis; batches are global arrays sharded over it, so XLA averages the
gradients across devices (and hosts). Keys are `fold_in(seed_key, step)`, and the data
order is a pure function of (seed, step), so a resumed run sees exactly the batches and
keys it would have seen.

A Ctrl-C or a SIGTERM is acted on between steps: the state and its step advance together,
and the checkpoint saved on the way out holds the last completed step (a second one stops
at once; a validation it cuts short is not recorded and runs again on resume). A full
disk is a `RunError` naming the file, never a bare traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import netrc
import os
import signal
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import imgx_data
from imgx_train import checkpoint as ckpt_lib
from imgx_train import config as config_lib
from imgx_train import devices, distributed, evaluation, optim, portable, reports, runs, tasks
from imgx_train.tasks import init_state

logger = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM during training: a checkpoint was saved; `run_dir` resumes it.

    `signum` is the signal that asked to stop (None when not known).
    """

    def __init__(self, run_dir: Path, step: int, signum: int | None = None):
        super().__init__(f"interrupted at step {step}; resume with: imgx train --resume {run_dir}")
        self.run_dir = run_dir
        self.step = step
        self.signum = signum


@dataclasses.dataclass
class EarlyStopping:
    """Stops when the validation metric has not improved by `min_delta` for `patience`."""

    patience: int
    min_delta: float
    best: float = -math.inf
    best_step: int | None = None
    bad_validations: int = 0
    stopped_step: int | None = None

    def update(self, value: float, step: int) -> bool:
        """Records a validation; returns True (and records the step) when training stops."""
        if value > self.best + self.min_delta:
            self.best, self.best_step, self.bad_validations = value, step, 0
        else:
            self.bad_validations += 1
        if self.bad_validations >= self.patience:
            self.stopped_step = step
            return True
        return False

    def restart(self) -> None:
        """Counts patience anew (a stopped run that is extended), keeping the best so far."""
        self.bad_validations, self.stopped_step = 0, None

    def to_json(self) -> dict[str, Any]:
        best = self.best if math.isfinite(self.best) else None
        return {
            "best": best,
            "best_step": self.best_step,
            "bad": self.bad_validations,
            "stopped_step": self.stopped_step,
        }

    def load_json(self, data: dict[str, Any]) -> None:
        self.best = -math.inf if data.get("best") is None else float(data["best"])
        self.best_step = data.get("best_step")
        self.bad_validations = int(data.get("bad", 0))
        self.stopped_step = data.get("stopped_step")


class _DeferredInterrupt:
    """Turns a Ctrl-C (SIGINT) or a SIGTERM (preemption, `scancel`, `docker stop`) into a
    request that the loop acts on between steps.

    An interrupt inside the jitted step would lose its result after the input state was
    donated, or leave the new state labelled with the old step. A second signal raises
    `KeyboardInterrupt` at once, except inside `atomic()`, where it is raised on leaving.
    Only the main thread can own the handlers; elsewhere, and for a signal that is ignored
    (e.g. SIGINT under `nohup`), nothing changes.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._atomic = False
        self._stop_now = False

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.requested, self.signum = True, signum
        elif self._atomic:
            self._stop_now = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def atomic(self):
        """A block that a second signal does not cut short (it stops right after it)."""
        self._atomic = True
        try:
            yield
        finally:
            self._atomic = False
        if self._stop_now:
            raise KeyboardInterrupt

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN:
                    self._previous[signum] = signal.SIG_DFL if previous is None else previous
                    signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def accumulation_steps(global_batch: int, num_devices: int, max_per_device: int | None) -> int:
    """Micro-batches per update so each device holds at most `max_per_device` samples."""
    if global_batch % num_devices:
        raise config_lib.ConfigError(
            f"data.global_batch_size={global_batch} must be a multiple of the {num_devices} devices"
        )
    per_device = global_batch // num_devices
    if max_per_device is None or per_device <= max_per_device:
        return 1
    steps = math.ceil(per_device / max_per_device)
    while per_device % steps:
        steps += 1
    return steps


_FAULT_ENV = "IMGX_FAULT_INJECTION"


def _fault_point(point: str, step: int, mngr=None) -> None:
    """Test hook: `IMGX_FAULT_INJECTION=step:<n>` kills the process after the update of step n,
    once the checkpoint saves already started (asynchronous) are committed, so what is on
    disk at the kill does not depend on timing.

    `save:<n>` kills it in the middle of saving step n's checkpoint, after its files are
    written and before it is committed (`checkpoint.kill_during_save`, installed by
    `_install_fault_hooks`). Used by the fault-tolerance tests to stop at a fixed point
    instead of a random time. `interrupt:<n>` sends this process a Ctrl-C (SIGINT) there
    instead (the multi-host test interrupts one host only).
    """
    fault = os.environ.get(_FAULT_ENV)
    if fault == f"{point}:{step}":
        if mngr is not None:
            mngr.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
    elif point == "step" and fault == f"interrupt:{step}":
        os.kill(os.getpid(), signal.SIGINT)


def _install_fault_hooks() -> None:
    point, _, step = os.environ.get(_FAULT_ENV, "").partition(":")
    if point == "save" and step.isdigit():
        ckpt_lib.kill_during_save(int(step))


def make_train_step(
    cfg: config_lib.Config, task: tasks.Task, tx: optax.GradientTransformation, num_micro: int
):
    """The jitted update: augmentation, loss, gradients (accumulated), optimizer, EMA."""
    ema_decay = cfg.optimizer.ema_decay
    aug_cfg = tasks.augmentation_config(cfg, task.info)

    def step_fn(state: dict[str, Any], batch: dict[str, jax.Array]):
        key = jax.random.fold_in(state["key"], state["step"])
        aug_key, loss_key = jax.random.split(key)
        image, label = batch["image"], batch["label"]
        augmented = imgx_data.augment_batch(
            aug_key, {"image": image, "label": label, "spacing": batch["spacing"]}, aug_cfg
        )
        image, label = augmented["image"], augmented["label"]

        def loss_fn(params, image, label, key):
            return task.loss(params, key, image, label, state["aux"])

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if num_micro == 1:
            (loss, (per_sample, t, logs)), grads = grad_fn(state["params"], image, label, loss_key)
        else:
            # Micro-batch m takes rows m, m + M, m + 2M, ...: each device's contiguous block
            # contributes to every micro-batch, so no data crosses devices.
            def split(x):
                x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
                return jnp.swapaxes(x, 0, 1)

            def body(acc, xs):
                img, lab, k = xs
                (loss, aux), grads = grad_fn(state["params"], img, lab, k)
                acc = jax.tree.map(lambda a, g: a + g / num_micro, acc, grads)
                return acc, (loss, aux)

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            keys = jax.random.split(loss_key, num_micro)
            grads, (losses, (per_sample, t, logs)) = jax.lax.scan(
                body, zeros, (split(image), split(label), keys)
            )
            loss = losses.mean()
            per_sample, t = per_sample.reshape(-1), t.reshape(-1)
            logs = jax.tree.map(jnp.mean, logs)

        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(per_sample))
        aux = jax.lax.cond(
            finite,
            lambda: task.update_aux(state["aux"], t, per_sample),
            lambda: state["aux"],
        )
        new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state, aux=aux)
        if ema_decay is not None:
            new_state["ema"] = jax.tree.map(
                lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], params
            )
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "skipped": opt_state.total_notfinite,
            **logs,
        }
        return new_state, metrics

    return step_fn


class _Progress:
    """tqdm on a terminal, plain periodic lines otherwise."""

    def __init__(self, bar: bool, start: int, total: int, enabled: bool = True):
        self.bar = None
        self.enabled = enabled
        if enabled and bar and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.total = total

    def update(self, step: int, n: int, record: dict[str, Any] | None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if record is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        elif record is not None and self.enabled:
            print(
                f"step {step}/{self.total} loss {record['loss']:.4f} "
                f"{record.get('steps_per_s', 0):.2f} it/s",
                flush=True,
            )

    def write(self, line: str) -> None:
        """A line above the bar (or a plain line without one)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: config_lib.Config, *, run_dir: str | Path | None = None) -> Path:
    """Trains a new run and returns its directory (see the run layout in the README).

    Without `run_dir`, a new `runs/<time>-<data>-<task>` folder is made for it. With
    several processes, process 0 makes it and decides whether a given folder already
    holds a run, so that all of them train into one folder.
    """
    config_lib.validate(cfg)
    devices.setup(cfg)
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None:
        _check_new(run_dir)
    return _run(cfg, run_dir)


def resume(run_dir: str | Path, *, steps: int | None = None) -> Path:
    """Continues a run from its last complete checkpoint, up to `steps` in total.

    A run that early stopping ended stays ended (it says so and trains nothing) unless
    `steps` is given: then it trains on, its patience counted anew.
    """
    run_dir = runs.check_run_dir(run_dir)
    cfg = config_lib.load(run_dir / "config.json")  # validated: a hand edit is checked here
    if steps is not None:
        cfg = config_lib.replace(cfg, {"train.steps": steps})
        config_lib.validate(cfg)
    return _run(cfg, run_dir, resuming=True, extend=steps is not None)


def _check_new(run_dir: Path) -> None:
    # Decided by process 0: another host may already have written this run's config.json.
    if distributed.broadcast_from_main((run_dir / "config.json").exists()):
        raise FileExistsError(
            f"{run_dir} already holds a run; continue it with: imgx train --resume {run_dir}"
        )


def _check_batch_size(cfg: config_lib.Config) -> None:
    """A batch larger than the training cases leaves every epoch without one: ConfigError."""
    num_cases = len(evaluation.split_source(cfg, "train"))
    if cfg.data.global_batch_size > num_cases:
        fold = "" if cfg.data.fold is None else f" (fold {cfg.data.fold})"
        raise config_lib.ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} exceeds the {num_cases} "
            f"training cases of {cfg.data.name}{fold}, so no epoch holds a batch; use at "
            f"most {num_cases} (--batch-size N)."
        )


def _jit_train_step(cfg, task, tx, num_micro: int, replicated: NamedSharding):
    """The train step jitted for the mesh; the input state's buffers are donated."""
    return jax.jit(
        make_train_step(cfg, task, tx, num_micro),
        in_shardings=(replicated, None),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )


def _run(
    cfg: config_lib.Config, run_dir: Path | None, resuming: bool = False, extend: bool = False
) -> Path:
    """Trains in `run_dir` (a new folder when None) while holding the run's lock."""
    devices.setup(cfg)
    _install_fault_hooks()
    runs.check_writable(run_dir if run_dir is not None else runs.RUNS_ROOT)
    # The data before the run directory: a dataset that is not built leaves nothing behind.
    info = imgx_data.ensure_built(cfg.data.name, data_dir=cfg.data.data_dir)
    _check_batch_size(cfg)
    if run_dir is None:
        # Made by process 0 (each host would pick a name from its own clock).
        new = str(runs.new_run_dir(cfg)) if devices.is_main_process() else None
        run_dir = Path(distributed.broadcast_from_main(new))
    runs.prepare(run_dir)
    # Only the main process locks: the others of a multi-host run share its folder.
    with runs.locked(run_dir) if devices.is_main_process() else contextlib.nullcontext():
        if not resuming:
            _check_new(run_dir)  # again under the lock: another `train` may have won the race
        # Closed on every exit: a manager left to the garbage collector can deadlock a
        # later thread start (its finalizer runs inside CPython's thread bootstrap).
        mngr = ckpt_lib.manager(run_dir, keep=cfg.train.keep_checkpoints)
        try:
            trained = _train(cfg, run_dir, info, mngr, resuming, extend)
        except BaseException as e:
            with contextlib.suppress(Exception):  # the error that stopped training wins
                mngr.close()
            if isinstance(e, OSError) and runs.is_disk_full(e) and not isinstance(e, runs.RunError):
                raise runs.disk_full_error(e.filename or run_dir, run_dir) from e
            raise
        mngr.close()
        return trained


def _train(
    cfg: config_lib.Config,
    run_dir: Path,
    info: imgx_data.DatasetInfo,
    mngr,
    resuming: bool,
    extend: bool = False,
) -> Path:
    main = devices.is_main_process()
    if main:
        config_lib.save(cfg, run_dir / "config.json", provenance=portable.provenance())
        if not resuming or not (run_dir / portable.PREPROCESS_FILE).exists():
            portable.write_preprocessing(run_dir, info)  # what predict needs, no data dir
        runs.point_latest(run_dir)

    mesh = devices.data_mesh()
    replicated = NamedSharding(mesh, P())
    task = tasks.Task(cfg, info)
    tx = optim.optimizer(cfg.optimizer)
    num_micro = accumulation_steps(
        cfg.data.global_batch_size, mesh.size, cfg.data.max_batch_per_device
    )
    # Built inside jit so that each process creates its part of the replicated global
    # arrays (device_put cannot target devices of other hosts).
    state = jax.jit(lambda: init_state(cfg, task, tx), out_shardings=replicated)()
    train_source = evaluation.split_source(cfg, "train")  # training windows of whole cases
    if main and not resuming:
        evaluation.warn_about_training_windows(cfg, info.image_shape)
    iterator = imgx_data.TrainIterator(
        train_source,
        global_batch_size=cfg.data.global_batch_size,
        seed=cfg.train.seed,
        mesh=mesh,
    )
    stopper = EarlyStopping(cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta)
    train_log = runs.JsonlWriter(run_dir / "metrics" / "train.jsonl", enabled=main)
    valid_log = runs.JsonlWriter(run_dir / "metrics" / "valid.jsonl", enabled=main)

    start = 0
    if resuming and mngr.all_steps():
        start, state, saved, skipped = ckpt_lib.restore_latest(mngr, state)
        # Every process continues from process 0's step and sets aside what it found
        # corrupt, even where a host could read a step that process 0 could not.
        agreed, skipped_on_main = distributed.broadcast_from_main([start, sorted(skipped.items())])
        if start != agreed:
            start, state, saved = ckpt_lib.restore(mngr, agreed, state)
        skipped = dict(skipped_on_main)
        iterator.set_state(saved["iterator"])
        stopper.load_json(saved["early_stopping"])
        # Newer steps proven corrupt: kept, moved out of the way of this run's saves.
        for later, reason in sorted(skipped.items()):
            ckpt_lib.set_aside(mngr, later, reason)
        if stopper.stopped_step is not None and not extend:
            if main:
                print(
                    f"{run_dir} was ended by early stopping at step {stopper.stopped_step} "
                    f"(best validation Dice at step {stopper.best_step}): not trained further; "
                    f"to train on: imgx train --resume {run_dir} --steps N",
                    flush=True,
                )
            return run_dir
        if stopper.stopped_step is not None:
            stopper.restart()
        if main:
            print(f"resumed {run_dir} at step {start}", flush=True)
    train_log.truncate_after(start)
    valid_log.truncate_after(start)

    step_fn = _jit_train_step(cfg, task, tx, num_micro, replicated)
    validator = evaluation.Validator(cfg, task, mesh)
    wandb_run = _init_wandb(cfg, run_dir, resuming)
    schedule = optim.learning_rate_schedule(cfg.optimizer)

    def eval_due(step: int) -> bool:
        return step % cfg.train.eval_every == 0 or step == cfg.train.steps

    # The last step whose validation is recorded (log, early stopping): a second
    # interrupt can stop a validation, and that step's checkpoint then says it is pending.
    validated = {"step": None}

    def meta(step: int) -> dict[str, Any]:
        # One batch per step, so the iterator's position is the step (also when a second
        # Ctrl-C stopped `next` after it had advanced).
        return {
            "iterator": {**iterator.get_state(), "step": step},
            "early_stopping": stopper.to_json(),
            "validation_pending": eval_due(step) and validated["step"] != step,
        }

    def validate(step: int) -> tuple[float, bool]:
        """Validates `step` and records it; returns (Dice, whether early stopping ends it)."""
        summary = validator.run(state, step)  # a second interrupt stops it: nothing recorded
        with interrupt.atomic():  # recorded all together or not at all
            valid_log.write({"step": step, **summary})
            if wandb_run is not None:
                wandb_run.log({f"valid/{k}": v for k, v in summary.items()}, step=step)
            valid_dice = summary["dice"]
            stop = stopper.update(valid_dice, step)
            validated["step"] = step
        hd95 = summary.get("hd95")
        progress.write(
            f"step {step}: validation Dice {valid_dice:.4f}"
            + (f", HD95 {hd95:.2f} mm" if hd95 is not None else "")
            + f" ({summary['num_cases']} cases)"
        )
        if main:  # redrawn at each validation: an interrupted run has its curves too
            plot_curves()
        return valid_dice, stop

    def plot_curves() -> None:
        reports.plot_curves(
            run_dir / "plots" / "curves.png",
            runs.read_jsonl(run_dir / "metrics" / "train.jsonl"),
            runs.read_jsonl(run_dir / "metrics" / "valid.jsonl"),
        )

    progress = _Progress(cfg.logging.progress, start, cfg.train.steps, enabled=main)
    step, last_time, last_step = start, time.perf_counter(), start
    interrupt = _DeferredInterrupt()
    stop = False
    try:
        with interrupt:
            if resuming and start and saved.get("validation_pending"):
                # A second interrupt stopped this step's validation: it runs now.
                _, stop = validate(start)
            while step < cfg.train.steps and not stop:
                # Ctrl-C or SIGTERM on any host stops all of them before the same step,
                # so that they all join the same checkpoint save.
                if distributed.any_process(interrupt.requested):
                    raise KeyboardInterrupt
                batch = next(iterator)
                new_state, metrics = step_fn(
                    state, {k: batch[k] for k in ("image", "label", "spacing")}
                )
                state, step = new_state, step + 1  # together: no interrupt between them
                record = None
                if step % cfg.logging.log_every == 0 or step == cfg.train.steps:
                    record = _log_record(step, metrics, schedule)  # waits for the step
                    now = time.perf_counter()
                    record["steps_per_s"] = (step - last_step) / max(now - last_time, 1e-9)
                    last_time, last_step = now, step
                    train_log.write(record)
                    if wandb_run is not None:
                        wandb_run.log({f"train/{k}": v for k, v in record.items()}, step=step)
                progress.update(step, 1, record)

                valid_dice = None
                if eval_due(step):
                    valid_dice, stop = validate(step)
                if valid_dice is not None or step % cfg.train.checkpoint_every == 0:
                    ckpt_lib.save(mngr, step, state, meta(step), valid_dice=valid_dice)
                _fault_point("step", step, mngr)
    except KeyboardInterrupt:
        progress.close()
        saved_step = _save_on_interrupt(mngr, state, meta)
        raise TrainingInterrupted(run_dir, saved_step, interrupt.signum) from None
    finally:
        progress.close()
    if stop:
        print(
            f"early stopping at step {step}: no improvement of the validation "
            f"Dice for {stopper.patience} validations (best {stopper.best:.4f} "
            f"at step {stopper.best_step})",
            flush=True,
        )
    _save_final(mngr, step, state, meta)
    if wandb_run is not None:
        wandb_run.finish()
    if main:
        plot_curves()
    return run_dir


def _save_on_interrupt(mngr, state: dict[str, Any], meta) -> int:
    """Saves the last completed step on Ctrl-C; returns the step a resume starts from.

    The step is read from the state itself, so the checkpoint's label always matches its
    content. When a second Ctrl-C stopped a step after its input buffers were donated,
    there is nothing consistent to save and the last checkpoint stands.
    """
    if any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(state)):
        ckpt_lib.wait(mngr)
        steps = mngr.all_steps()
        last = max(steps) if steps else 0
        logger.warning("interrupted inside a step: resuming will start from step %d", last)
        return last
    step = int(np.asarray(state["step"].addressable_data(0)))
    _save_final(mngr, step, state, meta)
    return step


def _save_final(mngr, step: int, state: dict[str, Any], meta) -> None:
    """Saves `step` unless it is on disk already, then waits for every save to finish."""
    if step not in mngr.all_steps():
        ckpt_lib.save(mngr, step, state, meta(step))
    ckpt_lib.wait(mngr)


def _log_record(step: int, metrics: dict[str, jax.Array], schedule) -> dict[str, Any]:
    """Brings a logged step's metrics to the host (the only host sync of the loop)."""
    values = jax.device_get(metrics)
    record = {"step": step, "lr": float(schedule(step - 1))}
    record.update({k: float(np.asarray(v)) for k, v in values.items()})
    record["skipped"] = int(record["skipped"])
    return record


def _init_wandb(cfg: config_lib.Config, run_dir: Path, resuming: bool):
    """wandb in the configured mode; offline when online is asked for without a key."""
    mode = cfg.logging.wandb
    if mode == "disabled" or not devices.is_main_process():
        return None
    import wandb

    if mode == "online" and not _wandb_credentials_found():
        logger.warning(
            "wandb: no API key found (WANDB_API_KEY or `wandb login`); logging offline to "
            "%s/wandb (upload later with `wandb sync`)",
            run_dir,
        )
        mode = "offline"
    tags = [cfg.data.name, cfg.train.task]
    if cfg.train.task == "diffusion":
        tags.append(cfg.diffusion.strategy)
    return wandb.init(
        project="imgx",
        dir=str(run_dir),
        name=run_dir.name,
        id=run_dir.name.replace(".", "-"),
        resume="allow" if resuming else None,
        mode=mode,
        config=config_lib.flatten(cfg),
        tags=tags,
        settings=wandb.Settings(silent=True, console="off"),
    )


def _wandb_credentials_found() -> bool:
    """Whether wandb has a key without asking for one.

    Looks only where wandb itself looks before it would prompt: `WANDB_API_KEY` (or an
    identity token file) and the netrc entry `wandb login` writes for the server
    (`WANDB_BASE_URL`, default api.wandb.ai). Neither the terminal nor the network is used,
    so a run without a key can never block on a prompt.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    host = urllib.parse.urlsplit(base_url).netloc
    if os.environ.get("NETRC"):
        candidates = [Path(os.environ["NETRC"]).expanduser()]
    else:
        candidates = [Path.home() / ".netrc", Path.home() / "_netrc"]
    for path in candidates:
        try:
            if host and netrc.netrc(str(path)).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False
