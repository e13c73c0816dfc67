"""imgx_train: training, evaluation and prediction for imgx segmentation models.

Public API::

    train(cfg, run_dir=None) -> Path          resume(run_dir, steps=None) -> Path
    evaluate(run_dir, split="test", ...) -> summary dict
    predict(run_dir, inputs, output_dir, ...) -> {"written": [...], "failures": [...]}
    export_run(run_dir, output, ...) -> {"output", "step", "files"}   (model.zip)
    describe_run(run_dir) -> dict             make_config(data, task, preset, overrides)
    compare_runs([run_dir, ...], output_dir="compare") -> Comparison (compare.format_comparison)
"""

from imgx_train import compare, config, metrics, presets, reports
from imgx_train.compare import compare_runs
from imgx_train.config import Config, ConfigError
from imgx_train.evaluation import describe_run, evaluate
from imgx_train.export import export_run
from imgx_train.predict import predict
from imgx_train.presets import make_config
from imgx_train.runs import RunError
from imgx_train.trainer import TrainingInterrupted, resume, train

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "RunError",
    "TrainingInterrupted",
    "compare",
    "compare_runs",
    "config",
    "describe_run",
    "evaluate",
    "export_run",
    "make_config",
    "metrics",
    "predict",
    "presets",
    "reports",
    "resume",
    "train",
]
