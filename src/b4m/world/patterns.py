"""The styles' fill patterns: ``f(u, v, params, ctx)`` -> int indices into the palette, or floats in [0, 1] (a
continuous ramp). ``u``, ``v``: object-centred coordinates in reference pixels, rotating with the object (float32
arrays over the object's bounding box). :mod:`b4m.world.render` colours them from the style's palette."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from PIL import Image

from .entries import PATTERNS


@dataclass
class PatternContext:
    rng: np.random.Generator
    half: float  # half the object's unit box, in reference pixels
    k: int  # palette size
    cell: float  # supersampled pixels per reference pixel


def _rot(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    a = math.radians(angle)
    c, s = np.float32(math.cos(a)), np.float32(math.sin(a))
    return u * c + v * s, v * c - u * s


def _band(t: np.ndarray, period: float, width: float) -> np.ndarray:
    return np.mod(t * np.float32(1.0 / period), np.float32(1.0)) < width


def _flat(u, v, p, ctx):
    return np.zeros(u.shape, dtype=np.intp)


def _stripes(u, v, p, ctx):
    d, _ = _rot(u, v, p["angle"])
    return _band(d, p["period"], p["width"])


def _hatching(u, v, p, ctx):
    return _stripes(u, v, p, ctx)


def _crosshatch(u, v, p, ctx):
    d, e = _rot(u, v, p["angle"])
    return _band(d, p["period"], p["width"]) | _band(e, p["period"], p["width"])


def _dots(u, v, p, ctx):
    s, r = p["spacing"], p["radius"]
    if p["stagger"]:
        u = u + np.mod(np.floor(v / s), 2) * np.float32(s / 2)
    du = np.mod(u, s) - np.float32(s / 2)
    dv = np.mod(v, s) - np.float32(s / 2)
    return du * du + dv * dv < r * r


def _checker(u, v, p, ctx):
    d, e = _rot(u, v, p["angle"])
    return (np.floor(d / p["size"]) + np.floor(e / p["size"])).astype(np.intp) & 1


def _rings(u, v, p, ctx):
    return _band(np.hypot(u, v), p["period"], p["width"])


def _waves(u, v, p, ctx):
    d, e = _rot(u, v, p["angle"])
    return _band(d + p["amplitude"] * np.sin(e * np.float32(2 * math.pi / p["wavelength"])), p["period"], p["width"])


def _zigzag(u, v, p, ctx):
    d, e = _rot(u, v, p["angle"])
    tri = np.abs(np.mod(e / np.float32(p["wavelength"]), 1.0) - 0.5) * 4 - 1
    return _band(d + p["amplitude"] * tri, p["period"], p["width"])


def _noise(u, v, p, ctx):
    h, w = u.shape
    cell = p["scale"] * ctx.cell  # supersampled pixels per noise cell
    gh, gw = math.ceil(h / cell) + 2, math.ceil(w / cell) + 2
    grid = Image.fromarray(ctx.rng.random((gh, gw), dtype=np.float32), mode="F")
    field = np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC, box=(0.5, 0.5, 0.5 + w / cell, 0.5 + h / cell)))
    z = (field - field.mean()) / (field.std() + 1e-6)
    cuts = [NormalDist().inv_cdf(i / ctx.k) for i in range(1, ctx.k)]
    return np.digitize(z, np.asarray(cuts, dtype=np.float32))


def _gradient(u, v, p, ctx):
    d, _ = _rot(u, v, p["angle"])
    return np.clip(d / np.float32(2 * ctx.half) + 0.5, 0.0, 1.0)


def _radial(u, v, p, ctx):
    return np.clip(np.hypot(u, v) / np.float32(ctx.half), 0.0, 1.0)


def _spiral(u, v, p, ctx):
    turn = np.arctan2(v, u) * np.float32(p["arms"] / (2 * math.pi))
    return np.mod(np.hypot(u, v) / np.float32(p["period"]) + turn, 1.0) < p["width"]


def _sectors(u, v, p, ctx):
    d, e = _rot(u, v, p["angle"])
    return np.floor((np.arctan2(e, d) / np.float32(2 * math.pi) + 0.5) * p["count"]).astype(np.intp) & 1


def _plaid(u, v, p, ctx):
    d, e = _rot(u, v, p["angle"])
    return _band(d, p["period"], p["width"]).astype(np.intp) + _band(e, p["period"], p["width"])


def _bricks(u, v, p, ctx):
    w, h = p["width"], p["height"]
    m = np.float32(p["mortar"] * h)
    row = np.floor(v / h)
    uu = u + np.mod(row, 2) * np.float32(w / 2)
    return (np.mod(uu, w) < m) | (np.mod(v, h) < m)


def _grid(u, v, p, ctx):
    d, e = _rot(u, v, p["angle"])
    return _band(d, p["period"], p["width"]) | _band(e, p["period"], p["width"])


def _tiles(u, v, p, ctx):
    s, g = p["size"], p["grout"]
    if ctx.k < 2:
        return np.zeros(u.shape, dtype=np.intp)
    table = ctx.rng.integers(1, ctx.k, size=(16, 16))
    i = np.floor(u / s).astype(np.intp) & 15
    j = np.floor(v / s).astype(np.intp) & 15
    grout = (np.mod(u, s) < g * s) | (np.mod(v, s) < g * s)
    return np.where(grout, 0, table[j, i])


PATTERN_FUNCS: dict[str, Callable[[np.ndarray, np.ndarray, dict[str, Any], PatternContext], np.ndarray]] = {
    "flat": _flat,
    "stripes": _stripes,
    "dots": _dots,
    "checker": _checker,
    "rings": _rings,
    "waves": _waves,
    "zigzag": _zigzag,
    "hatching": _hatching,
    "crosshatch": _crosshatch,
    "noise": _noise,
    "gradient": _gradient,
    "radial": _radial,
    "spiral": _spiral,
    "sectors": _sectors,
    "plaid": _plaid,
    "bricks": _bricks,
    "grid": _grid,
    "tiles": _tiles,
}
assert set(PATTERN_FUNCS) == set(PATTERNS), "entries.PATTERNS and patterns.PATTERN_FUNCS must agree"
