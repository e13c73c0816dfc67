"""imgx_data: medical image datasets (TFDS array_record builders), I/O and preprocessing.

Public API (re-exported here)::

    data_dir, list_datasets, dataset_info, build, existing_build, ensure_built, data_source,
    cross_validation_folds, postprocess, plan, dataset_plan,
    planning (fingerprint and training plan of a folder),
    DatasetInfo, DataSource, DatasetError, io (read_image, write_image, Geometry, ...),
    restore_to_original, resample_to_geometry, training_window, window_drops,
    describe_window_drops, find_scans,
    prepare_scan, restore_scan_label,
    TrainIterator, eval_batches, AugmentationConfig, augment_batch, augment_sample,
    min_max_rescale, patch_grid, gaussian_weight, sliding_window_inference
"""

from imgx_data import io, planning
from imgx_data.augmentation import (
    AugmentationConfig,
    augment_batch,
    augment_sample,
    min_max_rescale,
)
from imgx_data.errors import DatasetError
from imgx_data.io import Geometry, read_channels, read_image, write_image
from imgx_data.loading import TrainIterator, eval_batches
from imgx_data.patches import gaussian_weight, patch_grid, sliding_window_inference
from imgx_data.preprocess import (
    example_geometry,
    resample_to_geometry,
    restore_probabilities,
    restore_to_original,
    training_window,
)
from imgx_data.registry import (
    DatasetInfo,
    DataSource,
    build,
    cross_validation_folds,
    data_dir,
    data_source,
    dataset_info,
    dataset_plan,
    describe_window_drops,
    ensure_built,
    existing_build,
    list_datasets,
    plan,
    postprocess,
    window_drops,
)
from imgx_data.scans import PreparedScan, find_scans, prepare_scan, restore_scan_label

__version__ = "0.1.0"

__all__ = [
    "DataSource",
    "DatasetError",
    "DatasetInfo",
    "Geometry",
    "PreparedScan",
    "build",
    "cross_validation_folds",
    "data_dir",
    "data_source",
    "dataset_info",
    "dataset_plan",
    "describe_window_drops",
    "ensure_built",
    "example_geometry",
    "existing_build",
    "find_scans",
    "io",
    "list_datasets",
    "plan",
    "planning",
    "postprocess",
    "prepare_scan",
    "read_channels",
    "read_image",
    "resample_to_geometry",
    "restore_scan_label",
    "restore_probabilities",
    "restore_to_original",
    "training_window",
    "window_drops",
    "write_image",
]
__all__ += [
    "AugmentationConfig",
    "TrainIterator",
    "augment_batch",
    "augment_sample",
    "eval_batches",
    "gaussian_weight",
    "min_max_rescale",
    "patch_grid",
    "sliding_window_inference",
]
