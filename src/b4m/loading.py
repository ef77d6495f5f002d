"""``load_model``: every base model b4m runs on, by name, folder, file or Hub id.

``model`` may be, in this order:

1. a registered name (:data:`MODEL_LOADERS`): ``world``, the built-in world model shipped in the package;
2. a world model folder (one with ``world_model.json``, e.g. written by ``b4m world pretrain``);
3. a diffusers pipeline folder, a single-file ``.safetensors`` checkpoint or a Hub id
   (:func:`b4m.models.loading.load_diffusers_model`).

This module sits above both :mod:`b4m.models` and :mod:`b4m.world`, so neither has to know the other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .models.base import DiffusionModel


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
    return loaded
