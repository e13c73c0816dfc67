"""Cross-validation folds of a built dataset, stored as nnU-Net's ``splits_final.json``.

The cases of a build's ``train`` and ``valid`` splits (its development cases; ``test``
stays the held-out test split) are cut into ``k`` folds (5 by default, as nnU-Net: Isensee
et al., Nature Methods 18, 2021): fold ``i`` trains on the cases of the other folds and
validates on those of fold ``i``. The folds are written once, beside the build, in
nnU-Net's format, a list with one ``{"train": [uids], "val": [uids]}`` per fold::

    <data_dir>/<name>/<version>/splits_final.json

A ``splits_final.json`` already there (e.g. one a user copied from nnU-Net) is used as
it is, checked against the build's cases; it is never regenerated over.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgx_data.errors import DatasetError

SPLITS_FINAL = "splits_final.json"
NUM_FOLDS = 5
#: The seed of the permutation, nnU-Net's (``KFold(5, shuffle=True, random_state=12345)``).
FOLD_SEED = 12345
#: The build's splits whose cases the folds divide.
DEVELOPMENT_SPLITS = ("train", "valid")

Folds = list[dict[str, list[str]]]


def kfold_splits(uids: Sequence[str], num_folds: int = NUM_FOLDS, seed: int = FOLD_SEED) -> Folds:
    """Seeded k-fold split of the cases: fold i's ``val`` is part i, ``train`` the others.

    The sorted uids are permuted with ``numpy.random.default_rng(seed)`` and cut into
    ``num_folds`` consecutive parts whose sizes differ by at most one
    (``numpy.array_split``); the parts partition the cases, so every case is validated
    exactly once. Lists are sorted.

    Raises:
        DatasetError: fewer cases than folds, or fewer than 2 folds.
    """
    uids = sorted(uids)
    if num_folds < 2 or len(uids) < num_folds:
        raise DatasetError(
            f"{num_folds} cross-validation folds need at least 2 folds and as many cases; "
            f"the dataset has {len(uids)} train/valid cases (set data.num_folds lower)."
        )
    order = np.random.default_rng(seed).permutation(len(uids))
    parts = [sorted(uids[i] for i in part) for part in np.array_split(order, num_folds)]
    return [
        {"train": sorted(u for j, part in enumerate(parts) if j != i for u in part), "val": val}
        for i, val in enumerate(parts)
    ]


def check_folds(data: Any, path: Path, uids: Sequence[str], num_folds: int) -> Folds:
    """Checks ``splits_final.json`` content against the build's development cases.

    Raises:
        DatasetError: naming ``path``: not a list of ``{"train": [...], "val": [...]}``,
            another number of folds than ``num_folds``, a case the build's train/valid
            splits do not hold, or a case in both lists of a fold.
    """
    shape = 'a list with one {"train": [case, ...], "val": [case, ...]} per fold'
    if not isinstance(data, list) or not all(
        isinstance(f, dict)
        and set(f) == {"train", "val"}
        and all(isinstance(v, list) and all(isinstance(u, str) for u in v) for v in f.values())
        for f in data
    ):
        raise DatasetError(f"{path}: expected nnU-Net's splits_final.json, {shape}.")
    if len(data) != num_folds:
        raise DatasetError(
            f"{path} holds {len(data)} folds, data.num_folds is {num_folds}: set "
            f"data.num_folds={len(data)}, or delete the file to make {num_folds} new folds."
        )
    known = set(uids)
    for i, fold in enumerate(data):
        for part in ("train", "val"):
            unknown = sorted(set(fold[part]) - known)
            if unknown:
                raise DatasetError(
                    f"{path}: fold {i} '{part}' lists {unknown[:3]} that the build's "
                    f"{'/'.join(DEVELOPMENT_SPLITS)} splits do not hold (test cases stay out "
                    "of the folds; a rebuilt dataset needs its splits_final.json deleted)."
                )
        both = sorted(set(fold["train"]) & set(fold["val"]))
        if both:
            raise DatasetError(f"{path}: fold {i} lists {both[:3]} in both 'train' and 'val'.")
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in data]


def load_or_make_folds(folder: Path, uids: Sequence[str], num_folds: int = NUM_FOLDS) -> Folds:
    """The folds in ``folder/splits_final.json``, made with :func:`kfold_splits` if absent.

    The new file is written to a temporary name and renamed into place, so readers never
    see half a file (processes that make it at once write the same content).
    """
    path = folder / SPLITS_FINAL
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DatasetError(f"{path}: unreadable ({error}); fix or delete it.") from None
        return check_folds(data, path, uids, num_folds)
    folds = kfold_splits(uids, num_folds)
    fd, tmp = tempfile.mkstemp(prefix=f".{SPLITS_FINAL}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(folds, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return folds
