"""JTtrain: one LoRA trained jointly on the content and the style images (B4M paper, eq. 2; DreamBooth-LoRA).

``L = L_content + L_style``: every micro-step draws ``batch_size`` images from the content sets and from the style
sets, each with its own prompt, through one ordinary LoRA (a PLP with no frozen part: ``ratio = 0``, ``B = 0`` and
a random ``D``, see :func:`b4m.baselines.common.plain_lora`) on the loop of :mod:`b4m.training.loop`. Content and style
share every parameter, which is the entanglement the paper's section 3 describes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..adapter.config import PLPConfig
from ..models.base import DiffusionModel
from ..training.config import TrainConfig
from ..training.runs import run_info, train_adapter
from ..training.sets import TrainSet
from .common import MethodResult, joint_sets, lora_train_config, plain_lora


@dataclass
class JTtrainConfig:
    """JTtrain's settings: the LoRA and its one training run."""

    lora: PLPConfig = field(default_factory=plain_lora)
    train: TrainConfig = field(default_factory=lora_train_config)


def run(
    content_sets: Sequence[TrainSet],
    style_sets: Sequence[TrainSet],
    model: DiffusionModel,
    config: JTtrainConfig,
    out: str | Path,
    cache: dict | None = None,
) -> MethodResult:
    """Train one LoRA on both concepts (no stage 1 to reuse: ``cache`` is not used)."""
    del cache
    t0 = time.perf_counter()
    sets = joint_sets(content_sets, style_sets)  # eq. 2: L = L_content + L_style
    stage = train_adapter(model, sets, config.train, Path(out) / "joint", "fused", plp=config.lora)
    return MethodResult(
        "jttrain",
        stage.adapter.factors(),
        info={"config": asdict(config), "seconds": round(time.perf_counter() - t0, 3), "joint": run_info(stage)},
        adapter=stage.adapter,
    )
