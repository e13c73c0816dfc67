"""Config schema, dotted-key overrides, presets and the JSON round trip."""

import pytest

from imgx_train import config as config_lib
from imgx_train import presets


def test_parse_overrides_keeps_commas_inside_brackets():
    parsed = config_lib.parse_overrides(
        "optimizer.peak_lr=1e-4,model.num_channels=[16,32,64],eval.sampler=ddim"
    )
    assert parsed == {
        "optimizer.peak_lr": 1e-4,
        "model.num_channels": [16, 32, 64],
        "eval.sampler": "ddim",
    }


def test_replace_coerces_types_and_nested_keys():
    cfg = config_lib.replace(
        config_lib.Config(),
        {"model.num_channels": [16, 32], "train.steps": "12", "data.patch_shape": "8,8"},
    )
    assert cfg.model.num_channels == (16, 32)
    assert cfg.train.steps == 12
    assert cfg.data.patch_shape == (8, 8)
    assert config_lib.replace(cfg, {"data.patch_shape": None}).data.patch_shape is None


def test_unknown_key_lists_valid_keys():
    with pytest.raises(config_lib.ConfigError, match="optimizer.peak_lr"):
        config_lib.replace(config_lib.Config(), {"optimizer.peak_rl": 1.0})


def test_wrong_type_names_the_key():
    with pytest.raises(config_lib.ConfigError, match="train.steps"):
        config_lib.replace(config_lib.Config(), {"train.steps": "many"})


def test_json_round_trip(tmp_path):
    cfg = presets.make_config("phantom_3d", task="seg", preset="debug")
    config_lib.save(cfg, tmp_path / "config.json")
    assert config_lib.load(tmp_path / "config.json") == cfg


def test_presets_apply_in_order():
    cfg = presets.make_config("male_pelvic_mr", preset="melba2023", overrides={"loss.focal": 5.0})
    assert cfg.data.patch_shape == (256, 256, 32)
    assert cfg.diffusion.strategy == "recycle_last"
    assert cfg.loss.focal == 5.0  # the user's override wins over the preset's 20
    dgm = presets.make_config("amos_ct", preset="dgm4miccai2023")
    assert dgm.diffusion.strategy == "recycle_next"
    assert dgm.diffusion.variance == "fixed_large"
    assert (dgm.loss.cross_entropy, dgm.loss.mse) == (1.0, 0.1)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"diffusion.strategy": "recycle"}, "recycle_last"),
        ({"train.task": "detect"}, "seg, diffusion"),
        ({"diffusion.variance": "learned_range"}, "loss.vlb"),
        ({"train.steps": 0}, "train.steps"),
    ],
)
def test_invalid_choices_are_clear(overrides, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        presets.make_config("phantom", overrides=overrides)


def test_unknown_preset():
    with pytest.raises(config_lib.ConfigError, match="debug"):
        presets.make_config("phantom", preset="fast")
