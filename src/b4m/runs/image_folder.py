"""A generate call's output folder: ``PP_seedS.png`` per image (prompt index ``PP``, seed ``S``), each with the prompt,
the seed and every setting in its PNG metadata, and ``grid.png`` (a row per prompt, a column per seed).

Images are written as soon as each prompt's are decoded, so an interrupted call keeps what it drew. With ``resume``
the images already there that this call would draw (same prompt, seed and settings) are kept and only the missing
ones are drawn: more seeds (``-n 8`` after ``-n 4``), another prompt, or what an interruption lost. An image an earlier
call drew with another prompt or other settings is refused, naming the file and the first difference."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import B4MError
from ..images import PNG_KEY, save_grid, save_png, upscaled
from ..progress import count

#: The files a generate call writes: ``NN_seedS.png`` per image and the grid.
GENERATED = re.compile(r"\d+_seed-?\d+\.png|grid\.png")
#: Metadata keys that differ from image to image (the rest are the call's settings).
PER_IMAGE = ("prompt", "seed", "scene")


def image_name(prompt_index: int, seed: int) -> str:
    return f"{prompt_index:02d}_seed{seed}.png"


def holds_all(folder: Path, prompts: int, seeds: Sequence[int]) -> bool:
    """Whether ``folder`` holds an image of each of ``prompts`` prompts at each seed, and the grid written last (by
    name: checked before a model loads; :func:`missing_seeds` reads what they were drawn with)."""
    images = all((folder / image_name(i, s)).is_file() for i in range(prompts) for s in seeds)
    return images and (folder / "grid.png").is_file()


def earlier_images(folder: Path, *, resume: bool, overwrite: bool) -> list[Path]:
    """The images an earlier call wrote to ``folder``, checked before anything loads: refused unless ``resume``
    (keep them, draw the missing ones) or ``overwrite`` (replace them)."""
    earlier = sorted(f for f in folder.glob("*.png") if GENERATED.fullmatch(f.name)) if folder.is_dir() else []
    if earlier and not (resume or overwrite):
        images = [f.name for f in earlier if f.name != "grid.png"] or ["grid.png"]
        raise B4MError(
            f"{folder}: holds {count(len(images), 'image')} of an earlier call (e.g. {images[0]}); --resume keeps "
            "them and draws only the missing ones, --overwrite replaces them"
        )
    return earlier


def image_info(prompt: str, seed: int, settings: dict, *, upscale: int = 1, scene: dict | None = None) -> dict:
    """One image's metadata: its prompt and seed, the call's settings, the upscale factor if any, the world scene."""
    info = {"prompt": prompt, "seed": seed, **settings, **({"upscale": upscale} if upscale > 1 else {})}
    if scene is not None:
        info["scene"] = scene
    return info


def read_info(path: Path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text.get(PNG_KEY, "{}"))


def missing_seeds(
    folder: Path, prompts: Sequence[str], seeds: Sequence[int], settings: dict, *, upscale: int = 1
) -> dict[int, list[int]]:
    """Per prompt index, the seeds whose image ``folder`` does not hold yet (those that hold none are left out). An
    image there of another prompt or other settings is refused in one line naming it and the first difference."""
    wanted = json.loads(json.dumps(image_info("", 0, settings, upscale=upscale)))  # as read back from a file
    want = {k: v for k, v in wanted.items() if k not in PER_IMAGE}
    todo: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        for seed in seeds:
            path = folder / image_name(i, seed)
            if not path.is_file():
                todo.setdefault(i, []).append(seed)
                continue
            info = read_info(path)
            if info.get("prompt") != prompt:
                raise B4MError(
                    f"{path}: drawn for the prompt {info.get('prompt')!r}, not {prompt!r}; --overwrite replaces the "
                    "folder's images, or choose another -o"
                )
            have = {k: v for k, v in info.items() if k not in PER_IMAGE}
            if have != want:
                key = next(k for k in sorted({*have, *want}) if have.get(k) != want.get(k))
                raise B4MError(
                    f"{path}: drawn with {key} = {have.get(key)!r}, this call's is {want.get(key)!r}; --overwrite "
                    "replaces the folder's images, or choose another -o"
                )
    return todo


def grouped(todo: dict[int, list[int]]) -> list[tuple[list[int], list[int]]]:
    """The prompts that miss the same seeds, together (one sampling call each): ``[(prompt indices, seeds)]``."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, seeds in todo.items():
        groups.setdefault(tuple(seeds), []).append(i)
    return [(indices, list(seeds)) for seeds, indices in groups.items()]


def write_images(
    folder: Path,
    prompt_index: int,
    prompt: str,
    seeds: Sequence[int],
    images: Sequence[Image.Image],
    settings: dict,
    *,
    upscale: int = 1,
    scene: dict | None = None,
) -> list[Path]:
    """One prompt's images (one per seed), each ``upscale`` times larger, with their metadata."""
    return [
        save_png(
            upscaled(image, upscale),
            folder / image_name(prompt_index, seed),
            image_info(prompt, seed, settings, upscale=upscale, scene=scene),
        )
        for seed, image in zip(seeds, images, strict=True)
    ]


def read_image(path: Path, upscale: int = 1) -> Image.Image:
    """An image as drawn, before :func:`write_images` made it ``upscale`` times larger (nearest neighbours undo
    exactly)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return Image.fromarray(np.ascontiguousarray(array[::upscale, ::upscale]))


def write_grid(
    folder: Path,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: dict,
    *,
    upscale: int = 1,
) -> Path:
    """``grid.png``: the images prompt-major, a row per prompt and a column per seed, labelled, with gaps."""
    return save_grid(
        images,
        len(seeds),
        folder / "grid.png",
        {"prompts": list(prompts), "seeds": list(seeds), **settings},
        gap=2,
        upscale=upscale,
        row_labels=list(prompts),
        column_labels=[f"seed {s}" for s in seeds],
    )


def save_generated(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    seeds: Sequence[int],
    folder: Path,
    settings: dict,
    *,
    upscale: int = 1,
    grid_upscale: int | None = None,
    scenes: Sequence[dict | None] | None = None,
) -> tuple[list[Path], Path]:
    """Images prompt-major (one per prompt and seed) as :func:`write_images` writes them, and the grid
    (``grid_upscale`` times larger, default ``upscale``)."""
    n = len(seeds)
    paths = []
    for i, prompt in enumerate(prompts):
        scene = scenes[i] if scenes is not None else None
        paths += write_images(
            folder, i, prompt, seeds, images[i * n : (i + 1) * n], settings, upscale=upscale, scene=scene
        )
    return paths, write_grid(folder, images, prompts, seeds, settings, upscale=grid_upscale or upscale)
