"""What every method shares: the result type, plain-LoRA configs, method configs from nested dicts, and the sets a
baseline trains on (the concept's own images; B4M's auxiliary sets are not theirs)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter.config import PLPConfig
from ..adapter.file import AdapterFile
from ..errors import B4MError
from ..lora_files import Factors, save_lora
from ..lora_files.factors import applied as merged
from ..training.config import TrainConfig
from ..training.sets import TrainSet


@dataclass
class MethodResult:
    """One method's adapter for one content-style pair: a mergeable ΔW per module, as plain LoRA factors.

    ``factors`` is ``{module: (up m×r, down r×n)}`` with ``ΔW = up @ down`` and every scale folded in (the
    :data:`b4m.lora_files.Factors` interchange type), so :meth:`save` writes a LoRA that diffusers, ComfyUI and A1111
    load with scale 1. ``adapter`` is the PLP adapter the factors come from when there is one (JTtrain, B-LoRA, B4M);
    ``parts`` holds what else the method made (stage-1 adapters, ZipLoRA's merger coefficients); ``info`` the
    settings, timings and losses. Sampling with the result goes through :meth:`applied`, which a method whose ΔW is
    not one fixed matrix overrides (K-LoRA: :class:`b4m.baselines.klora.KLoRAResult`).
    """

    method: str
    factors: Factors
    info: dict[str, Any] = field(default_factory=dict)
    adapter: AdapterFile | None = None
    parts: dict[str, Any] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted(self.factors)

    def delta(self, name: str) -> torch.Tensor:
        """ΔW of one module (m × n, float32)."""
        up, down = self.factors[name]
        return up.float() @ down.float()

    def ranks(self) -> dict[str, int]:
        return {name: int(down.shape[0]) for name, (_, down) in self.factors.items()}

    def applied(self, denoiser: nn.Module) -> AbstractContextManager:
        """The result on ``denoiser`` for sampling inside a ``with`` block, taken off after: ``factors`` merged into
        the weights (:func:`b4m.lora_files.applied`: the exact original weights come back)."""
        return merged(denoiser, self.factors)

    def save(
        self,
        path: str | Path,
        *,
        format: str = "diffusers",
        dtype: torch.dtype = torch.float32,
        metadata: dict[str, Any] | None = None,
        unet_config: Any = None,
    ) -> Path:
        """Write the result as a plain LoRA file (see :func:`b4m.lora_files.save_lora`)."""
        save_lora(
            self.factors,
            path,
            format=format,
            dtype=dtype,
            metadata={"b4m_method": self.method, **(metadata or {})},
            unet_config=unet_config,
        )
        return Path(path)


# --------------------------------------------------------------------------------------------------------------------
# Configs


def plain_lora(
    rank: int = 64,
    *,
    seed: int = 0,
    targets: list[str] | str | None = None,
    learned_init: str = "gaussian",
    base_model: str = "",
) -> PLPConfig:
    """A standard LoRA as a PLP with no frozen part (ratio 0): ``B = 0`` and a random ``D``, both learned.

    The default init, ``N(0, 1/r²)`` for the down projection, is the one of diffusers' DreamBooth-LoRA scripts
    (which the public ZipLoRA implementation trains its LoRAs with); ``kaiming`` is peft's default.
    """
    return PLPConfig(
        rank=rank,
        ratio=0.0,
        seed=seed,
        targets=[] if targets is None else targets,  # none: the model's own, resolved when attached
        learned_init=learned_init,
        base_model=base_model,
    )


def lora_train_config(**overrides: Any) -> TrainConfig:
    """The training settings of a plain LoRA run: the loop's defaults, both factors from the whole loss."""
    return TrainConfig(**{"routing": "none", **overrides})


def method_config(cls: type, data: dict[str, Any] | None = None, source: str = "config") -> Any:
    """An instance of the method config dataclass ``cls`` with ``data`` (nested dicts, TOML layout) merged over its
    defaults; nested :class:`PLPConfig` / :class:`TrainConfig` tables are merged key by key. Unknown keys are
    errors that name them."""
    default = cls()
    names = {f.name for f in dataclasses.fields(cls)}
    data = dict(data or {})
    unknown = sorted(set(data) - names)
    if unknown:
        raise B4MError(f"{source}: unknown key(s) for {cls.__name__}: {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        current = getattr(default, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            sub = {f.name for f in dataclasses.fields(current)}
            bad = sorted(set(value) - sub)
            if bad:
                raise B4MError(f"{source}: unknown key(s) in [{name}]: {', '.join(bad)}")
            value = type(current)(**{**dataclasses.asdict(current), **value})
        kwargs[name] = value
    return dataclasses.replace(default, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Sets


def main_sets(sets: Sequence[TrainSet]) -> list[TrainSet]:
    """The concept's own sets (``main=True``), weighted so that together they weigh 1 (their mean loss).

    Sets with ``main=False`` are B4M's auxiliary sets (multi-correspondence); the baselines do not use them.
    """
    mains = [s for s in sets if s.main]
    if not mains:
        raise B4MError("no main training set (every set given is auxiliary)")
    return [TrainSet(s.name, s.latents, s.cond, 1.0 / len(mains), True) for s in mains]


def joint_sets(content_sets: Sequence[TrainSet], style_sets: Sequence[TrainSet]) -> list[TrainSet]:
    """The content's main sets (weighing 1 together, named ``content:…``), then the style's (``style:…``)."""
    content = [TrainSet(f"content:{s.name}", s.latents, s.cond, s.weight, True) for s in main_sets(content_sets)]
    style = [TrainSet(f"style:{s.name}", s.latents, s.cond, s.weight, True) for s in main_sets(style_sets)]
    return content + style
