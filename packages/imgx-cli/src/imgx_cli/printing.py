"""Plain-text rendering of configs, tables and key-value listings for the terminal."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optimizer": {"peak_lr": 1e-4}}` -> `{"optimizer.peak_lr": 1e-4}`."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def as_plain(value: Any) -> Any:
    """A dataclass (a config) or mapping as nested JSON values: tuples become lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


def config_changes(config: Any, defaults: Any) -> list[str]:
    """`key = value` lines for the fields of `config` that differ from `defaults`.

    Both are configs (dataclasses) or their `to_dict` form; keys are dotted and values
    are written as `--set` reads them.
    """
    current = flatten(as_plain(config))
    reference = flatten(as_plain(defaults))
    changed = {k: v for k, v in current.items() if reference.get(k, object()) != v}
    width = max((len(k) for k in changed), default=0)
    return [f"  {key:<{width}} = {_config_value(value)}" for key, value in changed.items()]


def config_sections(config: Any, width: int = 100) -> list[str]:
    """Every field of `config`, one block per section: `  data   name=phantom ...`.

    The values are written as `--set` reads them (`[8,16,32]`, `null`), and a block wraps
    at `width` columns with its continuation lines under the first field.
    """
    sections: dict[str, list[str]] = {}
    for key, value in flatten(as_plain(config)).items():
        section, _, field = key.partition(".")
        sections.setdefault(section, []).append(f"{field}={_config_value(value)}")
    indent = 2 + max((len(section) for section in sections), default=0) + 2
    lines: list[str] = []
    for section, fields in sections.items():
        line = f"  {section:<{indent - 4}}  "
        for i, field in enumerate(fields):
            if i and len(line) + 1 + len(field) > width:
                lines.append(line)
                line = " " * indent + field
            else:
                line += (" " if i else "") + field
        lines.append(line)
    return lines


def _config_value(value: Any) -> str:
    """As `--set` takes it: `[8,16,32]`, `null`, `0.0001`, `recycle_last`."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def cell(value: Any) -> str:
    """One value as a short table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {cell(v)}" for k, v in value.items())
    if isinstance(value, tuple) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        return "x".join(cell(v) for v in value)  # a shape or a spacing
    if isinstance(value, list | tuple):
        return ", ".join(cell(v) for v in value)
    return str(value)


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """An aligned text table, one row per mapping, columns in order of first appearance."""
    if not rows:
        return "(none)"
    columns = list(dict.fromkeys(col for row in rows for col in row))
    cells = [[cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def key_values(mapping: Mapping[str, Any]) -> list[str]:
    """Aligned `key: value` lines."""
    width = max((len(k) for k in mapping), default=0)
    return [f"{key + ':':<{width + 1}} {cell(value)}" for key, value in mapping.items()]
