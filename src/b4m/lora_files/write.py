"""Writing plain LoRA files: the diffusers/peft layout and the kohya layout (ComfyUI, A1111), for SD/SDXL UNets and
FLUX.1 transformers (:mod:`.flux`)."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import torch

from ..errors import B4MError, first_line
from ..files import save_safetensors
from . import flux
from .factors import Factors, check_factors
from .formats import EXPORT_DTYPES, FORMATS, check_dtype_name
from .names import diffusers_reading, kohya_module_name, layers_per_block, resolve_naming

SAVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Export dtypes by the names the CLI and config files use.
DTYPE_NAMES = dict(zip(EXPORT_DTYPES, SAVE_DTYPES, strict=True))


def dtype_from_name(name: str) -> torch.dtype:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` as a torch dtype; a one-line error for anything else."""
    return DTYPE_NAMES[check_dtype_name(name)]


KOHYA_NETWORK_MODULE = "networks.lora"
#: Model families ``save_lora`` writes for: SD/SDXL UNets (also ``None``), FLUX.1 and FLUX.2 [klein] transformers.
FAMILIES = ("sd", "sdxl", *flux.LAYOUTS)

# diffusers' safetensors metadata entry for the peft LoraConfig kwargs (diffusers.loaders.lora_base).
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# Metadata keys the writer owns: values the caller passes under these names are replaced.
_OWNED_KEYS = (
    "format",
    LORA_ADAPTER_METADATA_KEY,
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_module",
    flux.FUSED_KEY,
    flux.FAMILY_KEY,
)


def _ranks(factors: Factors) -> dict[str, int]:
    return {name: int(down.shape[0]) for name, (_, down) in factors.items()}


def _diffusers_payload(
    factors: Factors, dtype: torch.dtype, prefix: str = "unet"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """peft keys under ``prefix.`` (``unet``, FLUX's ``transformer``) and the adapter metadata diffusers'
    pipeline-level ``save_lora_weights`` writes."""
    from diffusers.loaders.lora_base import _pack_dict_with_prefix

    tensors = {}
    for name, (up, down) in factors.items():
        tensors[f"{prefix}.{name}.lora_A.weight"] = down.to(dtype)
        tensors[f"{prefix}.{name}.lora_B.weight"] = up.to(dtype)
    ranks = _ranks(factors)
    common = Counter(ranks.values()).most_common(1)[0][0]
    # diffusers' own get_peft_kwargs layout; alpha = rank everywhere so the scale is exactly 1.
    pattern = {f"^{name}": r for name, r in ranks.items() if r != common}
    lora_kwargs = {
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(factors),
        "use_dora": False,
        "lora_bias": False,
    }
    packed = _pack_dict_with_prefix(lora_kwargs, prefix)
    return tensors, {LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def _kohya_names(factors: Factors, lpb: int | None, path: str | os.PathLike) -> dict[str, str]:
    """``{module: kohya module part}``, checked against diffusers' own kohya renaming: every module must come back
    as itself, or the file would lose it in ``load_lora_weights`` without an error."""
    names = {}
    for name in factors:
        try:
            names[name] = kohya_module_name(name, lpb)
        except B4MError:  # no SGM name: does the diffusers naming carry it?
            fallback = _diffusers_reading({name: kohya_module_name(name, None)}, None, path)[name] == name
            instead = "kohya_naming='diffusers'" if fallback else "format='diffusers'"
            raise B4MError(f"{path}: module {name} has no SGM (kohya SDXL) name; use {instead}") from None
    reading = _diffusers_reading(names, lpb, path)
    for name, part in names.items():
        if reading[name] != name:
            naming = "SGM" if lpb is not None else "diffusers"
            lost = "drops it" if reading[name] is None else f"puts it on {reading[name]}"
            raise B4MError(
                f"{path}: module {name}: diffusers' kohya loader {lost} (kohya key lora_unet_"
                f"{part.replace('.', '_')}, {naming} naming); export it with format='diffusers'"
            )
    return names


def _diffusers_reading(names: dict[str, str], lpb: int | None, path: str | os.PathLike) -> dict[str, str | None]:
    try:
        return diffusers_reading(names, lpb)
    except (ValueError, KeyError, IndexError) as e:
        raise B4MError(f"{path}: diffusers cannot convert these kohya names ({first_line(e)})") from None


def _kohya_payload(
    factors: Factors, dtype: torch.dtype, naming: str, unet_config: Any, path: str | os.PathLike
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya keys (via diffusers' ``convert_state_dict_to_kohya``), one alpha, and sd-scripts' network metadata.

    Every module gets the same alpha, the most common rank, so uniform-rank files have alpha = rank (scale 1). A
    module of another rank r gets ``up · r/alpha``, which the loaders' ``alpha/r`` undoes: diffusers' kohya loader
    cannot apply per-module alphas to attention layers (its alpha_pattern keys never match), one alpha it can.
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    lpb = layers_per_block(unet_config, path) if naming == "sgm" else None
    names = _kohya_names(factors, lpb, path)
    ranks = _ranks(factors)
    alpha = Counter(ranks.values()).most_common(1)[0][0]
    peft_sd = {}
    for name, (up, down) in factors.items():
        if ranks[name] != alpha:
            up = up.float() * (ranks[name] / alpha)
        peft_sd[f"unet.{names[name]}.lora_A.weight"] = down.to(dtype)
        peft_sd[f"unet.{names[name]}.lora_B.weight"] = up.to(dtype)
    tensors = convert_state_dict_to_kohya(peft_sd)
    for key in tensors:
        if key.endswith(".alpha"):  # diffusers writes an int64 rank; sd-scripts stores alpha in the save dtype
            tensors[key] = torch.tensor(float(alpha), dtype=dtype)
    dim = str(alpha) if len(set(ranks.values())) == 1 else "Dynamic"
    meta = {"ss_network_dim": dim, "ss_network_alpha": str(alpha), "ss_network_module": KOHYA_NETWORK_MODULE}
    return tensors, meta


def save_lora(
    factors: Factors,
    path: str | os.PathLike,
    *,
    format: str = "diffusers",
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, Any] | None = None,
    kohya_naming: str = "auto",
    unet_config: Any = None,
    family: str | None = None,
) -> str | None:
    """Write ``factors`` as a plain LoRA safetensors file (atomically).

    Both formats carry every linear layer of SD 1.x/2.x and SDXL UNets through diffusers' ``load_lora_weights``
    (attention, feed-forward, ``proj_in``/``proj_out``, resnet ``time_emb_proj``, time and added embeddings). In the
    kohya format each module's key is checked against diffusers' own kohya renaming before anything is written: in
    the diffusers naming SDXL's ``add_embedding.linear_1``/``_2`` are spelled by their SGM names
    ``lora_unet_label_emb_0_0``/``_0_2`` (diffusers maps ``lora_unet_add_embedding_linear_*`` onto no module and drops
    them with only a logged warning). A module diffusers cannot read from a kohya file in any spelling (e.g. the
    ``class_embedding.linear_*`` of class-conditioned UNets, which comes back as ``add_embedding``) is refused with a
    B4MError naming it and the diffusers format, which carries it, rather than written to a file that loses it.

    With ``family="flux"`` the module names are those of a FLUX.1 transformer (diffusers' ``FluxTransformer2DModel``)
    and the formats are peft keys under ``transformer.`` (``FluxPipeline.load_lora_weights``) or the kohya/BFL naming
    of sd-scripts and ComfyUI, whose fused ``qkv``/``linear1`` layers get block-diagonal factors (:mod:`.flux`).
    ``family="flux2"`` (FLUX.2 [klein], ``Flux2Transformer2DModel``) is the same with klein's BFL names, where only
    the double blocks' ``qkv`` are fused (the single blocks' fused layers are diffusers modules themselves); ComfyUI
    loads both formats.

    Args:
        factors: ``{module name: (up, down)}`` with ``ΔW = up @ down``.
        path: Output ``.safetensors`` file.
        format: ``"diffusers"`` (peft keys readable by ``load_lora_weights``) or ``"kohya"`` (ComfyUI/A1111).
        dtype: Tensor dtype on disk: float32, bfloat16 or float16.
        metadata: Extra metadata (e.g. trigger words); non-string values are stored as JSON. Keys the writer owns
            (``format``, ``lora_adapter_metadata``, ``ss_network_dim``/``_alpha``/``_module``) are replaced.
        kohya_naming: ``"sgm"`` (kohya SDXL block names), ``"diffusers"`` (kohya SD 1.x/2.x names) or ``"auto"``:
            SGM when ``unet_config`` is SDXL's (``addition_embed_type == "text_time"``), else diffusers (also when
            ``unet_config`` is None: diffusers and ComfyUI read such an SDXL file too, but kohya sd-scripts tools
            expect the SGM layout).
        unet_config: The UNet's config (or the UNet); needed for SGM naming (``layers_per_block``).
        family: The model family the module names belong to: ``None``, ``"sd"`` or ``"sdxl"`` (a UNet: the naming
            follows ``kohya_naming`` and ``unet_config``) or ``"flux"`` (a FLUX.1 transformer; ``kohya_naming`` must be
            ``"auto"`` or ``"bfl"``, ``unet_config`` is not used) or ``"flux2"`` (a FLUX.2 [klein] transformer,
            ``Flux2Transformer2DModel``; as FLUX.1, with klein's BFL names: :data:`b4m.lora_files.flux.FLUX2`).

    Returns:
        The kohya naming the file was written in, so that callers can say which one ``"auto"`` chose: ``"sgm"``
        (SGM/original SDXL block names, ``lora_unet_input_blocks_4_1_…``) or ``"diffusers"`` (diffusers module
        names, ``lora_unet_down_blocks_1_attentions_0_…``; without ``unet_config`` this is the naming even for an
        SDXL model, so a CLI should tell that the model's config gives the SGM layout), or ``"bfl"`` (FLUX's BFL
        layer names, ``lora_unet_double_blocks_0_img_attn_qkv``). None for ``format="diffusers"``.

    Raises:
        B4MError: Bad arguments, malformed factors, a module without an SGM name, a module diffusers cannot read
            from a kohya file, a module that is no FLUX.1 linear layer (``family="flux"``), or a failed write.
            Nothing is written then.
    """
    if format not in FORMATS:
        raise B4MError(f"{path}: format must be one of {FORMATS}, got {format!r}")
    if dtype not in SAVE_DTYPES:
        raise B4MError(f"{path}: dtype must be one of {SAVE_DTYPES}, got {dtype}")
    if family is not None and family not in FAMILIES:
        raise B4MError(f"{path}: family must be None or one of {FAMILIES}, got {family!r}")
    check_factors(factors, path)
    naming = None
    if family in flux.LAYOUTS:  # FLUX.1's or klein's transformer names
        layout = flux.LAYOUTS[family]
        flux.check_modules(list(factors), path, layout)
        if format == "diffusers":
            tensors, owned = _diffusers_payload(factors, dtype, flux.PREFIX)
        else:
            naming = flux.resolve_naming(kohya_naming, path)
            tensors, owned = flux.kohya_payload(factors, dtype, path, layout)
    elif format == "diffusers":
        tensors, owned = _diffusers_payload(factors, dtype)
    else:
        naming = resolve_naming(kohya_naming, unet_config)
        tensors, owned = _kohya_payload(factors, dtype, naming, unet_config, path)
    meta = {str(k): v for k, v in (metadata or {}).items() if k not in _OWNED_KEYS}
    meta.update(owned)
    save_safetensors(tensors, path, meta)
    return naming
