"""The entries of the built-in world's catalog: contents (silhouettes built of parts), styles (fill patterns,
palettes, outlines, whole-image effects), positions, sizes and backgrounds, with the pattern, effect and shape
primitive types the catalog file may use (:mod:`b4m.world.catalog` reads and checks the file).

Coordinates of content shapes lie in a unit box, x and y in -1..1, **y pointing down** (as image rows do); angles
are degrees, clockwise on screen, 0 pointing right (+x). Pattern lengths are in *reference pixels*, 1/64 of the
image side, so a pattern looks the same at 32, 64 or 128 px.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

RGB = tuple[int, int, int]

#: Reserved tokens for customisation ("a sks in zwx style"): no catalog name and no training caption uses them.
PLACEHOLDERS: tuple[str, ...] = ("sks", "zwx", "qxv", "vbn", "pqz", "kjw", "xdf", "bvq", "hjt", "wmz")

#: Outline widths in reference pixels (1/64 of the image side).
OUTLINE_WIDTHS: dict[str, float] = {"none": 0.0, "thin": 1.3, "thick": 2.6}

#: Palette name that takes the content's own colour (its "natural" look), as the ``plain`` style does.
NATURAL = "natural"

# A parameter spec: (default, low, high). Booleans have no range; ints are checked to be whole numbers.
_Spec = tuple[Any, float, float]
_ANGLE: _Spec = (0.0, -360.0, 360.0)
_FRACTION: _Spec = (0.5, 0.02, 0.98)

#: Fill patterns and their parameters. Lengths are in reference pixels.
PATTERNS: dict[str, dict[str, _Spec]] = {
    "flat": {},
    "stripes": {"angle": _ANGLE, "period": (8.0, 2.0, 64.0), "width": _FRACTION},
    "dots": {"spacing": (8.0, 2.0, 64.0), "radius": (2.5, 0.5, 32.0), "stagger": (True, 0, 1)},
    "checker": {"size": (6.0, 1.5, 64.0), "angle": _ANGLE},
    "rings": {"period": (8.0, 2.0, 64.0), "width": _FRACTION},
    "waves": {
        "angle": _ANGLE,
        "period": (8.0, 2.0, 64.0),
        "amplitude": (2.0, 0.0, 32.0),
        "wavelength": (16.0, 2.0, 128.0),
        "width": _FRACTION,
    },
    "zigzag": {
        "angle": _ANGLE,
        "period": (8.0, 2.0, 64.0),
        "amplitude": (3.0, 0.0, 32.0),
        "wavelength": (12.0, 2.0, 128.0),
        "width": _FRACTION,
    },
    "hatching": {"angle": (45.0, -360.0, 360.0), "period": (5.0, 2.0, 64.0), "width": (0.3, 0.02, 0.98)},
    "crosshatch": {"angle": (45.0, -360.0, 360.0), "period": (5.0, 2.0, 64.0), "width": (0.3, 0.02, 0.98)},
    "noise": {"scale": (6.0, 1.0, 64.0)},
    "gradient": {"angle": (90.0, -360.0, 360.0)},
    "radial": {},
    "spiral": {"period": (10.0, 2.0, 64.0), "arms": (1, 1, 12), "width": _FRACTION},
    "sectors": {"count": (12, 2, 64), "angle": _ANGLE},
    "plaid": {"angle": _ANGLE, "period": (12.0, 3.0, 64.0), "width": (0.35, 0.05, 0.95)},
    "bricks": {"width": (10.0, 2.0, 64.0), "height": (5.0, 1.5, 64.0), "mortar": (0.2, 0.05, 0.6)},
    "grid": {"angle": _ANGLE, "period": (8.0, 2.0, 64.0), "width": (0.2, 0.02, 0.9)},
    "tiles": {"size": (6.0, 2.0, 64.0), "grout": (0.18, 0.0, 0.6)},
}

#: Whole-image effects, applied after downsampling, in order.
EFFECTS: dict[str, dict[str, _Spec]] = {
    "grain": {"amount": (12.0, 0.0, 64.0)},  # std of Gaussian noise, in 0..255 units
    "blur": {"radius": (1.0, 0.1, 8.0)},  # reference pixels
    "cast": {"color": ("#704214", 0, 0), "strength": (0.25, 0.0, 0.35)},  # blend towards a colour
    "fade": {"strength": (0.25, 0.0, 0.35)},  # blend towards white
    "posterize": {"levels": (6, 6, 64)},  # levels per channel (>= 6 keeps the object's contrast)
    "pixelate": {"block": (3.0, 1.0, 8.0)},  # reference pixels
    "scanlines": {"period": (4.0, 2.0, 16.0), "strength": (0.35, 0.0, 0.6)},
    "vignette": {"strength": (0.35, 0.0, 0.5)},
}

#: Shape primitives and their keys (besides ``type`` and ``subtract``).
PRIMITIVES: dict[str, tuple[str, ...]] = {
    "polygon": ("points",),
    "rect": ("center", "size", "angle"),
    "ellipse": ("center", "radii", "angle"),
    "circle": ("center", "radius"),
    "star": ("center", "radius", "points", "inner", "angle"),
    "regular": ("center", "radius", "sides", "angle"),
    "line": ("points", "width"),
    "arc": ("center", "radius", "start", "end", "width"),
}


@dataclass(eq=False)
class Part:
    """One drawable piece of a silhouette: a filled polygon or a thick polyline (unit-box coordinates)."""

    kind: str  # "fill" | "line"
    points: np.ndarray  # (n, 2) float64
    width: float = 0.0  # line width, unit-box units
    subtract: bool = False  # cut a hole instead of adding


@dataclass(eq=False)
class Content:
    """An object: a silhouette built from parts, with its own ("natural") colours."""

    name: str
    parts: list[Part]
    color: RGB
    split: str = ""  # "" for a known entry; a novel one's split: "dev" or "test" (docs/world.md)

    @property
    def novel(self) -> bool:
        """Never rendered in pretraining."""
        return bool(self.split)


@dataclass(frozen=True)
class Parametrised:
    """A named kind with all its parameters (defaults filled in)."""

    type: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)


class Pattern(Parametrised):
    """A fill pattern: its type (a key of :data:`PATTERNS`) and all its parameters."""


class Effect(Parametrised):
    """A whole-image effect: its type (a key of :data:`EFFECTS`) and all its parameters."""


@dataclass(frozen=True)
class Style:
    """A rendering: fill pattern, palette, outline and whole-image effects."""

    name: str
    pattern: Pattern
    palette: str  # a palette name, or NATURAL
    colors: tuple[RGB, ...]  # empty for NATURAL (taken from the content)
    outline: str  # a key of OUTLINE_WIDTHS
    outline_color: RGB
    effects: tuple[Effect, ...] = ()
    split: str = ""  # "" for a known entry; a novel one's split: "dev" or "test" (docs/world.md)

    @property
    def novel(self) -> bool:
        """Never rendered in pretraining."""
        return bool(self.split)


@dataclass(frozen=True)
class Position:
    """Where the object's centre lies, in image fractions (x right, y down)."""

    name: str
    phrase: str
    center: tuple[float, float]


@dataclass(frozen=True)
class Size:
    """How large the object is: the unit box spans ``scale`` of the image side."""

    name: str
    phrase: str
    scale: float


@dataclass(frozen=True)
class Background:
    """A named, flat background colour."""

    name: str
    color: RGB
