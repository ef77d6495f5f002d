"""Module names of kohya files: SGM (original SDXL checkpoint) block names, how a file's naming is chosen, and the
module diffusers' kohya loader puts each name on."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import B4MError

KOHYA_NAMINGS = ("auto", "diffusers", "sgm")
# Kohya spellings in the diffusers naming that differ from the module name: diffusers' converter turns
# lora_unet_add_embedding_linear_1/_2 both into "add.embedding.linear" (its SDXL index-stripping rule for names with
# "emb"), a module that does not exist, so load_lora_weights drops them with only a logged warning; the SGM names
# label_emb_0_0/_0_2 (which ComfyUI and A1111 read too) come back as add_embedding.linear_1/_2.
DIFFUSERS_NAMING_SPELLINGS = {
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
# What b4m wrote before (and diffusers drops): read as the spelling diffusers maps back.
KOHYA_ALIASES = {
    "lora_unet_" + name.replace(".", "_"): "lora_unet_" + spelling.replace(".", "_")
    for name, spelling in DIFFUSERS_NAMING_SPELLINGS.items()
}
SGM_PARTS = ("input_blocks", "middle_block", "output_blocks")
DIFFUSERS_PARTS = ("down_blocks", "mid_block", "up_blocks")


def config_value(unet_config: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a UNet config given as a mapping, a diffusers config object or the UNet itself."""
    if unet_config is None:
        return default
    if not isinstance(unet_config, Mapping) and hasattr(unet_config, "config"):
        unet_config = unet_config.config
    if isinstance(unet_config, Mapping):
        return unet_config.get(key, default)
    return getattr(unet_config, key, default)


def layers_per_block(unet_config: Any, path: str | os.PathLike) -> int:
    lpb = config_value(unet_config, "layers_per_block")
    if lpb is None:
        raise B4MError(f"{path}: SGM (input_blocks/middle_block/output_blocks) naming needs unet_config")
    if not isinstance(lpb, int):
        raise B4MError(f"{path}: SGM naming needs one int layers_per_block in unet_config, got {lpb!r}")
    return lpb


_SGM_RULES = (
    (re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"), "input", "1"),
    (re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.time_emb_proj"), "input", "0"),
    (re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"), "output", "1"),
    (re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\.time_emb_proj"), "output", "0"),
)
_SGM_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "mid_block.resnets.0.time_emb_proj": "middle_block.0.emb_layers.1",
    "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
}


def sgm_module_name(name: str, layers_per_block: int) -> str:
    """The SGM (original SDXL checkpoint) name of a diffusers UNet linear module, as kohya sd-scripts spells it.

    ``down_blocks.i.attentions.j`` → ``input_blocks.{1 + i·(lpb+1) + j}.1``, ``mid_block.attentions.0`` →
    ``middle_block.1``, ``up_blocks.i.attentions.j`` → ``output_blocks.{i·(lpb+1) + j}.1``; resnet
    ``time_emb_proj`` → ``….0.emb_layers.1``; time/added embeddings → ``time_embed``/``label_emb``. This is the
    inverse of diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_unet_lora_key``.

    Raises:
        B4MError: ``name`` has no SGM counterpart among the linear modules.
    """
    if name in _SGM_FIXED:
        return _SGM_FIXED[name]
    if name.startswith("mid_block.attentions.0."):
        return "middle_block.1." + name.removeprefix("mid_block.attentions.0.")
    for pattern, side, inner in _SGM_RULES:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        block, layer = int(match.group(1)), int(match.group(2))
        index = block * (layers_per_block + 1) + layer + (1 if side == "input" else 0)
        rest = match.group(3) if inner == "1" else "emb_layers.1"
        return f"{side}_blocks.{index}.{inner}.{rest}"
    raise B4MError(f"module {name} has no SGM (kohya SDXL) name; use kohya_naming='diffusers'")


def kohya_module_name(name: str, layers_per_block: int | None) -> str:
    """The dotted module part of ``name``'s kohya key (``lora_unet_`` + this with ``_`` for ``.``): its SGM name
    when ``layers_per_block`` is given (SGM naming), else its diffusers name with
    :data:`DIFFUSERS_NAMING_SPELLINGS` applied (diffusers naming).

    Raises:
        B4MError: SGM naming and ``name`` has no SGM counterpart among the linear modules.
    """
    if layers_per_block is not None:
        return sgm_module_name(name, layers_per_block)
    return DIFFUSERS_NAMING_SPELLINGS.get(name, name)


def kohya_to_peft(state: Mapping[str, torch.Tensor], layers_per_block: int | None) -> dict[str, torch.Tensor]:
    """Rename kohya UNet keys (``lora_unet_…lora_down.weight``/``lora_up.weight``/``alpha``) to peft keys
    (``unet.<module>.lora_A.weight``…) the way ``StableDiffusion(XL)Pipeline.load_lora_weights`` does: SGM blocks
    remapped with ``layers_per_block`` (when given), then diffusers' kohya converter. The tensors are not copied.

    Raises:
        ValueError, KeyError, IndexError: diffusers' converters refuse the names.
    """
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    state = dict(state)  # diffusers' converters pop from the dict they are given
    if layers_per_block is not None:
        state = _maybe_map_sgm_blocks_to_diffusers(state, SimpleNamespace(layers_per_block=layers_per_block))
    state, _ = _convert_non_diffusers_lora_to_diffusers(state)
    return convert_unet_state_dict_to_peft(state)


def diffusers_reading(kohya_names: Mapping[str, str], layers_per_block: int | None) -> dict[str, str | None]:
    """For each ``{module: kohya module part}``, the UNet module diffusers' kohya loader puts that LoRA on, or None
    where it loses it (a name that comes back as another module's or collides with one).

    Raises:
        ValueError, KeyError, IndexError: diffusers' converters refuse the names (the load would fail loudly).
    """
    state, owner = {}, {}
    for module, part in kohya_names.items():
        key = "lora_unet_" + part.replace(".", "_")
        down = torch.empty(0)  # a distinct placeholder per module, followed through the renaming by identity
        owner[id(down)] = module
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = torch.empty(0)
    reading: dict[str, str | None] = dict.fromkeys(kohya_names)
    for key, value in kohya_to_peft(state, layers_per_block).items():
        if key.endswith(".lora_A.weight") and id(value) in owner:
            reading[owner[id(value)]] = key.removeprefix("unet.").removesuffix(".lora_A.weight")
    return reading


def resolve_naming(kohya_naming: str, unet_config: Any) -> str:
    if kohya_naming not in KOHYA_NAMINGS:
        raise B4MError(f"kohya_naming must be one of {KOHYA_NAMINGS}, got {kohya_naming!r}")
    if kohya_naming != "auto":
        return kohya_naming
    return "sgm" if config_value(unet_config, "addition_embed_type") == "text_time" else "diffusers"
