"""Nested dicts in TOML layout (tables of keys): merging settings from defaults, presets, files and flags."""

from __future__ import annotations

import copy
from typing import Any


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``base`` with ``extra`` merged in, table by table (``extra`` wins key by key). Values are copied,
    so later writes to the result never reach either input."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys for the leaves of ``data``: ``{"train": {"steps": 5}}`` -> ``{"train.steps": 5}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """Tables from dotted keys, the inverse of :func:`flatten`: ``{"train.steps": 5}`` -> ``{"train": {"steps":
    5}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *tables, leaf = key.split(".")
        node = out
        for t in tables:
            node = node.setdefault(t, {})
        node[leaf] = value
    return out


def key_hints(keys: list[str], known: set[str], tables: dict[str, set[str]] | None = None) -> str:
    """Unknown config keys for an error message, each with a hint where one is found: the table that has it
    (``steps (it goes in [train])``) or the nearest known key (``stpes (did you mean steps?)``)."""
    import difflib

    hints = []
    for key in keys:
        homes = [f"[{name}]" for name, fields in (tables or {}).items() if key in fields]
        if homes:
            where = homes[0] if len(homes) == 1 else f"{', '.join(homes[:-1])} or {homes[-1]}"
            hints.append(f"{key} (it goes in {where})")
            continue
        near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
        hints.append(f"{key} (did you mean {near[0]}?)" if near else key)
    return ", ".join(hints)
