"""Render a scene of the built-in world: one content, drawn in one style, at a position and size, on a background.

The pipeline, all vectorised and deterministic (a :class:`numpy.random.Generator` seeded from the scene, no global
random state):

1. the silhouette's parts are drawn as a mask at ``resolution * supersample`` (PIL polygons and thick lines);
2. the style's pattern is computed from pixel coordinates (object-centred, rotating with the object) inside the
   object's bounding box and coloured from the style's palette;
3. the outline is the mask dilated by the outline width, minus the mask;
4. the image is box-downsampled to ``resolution``, then the style's whole-image effects run.

Visibility is guaranteed: any palette or outline colour closer than :data:`MIN_CONTRAST` (max over channels) to the
background is pushed towards black or white until it is not, so the object never melts into the background.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .catalog import Catalog
from .entries import NATURAL, OUTLINE_WIDTHS, Content, Style
from .patterns import PATTERN_FUNCS, PatternContext

ROTATION_JITTER = 10.0  # degrees, uniform in +-
OFFSET_JITTER = 0.03  # image fractions, uniform in +- for x and y
SCALE_JITTER = 0.1  # scale factor uniform in 1 +- this
MIN_CONTRAST = 80  # min over palette colours of max-channel distance to the background
SUPERSAMPLE = 4
REF = 64.0  # reference pixels per image side: pattern and outline lengths are in 1/64 of the image


@dataclass(frozen=True)
class Scene:
    """What to draw. Names refer to a :class:`~b4m.world.catalog.Catalog`.

    Jitter (``rotation`` in degrees, ``offset`` in image fractions, ``scale`` factor) left as ``None`` is drawn from
    ``seed`` (so scenes that differ only by seed differ in jitter); set it explicitly to pin it, or use
    :meth:`without_jitter`. The seed also drives per-image randomness of some styles (noise, tiles, grain).
    """

    content: str
    style: str
    position: str = "center"
    size: str = "large"
    background: str = "white"
    seed: int = 0
    rotation: float | None = None
    offset: tuple[float, float] | None = None
    scale: float | None = None

    def without_jitter(self) -> Scene:
        """The same scene upright, centred on its position, at its nominal size."""
        return dataclasses.replace(self, rotation=0.0, offset=(0.0, 0.0), scale=1.0)


def _jitter(scene: Scene, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(rotation, dx, dy, scale): always draws from ``rng`` first so the stream does not depend on overrides."""
    rot = rng.uniform(-ROTATION_JITTER, ROTATION_JITTER)
    dx, dy = rng.uniform(-OFFSET_JITTER, OFFSET_JITTER, size=2)
    s = 1.0 + rng.uniform(-SCALE_JITTER, SCALE_JITTER)
    if scene.rotation is not None:
        rot = scene.rotation
    if scene.offset is not None:
        dx, dy = scene.offset
    if scene.scale is not None:
        s = scene.scale
    return float(rot), float(dx), float(dy), float(s)


def random_scene(
    rng: np.random.Generator,
    catalog: Catalog,
    contents: Sequence[str] | None = None,
    styles: Sequence[str] | None = None,
) -> Scene:
    """A scene with every attribute uniform over the catalog (contents/styles: restrict to these names).

    Jitter is left to the scene's seed. Pretraining passes the known contents and styles only.
    """
    contents = list(contents) if contents is not None else [c.name for c in catalog.contents]
    styles = list(styles) if styles is not None else [s.name for s in catalog.styles]

    def pick(names: Sequence[str]) -> str:
        return names[int(rng.integers(len(names)))]

    return Scene(
        content=pick(contents),
        style=pick(styles),
        position=pick([p.name for p in catalog.positions]),
        size=pick([s.name for s in catalog.sizes]),
        background=pick([b.name for b in catalog.backgrounds]),
        seed=int(rng.integers(2**31 - 1)),
    )


def layout_scene(
    rng: np.random.Generator, catalog: Catalog, content: str, style: str, size: str | None = None
) -> Scene:
    """``content`` in ``style`` at a random position, size (unless given) and background, with a drawn seed."""
    return Scene(
        content=content,
        style=style,
        position=catalog.positions[int(rng.integers(len(catalog.positions)))].name,
        size=size or catalog.sizes[int(rng.integers(len(catalog.sizes)))].name,
        background=catalog.backgrounds[int(rng.integers(len(catalog.backgrounds)))].name,
        seed=int(rng.integers(2**31 - 1)),
    )


# ----------------------------------------------------------------------------------------------------------------
# Colours


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def ensure_contrast(color: Sequence[float], background: Sequence[float], minimum: float = MIN_CONTRAST) -> np.ndarray:
    """``color``, moved until some channel differs by ``minimum`` from the background; unchanged if it already does.

    It moves towards white if it is lighter than the background, else towards black (so light and dark marks of a
    pattern stay apart), and the other way if that end cannot get far enough."""
    c = np.asarray(color, dtype=np.float32)
    bg = np.asarray(background, dtype=np.float32)
    if np.abs(c - bg).max() >= minimum:
        return c
    lighter = _luma(c) > _luma(bg)
    for end in (255.0, 0.0) if lighter else (0.0, 255.0):
        target = np.float32(end)
        if np.abs(target - bg).max() < minimum:
            continue
        for t in np.linspace(0.05, 1.0, 20):
            moved = c + np.float32(t) * (target - c)
            if np.abs(moved - bg).max() >= minimum:
                return moved
    return np.full(3, 0.0 if _luma(bg) > 127 else 255.0, dtype=np.float32)


def _palette(style: Style, content: Content) -> np.ndarray:
    """The style's colours as a (k, 3) float array; NATURAL: the content's colour, a darker and a lighter shade."""
    if style.palette == NATURAL:
        c = np.asarray(content.color, dtype=np.float32)
        return np.stack([c, c * 0.55, c + (255.0 - c) * 0.55])
    return np.asarray(style.colors, dtype=np.float32)


def _colorize(values: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Palette indices (int/bool) or a ramp in [0, 1] (float) -> (h, w, 3) uint8."""
    k = len(palette)
    if values.dtype.kind == "f":
        if k == 1:
            return np.broadcast_to(palette[0].astype(np.uint8), (*values.shape, 3))
        pos = values * np.float32(k - 1)
        i0 = np.minimum(pos.astype(np.intp), k - 2)
        f = (pos - i0)[..., None]
        out = palette[i0] * (1 - f) + palette[i0 + 1] * f
        return (out + 0.5).astype(np.uint8)
    table = (palette + 0.5).astype(np.uint8)
    idx = values.astype(np.intp)
    return table[idx % k] if k > 1 else table[np.zeros_like(idx)]


# ----------------------------------------------------------------------------------------------------------------
# Masks


def _draw_parts(content: Content, size: int, center: tuple[float, float], half: float, angle: float) -> Image.Image:
    """The silhouette as an 'L' image (255 inside): parts in order, subtract parts cut holes."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    a = math.radians(angle)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) * half
    offset = np.array(center) - 0.5  # PIL puts integer coordinates on pixel centres
    for part in content.parts:
        pts = part.points @ rot + offset
        fill = 0 if part.subtract else 255
        xy = [tuple(p) for p in pts.tolist()]
        if part.kind == "fill":
            draw.polygon(xy, fill=fill)
        else:
            w = max(1.0, part.width * half)
            draw.line(xy, fill=fill, width=round(w), joint="curve")
            r = w / 2
            for x, y in (xy[0], xy[-1]):  # round caps
                draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    return img


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation by ``steps`` pixels (alternating 4- and 8-neighbourhoods: a near-octagonal disk)."""
    out = mask
    for i in range(steps):
        src = out
        out = src.copy()
        out[1:] |= src[:-1]
        out[:-1] |= src[1:]
        out[:, 1:] |= src[:, :-1]
        out[:, :-1] |= src[:, 1:]
        if i % 2 == 1:
            out[1:, 1:] |= src[:-1, :-1]
            out[1:, :-1] |= src[:-1, 1:]
            out[:-1, 1:] |= src[1:, :-1]
            out[:-1, :-1] |= src[1:, 1:]
    return out


@lru_cache(maxsize=16)
def _coords(size: int) -> np.ndarray:
    """Pixel-centre coordinates in reference pixels."""
    return ((np.arange(size, dtype=np.float32) + 0.5) * np.float32(REF / size)).astype(np.float32)


@lru_cache(maxsize=16)
def _vignette(res: int) -> np.ndarray:
    c = (np.arange(res, dtype=np.float32) + 0.5) / res - 0.5
    r2 = (c[None, :] ** 2 + c[:, None] ** 2) / 0.5
    return r2[..., None].astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Effects (final resolution; float32 image in 0..255)


def _apply_effects(img: np.ndarray, style: Style, res: int, rng: np.random.Generator) -> np.ndarray:
    px = res / REF  # pixels per reference pixel
    for effect in style.effects:
        p = effect.params
        if effect.type == "grain":
            img = img + rng.normal(0.0, p["amount"], size=(res, res, 1)).astype(np.float32)
        elif effect.type == "blur":
            pil = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))
            img = np.asarray(pil.filter(ImageFilter.GaussianBlur(p["radius"] * px)), dtype=np.float32)
        elif effect.type == "cast":
            img = img * np.float32(1 - p["strength"]) + np.asarray(p["color"], np.float32) * p["strength"]
        elif effect.type == "fade":
            img = img * np.float32(1 - p["strength"]) + np.float32(255 * p["strength"])
        elif effect.type == "posterize":
            step = np.float32(255.0 / (p["levels"] - 1))
            img = np.round(img / step) * step
        elif effect.type == "pixelate":
            n = max(1, round(res / (p["block"] * px)))
            pil = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))
            small = pil.resize((n, n), Image.Resampling.BOX)
            img = np.asarray(small.resize((res, res), Image.Resampling.NEAREST), dtype=np.float32)
        elif effect.type == "scanlines":
            rows = np.mod(_coords(res) / np.float32(p["period"]), 1.0) >= 0.5
            img = img.copy()
            img[rows] *= np.float32(1 - p["strength"])
        elif effect.type == "vignette":
            img = img * (1 - np.float32(p["strength"]) * _vignette(res))
        else:  # pragma: no cover - catalog validation rejects unknown effects
            raise AssertionError(effect.type)
    return img


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _render(
    scene: Scene, catalog: Catalog, resolution: int, supersample: int, draw_object: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    content = catalog.content(scene.content)
    style = catalog.style(scene.style)
    pos = catalog.position(scene.position)
    size = catalog.size(scene.size)
    bg = np.asarray(catalog.background(scene.background).color, dtype=np.float32)
    # Independent streams, so the background plate gets the same grain as the full render.
    jitter_rng, pattern_rng, effect_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(scene.seed).spawn(3)
    )
    rot, dx, dy, s = _jitter(scene, jitter_rng)

    S = resolution * supersample
    cell = S / REF  # supersampled pixels per reference pixel
    half = size.scale * s * S / 2  # supersampled pixels per unit-box unit
    cx, cy = (pos.center[0] + dx) * S, (pos.center[1] + dy) * S
    outline_px = round(OUTLINE_WIDTHS[style.outline] * cell)

    canvas = np.empty((S, S, 3), dtype=np.uint8)
    canvas[:] = (bg + 0.5).astype(np.uint8)
    full = np.zeros((S, S), dtype=bool)
    if draw_object:
        full = np.asarray(_draw_parts(content, S, (cx, cy), half, rot)) > 127
    rows, cols = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
    if len(rows):
        pad = outline_px + 1
        y0, y1 = max(0, rows[0] - pad), min(S, rows[-1] + pad + 1)
        x0, x1 = max(0, cols[0] - pad), min(S, cols[-1] + pad + 1)
        mask = full[y0:y1, x0:x1]
        xs = _coords(S)[x0:x1] - np.float32(cx / cell)
        ys = _coords(S)[y0:y1] - np.float32(cy / cell)
        a = math.radians(rot)
        c, sn = np.float32(math.cos(a)), np.float32(math.sin(a))
        u = xs[None, :] * c + ys[:, None] * sn
        v = ys[:, None] * c - xs[None, :] * sn
        palette = np.stack([ensure_contrast(col, bg) for col in _palette(style, content)])
        ctx = PatternContext(rng=pattern_rng, half=half / cell, k=len(palette), cell=cell)
        fill = _colorize(PATTERN_FUNCS[style.pattern.type](u, v, style.pattern.params, ctx), palette)
        region = canvas[y0:y1, x0:x1]
        region[mask] = fill[mask]
        if outline_px:
            ring = _dilate(mask, outline_px) & ~mask
            region[ring] = (ensure_contrast(style.outline_color, bg) + 0.5).astype(np.uint8)
            full = full.copy()
            full[y0:y1, x0:x1] |= ring

    out = np.asarray(Image.fromarray(canvas).reduce(supersample))
    cover = np.asarray(Image.fromarray(full.astype(np.uint8) * 255).reduce(supersample), dtype=np.float32) / 255
    if style.effects:
        out = _apply_effects(out.astype(np.float32), style, resolution, effect_rng)
        out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return out, cover


def render_with_mask(
    scene: Scene, catalog: Catalog, resolution: int = 64, supersample: int = SUPERSAMPLE
) -> tuple[np.ndarray, np.ndarray]:
    """The scene as a (H, W, 3) uint8 array and the object's coverage (H, W) float32 in [0, 1] (fill + outline)."""
    return _render(scene, catalog, resolution, supersample)


def render_background(
    scene: Scene, catalog: Catalog, resolution: int = 64, supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """The scene's background plate: the same image without the object (same effects, same grain)."""
    return _render(scene, catalog, resolution, supersample, draw_object=False)[0]


def render_array(scene: Scene, catalog: Catalog, resolution: int = 64, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """The scene as a (H, W, 3) uint8 array."""
    return render_with_mask(scene, catalog, resolution, supersample)[0]


def render(scene: Scene, catalog: Catalog, resolution: int = 64, supersample: int = SUPERSAMPLE) -> Image.Image:
    """The scene as an RGB image, ``resolution`` pixels square. Same scene, same bytes."""
    return Image.fromarray(render_array(scene, catalog, resolution, supersample), mode="RGB")


def render_batch(scenes: Sequence[Scene], catalog: Catalog, resolution: int = 64) -> np.ndarray:
    """Many scenes as one (N, H, W, 3) uint8 array."""
    out = np.empty((len(scenes), resolution, resolution, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = render_array(scene, catalog, resolution)
    return out
