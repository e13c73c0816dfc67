"""imgx-diffusion installs alone from its wheel, with jax, chex and numpy only."""

import pathlib
import re
import shutil
import subprocess
import zipfile

import pytest

ALLOWED = {"jax", "chex", "numpy"}


def _workspace_root() -> pathlib.Path:
    for parent in pathlib.Path(__file__).resolve().parents:
        if (parent / "uv.lock").exists():
            return parent
    raise RuntimeError("no uv.lock above the test file: run from the imgx workspace.")


def _run(*args, cwd=None):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    if shutil.which("uv") is None:
        pytest.skip("uv is not on PATH; it builds the wheel and the fresh venv.")
    _run(
        "uv",
        "build",
        "--package",
        "imgx-diffusion",
        "--wheel",
        "-o",
        tmp_path,
        cwd=_workspace_root(),
    )
    (wheel,) = tmp_path.glob("imgx_diffusion-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        (metadata_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
        assert any(n.endswith("imgx_diffusion/py.typed") for n in archive.namelist())
    requires = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.\-]+)", metadata, flags=re.MULTILINE)
    assert requires and set(requires) <= ALLOWED, f"unexpected dependencies {requires}"

    venv = tmp_path / "venv"
    _run("uv", "venv", venv, "--python", "3.11")
    python = venv / "bin" / "python"
    _run("uv", "pip", "install", "--python", python, wheel)
    script = (
        "import jax.numpy as jnp, imgx_diffusion as idf\n"
        "d = idf.GaussianDiffusion.from_betas(idf.beta_schedule('linear', 11)).respace(3)\n"
        "x0 = jnp.ones((1, 2, 2, 2))\n"
        "xt = d.q_sample(x0, jnp.zeros_like(x0), jnp.array([2]))\n"
        "print(float(xt[0, 0, 0, 0]) ** 2, float(d.alphas_cumprod[-1]))\n"
    )
    out = _run(python, "-c", script).split()
    assert float(out[0]) == pytest.approx(float(out[1]), rel=1e-5)  # (√ᾱ·1)² = ᾱ
