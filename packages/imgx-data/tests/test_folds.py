"""Cross-validation folds: the k-fold split's closed form, `splits_final.json` beside the
build (nnU-Net's format), a user's file winning over the generated one, and the fold's
train/valid sources (test unchanged)."""

import json

import pytest

import imgx_data
from imgx_data.errors import DatasetError
from imgx_data.folds import FOLD_SEED, SPLITS_FINAL, kfold_splits

UIDS = [f"case_{i:02d}" for i in range(23)]


def test_kfold_splits_partition_the_cases():
    folds = kfold_splits(UIDS)
    assert len(folds) == 5
    vals = [fold["val"] for fold in folds]
    # The val parts partition the cases: every case validated exactly once.
    assert sorted(u for val in vals for u in val) == UIDS
    assert sorted(len(val) for val in vals) == [4, 4, 5, 5, 5]  # 23 = 3·5 + 2·4
    for fold in folds:
        assert fold["train"] == sorted(set(UIDS) - set(fold["val"]))
        assert fold["val"] == sorted(fold["val"])
    # Seeded and deterministic, independent of the order the cases are given in.
    assert kfold_splits(list(reversed(UIDS))) == folds
    assert kfold_splits(UIDS, seed=FOLD_SEED + 1) != folds
    assert len(kfold_splits(UIDS, num_folds=3)) == 3
    with pytest.raises(DatasetError, match="at least 2 folds and as many cases"):
        kfold_splits(UIDS[:4])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    imgx_data.build("phantom", data_dir=root, split_sizes=(8, 2, 3))
    return root


def _uids(source):
    return [source[i]["uid"] for i in range(len(source))]


def test_fold_sources_and_splits_final_json(data_dir):
    info = imgx_data.dataset_info("phantom", data_dir=data_dir)
    path = info.path / SPLITS_FINAL
    path.unlink(missing_ok=True)
    development = _uids(imgx_data.data_source("phantom", "train", data_dir)) + _uids(
        imgx_data.data_source("phantom", "valid", data_dir)
    )
    test = _uids(imgx_data.data_source("phantom", "test", data_dir))
    vals = []
    for k in range(5):
        train = imgx_data.data_source("phantom", "train", data_dir, fold=k)
        valid = imgx_data.data_source("phantom", "valid", data_dir, fold=k)
        assert train.fold == valid.fold == k
        assert sorted(_uids(train) + _uids(valid)) == sorted(development)
        assert not set(_uids(train)) & set(_uids(valid))
        vals += _uids(valid)
        # The test split stays the test split.
        assert _uids(imgx_data.data_source("phantom", "test", data_dir, fold=k)) == test
    assert sorted(vals) == sorted(development)
    # nnU-Net's format, written beside the build; the examples are the stored ones.
    written = json.loads(path.read_text())
    assert written == kfold_splits(development)
    assert [set(f) for f in written] == [{"train", "val"}] * 5
    valid0 = imgx_data.data_source("phantom", "valid", data_dir, fold=0)
    assert valid0[0]["image"].shape == (*info.image_shape, info.num_channels)
    with pytest.raises(DatasetError, match="folds are numbered 0 to 4"):
        imgx_data.data_source("phantom", "train", data_dir, fold=5)


def test_a_users_splits_final_json_wins(data_dir):
    info = imgx_data.dataset_info("phantom", data_dir=data_dir)
    path = info.path / SPLITS_FINAL
    development = sorted(
        _uids(imgx_data.data_source("phantom", "train", data_dir))
        + _uids(imgx_data.data_source("phantom", "valid", data_dir))
    )
    mine = [{"train": development[:7], "val": development[7:]},
            {"train": development[3:], "val": development[:3]}]  # fmt: skip
    path.write_text(json.dumps(mine))
    try:
        assert imgx_data.cross_validation_folds("phantom", data_dir, num_folds=2) == mine
        valid = imgx_data.data_source("phantom", "valid", data_dir, fold=1, num_folds=2)
        assert _uids(valid) == development[:3]
        assert json.loads(path.read_text()) == mine  # never regenerated over
        with pytest.raises(DatasetError, match="holds 2 folds, data.num_folds is 5"):
            imgx_data.data_source("phantom", "train", data_dir, fold=0)
        test_uid = imgx_data.data_source("phantom", "test", data_dir)[0]["uid"]
        path.write_text(json.dumps([{"train": [test_uid], "val": development}] * 5))
        with pytest.raises(DatasetError, match=f"{SPLITS_FINAL}: fold 0 'train' lists"):
            imgx_data.data_source("phantom", "train", data_dir, fold=0)
        path.write_text(json.dumps({"train": development}))
        with pytest.raises(DatasetError, match="expected nnU-Net's splits_final.json"):
            imgx_data.cross_validation_folds("phantom", data_dir)
    finally:
        path.unlink()
