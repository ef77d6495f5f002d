"""Direct merge: two independently trained LoRAs added with fixed weights (B4M paper, eq. 3).

``ΔW = λc·ΔWc + λs·ΔWs`` for every module. The sum is kept as plain LoRA factors of rank ``rc + rs``:
``up = [λc·Uc, λs·Us]``, ``down = [Dc; Ds]``, so ``up @ down`` is the weighted sum and the file loads in any LoRA
loader; a module only one of the LoRAs adapts keeps that LoRA's (weighted) factors.

Stage 1 is one plain LoRA per concept (DreamBooth-LoRA on its main sets), the same runs ZipLoRA merges: with a shared
``cache``, :func:`b4m.baselines.run_method` trains them once for both methods and for every pair they appear in.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter.config import PLPConfig
from ..errors import B4MError
from ..lora_files import Factors
from ..models.base import DiffusionModel
from ..training.config import TrainConfig
from ..training.runs import RunRecord, memoized, pair_info, run_key, train_adapter
from ..training.sets import TrainSet
from .common import MethodResult, lora_train_config, main_sets, plain_lora


@dataclass
class DirectMergeConfig:
    """Direct merge's settings: the two stage-1 LoRAs and the weights λc, λs of eq. 3."""

    lora: PLPConfig = field(default_factory=plain_lora)
    train: TrainConfig = field(default_factory=lora_train_config)
    content_scale: float = 1.0
    style_scale: float = 1.0


def concat_factors(parts: Sequence[tuple[Factors, float]]) -> Factors:
    """``Σ_k λ_k · up_k @ down_k`` per module as one pair of factors (ranks add up): ``up = [λ_1·U_1, λ_2·U_2, …]``,
    ``down = [D_1; D_2; …]``. Modules present in only some of the parts get only those."""
    names = sorted({name for factors, _ in parts for name in factors})
    out: Factors = {}
    for name in names:
        ups, downs = [], []
        for factors, scale in parts:
            if name not in factors:
                continue
            up, down = factors[name]
            if ups and (up.shape[0] != ups[0].shape[0] or down.shape[1] != downs[0].shape[1]):
                raise B4MError(f"module {name}: the LoRAs disagree on its shape ({tuple(up.shape)} vs earlier)")
            ups.append(up if scale == 1.0 else up * scale)
            downs.append(down)
        out[name] = (torch.cat(ups, dim=1).contiguous(), torch.cat(downs, dim=0).contiguous())
    return out


def direct_merge(content: Factors, style: Factors, content_scale: float = 1.0, style_scale: float = 1.0) -> Factors:
    """Eq. 3: ``ΔW = λc·ΔWc + λs·ΔWs`` per module, as factors of rank ``rc + rs``."""
    return concat_factors([(content, content_scale), (style, style_scale)])


def lora_stage1(
    role: str,
    sets: Sequence[TrainSet],
    model: DiffusionModel,
    lora: PLPConfig,
    train: TrainConfig,
    out: str | Path,
    cache: dict | None,
) -> tuple[RunRecord, bool]:
    """One concept's plain LoRA on its main sets, from ``cache`` when the same run was done before."""
    mains = main_sets(sets)
    key = run_key("lora", role, mains, model.identity, lora, train)
    folder = Path(out) / f"lora-{role}"
    return memoized(cache, key, lambda: train_adapter(model, mains, train, folder, role, plp=lora))


def run(
    content_sets: Sequence[TrainSet],
    style_sets: Sequence[TrainSet],
    model: DiffusionModel,
    config: DirectMergeConfig,
    out: str | Path,
    cache: dict | None = None,
) -> MethodResult:
    t0 = time.perf_counter()
    content, c_reused = lora_stage1("content", content_sets, model, config.lora, config.train, out, cache)
    style, s_reused = lora_stage1("style", style_sets, model, config.lora, config.train, out, cache)
    c_factors, s_factors = content.adapter.factors(), style.adapter.factors()
    factors = direct_merge(c_factors, s_factors, config.content_scale, config.style_scale)
    info = pair_info(config, t0, (content, c_reused), (style, s_reused))
    return MethodResult("direct_merge", factors, info, parts={"content": content.adapter, "style": style.adapter})
