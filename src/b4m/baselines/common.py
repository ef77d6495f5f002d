"""What every method shares: the result type, plain-LoRA configs, PLP runs on the one training loop, the stage-1
cache, method configs from nested dicts, and a context manager that merges a result into a model and restores it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter_file import AdapterFile, adapter_from_model, apply_adapter
from ..errors import B4MError
from ..lora_io import Factors, apply_factors, check_factors_fit, save_lora
from ..models.base import DiffusionModel
from ..plp import DEFAULT_TARGETS, PLPConfig, add_plp, remove_plp
from ..train import TrainConfig, TrainResult, TrainSet, train


@dataclass
class MethodResult:
    """One method's adapter for one content-style pair: a mergeable ΔW per module, as plain LoRA factors.

    ``factors`` is ``{module: (up m×r, down r×n)}`` with ``ΔW = up @ down`` and every scale folded in (the
    :data:`b4m.lora_io.Factors` interchange type), so :meth:`save` writes a LoRA that diffusers, ComfyUI and A1111
    load with scale 1. ``adapter`` is the PLP adapter the factors come from when there is one (JTtrain, B-LoRA, B4M);
    ``parts`` holds what else the method made (stage-1 adapters, ZipLoRA's merger coefficients); ``info`` the
    settings, timings and losses.
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

    def save(
        self,
        path: str | Path,
        *,
        format: str = "diffusers",
        dtype: torch.dtype = torch.float32,
        metadata: dict[str, Any] | None = None,
        unet_config: Any = None,
    ) -> Path:
        """Write the result as a plain LoRA file (see :func:`b4m.lora_io.save_lora`)."""
        save_lora(
            self.factors,
            path,
            format=format,
            dtype=dtype,
            metadata={"b4m_method": self.method, **(metadata or {})},
            unet_config=unet_config,
        )
        return Path(path)


@contextlib.contextmanager
def applied(denoiser: nn.Module, factors: Factors, *, scale: float = 1.0) -> Iterator[nn.Module]:
    """Merge ``factors`` into ``denoiser``'s weights for the duration of the block, then put the exact original
    weights back (a copy of each touched weight is kept, so nothing drifts through rounding)."""
    check_factors_fit(factors, denoiser, "<result>")
    saved = {}
    for name in factors:
        module = denoiser.get_submodule(name)
        weight = getattr(module, "base_layer", module).weight
        saved[name] = (weight, weight.detach().clone())
    try:
        apply_factors(denoiser, factors, scale=scale)
        yield denoiser
    finally:
        with torch.no_grad():
            for weight, original in saved.values():
                weight.copy_(original)


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
        targets=list(DEFAULT_TARGETS) if targets is None else targets,
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


def _digest(sets: Sequence[TrainSet]) -> list:
    out = []
    for s in sets:
        h = hashlib.sha256()
        for t in (s.latents, s.cond.hidden, *(s.cond.extra[k] for k in sorted(s.cond.extra))):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        out.append([s.name, len(s.latents), s.weight, s.main, h.hexdigest()[:16]])
    return out


def stage1_key(kind: str, role: str, sets: Sequence[TrainSet], *configs: Any) -> str:
    """The key of a stage-1 run in a cache: its kind, role, data (hashed) and settings (the base model's identity
    among them). Two methods whose stage 1 is the same run (direct merge and ZipLoRA train the same plain LoRAs)
    get the same key."""
    settings = [dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c for c in configs]
    blob = json.dumps([kind, role, _digest(sets), settings], sort_keys=True, default=str)
    return f"{kind}/{role}/" + hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Stage1:
    """A finished stage-1 run: its adapter, the loop's result and its wall time."""

    adapter: AdapterFile
    result: TrainResult | None
    seconds: float


def cached_stage1(cache: dict | None, key: str, run) -> tuple[Stage1, bool]:
    """``cache[key]`` if present (``True``: reused), else ``run()`` stored under ``key``."""
    if cache is not None and key in cache:
        return cache[key], True
    done = run()
    if cache is not None:
        cache[key] = done
    return done, False


# --------------------------------------------------------------------------------------------------------------------
# PLP runs on the one loop


def train_plp(
    model: DiffusionModel,
    sets: Sequence[TrainSet],
    plp: PLPConfig | None,
    config: TrainConfig,
    out: str | Path,
    role: str,
    *,
    start: AdapterFile | None = None,
) -> Stage1:
    """Attach a PLP adapter to ``model.denoiser`` (a new one from ``plp``, or ``start`` loaded), train it with
    :func:`b4m.train.train`, snapshot it and take it off again: the model is left as it was given.

    ``role`` is the adapter's role ("content", "style" or "fused"). With ``config.steps == 0`` nothing trains.
    """
    t0 = time.perf_counter()
    if start is not None:
        apply_adapter(model.denoiser, start)
        plp = start.config
    else:
        plp = dataclasses.replace(plp, base_model=plp.base_model or model.identity)
        add_plp(model.denoiser, plp)
    try:
        result = train(model, plp, list(sets), config, Path(out), role=role) if config.steps > 0 else None
        adapter = adapter_from_model(model.denoiser, plp, role)
    finally:
        remove_plp(model.denoiser)
    return Stage1(adapter, result, time.perf_counter() - t0)


def train_info(stage: Stage1 | None, reused: bool = False) -> dict[str, Any] | None:
    """What a result records of one run: ``seconds`` spent in this call (0 when reused from the cache), the run's own
    ``run_seconds``, steps and the loss curve."""
    if stage is None:
        return None
    r = stage.result
    return {
        "seconds": 0.0 if reused else round(stage.seconds, 3),
        "run_seconds": round(stage.seconds, 3),
        "reused": reused,
        "steps": r.steps if r else 0,
        "final_loss": r.final_loss if r else None,
        "losses": r.losses if r else [],
    }
