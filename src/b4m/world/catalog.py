"""The built-in world's catalog: contents, styles, layouts and backgrounds, read from a TOML file.

Everything the renderer can draw is data, so users extend the world without code (see ``catalog.toml`` for the
format; a user file that starts with ``extends = "builtin"`` adds entries to the shipped catalog).

The entries themselves (contents, styles, …) and the pattern and effect types are :mod:`b4m.world.entries`; the
readers of single values (numbers, colours, names) that check them are :mod:`b4m.world.catalog_values`.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import B4MError
from .catalog_values import (
    KEY,
    SPLITS,
    BadValue,
    boolean,
    check_keys,
    entry_name,
    hex_rgb,
    novel_split,
    number,
    pair,
    parameters,
    phrase,
    points,
    rgb,
)
from .entries import (
    EFFECTS,
    NATURAL,
    OUTLINE_WIDTHS,
    PATTERNS,
    PLACEHOLDERS,
    PRIMITIVES,
    RGB,
    Background,
    Content,
    Effect,
    Part,
    Pattern,
    Position,
    Size,
    Style,
)

__all__ = [
    "EFFECTS",
    "NATURAL",
    "OUTLINE_WIDTHS",
    "PATTERNS",
    "PLACEHOLDERS",
    "PRIMITIVES",
    "SPLITS",
    "Background",
    "Catalog",
    "Content",
    "Effect",
    "Part",
    "Pattern",
    "Position",
    "Size",
    "Style",
    "builtin_catalog_text",
    "default_catalog",
    "load_catalog",
    "parse_catalog",
]

_BOX = 1.0001  # shapes must stay inside the unit box
_CURVE_STEPS = 72  # polygon vertices of a full ellipse


@dataclass(eq=False)
class Catalog:
    """Everything the world can draw. Lists keep file order; lookups by name raise :class:`B4MError`."""

    contents: list[Content]
    styles: list[Style]
    positions: list[Position]
    sizes: list[Size]
    backgrounds: list[Background]
    palettes: dict[str, tuple[RGB, ...]]
    source: str = "catalog"

    def __post_init__(self) -> None:
        self._index = {
            kind: {x.name: x for x in getattr(self, kind)}
            for kind in ("contents", "styles", "positions", "sizes", "backgrounds")
        }

    def _get(self, kind: str, name: str) -> Any:
        try:
            return self._index[kind][name]
        except KeyError:
            known = ", ".join(self._index[kind])
            raise B4MError(f"{self.source}: unknown {kind[:-1]} {name!r} (known: {known})") from None

    def content(self, name: str) -> Content:
        """The content called ``name``."""
        return self._get("contents", name)

    def style(self, name: str) -> Style:
        """The style called ``name``."""
        return self._get("styles", name)

    def position(self, name: str) -> Position:
        """The position called ``name``."""
        return self._get("positions", name)

    def size(self, name: str) -> Size:
        """The size called ``name``."""
        return self._get("sizes", name)

    def background(self, name: str) -> Background:
        """The background called ``name``."""
        return self._get("backgrounds", name)

    @property
    def known_contents(self) -> list[Content]:
        """Contents that pretraining renders."""
        return [c for c in self.contents if not c.novel]

    @property
    def novel_contents(self) -> list[Content]:
        """Contents held out of pretraining (stand-ins for the user's own subject)."""
        return [c for c in self.contents if c.novel]

    def novel_contents_of(self, split: str) -> list[Content]:
        """The novel contents of one split (``dev`` or ``test``), in catalog order."""
        return [c for c in self.novel_contents if c.split == _check_split(split)]

    def novel_styles_of(self, split: str) -> list[Style]:
        """The novel styles of one split (``dev`` or ``test``), in catalog order."""
        return [s for s in self.novel_styles if s.split == _check_split(split)]

    @property
    def known_styles(self) -> list[Style]:
        """Styles that pretraining renders."""
        return [s for s in self.styles if not s.novel]

    @property
    def novel_styles(self) -> list[Style]:
        """Styles held out of pretraining (stand-ins for an artist's own style)."""
        return [s for s in self.styles if s.novel]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise B4MError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    return split


# ----------------------------------------------------------------------------------------------------------------
# Loading


def builtin_catalog_text() -> str:
    """The text of the catalog shipped inside the package."""
    return resources.files(__package__).joinpath("catalog.toml").read_text(encoding="utf-8")


_DEFAULT: Catalog | None = None


def default_catalog() -> Catalog:
    """The shipped catalog, loaded once."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_catalog()
    return _DEFAULT


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read and validate a catalog file (default: the one shipped in ``b4m.world``).

    A file whose first key is ``extends = "builtin"`` adds its entries to the shipped catalog. Errors are
    :class:`B4MError` lines naming the file and the entry.
    """
    if path is None:
        source, text = "the built-in world", builtin_catalog_text()  # errors say so, not a file the user never named
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise B4MError(f"{source}: no such catalog file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise B4MError(f"{source}: not valid TOML ({e})") from e
    extends = data.pop("extends", None)
    if extends is not None:
        if extends != "builtin":
            raise B4MError(f'{source}: extends must be "builtin", not {extends!r}')
        data = _merge_tables(tomllib.loads(builtin_catalog_text()), data)
    return parse_catalog(data, source)


def _merge_tables(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = out[key] + value
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def parse_catalog(data: dict[str, Any], source: str = "catalog") -> Catalog:
    """Validate a catalog given as a TOML-shaped dict (see :func:`load_catalog`)."""
    top = {"colors", "palettes", "content", "style", "position", "size", "background"}
    unknown = sorted(set(data) - top)
    if unknown:
        raise B4MError(f"{source}: unknown top-level key(s) {', '.join(unknown)}")

    def entry_error(what: str, e: Exception) -> B4MError:
        return B4MError(f"{source}: {what}: {e}")

    colors: dict[str, RGB] = {}
    for name, value in _table(data, "colors", source).items():
        try:
            colors[name] = hex_rgb(value)
        except BadValue as e:
            raise entry_error(f"color {name!r}", e) from None
    palettes: dict[str, tuple[RGB, ...]] = {}
    for name, value in _table(data, "palettes", source).items():
        try:
            if name == NATURAL:
                raise BadValue(f"{NATURAL!r} is reserved for the content's own colours")
            if not isinstance(value, list) or not 1 <= len(value) <= 4:
                raise BadValue("must be a list of 1 to 4 colours")
            palettes[name] = tuple(rgb(v, colors) for v in value)
        except BadValue as e:
            raise entry_error(f"palette {name!r}", e) from None

    out: dict[str, list[Any]] = {}
    parsers = {
        "content": lambda e: _content(e, colors),
        "style": lambda e: _style(e, colors, palettes),
        "position": _position,
        "size": _size,
        "background": lambda e: _background(e, colors),
    }
    for kind, parse in parsers.items():
        entries = data.get(kind, [])
        if not isinstance(entries, list) or not entries:
            raise B4MError(f"{source}: needs at least one [[{kind}]] entry")
        items, seen = [], set()
        for i, entry in enumerate(entries):
            label = f"{kind} #{i + 1}"
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                label = f"{kind} {entry['name']!r}"
            try:
                if not isinstance(entry, dict):
                    raise BadValue("must be a table")
                item = parse(entry)
            except BadValue as e:
                raise entry_error(label, e) from None
            if item.name in seen:
                raise B4MError(f"{source}: {label}: duplicate name")
            seen.add(item.name)
            items.append(item)
        out[kind] = items

    words: dict[str, str] = {}
    for kind in ("content", "style", "background"):
        for item in out[kind]:
            if item.name in words:
                raise B4MError(f"{source}: {kind} {item.name!r}: name already used by a {words[item.name]}")
            if item.name in PLACEHOLDERS:
                raise B4MError(f"{source}: {kind} {item.name!r}: name is a reserved placeholder token")
            words[item.name] = kind
    return Catalog(
        contents=out["content"],
        styles=out["style"],
        positions=out["position"],
        sizes=out["size"],
        backgrounds=out["background"],
        palettes=palettes,
        source=source,
    )


def _table(data: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise B4MError(f"{source}: [{key}] must be a table")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Entries


def _content(entry: dict[str, Any], colors: dict[str, RGB]) -> Content:
    check_keys(entry, {"name", "color", "novel", "parts"}, {"name", "parts"})
    name = entry_name(entry["name"])
    parts_in = entry["parts"]
    if not isinstance(parts_in, list) or not parts_in:
        raise BadValue("parts must be a non-empty list of shape tables")
    parts: list[Part] = []
    for i, p in enumerate(parts_in):
        try:
            parts.extend(_primitive(p))
        except BadValue as e:
            raise BadValue(f"part #{i + 1}: {e}") from None
    if parts[0].subtract:
        raise BadValue("the first part must add, not subtract")
    color = rgb(entry.get("color", "#808080"), colors)
    split = novel_split(entry.get("novel", False))
    return Content(name, parts, color, split)


def _style(entry: dict[str, Any], colors: dict[str, RGB], palettes: dict[str, tuple[RGB, ...]]) -> Style:
    allowed = {"name", "pattern", "palette", "outline", "outline_color", "effects", "novel"}
    check_keys(entry, allowed, {"name", "palette"})
    name = entry_name(entry["name"])
    pattern_in = entry.get("pattern", "flat")
    if isinstance(pattern_in, str):
        pattern_in = {"type": pattern_in}
    if not isinstance(pattern_in, dict) or "type" not in pattern_in:
        raise BadValue("pattern must be a type name or a table with a type")
    kind = pattern_in["type"]
    if kind not in PATTERNS:
        raise BadValue(f"unknown pattern type {kind!r} (known: {', '.join(PATTERNS)})")
    given = {k: v for k, v in pattern_in.items() if k != "type"}
    params = parameters(PATTERNS[kind], given, f"pattern {kind}", colors)
    palette = entry["palette"]
    if palette == NATURAL:
        pal: tuple[RGB, ...] = ()
    elif isinstance(palette, str) and palette in palettes:
        pal = palettes[palette]
    else:
        raise BadValue(f"unknown palette {palette!r} (known: {NATURAL}, {', '.join(palettes)})")
    outline = entry.get("outline", "none")
    if outline not in OUTLINE_WIDTHS:
        raise BadValue(f"outline must be one of {', '.join(OUTLINE_WIDTHS)} (got {outline!r})")
    outline_color = rgb(entry.get("outline_color", "#1a1a1a"), colors)
    effects_in = entry.get("effects", [])
    if not isinstance(effects_in, list):
        raise BadValue("effects must be a list of tables")
    effects = []
    for e in effects_in:
        if not isinstance(e, dict) or e.get("type") not in EFFECTS:
            got = e.get("type") if isinstance(e, dict) else e
            raise BadValue(f"unknown effect {got!r} (known: {', '.join(EFFECTS)})")
        given = {k: v for k, v in e.items() if k != "type"}
        effects.append(Effect(e["type"], parameters(EFFECTS[e["type"]], given, f"effect {e['type']}", colors)))
    split = novel_split(entry.get("novel", False))
    return Style(name, Pattern(kind, params), palette, pal, outline, outline_color, tuple(effects), split)


def _position(entry: dict[str, Any]) -> Position:
    check_keys(entry, {"name", "phrase", "center"}, {"name", "phrase", "center"})
    center = pair(entry["center"], "center", 0.0, 1.0)
    return Position(entry_name(entry["name"], KEY), phrase(entry["phrase"]), center)


def _size(entry: dict[str, Any]) -> Size:
    check_keys(entry, {"name", "phrase", "scale"}, {"name", "phrase", "scale"})
    return Size(entry_name(entry["name"], KEY), phrase(entry["phrase"]), number(entry["scale"], "scale", 0.05, 1.5))


def _background(entry: dict[str, Any], colors: dict[str, RGB]) -> Background:
    check_keys(entry, {"name", "color"}, {"name", "color"})
    return Background(entry_name(entry["name"]), rgb(entry["color"], colors))


# ----------------------------------------------------------------------------------------------------------------
# Shape primitives -> parts


def _ellipse_points(
    cx: float, cy: float, rx: float, ry: float, angle: float, a0: float = 0.0, a1: float = 360.0
) -> np.ndarray:
    """Points along an ellipse (or an arc of it, from angle a0 to a1), rotated by ``angle``."""
    n = max(8, int(_CURVE_STEPS * abs(a1 - a0) / 360.0))
    t = np.radians(np.linspace(a0, a1, n, endpoint=abs(a1 - a0) < 360.0))
    pts = np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)
    return _rotate(pts, angle) + np.array([cx, cy])


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    return points @ np.array([[c, s], [-s, c]])


def _primitive(p: Any) -> list[Part]:
    if not isinstance(p, dict) or p.get("type") not in PRIMITIVES:
        got = p.get("type") if isinstance(p, dict) else p
        raise BadValue(f"unknown shape type {got!r} (known: {', '.join(PRIMITIVES)})")
    kind = p["type"]
    check_keys(p, {"type", "subtract", *PRIMITIVES[kind]}, set())
    subtract = boolean(p.get("subtract", False), "subtract")
    center = pair(p.get("center", [0.0, 0.0]), "center")
    angle = number(p.get("angle", 0.0), "angle", -360.0, 360.0)
    width = 0.0
    if kind == "polygon":
        pts, fill = points(p.get("points"), "points", 3), True
    elif kind == "rect":
        w, h = pair(p.get("size"), "size", 0.0, 2.0)
        pts, fill = _rotate(np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2, angle) + center, True
    elif kind in ("ellipse", "circle"):
        if kind == "circle":
            r = number(p.get("radius"), "radius", 0.0, 1.0)
            rx, ry = r, r
        else:
            rx, ry = pair(p.get("radii"), "radii", 0.0, 1.0)
        pts, fill = _ellipse_points(*center, rx, ry, angle), True
    elif kind in ("star", "regular"):
        r = number(p.get("radius", 1.0), "radius", 0.0, 1.0)
        if kind == "star":
            n = number(p.get("points", 5), "points", 3, 64, integer=True)
            inner = number(p.get("inner", 0.45), "inner", 0.05, 0.99)
            radii = np.where(np.arange(2 * n) % 2 == 0, r, r * inner)
            t = np.radians(-90.0 + angle + np.arange(2 * n) * 180.0 / n)
        else:
            n = number(p.get("sides", 6), "sides", 3, 64, integer=True)
            radii = np.full(n, r)
            t = np.radians(-90.0 + angle + np.arange(n) * 360.0 / n)
        pts, fill = np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1) + center, True
    elif kind == "line":
        pts, fill = points(p.get("points"), "points", 2), False
        width = number(p.get("width", 0.1), "width", 0.01, 1.0)
    else:  # arc
        r = number(p.get("radius"), "radius", 0.0, 1.0)
        a0 = number(p.get("start", 0.0), "start", -720.0, 720.0)
        a1 = number(p.get("end", 180.0), "end", -720.0, 720.0)
        if a1 <= a0:
            raise BadValue(f"end ({a1:g}) must be larger than start ({a0:g})")
        pts, fill = _ellipse_points(*center, r, r, 0.0, a0, a1), False
        width = number(p.get("width", 0.1), "width", 0.01, 1.0)
    reach = np.abs(pts).max() + width / 2
    if reach > (2 * _BOX if subtract else _BOX):  # holes may reach past the box: they cut nothing there
        raise BadValue(f"{kind} reaches {reach:.2f} outside the unit box -1..1")
    return [Part("fill" if fill else "line", pts, width, subtract)]
