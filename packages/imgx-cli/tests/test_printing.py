"""Text rendering of configs and tables."""

import dataclasses

from imgx_cli import printing
from imgx_train import config as config_lib


def test_config_changes_lists_only_changed_fields_aligned():
    changes = {"train.steps": 7, "model.num_channels": [4, 8], "train.max_valid_cases": 3}
    cfg = config_lib.replace(config_lib.Config(), changes)
    assert printing.config_changes(cfg, config_lib.Config()) == [
        "  model.num_channels    = [4,8]",
        "  train.steps           = 7",
        "  train.max_valid_cases = 3",
    ]
    back = config_lib.replace(cfg, {"train.max_valid_cases": None})
    assert printing.config_changes(cfg, back) == ["  train.max_valid_cases = 3"]
    assert printing.config_changes(back, cfg) == ["  train.max_valid_cases = null"]


def test_config_changes_accepts_the_saved_dict_form():
    saved = config_lib.to_dict(config_lib.replace(config_lib.Config(), {"eval.sampler": "ddim"}))
    assert printing.config_changes(saved, config_lib.Config()) == ["  eval.sampler = ddim"]


def test_table_aligns_columns_and_formats_cells():
    rows = [{"name": "a", "ok": True, "x": 0.123456}, {"name": "long", "ok": False, "x": None}]
    assert printing.table(rows).splitlines() == [
        "name  ok   x",
        "a     yes  0.1235",
        "long  no   -",
    ]
    assert printing.table([]) == "(none)"


def test_cells():
    assert printing.cell({"dice": 0.9, "hd95": 2.0}) == "dice 0.9, hd95 2"
    assert printing.cell(["a", "b"]) == "a, b"
    assert printing.cell([4, 7]) == "4, 7"
    assert printing.cell((96, 96, 1.5)) == "96x96x1.5"
    assert printing.key_values({"a": 1, "long": "x"}) == ["a:    1", "long: x"]


def _parse_sections(lines):
    """`config_sections` output back to `{"section.field": "value text"}`."""
    parsed, section = {}, None
    for line in lines:
        words = line.split()
        if not line.startswith("   "):  # a section's first line: two spaces, then its name
            section, words = words[0], words[1:]
        for word in words:
            field, _, value = word.partition("=")
            parsed[f"{section}.{field}"] = value
    return parsed


def test_config_sections_print_every_field_with_its_value():
    cfg = config_lib.replace(
        config_lib.Config(), {"model.num_channels": [4, 8], "train.max_valid_cases": 3}
    )
    lines = printing.config_sections(cfg, width=80)
    assert all(len(line) <= 80 for line in lines), lines
    expected = {
        key: printing._config_value(value)
        for key, value in printing.flatten(printing.as_plain(cfg)).items()
    }
    assert _parse_sections(lines) == expected
    assert expected["model.num_channels"] == "[4,8]"
    assert expected["train.max_valid_cases"] == "3"
    assert expected["data.data_dir"] == "null"
    # Section order is the config's; every section starts a block.
    heads = [line.split()[0] for line in lines if not line.startswith("   ")]
    assert heads == [f.name for f in dataclasses.fields(config_lib.Config)]
