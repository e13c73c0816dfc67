"""Every workspace package builds a wheel whose metadata keeps to the allowed dependency edges.

The edges are those of `shared/spec/overview.md`: a dependency outside a package's set is a
design bug, caught here from the built metadata rather than from the source.
"""

import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ALLOWED = {
    "imgx-diffusion": {"jax", "chex", "numpy"},
    "imgx-nets": {"jax", "flax", "chex"},
    "imgx-data": {
        "jax", "chex", "numpy", "scipy", "tensorflow-datasets", "array-record", "grain",
        "simpleitk", "scikit-image", "etils",
    },
    "imgx-train": {
        "imgx-diffusion", "imgx-nets", "imgx-data", "jax", "flax", "chex", "optax",
        "orbax-checkpoint", "wandb", "scipy", "matplotlib", "tqdm", "numpy",
        "flatbuffers",  # a small utility (spec): jax.export's serializer, for imgx export
    },
    "imgx-cli": {"imgx-train", "imgx-data", "fire"},
}  # fmt: skip
FORBIDDEN = {"tensorflow", "torch", "tf-nightly", "tensorflow-cpu"}


def _requirements(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(name).decode()
    reqs = set()
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            spec = line.split(":", 1)[1].strip()
            reqs.add(re.split(r"[\s\[<>=!~;(]", spec, maxsplit=1)[0].lower().replace("_", "-"))
    return reqs


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    if shutil.which("uv") is None:
        pytest.fail("uv is not on PATH: install it with `pip install uv`")
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        ["uv", "build", "--all-packages", "--wheel", "-o", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    found = {}
    for wheel in out.glob("*.whl"):
        found[wheel.name.split("-")[0].replace("_", "-")] = wheel
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_wheel_builds_with_allowed_dependencies(wheels, package):
    assert package in wheels, f"no wheel built for {package}: {sorted(wheels)}"
    reqs = _requirements(wheels[package])
    assert reqs <= ALLOWED[package], f"{package} requires {sorted(reqs - ALLOWED[package])}"
    assert not reqs & FORBIDDEN


def test_imgx_packages_use_compatible_release_bounds(wheels):
    for package, wheel in wheels.items():
        with zipfile.ZipFile(wheel) as zf:
            name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = zf.read(name).decode()
        for line in metadata.splitlines():
            if line.startswith("Requires-Dist: imgx"):
                assert "<0.2" in line and ">=0.1" in line, f"{package}: {line}"


def _dockerfile(kind: str) -> dict[str, list[str]]:
    """The instructions of docker/Dockerfile.<kind>: {"ENV": [...], "WORKDIR": [...], ...}."""
    text = (ROOT / "docker" / f"Dockerfile.{kind}").read_text()
    logical = re.sub(r"\\\n\s*", " ", text)  # join continued lines
    out: dict[str, list[str]] = {}
    for line in logical.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, args = line.strip().partition(" ")
            out.setdefault(instruction.upper(), []).append(args.strip())
    return out


@pytest.mark.parametrize("kind", ["gpu", "tpu"])
def test_docker_image_layout_is_consistent(kind):
    """Checked by reading (no Docker engine here): the paths the README uses exist."""
    image = _dockerfile(kind)
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(image["ENV"])))
    # The default run root `runs/` (relative to the last WORKDIR) is the /runs volume, so
    # `imgx test --run /runs/latest` and the default `--run runs/latest` name one folder.
    assert image["WORKDIR"][-1] == "/"
    assert '"/runs"' in image["VOLUME"][-1] and '"/data"' in image["VOLUME"][-1]
    assert env["IMGX_DATA_DIR"] == "/data"
    readme = (ROOT / "docker" / "README.md").read_text()
    for run in re.findall(r"--run (\S+)", readme):
        assert run.startswith("/runs/"), run
    # HOME and the caches are writable by any uid (`--user $(id -u)`).
    for name in ("HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
        assert env[name].startswith(env["HOME"]), name
    assert any(f"chmod -R 1777 {env['HOME']}" in run for run in image["RUN"])
    assert any(env["MPLCONFIGDIR"] in run and "mkdir -p" in run for run in image["RUN"])
    assert env["IMGX_COMPILATION_CACHE_DIR"].startswith("/runs/")
    # The extra it installs is the root's, from the lock.
    sync = next(run for run in image["RUN"] if "uv sync" in run)
    assert "--locked" in sync and f"--extra {'cuda' if kind == 'gpu' else 'tpu'}" in sync
    assert f"\n{'cuda' if kind == 'gpu' else 'tpu'} = " in (ROOT / "pyproject.toml").read_text()
    for copied in image["COPY"]:
        for path in copied.split()[:-1]:
            assert (ROOT / path).exists(), path
    if kind == "gpu":
        assert image["USER"] == ["imgx"]
