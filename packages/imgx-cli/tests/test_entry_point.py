"""The `imgx` console script is installed and answers --help."""

import shutil
import subprocess

import pytest


def test_console_script_help():
    exe = shutil.which("imgx")
    if exe is None:
        pytest.fail("the `imgx` console script is not installed: run `uv sync --locked`")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "imgx" in result.stdout + result.stderr
