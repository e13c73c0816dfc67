"""preprocess.json round trip, its errors, and provenance (no training)."""

import dataclasses
import json
from pathlib import Path

import pytest

import imgx_data
from imgx_train import config as config_lib
from imgx_train import portable

# The fields a run needs for prediction; split sizes, build state and manual dir are the
# data dir's business.
FIELDS = ("name", "num_spatial_dims", "image_shape", "num_channels", "class_names", "overlapping",
          "spacing", "postprocess", "intensity", "channel_names", "path")  # fmt: skip


def _info(**changes):
    phantom = imgx_data.dataset_info("phantom", data_dir=Path("no-data-dir"))
    return dataclasses.replace(phantom, **changes)


@pytest.mark.parametrize(
    "changes",
    [
        {},  # identity
        {"intensity": "percentile", "spacing": (0.8, 1.25)},
        {"intensity": (-200.0, 300.0), "channel_names": ("T2", "ADC"), "num_channels": 2},
        {"intensity": "png", "overlapping": True, "postprocess": "muscle"},
    ],
)
def test_preprocess_json_round_trip(tmp_path, changes):
    info = _info(**changes)
    portable.write_preprocessing(tmp_path, info)
    back = portable.info_from_preprocessing(tmp_path / "preprocess.json", "phantom")
    for field in FIELDS:
        expected = getattr(info, field)
        if field == "channel_names" and not expected:
            expected = tuple(f"channel_{c}" for c in range(info.num_channels))
        assert getattr(back, field) == expected, field
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"dataset": "amos_ct"}, "is not the config's data.name"),
        ({"intensity": {"rule": "percentile", "percentiles": [1, 99]}}, "percentiles"),
        ({"intensity": {"rule": "gamma"}}, "is not one of the rules"),
        ({"spacing": [1.0]}, "need 2 values"),
        ({"format": 2}, "format 2 is not 1"),
        ({"class_names": None}, "malformed"),
    ],
)
def test_bad_preprocess_json_names_the_file(tmp_path, edit, message):
    path = tmp_path / "preprocess.json"
    path.write_text(json.dumps({**portable.preprocessing(_info()), **edit}))
    with pytest.raises(portable.RunError, match=message) as error:
        portable.info_from_preprocessing(path, "phantom")
    assert str(path) in str(error.value)


def test_provenance_without_git_is_none(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no git command: never fails
    record = portable.provenance()
    assert (record["git_commit"], record["git_dirty"]) == (None, None)
    assert record["versions"]["imgx-train"] == "0.1.0"


def test_config_json_with_provenance_loads(tmp_path):
    cfg = config_lib.Config()
    config_lib.save(cfg, tmp_path / "config.json", provenance=portable.provenance())
    assert "provenance" in json.loads((tmp_path / "config.json").read_text())
    assert config_lib.load(tmp_path / "config.json") == cfg
