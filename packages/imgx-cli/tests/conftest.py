"""Test set-up shared by this package's tests: 2 fake CPU devices and the shared JAX
compilation cache, before jax is imported.

`api` replaces the imgx-train / imgx-data functions the commands call with recorders, so
the tests check the command line -> call mapping without training anything.
"""

import os
from pathlib import Path

_FLAG = "--xla_force_host_platform_device_count=2"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole suite, inside the clone (git ignores
# .pytest_cache/), not in ~/.cache: a step compiled by one test module (or an earlier run)
# is loaded by the next. JAX_* for every jit of the tests, IMGX_* for imgx_train runs.
os.environ.setdefault(
    "IMGX_COMPILATION_CACHE_DIR",
    str(Path(__file__).resolve().parents[3] / ".pytest_cache" / "jax-compilation-cache"),
)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["IMGX_COMPILATION_CACHE_DIR"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import dataclasses  # noqa: E402

import pytest  # noqa: E402

import imgx_data  # noqa: E402
import imgx_train  # noqa: E402
from imgx_cli.main import main  # noqa: E402
from imgx_data.registry import DatasetInfo  # noqa: E402


class TrainingInterrupted(Exception):
    """Stands in for imgx_train.TrainingInterrupted(run_dir, step)."""

    def __init__(self, run_dir, step):
        super().__init__(f"interrupted at step {step}")
        self.run_dir = run_dir
        self.step = step


def _stats(mean: float, std: float) -> dict[str, float]:
    return {"mean": mean, "std": std, "median": mean, "count": 2}


SUMMARY = {  # the form of imgx_train.reports.summarize, background first
    "num_cases": 2,
    "foreground_mean": {"dice": 0.85, "hd95": 1.5},
    "per_class": {
        "background": {"dice": _stats(0.99, 0.0), "hd95": _stats(0.5, 0.0)},
        "muscle": {"dice": _stats(0.9, 0.01), "hd95": _stats(1.0, 0.1)},
        "fascia": {"dice": _stats(0.8, 0.02), "hd95": _stats(2.0, 0.2)},
    },
}


RESULTS = "step_4-ddpm_5steps-1sample-seed0"  # the folder evaluate names by its settings


def dataset_info(name: str, split_sizes: dict[str, int]) -> DatasetInfo:
    """The phantom's real (unbuilt) description, renamed and sized."""
    phantom = imgx_data.dataset_info("phantom", data_dir=Path("no-data-dir"))
    return dataclasses.replace(
        phantom,
        name=name,
        split_sizes=split_sizes,
        is_built=bool(split_sizes),
        path=Path("store") / name,
    )


def make_run(path: Path) -> Path:
    """A run directory as `imgx train` leaves it (what the commands look at)."""
    (path / "plots").mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "plots" / "curves.png").write_bytes(b"")
    return path


class Api:
    """Records the calls made to imgx-train and imgx-data."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.calls: list[tuple[str, tuple, dict]] = []
        self.train_error: BaseException | None = None
        self.evaluate_error: BaseException | None = None
        self.results = RESULTS
        self.predict_failures: list[tuple[str, str]] = []
        self.existing: DatasetInfo | None = None  # what existing_build finds
        self.drops: dict[str, dict] = {}  # what window_drops finds, by split

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def call(self, name: str) -> tuple[tuple, dict]:
        matches = [(args, kwargs) for n, args, kwargs in self.calls if n == name]
        assert len(matches) == 1, (name, self.calls)
        return matches[0]

    def train(self, cfg, *, run_dir=None):
        self.calls.append(("train", (cfg,), {"run_dir": run_dir}))
        if self.train_error is not None:
            raise self.train_error
        return make_run(run_dir or self.tmp_path / "runs" / "new")

    def resume(self, run_dir, *, steps=None):
        self.calls.append(("resume", (run_dir,), {"steps": steps}))
        if self.train_error is not None:
            raise self.train_error
        return run_dir

    def evaluate(self, run_dir, **kwargs):
        self.calls.append(("evaluate", (run_dir,), kwargs))
        if self.evaluate_error is not None:
            raise self.evaluate_error
        folder = run_dir / kwargs["split"] / RESULTS
        summary = {**SUMMARY, "output_dir": str(folder)}
        others = kwargs.get("ensemble_with", [])
        if others:  # an ensemble: each run's metrics alone, as imgx_train.evaluate gives
            folder = folder.with_name(f"{RESULTS}-ensemble_{1 + len(others)}runs_0123abcd")
            summary["output_dir"] = str(folder)
            summary["runs"] = [
                {"run_dir": str(run), "task": "seg", "checkpoint": 4, "fold": k,
                 "foreground_mean": {"dice": 0.5 + k / 10, "hd95": 3.0}}
                for k, run in enumerate([run_dir, *others])
            ]  # fmt: skip
        return summary

    def predict(self, run_dir, inputs, output_dir, **kwargs):
        self.calls.append(("predict", (run_dir, inputs, output_dir), kwargs))
        return {"written": [str(output_dir / "case.nii.gz")], "failures": self.predict_failures}

    def describe_run(self, run_dir):
        self.calls.append(("describe_run", (run_dir,), {}))
        return {
            "run_dir": str(run_dir),
            "data": "phantom",
            "checkpoints": [4, 7],
            "best": {"step": 4, "dice": 0.91},
            "config": {"train": {"steps": 7}},
        }

    def build(self, dataset, /, **kwargs):
        self.calls.append(("build", (dataset,), kwargs))
        return dataset_info(kwargs.get("name", dataset), {"train": 8, "valid": 1, "test": 1})

    def existing_build(self, dataset, /, **kwargs):
        self.calls.append(("existing_build", (dataset,), kwargs))
        return self.existing

    def window_drops(self, name, split="train", data_dir=None, **kwargs):
        return self.drops.get(split, {"num_cases": 1, "by_case": {}})

    def list_datasets(self, data_dir=None):
        self.calls.append(("list_datasets", (), {"data_dir": data_dir}))
        return [dataset_info("phantom", {"train": 240, "valid": 24, "test": 48}),
                dataset_info("amos_ct", {})]  # fmt: skip


@pytest.fixture
def api(monkeypatch, tmp_path):
    fake = Api(tmp_path)
    for name in ("train", "resume", "evaluate", "predict", "describe_run"):
        monkeypatch.setattr(imgx_train, name, getattr(fake, name), raising=False)
    monkeypatch.setattr(imgx_train, "TrainingInterrupted", TrainingInterrupted, raising=False)
    for name in ("build", "existing_build", "list_datasets", "window_drops"):
        monkeypatch.setattr(imgx_data, name, getattr(fake, name), raising=False)
    monkeypatch.chdir(tmp_path)
    return fake


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path / "runs" / "20260101-000000-phantom-diffusion")


@pytest.fixture
def imgx(capsys):
    """Runs `imgx` in-process: returns (exit code, stdout, stderr)."""

    def run(*words: str):
        code = main(list(words))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith("imgx: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def one_line_error():
    """Asserts exit code 2 and a single `imgx: error:` line holding the fragments."""
    return _assert_one_line_error
