"""``load_model``: every base model b4m runs on, by name, folder, file or Hub id.

``model`` may be, in this order:

1. a registered name (:data:`MODEL_LOADERS`): ``world``, the built-in world model shipped in the package;
2. a world model folder (one with ``world_model.json``, e.g. written by ``b4m world pretrain``);
3. a diffusers pipeline folder, a single-file ``.safetensors`` checkpoint or a Hub id
   (:func:`b4m.models.loading.load_diffusers_model`).

This module sits above both :mod:`b4m.models` and :mod:`b4m.world`, so neither has to know the other.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .hub import looks_like_hub_id

if TYPE_CHECKING:  # light at import time: the command line asks is_world_model and training_defaults for its help
    import torch

    from .models.base import DiffusionModel

#: A diffusers VAE's downsampling (SD and SDXL): a UNet's sample size times this is its native resolution.
VAE_FACTOR = 8


def _builtin_world(device="cpu", **_) -> DiffusionModel:
    """The world model shipped inside the package (``b4m/world/weights``)."""
    from .world.model import load_world_model
    from .world.weights import model_folder

    return load_world_model(model_folder(), device=str(device), identity="world")


#: Built-in models by name: ``loader(device=..., dtype=..., variant=..., resolution=...) -> DiffusionModel``.
#: Names are looked up before paths, so a registered name shadows a folder of the same name in the working directory.
MODEL_LOADERS: dict[str, Callable[..., DiffusionModel]] = {"world": _builtin_world}


def register_model(name: str, loader: Callable[..., DiffusionModel]) -> None:
    """Make ``load_model(name, ...)`` call ``loader(device=..., dtype=..., variant=..., resolution=...)``."""
    MODEL_LOADERS[name] = loader


def is_world_model(model: str) -> bool:
    """``model`` names the built-in world or a world model folder (empty: the built-in world, the default)."""
    return model in ("", "world") or (Path(model) / "world_model.json").is_file()


def model_of_identity(identity: str) -> str | None:
    """What to load for an adapter file's recorded base model (:attr:`DiffusionModel.identity`), where the identity
    says it: the built-in world, or a Hub id or an existing path after the family (``sdxl:owner/name``). None where
    it does not (a local folder recorded by its name only): the caller asks for ``--model``."""
    if identity == "world":
        return "world"
    family, _, name = identity.partition(":")
    if family in ("sd", "sdxl", "flux", "flux2") and name and (Path(name).exists() or looks_like_hub_id(name)):
        return name
    return None


#: model_index.json ``_class_name`` of the transformer families, by the family name their identities carry.
FLUX_PIPELINES = {"FluxPipeline": "flux", "Flux2KleinPipeline": "flux2"}


def flux_family(model: str) -> str | None:
    """``"flux"`` (FLUX.1) or ``"flux2"`` (FLUX.2 [klein]) where ``model`` is a local diffusers folder of such a
    pipeline (its model_index.json says ``FluxPipeline`` or ``Flux2KleinPipeline``), else None."""
    index = Path(model) / "model_index.json"
    if not model or not index.is_file():
        return None
    try:
        return FLUX_PIPELINES.get(json.loads(index.read_text(encoding="utf-8")).get("_class_name"))
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def is_flux_folder(model: str) -> bool:
    """``model`` is a local diffusers folder of a FLUX.1 pipeline (its model_index.json says ``FluxPipeline``)."""
    return flux_family(model) == "flux"


def flux_targets(family: str) -> str:
    """The default PLP targets of a transformer family (:data:`b4m.adapter.config.FLUX_TARGETS`, ``KLEIN_TARGETS``)."""
    from .adapter.config import FLUX_TARGETS, KLEIN_TARGETS

    return KLEIN_TARGETS if family == "flux2" else FLUX_TARGETS


def transformer_skeleton(model: str, family: str):
    """The transformer of a local FLUX.1 or klein folder on the meta device (its config file only, no weights)."""
    if family == "flux2":
        from .models.flux2 import transformer_skeleton as skeleton
    else:
        from .models.flux import transformer_skeleton as skeleton
    return skeleton(model)


def training_defaults(model: str, stage: str) -> dict[str, Any]:
    """The settings base model ``model`` brings to ``stage`` (TOML layout), under the preset, the config file and the
    flags: the world's (:data:`b4m.world.defaults.TRAINING_DEFAULTS`); for a local FLUX.1 or FLUX.2 [klein] folder
    its PLP targets (:data:`b4m.adapter.config.FLUX_TARGETS`, ``KLEIN_TARGETS``: the transformer's attention
    projections; content and style runs: make takes its runs' adapters); none for SDXL and SD, whose defaults are the
    official ones of the config dataclasses."""
    if is_world_model(model):
        from .world.defaults import TRAINING_DEFAULTS

        return TRAINING_DEFAULTS.get(stage, {})
    family = flux_family(model) if stage in ("content", "style") else None
    if family is not None:
        return {"adapter": {"targets": flux_targets(family)}}
    return {}


def denoiser_config(model: str) -> tuple[dict, int] | None:
    """``(UNet config, native resolution)`` of ``model`` read from its small config files, no weights: the built-in
    world, a world model folder, or a local diffusers folder. None where that would take the Hub or a whole
    checkpoint (Hub ids, single-file checkpoints): those are checked once loaded."""
    folder = None
    if model == "world":
        from .world.weights import model_folder

        folder = model_folder()
    elif (Path(model) / "world_model.json").is_file():
        folder = Path(model)
    if folder is not None:
        from .world.model import read_world_config

        config = read_world_config(folder)
        return dict(config.unet), config.resolution
    if (Path(model) / "unet" / "config.json").is_file():
        from .unet_skeleton import read_unet_config

        unet = read_unet_config(model)
        size = unet.get("sample_size")
        size = size[0] if isinstance(size, (list, tuple)) else size
        return unet, int(size or 128) * VAE_FACTOR
    return None


def load_model(
    model: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    resolution: int | None = None,
    identity: str | None = None,
) -> DiffusionModel:
    """Load a base model (see the module docstring for what ``model`` may be).

    Args:
        model: A registered name, a world model folder, a diffusers folder, a ``.safetensors`` checkpoint or a Hub id.
        device: Where to put every component.
        dtype: Weights of the denoiser and text encoders (diffusers models; default: float32 on the CPU, bfloat16 or
            float16 on CUDA).
        variant: Weight file variant of a diffusers folder or Hub repo (e.g. ``"fp16"``).
        resolution: Default training/sampling resolution; None: the model's native one.
        identity: Override of the base model identity recorded in adapter files.

    Raises:
        B4MError: The path does not exist, is not a supported model, or loading failed.
    """
    key = (model, str(device), dtype, variant, identity)
    if _shared is not None and key in _shared:  # inside shared_models(): the model an earlier stage loaded
        _shared[key].restore_encoders()
        _shared[key].use_resolution(resolution)
        return _shared[key]
    if model in MODEL_LOADERS:
        loaded = MODEL_LOADERS[model](device=device, dtype=dtype, variant=variant, resolution=resolution)
    elif (Path(model) / "world_model.json").is_file():
        from .world.model import load_world_model

        loaded = load_world_model(model, device=str(device), identity=f"world:{Path(model).name}")
    else:
        from .models.loading import load_diffusers_model

        loaded = load_diffusers_model(model, device=device, dtype=dtype, variant=variant, resolution=resolution)
    if identity:
        loaded.identity = identity
    if _shared is not None:
        _shared[key] = loaded
    return loaded


_shared: dict | None = None


@contextlib.contextmanager
def shared_models() -> Iterator[None]:
    """Inside the block, :func:`load_model` with the same arguments returns the model it loaded before (its encoders
    back on its device) instead of loading it again: several stages in one process (``b4m run``) load the base
    model once. Every stage leaves the model as it found it (adapters taken off), so the next one starts clean."""
    global _shared
    outer, _shared = _shared, {} if _shared is None else _shared
    try:
        yield
    finally:
        _shared = outer
