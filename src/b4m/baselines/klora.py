"""K-LoRA (Ouyang, Li, Hou, CVPR 2025, arXiv 2502.18461): two LoRAs fused without training, the content or the style
LoRA per layer and per sampling step, whichever has the larger (balanced, step-scaled) sum of its Top-K absolute
ΔW entries. The formulas, their sources and what we do differently are in :mod:`b4m.adapter.klora`.

Stage 1 is direct merge's: one plain LoRA per concept (:func:`b4m.baselines.direct_merge.lora_stage1`, the same run
keys), so with a shared ``cache`` the benchmark trains the two LoRAs once for direct merge, ZipLoRA and K-LoRA.

Sampling: :meth:`KLoRAResult.applied` (:func:`klora_applied`) attaches the K-LoRA layers and listens to the sampler's
steps (:mod:`b4m.models.steps`), so each step's choice uses the sampler's true step fraction.

Export: K-LoRA is no single plain LoRA (which LoRA a layer adds changes from step to step), so a result's ``factors``
are empty and :meth:`KLoRAResult.save` writes its **two LoRAs** (plain LoRA files, ``content_scale`` and
``style_scale`` folded in) **and a JSON of its settings** beside them; ``b4m generate --content-lora … --style-lora …
--combine k-lora`` applies them again (with the default settings; others through :func:`klora_applied`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter.config import PLPConfig
from ..adapter.klora import KLoRA, KLoRASettings, klora_attached
from ..files import atomic_path
from ..lora_files import Factors, save_lora
from ..models.base import DiffusionModel
from ..models.steps import step_listener
from ..training.config import TrainConfig
from ..training.runs import pair_info
from ..training.sets import TrainSet
from .common import MethodResult, lora_train_config, plain_lora
from .direct_merge import lora_stage1


@dataclass
class KLoRAConfig:
    """K-LoRA's settings: the two stage-1 LoRAs (direct merge's), a weight for each (folded into its ΔW before the
    choice, which γ makes independent of them: both scores and γ scale alike) and K-LoRA's constants."""

    lora: PLPConfig = field(default_factory=plain_lora)
    train: TrainConfig = field(default_factory=lora_train_config)
    content_scale: float = 1.0
    style_scale: float = 1.0
    klora: KLoRASettings = field(default_factory=KLoRASettings)


def scaled(factors: Factors, scale: float) -> Factors:
    """``scale · ΔW`` per module (folded into ``up``)."""
    return factors if scale == 1.0 else {name: (up * scale, down) for name, (up, down) in factors.items()}


@contextlib.contextmanager
def klora_applied(
    denoiser: nn.Module, content: Factors, style: Factors, settings: KLoRASettings | None = None
) -> Iterator[KLoRA]:
    """K-LoRA on ``denoiser`` inside the block: every module either LoRA adapts wrapped
    (:func:`b4m.adapter.klora.add_klora`), each layer choosing at every step the sampler announces; the original
    layers are put back after (the weights are never changed). Yields the :class:`~b4m.adapter.klora.KLoRA` (its
    ``gamma``, ``choices()``)."""
    with klora_attached(denoiser, content, style, settings) as klora, step_listener(klora.begin_step):
        yield klora


@dataclass
class KLoRAResult(MethodResult):
    """K-LoRA's result: no static ΔW (``factors`` is empty); ``content`` and ``style`` are the two LoRAs (scales
    folded in) and ``settings`` K-LoRA's constants."""

    content: Factors = field(default_factory=dict)
    style: Factors = field(default_factory=dict)
    settings: KLoRASettings = field(default_factory=KLoRASettings)

    def applied(self, denoiser: nn.Module) -> AbstractContextManager:
        """The two LoRAs on ``denoiser`` with K-LoRA's per-step choice (:func:`klora_applied`)."""
        return klora_applied(denoiser, self.content, self.style, self.settings)

    def save(
        self,
        path: str | Path,
        *,
        format: str = "diffusers",
        dtype: torch.dtype = torch.float32,
        metadata: dict[str, Any] | None = None,
        unet_config: Any = None,
    ) -> Path:
        """For ``path`` = ``DIR/NAME.safetensors``: ``DIR/NAME.content.safetensors`` and ``DIR/NAME.style.safetensors``
        (plain LoRAs, see :func:`b4m.lora_files.save_lora`) and ``DIR/NAME.k-lora.json`` (the settings, the two
        files and the command that applies them); returns the JSON's path."""
        path = Path(path)
        stem = path.name.removesuffix(".safetensors")
        files = {}
        for role, factors in (("content", self.content), ("style", self.style)):
            files[role] = path.with_name(f"{stem}.{role}.safetensors")
            meta = {"b4m_method": self.method, "b4m_role": role, **(metadata or {})}
            save_lora(factors, files[role], format=format, dtype=dtype, metadata=meta, unet_config=unet_config)
        info = {
            "method": "k-lora",
            "content_lora": files["content"].name,
            "style_lora": files["style"].name,
            "settings": dataclasses.asdict(self.settings),
            "apply": f"b4m generate --content-lora {files['content'].name} --style-lora {files['style'].name} "
            "--combine k-lora PROMPT",
        }
        out = path.with_name(f"{stem}.k-lora.json")
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(info, indent=2))
        return out


def run(
    content_sets: Sequence[TrainSet],
    style_sets: Sequence[TrainSet],
    model: DiffusionModel,
    config: KLoRAConfig,
    out: str | Path,
    cache: dict | None = None,
) -> KLoRAResult:
    t0 = time.perf_counter()
    content, c_reused = lora_stage1("content", content_sets, model, config.lora, config.train, out, cache)
    style, s_reused = lora_stage1("style", style_sets, model, config.lora, config.train, out, cache)
    info = pair_info(config, t0, (content, c_reused), (style, s_reused))
    return KLoRAResult(
        "klora",
        {},
        info,
        parts={"content": content.adapter, "style": style.adapter},
        content=scaled(content.adapter.factors(), config.content_scale),
        style=scaled(style.adapter.factors(), config.style_scale),
        settings=config.klora,
    )
