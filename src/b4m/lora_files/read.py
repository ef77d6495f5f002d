"""Reading plain LoRA files: diffusers/peft, the old diffusers layout (the official B4M repository's too) and kohya
(diffusers or SGM naming), renamed by diffusers' own converters into :data:`~b4m.lora_files.factors.Factors`; FLUX.1
and FLUX.2 [klein] files (peft keys under ``transformer.``, kohya/BFL names) through :mod:`.flux`."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import B4MError, first_line
from ..files import load_safetensors
from . import flux
from .factors import Factors
from .names import DIFFUSERS_PARTS, KOHYA_ALIASES, SGM_PARTS, kohya_to_peft, layers_per_block
from .write import LORA_ADAPTER_METADATA_KEY

# Key layouts read by load_lora: the module part ("base") and the tensor's role in the pair.
_PATTERNS = {
    "kohya": re.compile(r"(?P<base>lora_unet_\w+)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha)"),
    "peft": re.compile(r"(?P<base>.+)\.(?P<role>lora_A\.weight|lora_B\.weight)"),
    "diffusers_old": re.compile(r"(?P<base>.+?(?:\.lora|_lora))\.(?P<role>down\.weight|up\.weight)"),
}
_ROLES = {
    "lora_down.weight": "down",
    "lora_A.weight": "down",
    "down.weight": "down",
    "lora_up.weight": "up",
    "lora_B.weight": "up",
    "up.weight": "up",
    "alpha": "alpha",
}
_UNSUPPORTED = {
    "hada_": "LyCORIS LoHa",
    "lokr_": "LyCORIS LoKr",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "lora_mid": "LoCon with a mid (Tucker) factor",
}
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")


def detect_format(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> str:
    """``kohya``, ``peft`` or ``diffusers_old``; refuses LyCORIS/DoRA files and files without LoRA keys."""
    for marker, kind in _UNSUPPORTED.items():
        if any(marker in key for key in tensors):
            raise B4MError(f"{path}: {kind} weights are not a plain LoRA; not supported")
    keys = list(tensors)
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) and k.startswith("lora_") for k in keys):
        return "kohya"
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "peft"
    if any(k.endswith((".lora.down.weight", ".lora.up.weight", "_lora.down.weight", "_lora.up.weight")) for k in keys):
        return "diffusers_old"
    raise B4MError(
        f"{path}: not a LoRA file (no lora_A/lora_B, lora.down/lora.up or lora_down/lora_up keys among "
        f"{len(keys)} tensors)"
    )


def _unet_tensors(tensors: dict[str, torch.Tensor], fmt: str, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """Drop text-encoder tensors (with a warning) and the ``base_model.model.`` / ``unet.`` (``prefix.``) prefixes."""
    out, skipped = {}, 0
    for key, value in tensors.items():
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            skipped += 1
            continue
        if fmt != "kohya":
            key = key.removeprefix("base_model.model.")
            while key.startswith(f"{prefix}."):  # the official B4M files nest it twice: unet.unet.<module>
                key = key.removeprefix(f"{prefix}.")
        out[key] = value
    if skipped:
        denoiser = "UNet" if prefix == "unet" else prefix
        warnings.warn(f"skipped {skipped} text-encoder LoRA tensors (only the {denoiser} is imported)", stacklevel=3)
    return out


def _pair(tensors: dict[str, torch.Tensor], fmt: str, path: str | os.PathLike) -> dict[str, dict]:
    """Group tensors by module as ``{base: {"down": (key, t), "up": (key, t), "alpha": (key, t)}}`` and check them."""
    pattern = _PATTERNS[fmt]
    groups: dict[str, dict] = {}
    for key, value in tensors.items():
        match = pattern.fullmatch(key)
        if match is None:
            raise B4MError(f"{path}: unexpected tensor {key} in a {fmt} LoRA file")
        groups.setdefault(match["base"], {})[_ROLES[match["role"]]] = (key, value)
    if not groups:
        raise B4MError(f"{path}: not a LoRA file (no UNet LoRA weights, only text-encoder ones)")
    for base, group in groups.items():
        _check_pair(base, group, path)
    return groups


def _as_2d(tensor: torch.Tensor, base: str, path: str | os.PathLike) -> torch.Tensor:
    """2-D weights pass; 1×1 conv LoRA weights (SD 1.x ``proj_in``/``proj_out``) are squeezed to 2-D."""
    if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        return tensor.reshape(tensor.shape[:2])
    if tensor.ndim != 2:
        raise B4MError(f"{path}: {base}: weight of shape {tuple(tensor.shape)} is not a linear (2-D) LoRA factor")
    return tensor


def _check_pair(base: str, group: dict, path: str | os.PathLike) -> None:
    for role, other in (("down", "up"), ("up", "down")):
        if role not in group:
            present = "alpha" if other not in group else other
            raise B4MError(f"{path}: {base}: has {present} but no {role} weight")
    down = group["down"] = (group["down"][0], _as_2d(group["down"][1], base, path))
    up = group["up"] = (group["up"][0], _as_2d(group["up"][1], base, path))
    if up[1].shape[1] != down[1].shape[0]:
        raise B4MError(f"{path}: {base}: inconsistent rank: up {tuple(up[1].shape)} vs down {tuple(down[1].shape)}")
    if "alpha" in group and group["alpha"][1].numel() != 1:
        raise B4MError(f"{path}: {base}: alpha must be a scalar, got shape {tuple(group['alpha'][1].shape)}")


def _peft_config(metadata: dict[str, str], path: str | os.PathLike, prefix: str = "unet") -> Any:
    """The peft ``LoraConfig`` diffusers would build from the file's ``lora_adapter_metadata`` (its ``prefix``
    component's entries in a pipeline-level layout), if any."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    from peft import LoraConfig

    try:
        data = json.loads(raw)
        if any(k.startswith(f"{prefix}.") for k in data):  # pipeline-level layout: one dict per component
            data = {k.removeprefix(f"{prefix}."): v for k, v in data.items() if k.startswith(f"{prefix}.")}
        elif any(k.startswith("text_encoder") for k in data):
            return None
        return LoraConfig(**data)
    except (ValueError, TypeError) as e:
        raise B4MError(f"{path}: unreadable {LORA_ADAPTER_METADATA_KEY} ({first_line(e)})") from None


def _scale(fmt: str, module: str, rank: int, alpha: torch.Tensor | None, peft_config: Any) -> float:
    """alpha / rank as the loaders apply it (kohya alpha tensor, peft metadata, else 1)."""
    if fmt == "kohya" and alpha is not None:
        value = float(alpha.float().item())
        return value / rank if value != 0 else 1.0  # sd-scripts reads alpha 0 as "alpha = rank"
    if fmt == "peft" and peft_config is not None:
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(peft_config.alpha_pattern.keys(), module)
        value = float(peft_config.alpha_pattern.get(key, peft_config.lora_alpha))
        return value / math.sqrt(rank) if peft_config.use_rslora else value / rank
    return 1.0


def _folded(groups: dict[str, dict], fmt: str, peft_config: Any) -> dict[str, torch.Tensor]:
    """The pairs in the file's own key names, float32, with alpha/rank folded into up (alpha keys dropped)."""
    out = {}
    for base, group in groups.items():
        (down_key, down), (up_key, up) = group["down"], group["up"]
        alpha = group.get("alpha", (None, None))[1]
        scale = _scale(fmt, base, int(down.shape[0]), alpha, peft_config)
        up = up.float()
        out[down_key] = down.float()
        out[up_key] = up if scale == 1.0 else up * scale
    return out


def _kohya_to_peft(folded: dict[str, torch.Tensor], unet_config: Any, path: str | os.PathLike) -> dict:
    """kohya names → diffusers/peft names with diffusers' converters (SGM blocks remapped from ``unet_config``)."""
    sgm = any(part in key for key in folded for part in SGM_PARTS)
    if sgm and any(part in key for key in folded for part in DIFFUSERS_PARTS):
        # diffusers would silently drop the SGM-named half of such a file.
        raise B4MError(f"{path}: mixes SGM (input_blocks…) and diffusers (down_blocks…) kohya names")
    # Files b4m wrote before spelled SDXL's added embedding add_embedding_linear_1/_2 in the diffusers naming, which
    # diffusers' converter has no rule for; it maps their SGM names (what b4m writes now).
    state = {KOHYA_ALIASES.get(k.split(".")[0], k.split(".")[0]) + k[k.index(".") :]: v for k, v in folded.items()}
    try:
        return kohya_to_peft(state, layers_per_block(unet_config, path) if sgm else None)
    except (ValueError, KeyError, IndexError) as e:
        raise B4MError(f"{path}: diffusers cannot convert its kohya names ({first_line(e)})") from e


def _to_factors(peft_sd: dict[str, torch.Tensor], expected: int, path: str | os.PathLike) -> Factors:
    """``[unet.]<module>.lora_A/B.weight`` → ``{module: (up, down)}``; ``expected`` modules must come out."""
    pattern = _PATTERNS["peft"]
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft_sd.items():
        match = pattern.fullmatch(key.removeprefix("unet."))
        if match is None or "processor" in match["base"] or "_lora" in match["base"]:
            raise B4MError(f"{path}: cannot map {key} to a diffusers module name")
        halves.setdefault(match["base"], {})[_ROLES[match["role"]]] = value
    if len(halves) != expected or any(len(h) != 2 for h in halves.values()):
        raise B4MError(f"{path}: {expected} LoRA modules map to {len(halves)} diffusers names (names collide)")
    return {name: (h["up"].contiguous(), h["down"].contiguous()) for name, h in halves.items()}


def load_lora(path: str | os.PathLike, *, unet_config: Any = None) -> tuple[Factors, dict[str, str]]:
    """Read a plain LoRA file (diffusers/peft, old diffusers, or kohya in diffusers or SGM naming; for FLUX.1 and
    FLUX.2 [klein], peft keys under ``transformer.`` or kohya/BFL names, told apart from UNet files by their keys).

    Args:
        path: A ``.safetensors`` LoRA file.
        unet_config: The UNet's config (or the UNet); needed for kohya files in SGM naming.

    Returns:
        ``(factors, metadata)``: factors keyed by diffusers module name, float32, with alpha/rank folded into
        ``up``; the file's metadata (all strings) without safetensors' ``format`` entry. Text-encoder tensors are
        skipped with a warning. FLUX factors are keyed by ``FluxTransformer2DModel`` (FLUX.1) or
        ``Flux2Transformer2DModel`` (klein) module name; a fused BFL layer (``qkv``, FLUX.1's ``linear1``) is split
        into its modules (:func:`b4m.lora_files.flux.kohya_factors`).

    Raises:
        B4MError: Unreadable file, NaN/Inf values, no LoRA keys, an up without its down (or the reverse),
            inconsistent ranks, unsupported LoRA variants, names diffusers cannot map, or names of no FLUX.1 or klein
            linear layer in a FLUX file.
    """
    tensors, metadata = load_safetensors(path)
    fmt = detect_format(tensors, path)
    is_flux = flux.is_flux_file(list(tensors), fmt)
    prefix = flux.PREFIX if is_flux else "unet"
    groups = _pair(_unet_tensors(tensors, fmt, prefix), fmt, path)
    peft_config = _peft_config(metadata, path, prefix) if fmt == "peft" else None
    folded = _folded(groups, fmt, peft_config)
    if is_flux:
        metadata.pop("format", None)
        if fmt == "kohya":
            return flux.kohya_factors(folded, metadata, path), metadata
        factors = _to_factors(folded, len(groups), path)
        flux.layout_of(list(factors), path)  # FLUX.1's or klein's modules (peft keys name them alike)
        return factors, metadata
    if fmt == "kohya":
        peft_sd = _kohya_to_peft(folded, unet_config, path)
    else:
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

        peft_sd = convert_unet_state_dict_to_peft(folded)
    metadata.pop("format", None)
    return _to_factors(peft_sd, len(groups), path), metadata
