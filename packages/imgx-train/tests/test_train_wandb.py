"""wandb never prompts: `online` without a key falls back to offline from the environment
and the netrc file alone (`wandb.init` is replaced here; the real offline run is in
test_trainer.py).
"""

import logging

import pytest
import wandb

from imgx_train import presets, trainer

KEY = "a" * 40


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """No key anywhere (isolated netrc), `wandb.init` recorded, `wandb.Api` forbidden."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    recorded = []

    def fake_init(**kwargs):
        recorded.append(kwargs)
        return "run"

    def api(*args, **kwargs):  # may prompt for a key or reach the network
        recorded.append("wandb.Api")
        raise RuntimeError("wandb.Api must not be used")

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setattr(wandb, "Api", api)
    return recorded


def _init(mode, run_dir):
    cfg = presets.make_config("phantom", preset="debug", overrides=f"logging.wandb={mode}")
    return trainer._init_wandb(cfg, run_dir, resuming=False)


def test_online_without_a_key_logs_offline_with_a_warning(calls, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="imgx_train.trainer"):
        assert _init("online", tmp_path) == "run"
    assert [c["mode"] for c in calls] == ["offline"]  # and wandb.Api never called
    assert "no API key found" in caplog.text and "offline" in caplog.text


def test_a_key_in_the_environment_or_netrc_keeps_online(calls, tmp_path, monkeypatch):
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai login user password {KEY}\n")
    _init("online", tmp_path)
    (tmp_path / "netrc").write_text(f"machine other.host login user password {KEY}\n")
    _init("online", tmp_path)
    monkeypatch.setenv("WANDB_BASE_URL", "https://other.host")
    _init("online", tmp_path)
    monkeypatch.delenv("WANDB_BASE_URL")
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    _init("online", tmp_path)
    assert [c["mode"] for c in calls] == ["online", "offline", "online", "online"]


def test_offline_and_disabled_are_kept(calls, tmp_path):
    assert _init("disabled", tmp_path) is None
    _init("offline", tmp_path)
    assert [c["mode"] for c in calls] == ["offline"]
