"""Readers of the catalog file's values (:mod:`b4m.world.catalog`): each checks one value and returns it, or raises
:class:`BadValue` saying what is wrong; the catalog adds the file and the entry to the message."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .entries import RGB, _Spec

WORD = re.compile(r"^[a-z][a-z0-9]*$")  # content, style and background names
KEY = re.compile(r"^[a-z][a-z0-9_]*$")  # position and size names
HEX = re.compile(r"^#[0-9a-fA-F]{6}$")


class BadValue(Exception):
    """A validation problem inside one entry; load_catalog adds the file and entry names."""


def check_keys(entry: dict[str, Any], allowed: set[str], required: set[str]) -> None:
    bad = sorted(set(entry) - allowed)
    if bad:
        raise BadValue(f"unknown key(s) {', '.join(bad)}")
    missing = sorted(required - set(entry))
    if missing:
        raise BadValue(f"missing key(s) {', '.join(missing)}")


def entry_name(value: Any, pattern: re.Pattern[str] = WORD) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        kind = "one lowercase word" if pattern is WORD else "lowercase letters, digits and _"
        raise BadValue(f"name must be {kind} (got {value!r})")
    return value


def phrase(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z]+( [a-z]+)*", value):
        raise BadValue(f"phrase must be lowercase words separated by single spaces (got {value!r})")
    return value


def boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadValue(f"{what} must be true or false (got {value!r})")
    return value


#: The splits of novel entries: ``dev`` (every setting is chosen on it) and ``test`` (only the reported table).
SPLITS = ("dev", "test")


def novel_split(value: Any) -> str:
    """``novel = true | "dev" | "test" | false`` as the entry's split ("" for a known entry; true means dev)."""
    if value is True:
        return "dev"
    if value is False:
        return ""
    if value in SPLITS:
        return value
    raise BadValue(f'novel must be true, false, "dev" or "test" (got {value!r})')


def number(value: Any, what: str, lo: float = -math.inf, hi: float = math.inf, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadValue(f"{what} must be a number (got {value!r})")
    if integer and value != int(value):
        raise BadValue(f"{what} must be a whole number (got {value!r})")
    if not lo <= value <= hi:
        raise BadValue(f"{what} must lie in [{lo:g}, {hi:g}] (got {value!r})")
    return int(value) if integer else float(value)


def pair(value: Any, what: str, lo: float = -math.inf, hi: float = math.inf) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise BadValue(f"{what} must be a pair [a, b] (got {value!r})")
    return number(value[0], what, lo, hi), number(value[1], what, lo, hi)


def hex_rgb(value: Any) -> RGB:
    if not isinstance(value, str) or not HEX.match(value):
        raise BadValue(f"colour must be '#rrggbb' (got {value!r})")
    return int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16)


def rgb(value: Any, colors: dict[str, RGB]) -> RGB:
    if isinstance(value, str) and value in colors:
        return colors[value]
    if isinstance(value, str) and not value.startswith("#"):
        raise BadValue(f"unknown colour {value!r} (use '#rrggbb' or a name from [colors])")
    return hex_rgb(value)


def parameters(spec: dict[str, _Spec], given: dict[str, Any], what: str, colors: dict[str, RGB]) -> dict[str, Any]:
    bad = sorted(set(given) - set(spec))
    if bad:
        raise BadValue(f"{what}: unknown parameter(s) {', '.join(bad)} (known: {', '.join(spec) or 'none'})")
    out: dict[str, Any] = {}
    for key, (default, lo, hi) in spec.items():
        value = given.get(key, default)
        label = f"{what} {key}"
        if isinstance(default, bool):
            out[key] = boolean(value, label)
        elif isinstance(default, str):
            out[key] = rgb(value, colors)
        else:
            out[key] = number(value, label, lo, hi, integer=isinstance(default, int))
    return out


def points(value: Any, what: str, minimum: int) -> np.ndarray:
    if not isinstance(value, list) or len(value) < minimum:
        raise BadValue(f"{what} must be a list of at least {minimum} [x, y] pairs")
    return np.array([pair(p, what) for p in value], dtype=np.float64)
