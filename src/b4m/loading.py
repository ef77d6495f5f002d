"""``load_model``: every base model b4m runs on, by name, folder, file or Hub id.

``model`` may be, in this order:

1. a registered name (:data:`MODEL_LOADERS`): ``world``, the built-in world model shipped in the package;
2. a world model folder (one with ``world_model.json``, e.g. written by ``b4m world pretrain``);
3. a diffusers pipeline folder, a single-file ``.safetensors`` checkpoint or a Hub id
   (:func:`b4m.models.loading.load_diffusers_model`); a FLUX.1 or FLUX.2 [klein] folder or Hub id with its
   transformer from one ``.safetensors`` file (``transformer=``, :mod:`b4m.models.flux_file`).

This module sits above both :mod:`b4m.models` and :mod:`b4m.world`, so neither has to know the other.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .hub import cached_hub_file, looks_like_hub_id

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
    if family in ("flux", "flux2") and name.endswith(".safetensors"):  # a transformer file's name: not a whole model
        return None
    if family in ("sd", "sdxl", "flux", "flux2") and name and (Path(name).exists() or looks_like_hub_id(name)):
        return name
    return None


def model_hint(identity: str) -> str:
    """What a command asks for where a run's record does not say where its base model is: ``--model``, and
    ``--transformer`` too where the identity names a FLUX transformer file (``flux:flux1-dev.safetensors``)."""
    family, _, name = identity.partition(":")
    if family in ("flux", "flux2") and name.endswith(".safetensors"):
        return f"pass --transformer (the file {name}) and --model (the FLUX folder or Hub id of the rest)"
    return "pass --model"


def model_file(model: str, filename: str) -> Path | None:
    """A small file of base model ``model`` (``model_index.json``, ``transformer/config.json``, ...), where it can be
    read without the network: in a local folder, or for a Hub id in the local Hugging Face cache (its snapshot, as
    ``hf download`` leaves it: :func:`b4m.hub.cached_hub_file`). None where it is in neither (an uncached Hub id, a
    single-file checkpoint, a folder without it). Every look at a model's config files before it loads goes here."""
    if not model:
        return None
    if Path(model).exists():
        path = Path(model) / filename
        return path if path.is_file() else None
    return cached_hub_file(model, filename) if looks_like_hub_id(model) else None


#: model_index.json ``_class_name`` of the transformer families, by the family name their identities carry.
FLUX_PIPELINES = {"FluxPipeline": "flux", "Flux2KleinPipeline": "flux2"}


def flux_family(model: str) -> str | None:
    """``"flux"`` (FLUX.1) or ``"flux2"`` (FLUX.2 [klein]) where ``model`` is a diffusers folder of such a pipeline
    (its model_index.json says ``FluxPipeline`` or ``Flux2KleinPipeline``): a local one or a Hub id in the local
    cache (:func:`model_file`); else None."""
    index = model_file(model, "model_index.json")
    if index is None:
        return None
    try:
        return FLUX_PIPELINES.get(json.loads(index.read_text(encoding="utf-8")).get("_class_name"))
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def is_flux_folder(model: str) -> bool:
    """``model`` is a diffusers folder of a FLUX.1 pipeline, local or cached (:func:`flux_family`)."""
    return flux_family(model) == "flux"


def transformer_skeleton(model: str, family: str):
    """The transformer of a FLUX.1 or klein folder (local or cached: :func:`model_file`) on the meta device, from its
    config file only (no weights); None where that file is not there (a partly downloaded Hub cache)."""
    config = model_file(model, "transformer/config.json")
    if config is None:
        return None
    if family == "flux2":
        from .models.flux2 import transformer_skeleton as skeleton
    else:
        from .models.flux import transformer_skeleton as skeleton
    return skeleton(config.parent.parent)


def check_transformer(model: str, transformer: str):
    """The header of transformer file ``transformer`` (:class:`b4m.models.flux_file.TransformerFile`), checked against
    base model ``model`` from its config files alone (:func:`model_file`: a local folder, or a Hub id in the local
    cache; an uncached Hub id is checked once it loads): one line naming the file when it is no FLUX transformer,
    of another family, or of another shape than ``model``'s."""
    from .errors import B4MError
    from .models.flux_file import check_transformer_fits, read_transformer_file

    file = read_transformer_file(transformer)
    if is_world_model(model):
        raise B4MError(f"{file.path}: --transformer replaces a FLUX transformer; the world model has none")
    family = flux_family(model)
    config = model_file(model, "transformer/config.json")
    if family is None and model_file(model, "model_index.json") is None:  # an uncached Hub id, a file: known later
        return file
    check_transformer_fits(file, family, json.loads(config.read_text(encoding="utf-8")) if config else None, model)
    return file


def training_defaults(model: str, stage: str) -> dict[str, Any]:
    """The settings base model ``model`` brings to ``stage`` (TOML layout), under the preset, the config file and the
    flags: the world's (:data:`b4m.world.defaults.TRAINING_DEFAULTS`); none for the diffusers families, whose
    defaults are the official ones of the config dataclasses. Their adapter targets are the one model-dependent
    default, and it is left empty here: the adapter resolves it from the model it is attached to (FLUX.1's and
    klein's transformers: :data:`b4m.adapter.config.FLUX_TARGETS`, ``KLEIN_TARGETS``; see
    :func:`b4m.adapter.walker.resolve_targets`), so a Hub id gets them as a folder does."""
    if is_world_model(model):
        from .world.defaults import TRAINING_DEFAULTS

        return TRAINING_DEFAULTS.get(stage, {})
    return {}


def denoiser_config(model: str) -> tuple[dict, int] | None:
    """``(UNet config, native resolution)`` of ``model`` read from its small config files, no weights: the built-in
    world, a world model folder, or a diffusers folder, local or a Hub id in the local cache (:func:`model_file`).
    None where that would take the network or a whole checkpoint (uncached Hub ids, single-file checkpoints): those
    are checked once loaded."""
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
    path = model_file(model, "unet/config.json")
    if path is not None:
        from .unet_skeleton import read_unet_config

        unet = read_unet_config(path)
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
    base_weights: str = "auto",
    transformer: str | None = None,
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
        base_weights: ``"auto"`` or ``"full"`` (``dtype``), or ``"int8"`` / ``"float8"``: the denoiser's and the
            text encoders' linear weights stored in 8 bits (:mod:`b4m.models.quantize`; needs torchao, checked
            before anything loads).
        transformer: A FLUX.1 or FLUX.2 transformer ``.safetensors`` file that replaces the transformer of ``model``
            (a FLUX folder or Hub id), checked from its header before anything loads (:func:`check_transformer`).

    Raises:
        B4MError: The path does not exist, is not a supported model, loading failed, or ``base_weights`` asks for
            torchao, which is not installed, or the transformer file does not fit ``model``.
    """
    from .models.quantize import quantize_base, require_quantization

    require_quantization(base_weights)  # before any weights load
    if transformer:
        check_transformer(model, transformer)
    key = (model, str(device), dtype, variant, identity, base_weights, transformer)
    if _shared is not None and key in _shared:  # inside shared_models(): the model an earlier stage loaded
        _shared[key].restore_encoders()
        _shared[key].use_resolution(resolution)
        return _shared[key]
    if model in MODEL_LOADERS or (Path(model) / "world_model.json").is_file():
        if model in MODEL_LOADERS:
            loaded = MODEL_LOADERS[model](device=device, dtype=dtype, variant=variant, resolution=resolution)
        else:
            from .world.model import load_world_model

            loaded = load_world_model(model, device=str(device), identity=f"world:{Path(model).name}")
        quantize_base(loaded, base_weights)  # the world's, once loaded: it is small
    else:  # quantized while loading, layer by layer on the device
        from .models.loading import load_diffusers_model

        loaded = load_diffusers_model(
            model,
            device=device,
            dtype=dtype,
            variant=variant,
            resolution=resolution,
            base_weights=base_weights,
            transformer=transformer,
        )
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
