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
