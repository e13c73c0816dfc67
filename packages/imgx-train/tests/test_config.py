"""Config schema, dotted-key overrides, presets and the JSON round trip."""

import json

import pytest

import imgx_data
from imgx_train import config as config_lib
from imgx_train import evaluation, presets, tasks, trainer


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
    assert (dgm.loss.cross_entropy, dgm.loss.mse) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"diffusion.strategy": "recycle"}, "recycle_last"),
        ({"train.task": "detect"}, "seg, diffusion"),
        ({"diffusion.variance": "learned_range"}, "loss.vlb"),
        ({"train.steps": 0}, "train.steps"),
        ({"loss.mse_target": "x0"}, "output, epsilon"),
        ({"data.shift_unit": "mm"}, "fraction, voxel"),
        ({"optimizer.ema_decay": 1.5}, "optimizer.ema_decay"),
        ({"loss.vlb": 1.0}, "no gradient with diffusion.variance=fixed_small"),
        ({"diffusion.recycle_posterior_mean": True}, "recycle_next, not recycle_last"),
        ({"diffusion.recycle_next_clipped": True}, "recycle_next, not recycle_last"),
        (
            {
                "diffusion.strategy": "recycle_next",
                "diffusion.recycle_posterior_mean": True,
                "diffusion.recycle_next_clipped": True,
            },
            "cannot both be true",
        ),
        ({"diffusion.self_cond_probability": 1.5}, r"\[0.0, 1.0\]"),
        ({"eval.sampler": "dpm_solver"}, "ddpm, ddim, dpm_solver_2m"),
    ],
)
def test_invalid_choices_are_clear(overrides, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        presets.make_config("phantom", overrides=overrides)


# The papers' code (ImgX-DiffSeg at the paper's version), one row of README.md each.
PAPER_SETTINGS = {
    "melba2023": {
        "diffusion.num_train_steps": 1001,
        "diffusion.variance": "fixed_small",
        "diffusion.strategy": "recycle_last",
        "diffusion.timestep_sampler": "importance",
        "loss.focal": 20.0,
        "loss.mse": 0.0,
        "data.gamma": 0.0,
        "data.probability": 1.0,
        "train.early_stopping_patience": 5,
    },
    "dgm4miccai2023": {
        "diffusion.num_train_steps": 5,
        "diffusion.variance": "fixed_large",
        "diffusion.strategy": "recycle_next",
        "diffusion.recycle_next_clipped": True,
        "diffusion.timestep_sampler": "uniform",
        "loss.cross_entropy": 1.0,
        "loss.mse": 0.0,  # the paper's MSE(ε) was for ε-predicting models only
        "optimizer.peak_lr": 1e-4,
        "data.gamma": 0.0,
        "data.probability": 1.0,
    },
}


@pytest.mark.parametrize("preset", sorted(PAPER_SETTINGS))
def test_paper_presets_are_the_papers_code(preset):
    flat = config_lib.flatten(presets.make_config("male_pelvic_mr", preset=preset))
    assert {k: flat[k] for k in PAPER_SETTINGS[preset]} == PAPER_SETTINGS[preset]
    assert flat["diffusion.model_output"] == "x0"


def test_diffusion_switches_reach_the_config():
    cfg = presets.make_config(
        "phantom",
        overrides="eval.sampler=dpm_solver_2m,diffusion.strategy=recycle_next,"
        "diffusion.recycle_posterior_mean=true",
    )
    assert (cfg.eval.sampler, cfg.diffusion.recycle_posterior_mean) == ("dpm_solver_2m", True)
    cfg = presets.make_config(
        "phantom", overrides="diffusion.strategy=self_cond_next,diffusion.self_cond_probability=1"
    )
    assert cfg.diffusion.self_cond_probability == 1.0
    learned = "diffusion.variance=learned_range,loss.vlb=1"
    assert presets.make_config("phantom", overrides=learned).loss.vlb == 1.0


def test_unknown_preset():
    with pytest.raises(config_lib.ConfigError, match="debug"):
        presets.make_config("phantom", preset="fast")


# shared/spec/presets.md: both paper presets shift ±10 voxels per axis, pelvic 20, 20, 4.
PAPER_SHIFTS = {
    "phantom": (10.0, 10.0),
    "phantom_3d": (10.0, 10.0, 10.0),
    "muscle_us": (10.0, 10.0),
    "male_pelvic_mr": (20.0, 20.0, 4.0),
    "amos_ct": (10.0, 10.0, 10.0),
    "brats2021_mr": (10.0, 10.0, 10.0),
    "brats2021_mr_wt": (10.0, 10.0, 10.0),
    "my_nifti_folder": 10.0,  # a user's dataset: 10 voxels along every axis
}


@pytest.mark.parametrize("preset", ["melba2023", "dgm4miccai2023"])
@pytest.mark.parametrize("data", sorted(PAPER_SHIFTS))
def test_paper_presets_shift_in_voxels_per_dataset(data, preset, tmp_path):
    cfg = presets.make_config(data, preset=preset)
    assert (cfg.data.shift, cfg.data.shift_unit) == (PAPER_SHIFTS[data], "voxel")
    if data in presets.DATASET_PRESETS:
        info = imgx_data.dataset_info(data, data_dir=tmp_path)  # not built: the default grid
        aug = tasks.augmentation_config(cfg, info)
        assert (aug.shift, aug.shift_unit) == (PAPER_SHIFTS[data], "voxel")
    default = presets.make_config(data)
    assert (default.data.shift, default.data.shift_unit) == (
        presets.DATASET_PRESETS.get(data, {}).get("data.shift", 0.3),
        "fraction",
    )


@pytest.mark.parametrize(
    ("preset", "expected"), [(None, False), ("melba2023", True), ("dgm4miccai2023", True)]
)
def test_paper_presets_keep_the_foreground_in_view(preset, expected, tmp_path):
    """Both papers' code limits the shift so that the foreground stays in view."""
    cfg = presets.make_config("phantom", preset=preset)
    assert cfg.data.keep_foreground_in_view is expected
    info = imgx_data.dataset_info("phantom", data_dir=tmp_path)
    assert tasks.augmentation_config(cfg, info).keep_foreground_in_view is expected
    off = config_lib.replace(cfg, {"data.augmentation": False})
    assert tasks.augmentation_config(off, info).keep_foreground_in_view is False


def test_per_axis_shift_round_trip_and_wrong_length(tmp_path):
    cfg = presets.make_config("phantom", overrides="data.shift=[4,2],data.shift_unit=voxel")
    assert cfg.data.shift == (4.0, 2.0)
    config_lib.save(cfg, tmp_path / "config.json")
    assert config_lib.load(tmp_path / "config.json") == cfg
    wrong = presets.make_config("phantom", overrides="data.shift=[20,20,4]")
    with pytest.raises(config_lib.ConfigError, match="data.shift"):
        tasks.augmentation_config(wrong, imgx_data.dataset_info("phantom", data_dir=tmp_path))


def test_ema_is_off_by_default_and_0999_when_on(tmp_path):
    """shared/spec/presets.md: EMA off by default, decay 0.999 when on."""
    default = presets.make_config("phantom")
    assert (default.optimizer.ema, default.optimizer.ema_decay) == (False, None)
    on = presets.make_config("phantom", overrides="optimizer.ema=true")
    assert (on.optimizer.ema, on.optimizer.ema_decay) == (True, 0.999)
    chosen = presets.make_config("phantom", overrides="optimizer.ema_decay=0.75")
    assert (chosen.optimizer.ema, chosen.optimizer.ema_decay) == (True, 0.75)
    off = config_lib.replace(chosen, {"optimizer.ema": False})
    assert (off.optimizer.ema, off.optimizer.ema_decay) == (False, None)
    config_lib.save(on, tmp_path / "config.json")
    assert config_lib.load(tmp_path / "config.json") == on


# A hand-edited config.json and `--set` go through the same checks (config.validate).
BAD_VALUES = [
    # (key, value in config.json, the same as --set text, what the message says is allowed)
    ("train.task", "sge", "sge", "choose one of seg, diffusion"),
    ("train.eval_every", 0, "0", "at least 1"),
    ("train.keep_checkpoints", 0, "0", "at least 1"),
    ("train.keep_checkpoints", -2, "-2", "at least 1"),
    ("optimizer.peak_lr", float("nan"), "nan", "finite number > 0"),
    ("optimizer.peak_lr", 0.0, "0", "finite number > 0"),
    ("diffusion.beta_schedule", "cosinus", "cosinus", "linear, quadratic, cosine"),
    ("data.eval_batch_size", 0, "0", "at least 1"),
    ("eval.num_steps", 0, "0", "at least 1"),
]


def _write_config(path, key, value):
    data = config_lib.to_dict(presets.make_config("phantom"))
    section, field = key.split(".")
    data[section][field] = value
    path.write_text(json.dumps(data))  # NaN is written as the JSON extension NaN
    return path


@pytest.mark.parametrize(("key", "value", "text", "allowed"), BAD_VALUES)
def test_hand_edited_config_json_is_validated_on_load(tmp_path, key, value, text, allowed):
    path = _write_config(tmp_path / "config.json", key, value)
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}=")
    assert repr(value) in message and allowed in message


@pytest.mark.parametrize(("key", "value", "text", "allowed"), BAD_VALUES)
def test_set_overrides_are_validated(key, value, text, allowed):
    with pytest.raises(config_lib.ConfigError) as info:
        presets.make_config("phantom", overrides=f"{key}={text}")
    assert f"{key}={value!r}" in str(info.value) and allowed in str(info.value)


def test_wrong_types_in_config_json_name_the_file_and_dotted_key(tmp_path):
    path = _write_config(tmp_path / "config.json", "train.steps", "many")
    with pytest.raises(config_lib.ConfigError, match=r"config.json: train.steps: expected an int"):
        config_lib.load(path)
    path.write_text('{"train": 5}')
    with pytest.raises(config_lib.ConfigError, match="train must be a JSON object"):
        config_lib.load(path)
    path.write_text('{"train": ')
    with pytest.raises(config_lib.ConfigError, match="config.json: not valid JSON"):
        config_lib.load(path)


def test_resume_and_describe_run_check_the_saved_config(tmp_path):
    _write_config(tmp_path / "config.json", "train.eval_every", 0)
    for read in (trainer.resume, evaluation.describe_run):
        with pytest.raises(config_lib.ConfigError, match="train.eval_every=0"):
            read(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # nothing written


@pytest.mark.parametrize("preset", ["melba2023", "dgm4miccai2023"])
def test_paper_presets_use_the_original_decoder(preset):
    """The published network (imgx_nets.UNet decoder="original"), its FLOPs and parameters."""
    assert presets.make_config("muscle_us", preset=preset).model.decoder == "original"
    assert presets.make_config("muscle_us").model.decoder == "mirrored"
    with pytest.raises(config_lib.ConfigError, match="mirrored, original"):
        presets.make_config("phantom", overrides={"model.decoder": "unet"})
