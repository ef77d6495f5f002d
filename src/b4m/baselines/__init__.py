"""The comparison methods behind one interface, each result a plain LoRA (K-LoRA's: two, one chosen per layer and
sampling step).

======================  ================================================================  ====================
name                    method                                                            stage 1 (cacheable)
======================  ================================================================  ====================
``jttrain``             one LoRA trained on content and style together (B4M eq. 2)        none
``direct_merge``        two LoRAs added, ``λc·ΔWc + λs·ΔWs`` (B4M eq. 3)                   plain LoRA per concept
``ziplora``             two LoRAs merged with learned per-column coefficients (Shah 2024)  the same LoRAs
``blora``               content / style LoRA in two decoder attention blocks (Frenkel 2024) B-LoRA run per concept
``klora``               content or style LoRA per layer and step by Top-K (Ouyang 2025)   direct merge's LoRAs
``b4m``                 break (content run, style run), fuse, make; and its ablations      B4M run per concept
======================  ================================================================  ====================

Usage::

    from b4m.baselines import run_method, method_config

    cache = {}                                   # stage-1 runs shared across methods and pairs
    config = method_config("ziplora", {"train": {"steps": 500}, "merge": {"steps": 100}})
    result = run_method("ziplora", content_sets, style_sets, model, config, out="runs/zip", cache=cache)
    result.save("zip_lora.safetensors")          # plain LoRA: pipe.load_lora_weights(...)
    with result.applied(model.denoiser):         # factors merged; K-LoRA: its layers, choosing per step
        images = model.sample(request)

``content_sets`` and ``style_sets`` are cached :class:`~b4m.training.sets.TrainSet` lists
(:func:`~b4m.training.sets.encode_sets`): ``main=True`` sets are the concept's images, ``main=False`` sets B4M's
auxiliary sets (the baselines ignore them).
Every method trains on the one loop of :mod:`b4m.training` and leaves the model as it found it; B4M is
:mod:`b4m.method`, the code the commands run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import B4MError
from ..lora_files.factors import applied
from ..method.config import B4MConfig
from ..models.base import DiffusionModel
from ..training.sets import TrainSet
from . import b4m, blora, direct_merge, jttrain, klora, ziplora
from .blora import BLoRAConfig, blora_blocks, blora_targets
from .common import MethodResult, main_sets, plain_lora
from .common import method_config as _method_config
from .direct_merge import DirectMergeConfig, concat_factors
from .direct_merge import direct_merge as direct_merge_factors
from .jttrain import JTtrainConfig
from .klora import KLoRAConfig, KLoRAResult, klora_applied
from .ziplora import ZipLoRAConfig, ZipLoRALinear, add_ziplora, remove_ziplora, ziplora_merge


@dataclass(frozen=True)
class Method:
    """One entry of :data:`METHODS`: its config class and the function that runs it."""

    name: str
    config_cls: type
    run: Callable[..., MethodResult]
    summary: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("jttrain", JTtrainConfig, jttrain.run, "one LoRA trained on content and style together (eq. 2)"),
        Method("direct_merge", DirectMergeConfig, direct_merge.run, "two LoRAs added with weights (eq. 3)"),
        Method("ziplora", ZipLoRAConfig, ziplora.run, "two LoRAs merged with learned per-column coefficients"),
        Method("blora", BLoRAConfig, blora.run, "content and style LoRAs in two decoder attention blocks"),
        Method("klora", KLoRAConfig, klora.run, "K-LoRA: the content or the style LoRA per layer and step (Top-K)"),
        Method("b4m", B4MConfig, b4m.run, "B4M: break (content run, style run), fuse, make"),
    )
}


def _method(name: str) -> Method:
    if name not in METHODS:
        raise B4MError(f"unknown method {name!r}; one of {', '.join(METHODS)}")
    return METHODS[name]


def method_config(name: str, data: dict[str, Any] | None = None) -> Any:
    """The config of method ``name``: its defaults with ``data`` (nested dicts, TOML layout) merged in."""
    return _method_config(_method(name).config_cls, data, source=name)


def run_method(
    name: str,
    content_sets: Sequence[TrainSet],
    style_sets: Sequence[TrainSet],
    model: DiffusionModel,
    config: Any = None,
    *,
    out: str | Path,
    cache: dict | None = None,
) -> MethodResult:
    """Run method ``name`` for one content-style pair and return its adapter.

    Args:
        name: A key of :data:`METHODS`.
        content_sets: The content's cached sets (``main=True``: its images; ``main=False``: auxiliary sets, B4M only).
        style_sets: The style's cached sets, likewise.
        model: The base model; every adapter is taken off again, so the model comes back unchanged.
        config: The method's config (see :func:`method_config`), a dict merged over its defaults, or ``None``.
        out: A folder for the runs' checkpoints.
        cache: A dict that keeps stage-1 runs by their data and settings; pass the same dict to every call of a
            benchmark and each content's and style's stage 1 is trained once per method family.

    Returns:
        A :class:`MethodResult`: ``factors`` (ΔW per module as plain LoRA factors, exportable with ``save``), the
        PLP ``adapter`` where the result is one, ``parts`` and ``info`` (settings, seconds, losses); sample with it
        inside ``with result.applied(model.denoiser):`` (K-LoRA, a :class:`KLoRAResult`, has no fixed ΔW: its
        ``factors`` are empty and ``applied`` attaches its per-step layers).
    """
    method = _method(name)
    if config is None or isinstance(config, dict):
        config = method_config(name, config)
    if not isinstance(config, method.config_cls):
        raise B4MError(f"{name} takes a {method.config_cls.__name__}, got {type(config).__name__}")
    return method.run(content_sets, style_sets, model, config, Path(out), cache)


__all__ = [
    "METHODS",
    "B4MConfig",
    "BLoRAConfig",
    "DirectMergeConfig",
    "JTtrainConfig",
    "KLoRAConfig",
    "KLoRAResult",
    "Method",
    "MethodResult",
    "ZipLoRAConfig",
    "ZipLoRALinear",
    "add_ziplora",
    "applied",
    "blora_blocks",
    "blora_targets",
    "concat_factors",
    "direct_merge_factors",
    "klora_applied",
    "main_sets",
    "method_config",
    "plain_lora",
    "remove_ziplora",
    "run_method",
    "ziplora_merge",
]
