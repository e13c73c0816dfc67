"""Tests of training and evaluation batches over an in-memory random-access source."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from imgx_data.loading import TrainIterator, eval_batches


def _source(num_samples: int, shape=(4, 3)) -> list[dict]:
    """Sample i has image value i everywhere and label i % 3; uids as TFDS bytes."""
    return [
        {
            "uid": f"case_{i:02d}".encode(),
            "image": np.full((*shape, 1), i, np.float32),
            "label": np.full(shape, i % 3, np.uint8),
            "spacing": np.arange(1, len(shape) + 1, dtype=np.float32) * (i + 1),
            "origin": np.zeros(len(shape), np.float32),
        }
        for i in range(num_samples)
    ]


def _ids(batch) -> list[int]:
    return [int(uid.split("_")[1]) for uid in batch["uid"]]


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_batch_follows_the_contract():
    it = TrainIterator(_source(6), global_batch_size=4, seed=0)
    batch = next(it)
    assert set(batch) == {"uid", "image", "label", "valid", "spacing"}
    assert batch["image"].shape == (4, 4, 3, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4, 4, 3) and batch["label"].dtype == np.int32
    assert batch["spacing"].shape == (4, 2) and batch["spacing"].dtype == np.float32
    assert batch["valid"].dtype == bool and bool(batch["valid"].all())
    assert isinstance(batch["image"], jax.Array)
    assert batch["uid"].dtype.kind == "U"
    # rows belong together: image value i, label i % 3, spacing (1, 2)·(i + 1).
    ids = np.array(_ids(batch))
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], ids)
    np.testing.assert_array_equal(batch["label"][:, 0, 0], ids % 3)
    np.testing.assert_array_equal(batch["spacing"], np.outer(ids + 1, [1.0, 2.0]))


def test_each_epoch_is_a_fresh_permutation_and_remainder_is_dropped():
    it = TrainIterator(_source(10), global_batch_size=4, seed=1)
    assert it.steps_per_epoch == 2
    epochs = [sum((_ids(next(it)) for _ in range(2)), []) for _ in range(3)]
    for epoch in epochs:
        assert len(set(epoch)) == 8  # 8 distinct samples, 2 left out of the 10
    assert epochs[0] != epochs[1]


def test_without_drop_remainder_batches_run_across_epochs():
    it = TrainIterator(_source(5), global_batch_size=2, seed=4, drop_remainder=False)
    ids = sum((_ids(next(it)) for _ in range(5)), [])
    assert sorted(ids[:5]) == list(range(5)) and sorted(ids[5:]) == list(range(5))


def test_order_is_a_function_of_seed():
    def first_ids(seed):
        it = TrainIterator(_source(12), global_batch_size=3, seed=seed)
        return [_ids(next(it)) for _ in range(4)]

    assert first_ids(7) == first_ids(7)
    assert first_ids(7) != first_ids(8)


def test_restored_state_gives_exactly_the_same_batches():
    source = _source(7)
    it = TrainIterator(source, global_batch_size=3, seed=2)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]

    resumed = TrainIterator(source, global_batch_size=3, seed=2)
    next(resumed)  # its prefetched batches must not leak into the restored sequence
    resumed.set_state(state)
    assert resumed.step == 5
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["uid"], want["uid"])
        np.testing.assert_array_equal(got["image"], want["image"])


def test_state_from_other_settings_is_rejected():
    state = TrainIterator(_source(7), global_batch_size=3, seed=2).get_state()
    with pytest.raises(ValueError, match="'seed'"):
        TrainIterator(_source(7), global_batch_size=3, seed=3).set_state(state)
    with pytest.raises(ValueError, match="'num_samples'"):
        TrainIterator(_source(8), global_batch_size=3, seed=2).set_state(state)


def test_batches_are_sharded_over_the_data_axis(mesh):
    it = TrainIterator(_source(6), global_batch_size=4, seed=0, mesh=mesh)
    batch = next(it)
    for field in ("image", "label", "valid", "spacing"):
        assert batch[field].sharding == NamedSharding(mesh, PartitionSpec("data"))
        assert batch[field].shape[0] == 4
    shard_rows = [shard.data.shape[0] for shard in batch["image"].addressable_shards]
    assert shard_rows == [2, 2]
    # same samples and order as without a mesh
    plain = next(TrainIterator(_source(6), global_batch_size=4, seed=0))
    np.testing.assert_array_equal(batch["uid"], plain["uid"])
    np.testing.assert_array_equal(batch["image"], plain["image"])


def test_batch_size_must_divide_over_the_mesh(mesh):
    with pytest.raises(ValueError, match="not divisible"):
        TrainIterator(_source(6), global_batch_size=3, seed=0, mesh=mesh)


def test_batch_larger_than_source_is_rejected_with_drop_remainder():
    with pytest.raises(ValueError, match="drop_remainder"):
        TrainIterator(_source(3), global_batch_size=4, seed=0)


def test_samples_of_different_shapes_name_the_sample():
    source = _source(2) + _source(1, shape=(5, 3))
    with pytest.raises(ValueError, match="case_00"):
        next(TrainIterator(source, global_batch_size=3, seed=0))


def test_missing_field_is_named():
    source = [{"uid": "a", "image": np.zeros((2, 2, 1), np.float32), "spacing": np.ones(2)}]
    with pytest.raises(KeyError, match="'label'"):
        next(eval_batches(source, batch_size=1))


@pytest.mark.parametrize("use_mesh", [False, True])
def test_eval_batches_keep_every_sample_once(use_mesh, mesh):
    batches = list(eval_batches(_source(5), batch_size=2, mesh=mesh if use_mesh else None))
    assert len(batches) == 3
    np.testing.assert_array_equal(batches[-1]["valid"], [True, False])
    # padding repeats a real sample
    np.testing.assert_array_equal(batches[-1]["image"][1], batches[-1]["image"][0])
    kept = [uid for b in batches for uid in b["uid"][np.asarray(b["valid"])]]
    assert kept == [f"case_{i:02d}" for i in range(5)]
    assert all(b["image"].shape == (2, 4, 3, 1) for b in batches)


def test_eval_batches_on_3d_samples():
    batches = list(eval_batches(_source(3, shape=(4, 3, 2)), batch_size=4))
    assert len(batches) == 1
    np.testing.assert_array_equal(batches[0]["valid"], [True, True, True, False])
    assert batches[0]["spacing"].shape == (4, 3)
