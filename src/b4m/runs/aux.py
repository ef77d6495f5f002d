"""Auxiliary sets generated with the base model when a content or style run is given none (``--aux``), cached on
disk by model, prompt and settings so that every later run reuses them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from ..data import ImageSet, load_image_set
from ..images import save_png
from ..models.base import DiffusionModel, SampleRequest
from ..progress import say
from ..training import distributed
from .config import StageConfig

# Built-in prompts for auxiliary sets generated with the base model (used when the user gives no --aux and the
# model brings none of its own). A content run needs varied styles; a style run needs varied everyday objects.
AUX_STYLE_PROMPTS = [
    "a house in watercolor painting style",
    "a bicycle in pixel art style",
    "a teapot in origami paper style",
    "a tree in pencil sketch style",
    "a boat in stained glass style",
    "a lighthouse in ukiyo-e woodblock print style",
]
AUX_CONTENT_PROMPTS = [
    "a photo of a teapot",
    "a photo of a vase",
    "a photo of a backpack",
    "a photo of a wooden chair",
    "a photo of a red apple",
    "a photo of a sneaker",
]


def cache_dir() -> Path:
    """b4m's cache folder: ``$B4M_CACHE``, else ``~/.cache/b4m``."""
    return Path(os.environ.get("B4M_CACHE", Path.home() / ".cache" / "b4m"))


def generated_aux_sets(
    model: DiffusionModel, role: str, cfg: StageConfig, train_res: int, console=None
) -> list[ImageSet]:
    """Auxiliary sets made with the base model from built-in prompts, cached on disk by model and prompt.

    Generated at the model's own resolution (its best quality), loaded at the training resolution. With several
    processes (``accelerate launch``) rank 0 generates the missing sets and the others wait for its files.
    """
    builtin = AUX_STYLE_PROMPTS if role == "content" else AUX_CONTENT_PROMPTS
    prompts = (model.aux_prompts(role) or builtin)[: cfg.auto_aux.sets]
    res = model.resolution
    dist = distributed.current()
    folders = []
    # The steps the model samples with (None: its default), so that the cache key names them.
    steps = cfg.auto_aux.steps if cfg.auto_aux.steps is not None else model.sample_steps(SampleRequest([], []))
    auto = dataclasses.replace(cfg.auto_aux, steps=steps)
    for prompt in prompts:
        key = hashlib.sha256(json.dumps([model.identity, prompt, res, dataclasses.asdict(auto)]).encode())
        folder = cache_dir() / "aux" / key.hexdigest()[:16]
        folders.append(folder)
        files = [folder / f"{i}.png" for i in range(cfg.auto_aux.images)]
        if dist.is_main and not all(f.exists() for f in files):
            say(console, f"generating auxiliary set: {prompt!r} ({cfg.auto_aux.images} images, cached in {folder})")
            seeds = list(range(cfg.auto_aux.images))
            request = SampleRequest(
                [prompt],
                seeds,
                steps=auto.steps,
                guidance_scale=cfg.auto_aux.guidance_scale,
                height=res,
                width=res,
            )
            for f, image in zip(files, model.sample(request), strict=True):
                save_png(image, f)
    dist.barrier()  # the other ranks wait for rank 0's images (a no-op with one process)
    return [
        load_image_set(folder, prompt, train_res, name=prompt) for folder, prompt in zip(folders, prompts, strict=True)
    ]
