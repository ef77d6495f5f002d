"""How good the world's base model is: generate from prompts that control every attribute, score with the oracle.

The quality bar is measured on *held-out* combinations: known contents and known styles that pretraining never
showed together (:func:`b4m.world.pretrain.holdout_combinations`), so the model must compose them. Each prompt uses
the first caption template, which names the content, the style, the size, the position and the background; every
image is scored on all five. A second oracle (other seed and architecture) scores the same images, and the share
of images on which the two agree says how far the scores can be trusted on generated images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import B4MError
from ..images import save_grid
from ..metrics.stats import wilson_interval
from ..models.base import SampleRequest
from .captions import caption
from .catalog import Catalog
from .oracle import ATTRIBUTES, Oracle, agreement, predict_indices, scene_labels
from .render import Scene, layout_scene


@dataclass
class QualityConfig:
    n: int = 512  # generated images (one per scene)
    seed: int = 0  # scenes and sampling noise
    steps: int = 25  # sampler steps
    guidance_scale: float | None = None  # None: the model's default
    scheduler: str | None = None  # None: the model's default (DPM++)


def held_out_pairs(model) -> list[tuple[str, str]]:
    """The (content, style) pairs a world model never saw together (from its folder's ``holdout.json``)."""
    pairs = list(getattr(model, "held_out", []))
    if not pairs:
        raise B4MError(f"{model.identity}: the model folder has no holdout.json, so the held-out pairs are unknown")
    return pairs


def prompt_scenes(catalog: Catalog, pairs: Sequence[tuple[str, str]], n: int, seed: int) -> list[Scene]:
    """``n`` scenes cycling through ``pairs`` (content, style), with position, size and background drawn at random."""
    rng = np.random.default_rng([seed, 11])
    order = rng.permutation(len(pairs))
    return [layout_scene(rng, catalog, *pairs[order[i % len(pairs)]]) for i in range(n)]


def generate_for_scenes(model, scenes: Sequence[Scene], catalog: Catalog, config: QualityConfig) -> np.ndarray:
    """One image per scene from its full caption (template 0), image i with seed ``config.seed * 100003 + i``."""
    pairs = [(caption(s, template=0, catalog=catalog), config.seed * 100_003 + i) for i, s in enumerate(scenes)]
    request = SampleRequest(
        [], [], steps=config.steps, guidance_scale=config.guidance_scale, scheduler=config.scheduler
    )
    return model.sample_pairs(pairs, request)


def score(
    oracle: Oracle, images: np.ndarray, scenes: Sequence[Scene], second: Oracle | None = None
) -> dict[str, object]:
    """Per attribute: accuracy, the per-image correctness (0/1 list), and agreement with ``second`` if given."""
    labels = scene_labels(scenes, oracle.classes)
    pred = predict_indices(oracle, images)
    out: dict[str, object] = {"n": len(scenes)}
    for j, a in enumerate(ATTRIBUTES):
        correct = (pred[a] == labels[:, j]).astype(int)
        interval = wilson_interval(int(correct.sum()), len(correct))
        out[a] = {
            "accuracy": interval.estimate,
            "low": interval.low,
            "high": interval.high,
            "correct": correct.tolist(),
        }
    if second is not None:
        out["agreement"] = agreement(oracle, second, images)
    return out


def base_model_quality(
    model,
    oracle: Oracle,
    catalog: Catalog,
    pairs: Sequence[tuple[str, str]],
    config: QualityConfig | None = None,
    second: Oracle | None = None,
) -> tuple[dict[str, object], np.ndarray, list[Scene]]:
    """Generate ``config.n`` images for scenes over ``pairs`` and score them; returns (scores, images, scenes)."""
    config = config or QualityConfig()
    scenes = prompt_scenes(catalog, pairs, config.n, config.seed)
    images = generate_for_scenes(model, scenes, catalog, config)
    result = score(oracle, images, scenes, second)
    result["config"] = {k: getattr(config, k) for k in config.__dataclass_fields__}
    return result, images, scenes


def save_samples(images: np.ndarray, path: str | Path, info: dict | None = None, limit: int = 64) -> Path:
    """The first ``limit`` images (uint8, ``(N, H, W, 3)``) as a PNG grid of 16 a row, ``info`` in its metadata."""
    tiles = [Image.fromarray(im) for im in images[:limit]]
    return save_grid(tiles, min(16, len(tiles)), Path(path), info or {})


def save_quality(folder: str | Path, pairs: Sequence[tuple[str, str]], results: list[dict[str, object]]) -> Path:
    """``folder/quality.json``: the number of held-out pairs and the scores (one result per guidance scale)."""
    path = Path(folder) / "quality.json"
    path.write_text(json.dumps({"pairs": len(pairs), "results": results}, indent=1))
    return path
