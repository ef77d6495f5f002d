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
- instant composition: ``make.steps = 0``;
- make's data: ``make.routing = "clean"`` (each concept's loss trains only its own half), ``make_style_weight``
  (1 = the paper's equal weights).

``content_sets`` / ``style_sets``: the main sets (``main=True``) and the auxiliary sets (``main=False``) of each
run; make trains on the two concepts' main sets (:func:`make_sets`, shared with ``b4m make``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..adapter_file import fuse
from ..errors import B4MError
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
    # The style references' weight in make's loss (content's is 1). 0.5, not the paper's equal weights: +0.016 and
    # +0.03 average on the world benchmark at seeds 0 and 1, from content (docs/benchmarks.md, "Make's data").
    make_style_weight: float = 0.5

    def __post_init__(self) -> None:
        if not self.make_style_weight >= 0:
            raise B4MError(f"make_style_weight must be at least 0, got {self.make_style_weight}")


def make_sets(
    content: Sequence[TrainSet],
    style: Sequence[TrainSet],
    config: TrainConfig,
    plp: PLPConfig,
    style_weight: float,
) -> tuple[list[TrainSet], TrainConfig]:
    """Make's training sets and loop settings from the two concepts' main sets.

    Routing ``none`` (the paper's): both halves learn from both losses. Routing ``clean``: the content loss trains
    only the content half and the style loss only the style half (the style sets become the "auxiliary" side of
    :func:`b4m.plp.routing`), so the style references' own contents cannot be learned into the content half.
    """
    if config.routing == "mixed":
        raise B4MError("make takes routing none or clean, not mixed")
    clean = config.routing == "clean"
    sets = [TrainSet(s.name, s.latents, s.cond, s.weight, True) for s in content]
    sets += [TrainSet(s.name, s.latents, s.cond, s.weight * style_weight, not clean) for s in style]
    if clean:
        config = dataclasses.replace(config, owned=plp.half_of("content"))
    return sets, config


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
    sets, make_cfg = make_sets(
        [dataclasses.replace(s, name=f"content:{s.name}") for s in content_sets if s.main],
        [dataclasses.replace(s, name=f"style:{s.name}") for s in style_sets if s.main],
        config.make,
        fused.config,
        config.make_style_weight,
    )
    made = train_plp(model, sets, None, make_cfg, Path(out) / "b4m-make", "fused", start=fused)
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
