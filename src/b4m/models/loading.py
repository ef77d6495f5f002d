"""Loading diffusers base models (SD 1.x/2.x, SDXL, FLUX.1, FLUX.2 [klein]): :func:`load_diffusers_model` finds the
right class.

``model`` may be, in this order:

1. a local diffusers pipeline folder (one with ``model_index.json``; ``FluxPipeline`` folders load a
   :class:`~b4m.models.flux.FluxModel`, ``Flux2KleinPipeline`` ones a :class:`~b4m.models.flux2.Flux2KleinModel`);
2. a single-file ``.safetensors`` checkpoint (SD 1.x/2.x or SDXL, told apart by its keys);
3. a Hugging Face Hub id such as ``stabilityai/stable-diffusion-xl-base-1.0``.

A FLUX.1 or FLUX.2 [klein] folder or Hub id may take its transformer from one ``.safetensors`` file instead
(``transformer=``, the ``--transformer`` setting: :mod:`b4m.models.flux_file`); its identity then names that file
(``flux:flux1-dev.safetensors``). A FLUX transformer file given as ``model`` itself is refused in one line that names
this fix.

A model's :attr:`~b4m.models.base.DiffusionModel.identity` is ``"{family}:{name}"`` (``sdxl:`` or ``sd:`` followed by
the folder's name, the Hub id or the checkpoint's file name; with ``transformer``, ``flux:`` or ``flux2:`` and the
transformer file's name). Adapter files record it and fusing refuses files of
different identities, so the same weights reached two ways (a Hub id and a local copy) get different identities:
pass ``identity=`` to :func:`b4m.loading.load_model` (or set ``model.identity``) to pin one.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors import SafetensorError, safe_open

from ..errors import B4MError, first_line
from ..hub import cached_hub_file, check_hub_reachable, looks_like_hub_id
from .diffusers_common import DiffusersModel, default_dtype
from .flux import FluxModel
from .flux2 import Flux2KleinModel
from .flux_file import (
    COMFY_PREFIX,
    FAMILY_NAMES,
    check_transformer_fits,
    load_transformer,
    not_a_whole_model,
    read_transformer_file,
)
from .quantize import quantize_base
from .sd import StableDiffusionModel
from .sdxl import StableDiffusionXLModel

#: A model class :func:`load_diffusers_model` builds from a diffusers pipeline (``family``, ``pipeline_class``,
#: ``load_kwargs()``, ``from_pipeline``).
ModelClass = type[DiffusersModel] | type[FluxModel]

#: Pipeline ``_class_name`` values of model_index.json, per model class. FLUX.1 and FLUX.2 [klein] load from diffusers
#: folders and Hub ids, with their own transformer or one from a single file (``transformer=``).
PIPELINE_CLASSES: dict[str, ModelClass] = {
    "StableDiffusionXLPipeline": StableDiffusionXLModel,
    "StableDiffusionPipeline": StableDiffusionModel,
    "FluxPipeline": FluxModel,
    "Flux2KleinPipeline": Flux2KleinModel,
}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Newer diffusers call the loading dtype ``dtype`` and warn about ``torch_dtype``; older ones only know the latter.
_DTYPE_KEY = (
    "dtype"
    if hasattr(importlib.import_module("diffusers.utils.deprecation_utils"), "_resolve_dtype")
    else "torch_dtype"
)


def load_diffusers_model(
    model: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    resolution: int | None = None,
    base_weights: str = "auto",
    transformer: str | None = None,
) -> DiffusersModel | FluxModel:
    """Load a diffusers base model (see the module docstring for what ``model`` may be).

    Args:
        model: A diffusers folder, a ``.safetensors`` checkpoint or a Hub id.
        device: Where to put every component.
        dtype: Weights of the denoiser and text encoders (default: float32 on the CPU, bfloat16 or float16 on CUDA).
            The VAE always stays in float32.
        variant: Weight file variant of a folder or Hub repo (e.g. ``"fp16"``).
        resolution: Default training/sampling resolution; None: the model's native one (UNet sample size times the
            VAE factor: 1024 SDXL, 512 SD 1.x, 768 SD 2.x-v).
        base_weights: ``"auto"`` or ``"full"`` (``dtype``), or ``"int8"`` / ``"float8"``: the denoiser's and the
            text encoders' linear weights stored in 8 bits (:func:`b4m.models.quantize.quantize_base`), layer by
            layer on ``device`` before the rest of the model moves there.
        transformer: A FLUX.1 or FLUX.2 transformer ``.safetensors`` file (BFL/ComfyUI or diffusers names; bf16,
            fp16 or fp8, cast to ``dtype``) that replaces the transformer of ``model``, then a FLUX folder or Hub id.

    Returns:
        The model, on ``device``.

    Raises:
        B4MError: The path does not exist, is not a supported model, loading failed, or the transformer file is
            not one of this model (checked from its header before anything loads).
    """
    dtype = dtype or default_dtype(device)
    # fp16 files for a bf16 run (or the reverse) load as stored and are cast after the move, on the GPU: the CPU
    # cast of SDXL's 3.5B weights took 6.6 s of an 8-s load on our 2-core CPU. 8-bit bases quantize as before.
    as_stored = base_weights in ("auto", "full") and not transformer
    if transformer:
        cls, pipe, name = _with_transformer(model, transformer, dtype, variant)
    else:
        cls, pipe, name = _load_pipeline(model, dtype, variant, as_stored=as_stored)
    loaded = cls.from_pipeline(pipe, identity=f"{cls.family}:{name}", resolution=resolution)
    quantize_base(loaded, base_weights, device)  # in dtype already: from_pretrained loaded it so
    if as_stored:
        loaded.to(device)  # as stored; a CPU-to-GPU copy that changes the dtype would cast on the CPU
    loaded.to(device, dtype)
    return loaded


#: safetensors' names of the 16-bit float types, which :func:`stored_half_dtypes` reports.
_HALF_TYPES = {"F16": torch.float16, "BF16": torch.bfloat16}


def stored_half_dtypes(folder: Path, variant: str | None = None) -> dict[str, torch.dtype]:
    """The components of a diffusers folder whose weights are all stored in one 16-bit float type (float16 or
    bfloat16), read from their safetensors headers (no weights are read); other components are left out.

    ``variant`` picks the files diffusers would load (``diffusion_pytorch_model.fp16.safetensors``, sharded or not);
    without one, the files without a variant.
    """
    found = {}
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [
            f
            for f in sorted(component.glob("*.safetensors"))
            if (f".{variant}." in f.name or f".{variant}-" in f.name if variant else f.name.count(".") == 1)
        ]
        types = set()
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    types |= {d for k in h.keys() if (d := h.get_slice(k).get_dtype())[0] in "FB"}  # noqa: SIM118
            except (SafetensorError, OSError):  # unreadable here: diffusers says what is wrong when it loads the file
                types.add("?")
        if len(types) == 1 and (kind := types.pop()) in _HALF_TYPES:
            found[component.name] = _HALF_TYPES[kind]
    return found


def _load_pipeline(
    model: str, dtype: torch.dtype, variant: str | None, as_stored: bool = False
) -> tuple[ModelClass, Any, str]:
    """The model class, the loaded diffusers pipeline and the name part of the identity. ``as_stored``: a local
    folder's components stored in the other 16-bit float type than ``dtype`` load as stored (the caller casts)."""
    path = Path(model).expanduser()
    if path.is_dir():
        cls = folder_model_class(path)
        stored = stored_half_dtypes(path, variant) if as_stored and dtype in _HALF_TYPES.values() else {}
        kept = {k: v for k, v in stored.items() if v != dtype and k != "vae"}
        return cls, _from_pretrained(cls, str(path), dtype, variant, where=model, dtypes=kept), path.resolve().name
    if path.is_file():
        cls = detect_checkpoint(path)
        return cls, _from_single_file(cls, path, dtype), path.name
    if looks_like_hub_id(model):
        check_hub_reachable(model)
        cls = hub_model_class(model)
        return cls, _from_pretrained(cls, model, dtype, variant, where=model), model
    raise B4MError(f"{model}: no such file or folder")


def _with_transformer(
    model: str, transformer: str, dtype: torch.dtype, variant: str | None
) -> tuple[ModelClass, Any, str]:
    """:func:`_load_pipeline` for a FLUX folder or Hub id whose transformer comes from the file ``transformer``: the
    file's header is checked against the model's transformer config before anything loads."""
    file = read_transformer_file(transformer)
    path = Path(model).expanduser()
    if path.is_dir():
        cls, source, config = folder_model_class(path), str(path), path / "transformer" / "config.json"
    elif path.is_file():
        raise B4MError(
            f"{model}: with --transformer, --model is the diffusers folder or Hub id of the rest of the model (text "
            "encoders, VAE, scheduler), not a single file"
        )
    elif looks_like_hub_id(model):
        check_hub_reachable(model)
        cls, source, config = hub_model_class(model), model, cached_hub_file(model, "transformer/config.json")
    else:
        raise B4MError(f"{model}: no such file or folder")
    family = cls.family if cls.family in FAMILY_NAMES else None
    check_transformer_fits(file, family, _read_json(config) if config and config.is_file() else None, model)
    module = load_transformer(file, source, dtype, local=path.is_dir())
    return cls, _from_pretrained(cls, source, dtype, variant, where=model, transformer=module), file.path.name


# --------------------------------------------------------------------------------------------------------------------
# Which model class


def model_class_from_index(index: dict, unet_config: Callable[[], dict | None], where: str) -> ModelClass:
    """The model class for a pipeline's model_index.json contents.

    Args:
        index: The parsed model_index.json.
        unet_config: Returns the UNet's config (or None); only called when the class name does not decide.
        where: The folder or Hub id, for error messages.

    Raises:
        B4MError: Neither an SD, an SDXL nor a FLUX pipeline.
    """
    name = index.get("_class_name")
    if name in PIPELINE_CLASSES:
        return PIPELINE_CLASSES[name]
    unet = unet_config() or {}
    if unet.get("addition_embed_type") == "text_time":
        return StableDiffusionXLModel
    expected = " or ".join(PIPELINE_CLASSES)
    raise B4MError(f"{where}: unsupported pipeline {name!r} (expected {expected})")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise B4MError(f"{path}: cannot read JSON ({first_line(e)})") from e


def folder_model_class(path: Path) -> ModelClass:
    """The model class of a local diffusers pipeline folder."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise B4MError(f"{path}: not a diffusers model folder (no model_index.json)")
    unet_file = path / "unet" / "config.json"
    return model_class_from_index(
        _read_json(index_file), lambda: _read_json(unet_file) if unet_file.is_file() else None, str(path)
    )


def hub_model_class(repo_id: str) -> ModelClass:
    """The model class of a Hub repository (fetches its model_index.json, and the UNet config if needed)."""

    def unet_config() -> dict | None:
        try:
            return UNet2DConditionModel.load_config(repo_id, subfolder="unet")
        except OSError:
            return None

    try:
        index = DiffusionPipeline.load_config(repo_id)
    except OSError as e:
        raise B4MError(f"{repo_id}: no such local path, and not loadable from the Hub ({first_line(e)})") from e
    return model_class_from_index(index, unet_config, repo_id)


def detect_checkpoint(path: str | Path) -> type[DiffusersModel]:
    """SDXL or SD for a single-file checkpoint, from its tensor names (nothing is loaded).

    SDXL checkpoints hold the second text encoder under ``conditioner.embedders.1.``; SD 1.x/2.x ones hold the UNet
    under ``model.diffusion_model.`` and no such key.

    Raises:
        B4MError: A pickle checkpoint (``.ckpt``/``.pt``...), an unreadable file, unknown tensor names, or a FLUX
            transformer file (the message names ``--transformer FILE --model FOLDER``, which loads it).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise B4MError(
            f"{path}: {suffix} checkpoints are pickles that can run code when loaded; convert it to .safetensors"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error type for malformed files
        raise B4MError(f"{path}: not a readable .safetensors file ({first_line(e)})") from e
    if any(k.startswith(("double_blocks.", "transformer_blocks.", f"{COMFY_PREFIX}double_blocks.")) for k in keys):
        raise not_a_whole_model(read_transformer_file(path))
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return StableDiffusionXLModel
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return StableDiffusionModel
    raise B4MError(f"{path}: not an SD or SDXL checkpoint (no model.diffusion_model.* tensors)")


# --------------------------------------------------------------------------------------------------------------------
# Loading


def _from_pretrained(
    cls: ModelClass,
    source: str,
    dtype: torch.dtype,
    variant: str | None,
    where: str,
    dtypes: dict[str, torch.dtype] | None = None,
    **components: Any,
) -> DiffusionPipeline:
    """``from_pretrained`` with the VAE in float32, the components named in ``dtypes`` in theirs and everything else
    in ``dtype``; ``components`` (a loaded ``transformer``) are used as they are."""
    kinds = {"default": dtype, **(dtypes or {}), "vae": torch.float32}
    kwargs: dict[str, Any] = {**cls.load_kwargs(), **components, _DTYPE_KEY: kinds}
    if variant:
        kwargs["variant"] = variant
    try:
        return cls.pipeline_class.from_pretrained(source, **kwargs)
    except OSError as e:
        raise B4MError(f"{where}: cannot load the model ({first_line(e)})") from e


def _from_single_file(cls: type[DiffusersModel], path: Path, dtype: torch.dtype) -> DiffusionPipeline:
    """``from_single_file`` (diffusers fetches the matching configs from the Hub the first time).

    The whole file is loaded in ``dtype`` and the VAE is upcast to float32 afterwards.
    """
    try:
        return cls.pipeline_class.from_single_file(str(path), torch_dtype=dtype, **cls.load_kwargs())
    except OSError as e:
        raise B4MError(f"{path}: cannot load the checkpoint ({first_line(e)})") from e
