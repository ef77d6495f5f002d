"""Writing images: PNGs with b4m's settings in their metadata, and grids (all written atomically)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .files import atomic_path

#: The PNG text chunk that holds an image's prompt, seed and settings (JSON).
PNG_KEY = "b4m"


def save_png(image: Image.Image, path: Path, info: dict | None = None) -> Path:
    """Write ``image`` atomically, with ``info`` (if any) as JSON in the PNG's ``b4m`` text chunk."""
    meta = PngInfo()
    if info is not None:
        meta.add_text(PNG_KEY, json.dumps(info))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=meta)
    return path


def save_grid(images: list[Image.Image], columns: int, path: Path, info: dict) -> Path:
    """A grid of equally sized images, written atomically with ``info`` as PNG text metadata."""
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return save_png(grid, path, info)


def save_image_set(images: list[Image.Image], captions: list[str], folder: Path) -> list[Path]:
    """Write a set of images as the commands read one: ``00.png``, ``01.png``, … each with its caption in a
    same-name ``.txt`` file (:func:`b4m.data.load_image_set` reads them back in this order)."""
    folder = Path(folder)
    paths = []
    for i, (image, text) in enumerate(zip(images, captions, strict=True)):
        path = save_png(image, folder / f"{i:02d}.png")
        with atomic_path(path.with_suffix(".txt")) as tmp:
            tmp.write_text(text + "\n")
        paths.append(path)
    return paths
