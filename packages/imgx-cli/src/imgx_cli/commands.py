"""The `imgx` commands: words in, imgx-train / imgx-data calls, results out.

Each command imports its back end when it runs, so `imgx --help` answers at once and
does not wait for JAX. Fire shows the docstrings as `imgx <command> --help`.
"""

import os
import sys
from pathlib import Path
from typing import Any

from imgx_cli import printing
from imgx_cli.argv import UsageError, dashed

SPLITS = ("train", "valid", "test")
DEVICES = ("auto", "cpu", "gpu", "tpu")
LATEST_RUN = "runs/latest"


class CommandExit(Exception):
    """Ends a command with `code` after printing `message` on stderr (not a user error)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------
# Shared helpers


def _echo(*lines: str) -> None:
    print("\n".join(lines), flush=True)


def _path(value: Any) -> Path | None:
    return None if value is None else Path(str(value)).expanduser()


def _run_dir(run: Any) -> Path:
    """The run directory `run`, which `imgx train` must have made (it holds config.json)."""
    path = _path(run)
    if path is None or not (path / "config.json").is_file():
        hint = "train one with `imgx train`" if str(run) == LATEST_RUN else "check the path"
        raise UsageError(
            f"no run directory at {run} (a folder with config.json made by `imgx train`); "
            f"{hint}, or pass --run runs/<id>"
        )
    return path


def _run_list(value: Any, option: str) -> list[Path]:
    """`a,b` as Fire's tuple, a list, or a comma-separated string -> run directories."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    names = [str(item).strip() for item in items if str(item).strip()]
    if not names:
        raise UsageError(f"{option} takes run directories separated by commas, got {value!r}")
    return [_run_dir(name) for name in names]


def _ensemble(run: Any, runs: Any, ensemble_with: Any) -> list[Path]:
    """The runs whose probabilities are averaged: --run plus --ensemble-with, or --runs."""
    if runs is not None and ensemble_with is not None:
        raise UsageError("--runs lists every run of the ensemble; drop --ensemble-with")
    if runs is not None:
        if str(run) != LATEST_RUN:
            raise UsageError("--runs lists every run of the ensemble; drop --run")
        members = _run_list(runs, "--runs")
        if len(members) < 2:
            raise UsageError("--runs takes two runs or more (one run: --run DIR)")
        return members
    others = [] if ensemble_with is None else _run_list(ensemble_with, "--ensemble-with")
    return [_run_dir(run), *others]


def _positive_int(value: Any, option: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{option} takes a whole number of at least 1, got {value!r}")
    return value


def _int(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{option} takes a whole number, got {value!r}")
    return value


def _checkpoint(value: Any) -> str | int:
    """`best`, `last` or a step number (int)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.lower() in ("best", "last"):
        return value.lower()
    raise UsageError(f"--checkpoint takes best, last or a step number, got {value!r}")


def _sampler(value: Any) -> str | None:
    if value is None:
        return None
    from imgx_train.config import CHOICES  # the samplers the config accepts

    samplers = CHOICES["eval.sampler"]
    if value not in samplers:
        raise UsageError(f"--sampler takes {', '.join(samplers)}, got {value!r}")
    return value


def _numbers(value: Any, kind: type, option: str) -> tuple[Any, ...]:
    """`1,1,3` as Fire's tuple, a list, or the strings `1,1,3` / `1x1x3` -> a tuple."""
    items = value if isinstance(value, list | tuple) else str(value).replace("x", ",").split(",")
    try:
        numbers = tuple(kind(str(item).strip()) for item in items if str(item).strip())
    except ValueError:
        numbers = ()
    if not numbers or any(n <= 0 for n in numbers):
        example = "1,1,3" if kind is float else "128,128,32"
        raise UsageError(f"{option} takes positive numbers per axis, e.g. {example}; got {value!r}")
    return numbers


def select_device(device: str) -> None:
    """Makes JAX use `device` (`cpu`, `gpu`, `tpu`) or checks that it is there.

    `auto` leaves the choice to JAX (an accelerator if present, else the CPU). All local
    devices of the chosen kind are used for data parallelism.
    """
    if device not in DEVICES:
        raise UsageError(f"--device takes {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return
    if device == "cpu" and "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from imgx_train import devices

    # A multi-host run must join before anything starts a JAX backend (jax.devices does).
    devices.initialize_distributed()

    try:
        found = jax.devices(device)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        install = {"gpu": "uv sync --extra cuda", "tpu": "uv sync --extra tpu"}.get(device)
        raise UsageError(
            f"--device {device} asked for, but JAX sees no {device.upper()} ({reason}); "
            + (f"install the {device.upper()} build of jax ({install}) or " if install else "")
            + "use --device auto"
        ) from None
    if jax.default_backend() != found[0].platform:
        raise UsageError(
            f"--device {device}: JAX already started on {jax.default_backend()}; "
            f"set JAX_PLATFORMS={found[0].platform} before starting imgx"
        )


def _print_results(summary: dict[str, Any]) -> None:
    from imgx_train import reports

    class_names = list(summary.get("per_class", {}))
    _echo(reports.print_results_table(summary, class_names))
    for alone in summary.get("runs", []):  # an ensemble: each run's own metrics
        fg = alone["foreground_mean"]
        _echo(
            f"alone:     {alone['run_dir']} ({alone['task']}, step {alone['checkpoint']}): "
            f"Dice {_number(fg.get('dice'))}, HD95 {_number(fg.get('hd95'))} mm"
        )
    output_dir = summary.get("output_dir")
    if output_dir is not None:
        _echo(f"results:   {output_dir} (summary.json, per_case.csv, predictions)")
        overlays = Path(output_dir) / "overlays"
        if overlays.is_dir():
            _echo(f"overlays:  {overlays}{os.sep}")


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _interrupted(error: BaseException) -> CommandExit:
    """imgx_train.TrainingInterrupted(run_dir, step): a checkpoint was saved."""
    step = getattr(error, "step", None)
    where = "" if step is None else f" at step {step}"
    return CommandExit(130, f"interrupted{where}; resume with: imgx train --resume {error.run_dir}")


def _train_config(
    data: str,
    task: str | None,
    strategy: str | None,
    steps: int | None,
    batch_size: int | None,
    seed: int | None,
    wandb: str | None,
    preset: str | None,
    overrides: Any,
    fold: int | None = None,
) -> Any:
    """The resolved config: dataset preset, named preset, --set, then the named flags."""
    from imgx_train import config as config_lib
    from imgx_train import presets

    # Fire hands a string on unless the text reads as a Python literal (e.g. a dict).
    if overrides is not None and not isinstance(overrides, dict):
        overrides = str(overrides)
    updates = config_lib.parse_overrides(overrides)
    flags = {
        "strategy": ("diffusion.strategy", strategy),
        "steps": ("train.steps", _positive_int(steps, "--steps")),
        "batch_size": ("data.global_batch_size", _positive_int(batch_size, "--batch-size")),
        "seed": ("train.seed", None if seed is None else _int(seed, "--seed")),
        "wandb": ("logging.wandb", wandb),
        "fold": ("data.fold", None if fold is None else _int(fold, "--fold")),
    }
    for flag, (key, value) in flags.items():
        if value is None:
            continue
        if key in updates:
            raise UsageError(f"{key} is given twice, by {dashed(flag)} and by --set; keep one")
        updates[key] = value
    cfg = presets.make_config(data=str(data), task=task, preset=preset, overrides=updates)
    if strategy is not None and cfg.train.task != "diffusion":
        raise UsageError(
            f"--strategy applies to --task diffusion; this run's task is {cfg.train.task}"
        )
    return cfg


def _print_config(cfg: Any) -> None:
    from imgx_train import config as config_lib

    head = (
        f"imgx train: data={cfg.data.name} task={cfg.train.task}"
        + (f" strategy={cfg.diffusion.strategy}" if cfg.train.task == "diffusion" else "")
        + f" steps={cfg.train.steps} batch={cfg.data.global_batch_size} seed={cfg.train.seed}"
    )
    _echo(head, "config (resolved; saved as <run>/config.json):", *printing.config_sections(cfg))
    _echo("changes from the defaults:")
    _echo(*(printing.config_changes(cfg, config_lib.Config()) or ["  (none)"]))


def _print_run_paths(run_dir: Path) -> None:
    plots = run_dir / "plots"
    _echo(f"run:       {run_dir}")
    if (plots / "curves.png").is_file():
        _echo(f"curves:    {plots / 'curves.png'}")


# ---------------------------------------------------------------------------------------
# Commands (their docstrings are the `--help` text)


def train(
    data: str = "phantom",
    task: str | None = None,
    strategy: str | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    run_dir: str | None = None,
    resume: str | None = None,
    wandb: str | None = None,
    preset: str | None = None,
    set: str | None = None,  # the option users type is --set
    fold: int | None = None,
    test: bool = True,
    device: str = "auto",
) -> None:
    """Train a model, then test it with the best checkpoint; or resume a run.

    Examples:
      imgx train                                     # phantom 2D, diffusion, xT-recycling
      imgx train --data amos_ct --task seg
      imgx train --strategy self_cond_next --set "optimizer.peak_lr=1e-4,model.dropout=0"
      imgx train --resume runs/latest --steps 2000   # continue up to 2000 steps in total
      imgx train --data liver --task seg --fold 0    # cross-validation fold 0 of 5

    Args:
      data: dataset name (`imgx datasets` lists them; `imgx build` builds one).
      task: diffusion or seg; default: the preset's (diffusion).
      strategy: standard, recycle_next, recycle_last, self_cond_same or self_cond_next.
      steps: total optimizer steps (also with --resume); default: the dataset preset's.
      batch_size: global batch size over all devices; default: the dataset preset's.
      seed: random seed; default 0.
      run_dir: the run directory to create; default runs/<time>-<data>-<task>.
      resume: a run directory to continue from its last checkpoint.
      wandb: offline, online or disabled; default offline.
      preset: debug, melba2023 or dgm4miccai2023 (papers' settings).
      set: any config fields, one string: "optimizer.peak_lr=1e-4,model.num_channels=[16,32]".
      fold: cross-validation fold (0-4; data.fold): train on the other folds' train/valid
        cases, validate on this fold's (splits_final.json beside the dataset build); the
        test split is unchanged. data.num_folds (5) sets the number of folds.
      test: test the best checkpoint after training (--no-test skips it).
      device: auto, cpu, gpu or tpu; all local devices of that kind are used.
    """
    select_device(device)
    import imgx_train

    if resume is not None:
        others = {
            "data": data != "phantom",
            "task": task,
            "strategy": strategy,
            "batch_size": batch_size,
            "seed": seed,
            "run_dir": run_dir,
            "wandb": wandb,
            "preset": preset,
            "set": set,
            "fold": fold,
        }
        extra = [dashed(k) for k, v in others.items() if v not in (None, False)]
        if extra:
            raise UsageError(
                f"--resume continues with the run's saved config; drop {', '.join(extra)} "
                "(only --steps may change)"
            )
        run = _run_dir(resume)
        total = _positive_int(steps, "--steps")
        _echo(f"imgx train: resuming {run}" + (f" up to step {total}" if total else ""))
        try:
            out = imgx_train.resume(run, steps=total)
        except imgx_train.TrainingInterrupted as error:
            raise _interrupted(error) from None
    else:
        cfg = _train_config(data, task, strategy, steps, batch_size, seed, wandb, preset, set, fold)
        _print_config(cfg)
        try:
            out = imgx_train.train(cfg, run_dir=_path(run_dir))
        except imgx_train.TrainingInterrupted as error:
            raise _interrupted(error) from None
    out = Path(out)
    if test:
        _echo("testing the best checkpoint on the test split")
        try:
            summary = imgx_train.evaluate(out, split="test", checkpoint="best")
        except KeyboardInterrupt:
            raise CommandExit(
                130, f"interrupted while testing; training is done: imgx test --run {out}"
            ) from None
        except FileExistsError as error:  # a resume whose best checkpoint was tested before
            summary = None
            _echo(f"not tested again: {error}")
        if summary is not None:
            _print_results(summary)
    _print_run_paths(out)


def _evaluate(
    split: str,
    run: str,
    sampler,
    num_steps,
    checkpoint,
    num_samples,
    seed,
    overwrite,
    device,
    runs=None,
    ensemble_with=None,
):
    select_device(device)
    run_dir, *others = _ensemble(run, runs, ensemble_with)
    import imgx_train

    summary = imgx_train.evaluate(
        run_dir,
        **({"ensemble_with": others} if others else {}),
        split=split,
        sampler=_sampler(sampler),
        num_steps=_positive_int(num_steps, "--num-steps"),
        checkpoint=_checkpoint(checkpoint),
        num_samples=_positive_int(num_samples, "--num-samples"),
        seed=_int(seed, "--seed"),
        overwrite=bool(overwrite),
    )
    _print_results(summary)


def valid(
    run: str = LATEST_RUN,
    sampler: str | None = None,
    num_steps: int | None = None,
    checkpoint: str = "best",
    num_samples: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    device: str = "auto",
) -> None:
    """Evaluate a run on the validation split; writes <run>/valid/<settings>/.

    <settings> names the checkpoint step and every sampling setting, e.g.
    valid/step_100-ddpm_5steps-1sample-seed0/ (seg: valid/step_100/): other settings never
    replace earlier results, and the same settings again need --overwrite.

    Args:
      run: the run directory (made by `imgx train`).
      sampler: diffusion sampler, ddpm, ddim or dpm_solver_2m; default: the run's.
      num_steps: diffusion sampling steps; default: the run's (5).
      checkpoint: best, last or a step number.
      num_samples: samples per case (diffusion); their mean probability gives the label.
      seed: random seed of the sampler.
      overwrite: replace earlier results of the same settings (refused without it).
      device: auto, cpu, gpu or tpu.
    """
    _evaluate("valid", run, sampler, num_steps, checkpoint, num_samples, seed, overwrite, device)


def test(
    run: str = LATEST_RUN,
    sampler: str | None = None,
    num_steps: int | None = None,
    checkpoint: str = "best",
    num_samples: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    device: str = "auto",
    runs: str | None = None,
    ensemble_with: str | None = None,
) -> None:
    """Evaluate a run (or an ensemble of runs) on the test split; writes <run>/test/<settings>/.

    Writes predictions (.nii.gz / .png), per_case.csv and summary.json, and prints Dice and
    HD95 per class. <settings> names the checkpoint step and every sampling setting, e.g.
    test/step_100-ddim_10steps-5samples-seed0/ (seg: test/step_100/): other settings never
    replace earlier results, and the same settings again need --overwrite.

    Ensembles average the runs' class probabilities (a diffusion run: its samples' mean),
    each run weighing the same; the runs must share dataset, classes and grid. Results go
    to the first run's test/<settings>-ensemble_<n>runs_<hash>/, with each run's metrics
    alone in summary.json ("runs").

    Examples:
      imgx test --runs runs/f0,runs/f1,runs/f2,runs/f3,runs/f4    # cross-validation folds
      imgx test --run runs/<diffusion> --ensemble-with runs/<seg>  # MELBA's ensemble

    Args:
      run: the run directory (made by `imgx train`).
      sampler: diffusion sampler, ddpm, ddim or dpm_solver_2m; default: the run's.
      num_steps: diffusion sampling steps; default: the run's (5).
      checkpoint: best, last or a step number.
      num_samples: samples per case (diffusion); their mean probability gives the label.
      seed: random seed of the sampler.
      overwrite: replace earlier results of the same settings (refused without it).
      device: auto, cpu, gpu or tpu.
      runs: the runs of an ensemble, comma-separated (instead of --run).
      ensemble_with: runs to ensemble with --run, comma-separated.
    """
    _evaluate(
        "test",
        run,
        sampler,
        num_steps,
        checkpoint,
        num_samples,
        seed,
        overwrite,
        device,
        runs,
        ensemble_with,
    )


def predict(
    run: str = LATEST_RUN,
    input: str | None = None,  # so that -i works
    output: str | None = None,
    sampler: str | None = None,
    num_steps: int | None = None,
    checkpoint: str = "best",
    num_samples: int = 1,
    save_probabilities: bool = False,
    seed: int = 0,
    device: str = "auto",
    runs: str | None = None,
    ensemble_with: str | None = None,
    model: str | None = None,
) -> None:
    """Segment new scans with a trained run; writes <case>.nii.gz in each input's geometry.

    Ensembles (--runs, --ensemble-with) average the runs' class probabilities, each run
    weighing the same, and also write the _entropy and _variance maps.

    Examples:
      imgx predict --run runs/latest -i scans/ -o preds/ --num-samples 5
      imgx predict --runs runs/f0,runs/f1,runs/f2,runs/f3,runs/f4 -i scans/ -o preds/
      imgx predict --run runs/<diffusion> --ensemble-with runs/<seg> -i scans/ -o preds/
      imgx predict --model model.zip -i scans/ -o preds/

    Args:
      run: the run directory (made by `imgx train`).
      input: a NIfTI file or a folder of them (channels as _0000, _0001 ...; 2D: also PNG).
      output: the folder for the predictions; never the inputs' folder (refused).
      sampler: diffusion sampler, ddpm, ddim or dpm_solver_2m; default: the run's.
      num_steps: diffusion sampling steps; default: the run's (5).
      checkpoint: best, last or a step number.
      num_samples: samples per case (diffusion); >1 also writes _entropy and _variance maps.
      save_probabilities: also write <case>_probabilities.nii.gz (classes last).
      seed: random seed of the sampler.
      device: auto, cpu, gpu or tpu.
      runs: the runs of an ensemble, comma-separated (instead of --run).
      ensemble_with: runs to ensemble with --run, comma-separated.
      model: a model file made by `imgx export` instead of --run (needs no data dir).
    """
    if input is None or output is None:
        raise UsageError("predict needs -i/--input (a file or folder) and -o/--output (a folder)")
    inputs = _path(input)
    if not inputs.exists():
        raise UsageError(f"-i/--input: {inputs} does not exist")
    if model is not None and run != LATEST_RUN:
        raise UsageError("predict takes --run (a run folder) or --model (a model file), not both")
    if model is not None and not _path(model).is_file():
        raise UsageError(f"--model: no model file at {model} (made by `imgx export`)")
    select_device(device)
    if model is not None:
        if runs is not None or ensemble_with is not None:
            raise UsageError(
                "--model predicts with one exported model: drop --runs/--ensemble-with"
            )
        run_dir, others = _path(model), []
    else:
        run_dir, *others = _ensemble(run, runs, ensemble_with)
    import imgx_train

    result = imgx_train.predict(
        run_dir,
        inputs,
        _path(output),
        **({"ensemble_with": others} if others else {}),
        sampler=_sampler(sampler),
        num_steps=_positive_int(num_steps, "--num-steps"),
        checkpoint=_checkpoint(checkpoint),
        num_samples=_positive_int(num_samples, "--num-samples"),
        save_probabilities=bool(save_probabilities),
        seed=_int(seed, "--seed"),
    )
    written, failures = result["written"], result["failures"]
    _echo(f"wrote {len(written)} files to {output}")
    for path, message in failures:
        # messages from imgx-data usually start with the file already
        text = message if str(message).startswith(str(path)) else f"{path}: {message}"
        print(f"imgx: failed: {text}", file=sys.stderr)
    if failures:
        raise CommandExit(1, f"{len(failures)} input(s) failed; the others were written")


def export(
    run: str = LATEST_RUN,
    output: str | None = None,
    checkpoint: str = "best",
    sampler: str | None = None,
    num_steps: int | None = None,
    overwrite: bool = False,
    device: str = "auto",
) -> None:
    """Write one model file of a run: config, preprocessing, checkpoint, StableHLO function.

    `imgx predict --model FILE` predicts from it on a machine without the run or the data.

    Example:
      imgx export --run runs/latest -o model.zip

    Args:
      run: the run directory (made by `imgx train`).
      output: the model file to write (a .zip); an existing one only with --overwrite.
      checkpoint: best, last or a step number.
      sampler: diffusion sampler of the exported StableHLO function; default: the run's.
      num_steps: its diffusion sampling steps; default: the run's.
      overwrite: replace an existing output file.
      device: auto, cpu, gpu or tpu.
    """
    if output is None:
        raise UsageError("export needs -o/--output, the model file to write (e.g. model.zip)")
    select_device(device)
    run_dir = _run_dir(run)
    import imgx_train

    result = imgx_train.export_run(
        run_dir,
        _path(output),
        checkpoint=_checkpoint(checkpoint),
        sampler=_sampler(sampler),
        num_steps=_positive_int(num_steps, "--num-steps"),
        overwrite=bool(overwrite),
    )
    _echo(f"wrote {result['output']} (checkpoint {result['step']})")


export.SHORT_FLAGS = {"o": "output"}  # type: ignore[attr-defined]  # -o, not --overwrite


def build(
    dataset: str,
    manual_dir: str | None = None,
    data_dir: str | None = None,
    name: str | None = None,
    spacing: str | None = None,
    shape: str | None = None,
    overwrite: bool = False,
) -> None:
    """Build a dataset from the files you downloaded (phantom data: from nothing).

    Built with the same parameters already: kept as it is. Built with other ones: an
    error naming them, unless --overwrite. A folder imgx did not write is never replaced.

    Examples:
      imgx build amos_ct --manual-dir ~/downloads          # holds amos22/
      imgx build nifti_folder --manual-dir ~/Dataset001_Liver --name liver --spacing 1,1,3

    Args:
      dataset: the dataset (`imgx datasets` lists them), or nifti_folder for your own data.
      manual_dir: the folder you extracted the download into (or the nnU-Net-style folder).
      data_dir: dataset store; default $IMGX_DATA_DIR, $TFDS_DATA_DIR or ~/tensorflow_datasets.
      name: nifti_folder only: the name to train with (imgx train --data NAME).
      spacing: target voxel spacing in mm per axis (x,y[,z]), e.g. 1,1,3; default: the dataset's.
      shape: target shape in voxels per axis, e.g. 128,128,32; default: the dataset's.
      overwrite: rebuild an existing build of this name, whatever its parameters.
    """
    dataset = str(dataset)
    if dataset == "nifti_folder" and (name is None or manual_dir is None):
        raise UsageError(
            "imgx build nifti_folder needs --manual-dir DIR (with dataset.json, imagesTr/, "
            "labelsTr/) and --name NAME (then: imgx train --data NAME)"
        )
    if dataset != "nifti_folder" and name is not None:
        raise UsageError("--name is for nifti_folder builds; published datasets keep their name")
    # imgx_data.build: `name`, `spacing`, `shape` for nifti_folder; `target_spacing`,
    # `target_shape` for the other builders.
    prefix = "" if dataset == "nifti_folder" else "target_"
    options: dict[str, Any] = {}
    if name is not None:
        options["name"] = str(name)
    if spacing is not None:
        options[prefix + "spacing"] = _numbers(spacing, float, "--spacing")
    if shape is not None:
        options[prefix + "shape"] = _numbers(shape, int, "--shape")
    import imgx_data

    where = {"manual_dir": _path(manual_dir), "data_dir": _path(data_dir)}
    kept = None if overwrite else imgx_data.existing_build(dataset, **where, **options)
    if kept is not None:
        _echo(
            f"already built {kept.name} ({_sizes(kept.split_sizes)} cases) in {kept.path} "
            "with these parameters; kept as it is (--overwrite rebuilds it)",
            f"train with: imgx train --data {kept.name}",
        )
        return
    built = imgx_data.build(dataset, **where, overwrite=bool(overwrite), **options)
    _echo(f"built {built.name} ({_sizes(built.split_sizes)} cases) in {built.path}")
    dropped = _window_drop_line(built, _path(data_dir))
    if dropped:
        _echo(dropped)
    plan = imgx_data.dataset_plan(built.name, data_dir=_path(data_dir))
    if plan is not None:
        _echo(*_plan_lines(built.name, plan))
    _echo(f"train with: imgx train --data {built.name}")


def _window_drop_line(built: Any, data_dir: Path | None) -> str | None:
    """One line when the training windows of the train and valid cases (valid cases train
    in cross-validation folds) drop foreground, else None."""
    import imgx_data

    total = {"num_cases": 0, "cases_dropping_foreground": 0, "voxels": 0, "by_case": {}}
    for split in ("train", "valid"):
        if built.split_sizes.get(split):
            drops = imgx_data.window_drops(built.name, split, data_dir=data_dir)
            if drops is None:
                return None
            total["num_cases"] += drops["num_cases"]
            total["by_case"].update(drops["by_case"])
    if not total["by_case"]:
        return None
    total["cases_dropping_foreground"] = len(total["by_case"])
    total["voxels"] = sum(total["by_case"].values())
    described = imgx_data.describe_window_drops(total, built.image_shape, "train/valid")
    return f"warning: {described}; a larger --shape keeps them"


def _plan_lines(name: str, plan: Any) -> list[str]:
    """The training plan of a dataset, for `imgx plan`, `imgx build` and `imgx info`."""
    patch = "whole images" if plan.patch_shape is None else "x".join(map(str, plan.patch_shape))
    return [
        f"plan ({plan.device}, {plan.memory_gb:.3g} GB budget; `imgx plan {name}` remakes it):",
        *printing.key_values(
            {
                "spacing_mm": plan.spacing,
                "median_shape": plan.median_shape,
                "stored_shape": plan.stored_shape,
                "patch_shape": patch,
                "batch_size": plan.batch_size,
                "levels": len(plan.num_channels),
                "channels": plan.num_channels,
                "res_blocks": plan.num_res_blocks,
                "first_downsampling": plan.first_downsampling,
                "memory_estimate_gb": round(plan.memory_estimate_gb, 3),
            }
        ),
    ]


def plan(
    dataset: str,
    memory_gb: float | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    refingerprint: bool = False,
) -> None:
    """Fingerprint a nifti_folder build and plan its training; writes <build>/plan.json.

    `imgx build nifti_folder` plans on its own; rerun this on the training machine, or for
    another budget. `imgx train --data NAME` uses the plan unless flags override it.

    Examples:
      imgx plan liver                       # the device JAX finds, its default budget
      imgx plan liver --device gpu --memory-gb 24

    Args:
      dataset: the name given to `imgx build nifti_folder --name`.
      memory_gb: activation memory budget in GB; default: 75 % of the accelerator's
        memory, 25 % of the host's on CPU.
      device: cpu, gpu or tpu (the network width follows it); default: the device JAX finds.
      data_dir: dataset store; default $IMGX_DATA_DIR, $TFDS_DATA_DIR or ~/tensorflow_datasets.
      refingerprint: read the raw cases again instead of the fingerprint in plan.json.
    """
    if memory_gb is not None and (
        isinstance(memory_gb, bool) or not isinstance(memory_gb, int | float) or memory_gb <= 0
    ):
        raise UsageError(f"--memory-gb takes a positive number, got {memory_gb!r}")
    if device is not None and device not in DEVICES[1:]:
        raise UsageError(f"--device takes {', '.join(DEVICES[1:])}, got {device!r}")
    import imgx_data

    fingerprint, made = imgx_data.plan(
        str(dataset),
        _path(data_dir),
        memory_gb=None if memory_gb is None else float(memory_gb),
        device=device,
        refingerprint=bool(refingerprint),
    )
    _echo(
        f"fingerprint of {dataset}: {len(fingerprint.shapes)} cases, "
        f"{len(fingerprint.channel_names)} channel(s), classes "
        + ", ".join(
            f"{n} {100 * f:.2g} %"
            for n, f in zip(fingerprint.class_names, fingerprint.class_frequency, strict=True)
        ),
        *_plan_lines(str(dataset), made),
        f"train with: imgx train --data {dataset}",
    )


def _sizes(split_sizes: dict[str, int]) -> str:
    return " / ".join(f"{split_sizes.get(split, 0)} {split}" for split in SPLITS)


def datasets(data_dir: str | None = None) -> None:
    """List the datasets, whether they are built, and their sizes.

    Args:
      data_dir: dataset store; default $IMGX_DATA_DIR, $TFDS_DATA_DIR or ~/tensorflow_datasets.
    """
    import imgx_data

    rows = [
        {
            "name": d.name,
            "dims": f"{d.num_spatial_dims}D",
            "shape": d.image_shape,
            "spacing_mm": d.spacing,
            "channels": d.num_channels,
            "classes": d.num_classes,
            "built": d.is_built,
            "train/valid/test": "/".join(str(d.split_sizes.get(s, 0)) for s in SPLITS)
            if d.is_built
            else None,
        }
        for d in imgx_data.list_datasets(data_dir=_path(data_dir))
    ]
    _echo(printing.table(rows), "classes include the background; build one with imgx build")


def info(run: str = LATEST_RUN) -> None:
    """Show a run: its config (changes from the defaults), checkpoints, best metric.

    Args:
      run: the run directory (made by `imgx train`).
    """
    run_dir = _run_dir(run)
    import imgx_data
    import imgx_train
    from imgx_train import config as config_lib

    description = dict(imgx_train.describe_run(run_dir))
    cfg = description.pop("config", None)
    description.pop("run_dir", None)
    _echo(f"run: {run_dir}", *printing.key_values(description))
    if cfg is not None:
        _echo("config (changes from the defaults):")
        _echo(*(printing.config_changes(cfg, config_lib.Config()) or ["  (none)"]))
    data = (cfg or {}).get("data", {})
    if data.get("name"):
        found = imgx_data.dataset_plan(data["name"], data_dir=data.get("data_dir"))
        if found is not None:
            _echo(*_plan_lines(data["name"], found))


def compare(
    *runs: str,
    output: str = "compare",
    split: str = "test",
    results: str | None = None,
    replace: bool = False,
) -> None:
    """Compare evaluated runs: one table, compare.csv, Wilcoxon tests, Dice per sampling step.

    Prints Dice, HD95 and NSD per class (mean ± std over the cases) with each evaluation's
    sampler and steps, the mean ± std over folds of a cross-validation, and two-sided
    Wilcoxon signed-rank p-values of each pair of runs on their shared cases (by uid).
    Writes compare.csv, wilcoxon.csv and dice_per_step.png into the output folder.

    Examples:
      imgx compare runs/seg runs/diffusion runs/recycling
      imgx compare runs/a runs/b --results step_100-ddim_10steps-1sample-seed0 -o cmp/
      imgx compare runs/a/test/step_100-ddpm_5steps-1sample-seed0 runs/b/test/step_90

    Args:
      runs: run directories (their newest results of the split) or results folders.
      output: the folder for the files (-o); earlier files there are kept unless --replace.
      split: test or valid: the results looked for in run directories.
      results: the results folder to take in every run, e.g. step_100-ddpm_5steps-1sample-seed0.
      replace: replace the files of an earlier comparison in the output folder.
    """
    if not runs:
        raise UsageError(
            "imgx compare needs run directories or results folders: imgx compare runs/a runs/b"
        )
    if split not in ("valid", "test"):
        raise UsageError(f"--split takes valid or test, got {split!r}")
    import imgx_train

    comparison = imgx_train.compare_runs(
        [_path(run) for run in runs],
        _path(output),
        split=split,
        results=None if results is None else str(results),
        overwrite=bool(replace),
    )
    _echo(imgx_train.compare.format_comparison(comparison))


def version() -> None:
    """Print the versions of the imgx packages."""
    from importlib import metadata

    names = ("imgx-cli", "imgx-train", "imgx-data", "imgx-nets", "imgx-diffusion")
    for name in names:
        try:
            _echo(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            _echo(f"{name} (not installed)")


COMMANDS = {
    "train": train,
    "valid": valid,
    "test": test,
    "predict": predict,
    "export": export,
    "build": build,
    "plan": plan,
    "datasets": datasets,
    "info": info,
    "compare": compare,
    "version": version,
}
