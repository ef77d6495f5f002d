"""B4M itself behind the same interface as the baselines, in memory: a content run, a style run, fuse, make.

The same steps as :func:`b4m.stages.run_break` and :func:`b4m.stages.run_make` (which work on folders and
configs), on cached sets and a loaded model, so a benchmark calls B4M, its ablations and the baselines the same way.
An ablation is one setting of :class:`B4MConfig`:

- frozen ratio d: ``adapter.ratio`` (``0`` needs ``adapter.learned_init = "kaiming"`` or ``"gaussian"``);
- frozen init: ``adapter.init`` (``approx``, ``exact``, ``random`` = w/o Orth);
- half assignment: ``adapter.assignment``; gradient mixing: ``train.routing = "mixed"``;
- without multi-correspondence: pass the other concept's sets as the auxiliary sets, or none with
  ``train.routing = "none"``;
- without the Riemannian preconditioner: ``make.precondition = False``;
- instant composition: ``make.steps = 0``.

``content_sets`` / ``style_sets``: the main sets (``main=True``) and the auxiliary sets (``main=False``) of each
run; make trains on the two concepts' main sets with weight 1 each (as ``b4m make`` does).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..adapter_file import fuse
from ..models.base import DiffusionModel
from ..plp import PLPConfig
from ..train import TrainConfig, TrainSet
from .common import MethodResult, Stage1, cached_stage1, stage1_key, train_info, train_plp


def make_train_config(**overrides) -> TrainConfig:
    """``b4m make``'s defaults (:data:`b4m.stages.STAGE_DEFAULTS`): 50 steps, routing none, preconditioner on."""
    from ..stages import STAGE_DEFAULTS

    return TrainConfig(**{**STAGE_DEFAULTS["make"]["train"], **overrides})


@dataclass
class B4MConfig:
    """B4M's settings: the PLP adapter, the two break runs (``train``) and make (``make``)."""

    adapter: PLPConfig = field(default_factory=PLPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    make: TrainConfig = field(default_factory=make_train_config)
    content_scale: float = 1.0
    style_scale: float = 1.0


def break_stage1(
    role: str,
    sets: Sequence[TrainSet],
    model: DiffusionModel,
    config: B4MConfig,
    out: str | Path,
    cache: dict | None,
) -> tuple[Stage1, bool]:
    """A content or style run (paper 4.2): the owned half from the main sets, the other from the auxiliary ones."""
    train_cfg = dataclasses.replace(config.train, owned=config.adapter.half_of(role))
    key = stage1_key("b4m", role, sets, model.identity, config.adapter, train_cfg)
    folder = Path(out) / f"b4m-{role}"
    return cached_stage1(cache, key, lambda: train_plp(model, sets, config.adapter, train_cfg, folder, role))


def run(
    content_sets: Sequence[TrainSet],
    style_sets: Sequence[TrainSet],
    model: DiffusionModel,
    config: B4MConfig,
    out: str | Path,
    cache: dict | None = None,
) -> MethodResult:
    t0 = time.perf_counter()
    content, c_reused = break_stage1("content", content_sets, model, config, out, cache)
    style, s_reused = break_stage1("style", style_sets, model, config, out, cache)
    fused = fuse(content.adapter, style.adapter)
    sets = [TrainSet(f"content:{s.name}", s.latents, s.cond, 1.0, True) for s in content_sets if s.main]
    sets += [TrainSet(f"style:{s.name}", s.latents, s.cond, 1.0, True) for s in style_sets if s.main]
    made = train_plp(model, sets, None, config.make, Path(out) / "b4m-make", "fused", start=fused)
    info = {
        "config": asdict(config),
        "seconds": round(time.perf_counter() - t0, 3),
        "content": train_info(content, c_reused),
        "style": train_info(style, s_reused),
        "make": train_info(made),
    }
    factors = made.adapter.factors(content_scale=config.content_scale, style_scale=config.style_scale)
    parts = {"content": content.adapter, "style": style.adapter, "fused": fused}
    return MethodResult("b4m", factors, info, adapter=made.adapter, parts=parts)
