"""`--help` of every command: on stdout, exit 0, options with their defaults, no pager."""

import subprocess
import sys

import pytest

from imgx_cli.commands import COMMANDS

OPTIONS = {
    "train": ["--data", "--task", "--strategy", "--steps", "--batch-size", "--seed",
              "--run-dir", "--resume", "--wandb", "--preset", "--set", "--test", "--device"],
    "valid": ["--run", "--sampler", "--num-steps", "--checkpoint", "--num-samples", "--seed",
              "--overwrite"],
    "test": ["--run", "--sampler", "--num-steps", "--checkpoint", "--num-samples", "--seed",
             "--overwrite"],
    "predict": ["--run", "-i, --input", "-o, --output", "--sampler", "--num-steps",
                "--checkpoint", "--num-samples", "--save-probabilities", "--seed", "--model"],
    "export": ["--run", "--output", "--checkpoint", "--sampler", "--num-steps", "--overwrite"],
    "build": ["DATASET", "--manual-dir", "--data-dir", "--name", "--spacing", "--shape",
              "--overwrite"],
    "plan": ["DATASET", "--memory-gb", "--device", "--data-dir", "--refingerprint"],
    "datasets": ["--data-dir"],
    "info": ["--run"],
    "compare": ["[RUNS]...", "-o, --output", "-s, --split", "--results", "--replace"],
    "version": [],
}  # fmt: skip
DEFAULTS = {
    "train": ["Default: 'phantom'", "Default: True", "Default: 'auto'"],
    "test": [
        "Default: 'runs/latest'",
        "Default: 'best'",
        "Default: 1",
        "Default: 0",
        "Default: False",
    ],
    "predict": ["Default: False"],
}


def test_every_command_is_covered():
    assert set(OPTIONS) == set(COMMANDS)


@pytest.mark.parametrize("command", list(OPTIONS))
def test_command_help_lists_options_and_defaults(imgx, command):
    code, out, err = imgx(command, "--help")
    assert (code, err) == (0, "")
    assert f"imgx {command}" in out
    for option in OPTIONS[command] + DEFAULTS.get(command, []):
        assert option in out, option
    flags = [word.partition("=")[0] for word in out.split() if word.startswith("--")]
    assert not [flag for flag in flags if "_" in flag]  # --batch-size, not --batch_size


@pytest.mark.parametrize("words", [[], ["--help"], ["-h"]])
def test_top_level_help_lists_commands(imgx, words):
    code, out, err = imgx(*words)
    assert (code, err) == (0, "")
    for command in COMMANDS:
        assert f"\n     {command}\n" in out


def test_help_flag_anywhere_shows_help_and_runs_nothing(api, imgx):
    code, out, _ = imgx("train", "--steps", "3", "-h")
    assert code == 0
    assert "--batch-size" in out
    assert api.calls == []


def test_version(imgx):
    code, out, _ = imgx("--version")
    assert code == 0
    assert "imgx-cli 0.1.0" in out


def test_help_does_not_import_jax():
    """`imgx train --help` answers without waiting for JAX (a fresh interpreter)."""
    code = (
        "import sys; from imgx_cli.main import main; rc = main(['train', '--help']); "
        "assert rc == 0, rc; assert 'jax' not in sys.modules, 'jax imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--batch-size" in result.stdout
