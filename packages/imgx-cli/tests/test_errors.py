"""User errors: one `imgx: error:` line on stderr, exit code 2, no traceback."""

import fire
import pytest

import imgx_data.errors
import imgx_data.registry
import imgx_train
from imgx_cli import argv as argv_lib
from imgx_cli import commands
from imgx_cli import main as main_lib
from imgx_train.checkpoint import CheckpointError


@pytest.mark.parametrize(
    ("words", "fragments"),
    [
        (["trian"], ["unknown command 'trian'", "did you mean train?"]),
        (["--steps", "3"], ["the command comes first", "train, valid"]),
        (["train", "--stpes", "10"], ["unknown option --stpes", "did you mean --steps?"]),
        (["train", "--steps"], ["--steps needs a value"]),
        (["train", "amos_ct"], ["unexpected argument 'amos_ct'"]),
        (["train", "--test", "maybe"], ["unexpected argument 'maybe'"]),
        (["train", "--test=maybe"], ["--test takes true or false"]),
        (["train", "--steps", "1", "--steps", "2"], ["--steps is given twice"]),
        (["train", "--set", "a=1", "--set", "b=2"], ['one: --set "a.b=1,c.d=2"']),
        (["test", "-s", "1"], ["-s is ambiguous", "--sampler", "--seed"]),
        (["build"], ["`imgx build` needs <dataset>"]),
        (["train", "--steps", "0"], ["--steps takes a whole number of at least 1"]),
        (["train", "--steps", "ten"], ["--steps takes a whole number"]),
        (["train", "--task", "segment"], ["train.task='segment' is not valid", "seg, diffusion"]),
        (["train", "--preset", "fast"], ["unknown preset 'fast'", "debug"]),
        (["train", "--set", "optimizer.lr=1"], ["unknown config key 'optimizer.lr'",
                                                "optimizer.peak_lr"]),
        (["train", "--set", "steps"], ["'steps' is not of the form key=value"]),
        (["train", "--set", "train.task=sge"], ["train.task='sge' is not valid", "seg, diffusion"]),
        (["train", "--set", "train.eval_every=0"], ["train.eval_every=0", "at least 1"]),
        (["train", "--set", "train.keep_checkpoints=0"], ["train.keep_checkpoints=0",
                                                          "at least 1"]),
        (["train", "--set", "optimizer.peak_lr=nan"], ["optimizer.peak_lr=nan",
                                                       "finite number > 0"]),
        (["train", "--steps", "5", "--set", "train.steps=6"], ["train.steps is given twice"]),
        (["train", "--task", "seg", "--strategy", "recycle_next"], ["--strategy applies to"]),
        (["train", "--device", "gpu"], ["--device gpu asked for, but JAX sees no GPU",
                                        "uv sync --extra cuda"]),
        (["train", "--device", "npu"], ["--device takes auto, cpu, gpu, tpu"]),
        (["train", "--resume", "runs/nope"], ["no run directory at runs/nope"]),
        (["test"], ["no run directory at runs/latest", "imgx train"]),
        (["valid", "--run", "runs/x"], ["no run directory at runs/x"]),
        (["info", "--run", "runs/x"], ["no run directory at runs/x"]),
        (["predict", "-i", "scans"], ["-o/--output"]),
        (["predict", "-i", "missing", "-o", "out"], ["-i/--input: missing does not exist"]),
        (["build", "nifti_folder", "--manual-dir", "raw"], ["needs --manual-dir DIR", "--name"]),
        (["build", "amos_ct", "--name", "x"], ["--name is for nifti_folder builds"]),
        (["build", "phantom", "--spacing", "1,a"], ["--spacing takes positive numbers"]),
    ],
)  # fmt: skip
def test_user_errors_are_one_line(api, imgx, one_line_error, words, fragments):
    code, _, err = imgx(*words)
    one_line_error(code, err, *fragments)
    assert api.calls == []


@pytest.mark.parametrize("split", ["test", "valid"])
def test_bad_evaluation_options(api, imgx, one_line_error, run_dir, split):
    for words, fragment in [
        (["--sampler", "euler"], "--sampler takes ddpm, ddim, dpm_solver_2m"),
        (["--checkpoint", "first"], "--checkpoint takes best, last or a step number"),
        (["--num-samples", "0"], "--num-samples takes a whole number of at least 1"),
    ]:
        code, _, err = imgx(split, "--run", str(run_dir), *words)
        one_line_error(code, err, fragment)


def test_dataset_errors_from_the_back_end_are_one_line(api, imgx, one_line_error):
    api.train_error = imgx_data.errors.DatasetError(
        "amos_ct is not built: imgx build amos_ct --manual-dir DIR  # DIR: holds amos22/"
    )
    code, _, err = imgx("train", "--data", "amos_ct")
    one_line_error(code, err, "imgx build amos_ct --manual-dir DIR")


def test_unbuilt_dataset_gives_the_real_build_command(imgx, one_line_error, tmp_path, monkeypatch):
    """Nothing faked: imgx_train.train meets the empty data dir and imgx_data says what to run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMGX_DATA_DIR", str(tmp_path / "data"))
    expected = imgx_data.registry.build_command("amos_ct")
    code, _, err = imgx("train", "--data", "amos_ct", "--preset", "debug", "--set",
                        "logging.wandb=disabled", "--no-test")  # fmt: skip
    one_line_error(code, err, "'amos_ct' is not built", expected)
    assert expected.startswith("imgx build amos_ct --manual-dir DIR")
    assert not (tmp_path / "runs").exists()  # nothing half-made


@pytest.mark.parametrize(
    "error",
    [
        imgx_data.errors.DatasetError("bad raw file a.nii.gz"),
        imgx_train.ConfigError("unknown config key 'x'"),
        imgx_train.RunError("run directory runs/x does not exist"),
        CheckpointError("no checkpoint in runs/x"),
        FileExistsError("runs/x already holds a run"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_back_end_user_errors_are_one_line(api, imgx, one_line_error, error):
    api.train_error = error
    code, _, err = imgx("train")
    one_line_error(code, err, str(error))


def test_multi_line_messages_are_joined(api, imgx, one_line_error):
    api.train_error = imgx_train.RunError("first line\n  second line")
    code, _, err = imgx("train")
    one_line_error(code, err, "first line second line")


def test_imgx_debug_shows_the_traceback(api, imgx, monkeypatch):
    monkeypatch.setenv("IMGX_DEBUG", "1")
    api.train_error = imgx_train.ConfigError("boom")
    with pytest.raises(imgx_train.ConfigError, match="boom"):
        imgx("train")


@pytest.mark.parametrize(
    "error",
    [TypeError("a bug"), ValueError("a bug"), FileNotFoundError("a bug"), KeyError("a bug")],
    ids=lambda e: type(e).__name__,
)
def test_programming_errors_are_not_hidden(api, imgx, error):
    """Only the project's user-error types become one line; a bare ValueError is a bug."""
    api.train_error = error
    with pytest.raises(type(error), match="a bug"):
        imgx("train")


def test_fire_errors_that_pass_the_checks_are_one_line(imgx, one_line_error, monkeypatch):
    """Fire's own usage screen is reduced to one line (here Fire cannot use a flag)."""
    display, display_error = fire.core.Display, fire.core._DisplayError
    monkeypatch.setitem(commands.COMMANDS, "echo", lambda: None)
    monkeypatch.setattr(argv_lib, "normalize", lambda words, _: list(words))
    code, _, err = imgx("echo", "--bogus=1")
    one_line_error(code, err, "Could not consume arg: --bogus=1")
    # Fire's own functions are back in place, not left patched.
    assert fire.core.Display is display
    assert fire.core._DisplayError is display_error
    assert display is not main_lib._display and display_error is not main_lib._display_error
