"""B4M behind the baselines' interface: :func:`b4m.method.run` (the one B4M the commands run), its made adapter as
plain LoRA factors with the generation scales folded in."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..method.config import B4MConfig
from ..method.stages import run as run_b4m
from ..models.base import DiffusionModel
from ..training.sets import TrainSet
from .common import MethodResult


def run(
    content_sets: Sequence[TrainSet],
    style_sets: Sequence[TrainSet],
    model: DiffusionModel,
    config: B4MConfig,
    out: str | Path,
    cache: dict | None = None,
) -> MethodResult:
    result = run_b4m(content_sets, style_sets, model, config, out, memo=cache)
    made = result.made.adapter
    factors = made.factors(content_scale=config.content_scale, style_scale=config.style_scale)
    parts = {"content": result.content.adapter, "style": result.style.adapter, "fused": result.fused}
    return MethodResult("b4m", factors, result.info, adapter=made, parts=parts)
