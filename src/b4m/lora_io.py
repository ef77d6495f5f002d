"""Plain LoRA interchange: export any adapter as a LoRA file other tools read, and import such files back.

The interchange type is :data:`Factors`: ``{module name: (up, down)}`` with module names relative to the UNet in
diffusers spelling (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``), ``up`` ``m × r``, ``down``
``r × n`` and ``ΔW = up @ down`` (every scale already folded into ``up``).

Two file formats are written:

- ``diffusers``: the peft layout ``unet.<module>.lora_A.weight`` (down) / ``unet.<module>.lora_B.weight`` (up) with
  ``lora_alpha = rank`` stored in diffusers' ``lora_adapter_metadata`` entry, so
  ``StableDiffusion(XL)Pipeline.load_lora_weights`` applies the factors with scale exactly 1.
- ``kohya``: ``lora_unet_<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (= rank) for ComfyUI and
  A1111, in diffusers module naming (SD 1.x/2.x) or the original SGM block naming kohya sd-scripts uses for SDXL.

Reading also accepts the old diffusers layout (``<module>.lora.down.weight``, ``..._lora.down.weight``), including
the official B4M repository's ``unet.unet.<module>.lora.down.weight`` keys. Renaming between kohya and diffusers
names is done by diffusers' own converters; this module only pairs, checks and rescales the tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .errors import B4MError
from .io_utils import load_safetensors, save_safetensors
from .plp import PLPLinear

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]

FORMATS = ("diffusers", "kohya")
KOHYA_NAMINGS = ("auto", "diffusers", "sgm")
SAVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Export dtypes by the names the CLI and config files use.
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_from_name(name: str) -> torch.dtype:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` as a torch dtype; a one-line error for anything else."""
    if name not in DTYPE_NAMES:
        raise B4MError(f"export dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return DTYPE_NAMES[name]


KOHYA_NETWORK_MODULE = "networks.lora"

# diffusers' safetensors metadata entry for the peft LoraConfig kwargs (diffusers.loaders.lora_base).
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# Metadata keys the writer owns: values the caller passes under these names are replaced.
_OWNED_KEYS = ("format", LORA_ADAPTER_METADATA_KEY, "ss_network_dim", "ss_network_alpha", "ss_network_module")

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
_KOHYA_ALIASES = {
    "lora_unet_add_embedding_linear_1": "lora_unet_label_emb_0_0",
    "lora_unet_add_embedding_linear_2": "lora_unet_label_emb_0_2",
}
_SGM_PARTS = ("input_blocks", "middle_block", "output_blocks")
_DIFFUSERS_PARTS = ("down_blocks", "mid_block", "up_blocks")


# --------------------------------------------------------------------------------------------------------------------
# Factors of a model, checks, merging


def factors_from_model(model: nn.Module) -> Factors:
    """The ΔW of every PLP layer of ``model`` as plain LoRA factors.

    Args:
        model: A model carrying PLP adapters (see :func:`b4m.add_plp`); names are taken relative to it.

    Returns:
        ``{module name: (up, down)}`` in float32 on the CPU, with ``layer.scale`` and the up/down scales of the
        learned halves folded into ``up`` (``ΔW = up @ down``).

    Raises:
        B4MError: ``model`` has no PLP layers.
    """
    factors: Factors = {}
    for name, module in model.named_modules():
        if isinstance(module, PLPLinear):
            with torch.no_grad():
                up = module.up().detach().float().cpu()
                down = module.down().detach().float().cpu()
            if module.scale != 1.0:
                up = up * float(module.scale)
            factors[name] = (up.contiguous(), down.contiguous())
    if not factors:
        raise B4MError("the model carries no PLP adapter layers; nothing to export")
    return factors


def _target_linear(model: nn.Module, name: str, path: str | os.PathLike) -> nn.Module:
    """The weight-holding layer for ``name``: an ``nn.Linear`` or 1×1 ``nn.Conv2d`` (unwrapping adapter layers)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise B4MError(f"{path}: module {name} does not exist in the model") from None
    module = getattr(module, "base_layer", module)  # PLPLinear or a peft LoRA layer around the real one
    if isinstance(module, nn.Linear):
        return module
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
        return module
    raise B4MError(f"{path}: module {name} is a {type(module).__name__}, not a linear layer")


def _out_in(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.out_channels, module.in_channels


def check_factors_fit(factors: Factors, model: nn.Module, path: str | os.PathLike) -> None:
    """Check that every module of ``factors`` exists in ``model`` as a linear layer and the shapes fit.

    Args:
        factors: ``{module name: (up, down)}``.
        model: The model the factors are meant for (PLP or peft layers are looked through to their base layer).
        path: The file the factors came from, named in errors.

    Raises:
        B4MError: A module is missing, is not linear, or ``up`` (m × r) / ``down`` (r × n) do not fit its
            ``out_features`` m and ``in_features`` n.
    """
    for name, (up, down) in factors.items():
        module = _target_linear(model, name, path)
        m, n = _out_in(module)
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0] or up.shape[0] != m or down.shape[1] != n:
            raise B4MError(
                f"{path}: module {name}: LoRA up {tuple(up.shape)} / down {tuple(down.shape)} does not fit the "
                f"model's layer (out {m}, in {n}); expected up ({m}, r) and down (r, {n})"
            )


@torch.no_grad()
def apply_factors(model: nn.Module, factors: Factors, *, scale: float = 1.0) -> None:
    """Add ``scale · up @ down`` into the weights of the model's linear layers (a plain merge).

    Args:
        model: The model to change in place. For PLP or peft layers the wrapped base layer is changed.
        factors: ``{module name: (up, down)}``.
        scale: Multiplier of every ΔW.

    Raises:
        B4MError: The factors do not fit the model (checked before anything is changed) or a merged weight
            would not be finite.
    """
    check_factors_fit(factors, model, "<factors>")
    for name, (up, down) in factors.items():
        weight = _target_linear(model, name, "<factors>").weight
        delta = (up.float() @ down.float()).to(weight.device) * float(scale)
        merged = weight.float() + delta.reshape(weight.shape)
        if not torch.isfinite(merged).all():
            raise B4MError(f"module {name}: merging the LoRA gives non-finite weights")
        weight.copy_(merged.to(weight.dtype))


def _check_factors(factors: Factors, path: str | os.PathLike) -> None:
    """Refuse empty factors, non-2-D tensors, mismatched ranks and non-finite values before writing."""
    if not factors:
        raise B4MError(f"{path}: no LoRA factors to write")
    for name, (up, down) in factors.items():
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise B4MError(
                f"{path}: module {name}: up {tuple(up.shape)} and down {tuple(down.shape)} are not m×r and r×n"
            )
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise B4MError(f"{path}: module {name}: factors hold NaN or Inf values; not written")


# --------------------------------------------------------------------------------------------------------------------
# Configs and SGM names


def _config_value(unet_config: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a UNet config given as a mapping, a diffusers config object or the UNet itself."""
    if unet_config is None:
        return default
    if not isinstance(unet_config, Mapping) and hasattr(unet_config, "config"):
        unet_config = unet_config.config
    if isinstance(unet_config, Mapping):
        return unet_config.get(key, default)
    return getattr(unet_config, key, default)


def _layers_per_block(unet_config: Any, path: str | os.PathLike) -> int:
    lpb = _config_value(unet_config, "layers_per_block")
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


def _resolve_naming(kohya_naming: str, unet_config: Any) -> str:
    if kohya_naming not in KOHYA_NAMINGS:
        raise B4MError(f"kohya_naming must be one of {KOHYA_NAMINGS}, got {kohya_naming!r}")
    if kohya_naming != "auto":
        return kohya_naming
    return "sgm" if _config_value(unet_config, "addition_embed_type") == "text_time" else "diffusers"


# --------------------------------------------------------------------------------------------------------------------
# Writing


def _ranks(factors: Factors) -> dict[str, int]:
    return {name: int(down.shape[0]) for name, (_, down) in factors.items()}


def _diffusers_payload(factors: Factors, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """peft keys under ``unet.`` and the adapter metadata diffusers' pipeline-level ``save_lora_weights`` writes."""
    from diffusers.loaders.lora_base import _pack_dict_with_prefix

    tensors = {}
    for name, (up, down) in factors.items():
        tensors[f"unet.{name}.lora_A.weight"] = down.to(dtype)
        tensors[f"unet.{name}.lora_B.weight"] = up.to(dtype)
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
    packed = _pack_dict_with_prefix(lora_kwargs, "unet")
    return tensors, {LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def _kohya_payload(
    factors: Factors, dtype: torch.dtype, naming: str, unet_config: Any, path: str | os.PathLike
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya keys (via diffusers' ``convert_state_dict_to_kohya``), one alpha, and sd-scripts' network metadata.

    Every module gets the same alpha, the most common rank, so uniform-rank files have alpha = rank (scale 1). A
    module of another rank r gets ``up · r/alpha``, which the loaders' ``alpha/r`` undoes: diffusers' kohya loader
    cannot apply per-module alphas to attention layers (its alpha_pattern keys never match), one alpha it can.
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    lpb = _layers_per_block(unet_config, path) if naming == "sgm" else None
    ranks = _ranks(factors)
    alpha = Counter(ranks.values()).most_common(1)[0][0]
    peft_sd = {}
    for name, (up, down) in factors.items():
        try:
            key = sgm_module_name(name, lpb) if lpb is not None else name
        except B4MError as e:
            raise B4MError(f"{path}: {e}") from None
        if ranks[name] != alpha:
            up = up.float() * (ranks[name] / alpha)
        peft_sd[f"unet.{key}.lora_A.weight"] = down.to(dtype)
        peft_sd[f"unet.{key}.lora_B.weight"] = up.to(dtype)
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
) -> None:
    """Write ``factors`` as a plain LoRA safetensors file (atomically).

    Args:
        factors: ``{module name: (up, down)}`` with ``ΔW = up @ down``.
        path: Output ``.safetensors`` file.
        format: ``"diffusers"`` (peft keys readable by ``load_lora_weights``) or ``"kohya"`` (ComfyUI/A1111).
        dtype: Tensor dtype on disk: float32, bfloat16 or float16.
        metadata: Extra metadata (e.g. trigger words); non-string values are stored as JSON. Keys the writer owns
            (``format``, ``lora_adapter_metadata``, ``ss_network_dim``/``_alpha``/``_module``) are replaced.
        kohya_naming: ``"sgm"`` (kohya SDXL block names), ``"diffusers"`` (kohya SD 1.x/2.x names) or ``"auto"``:
            SGM when ``unet_config`` is SDXL's (``addition_embed_type == "text_time"``), else diffusers.
        unet_config: The UNet's config (or the UNet); needed for SGM naming (``layers_per_block``).

    Raises:
        B4MError: Bad arguments, malformed factors, a module without an SGM name, or a failed write.
    """
    if format not in FORMATS:
        raise B4MError(f"{path}: format must be one of {FORMATS}, got {format!r}")
    if dtype not in SAVE_DTYPES:
        raise B4MError(f"{path}: dtype must be one of {SAVE_DTYPES}, got {dtype}")
    _check_factors(factors, path)
    if format == "diffusers":
        tensors, owned = _diffusers_payload(factors, dtype)
    else:
        naming = _resolve_naming(kohya_naming, unet_config)
        tensors, owned = _kohya_payload(factors, dtype, naming, unet_config, path)
    meta = {str(k): v for k, v in (metadata or {}).items() if k not in _OWNED_KEYS}
    meta.update(owned)
    save_safetensors(tensors, path, meta)


# --------------------------------------------------------------------------------------------------------------------
# Reading


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


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


def _unet_tensors(tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Drop text-encoder tensors (with a warning) and the ``base_model.model.`` / ``unet.`` prefixes."""
    out, skipped = {}, 0
    for key, value in tensors.items():
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            skipped += 1
            continue
        if fmt != "kohya":
            key = key.removeprefix("base_model.model.")
            while key.startswith("unet."):  # the official B4M files nest it twice: unet.unet.<module>
                key = key.removeprefix("unet.")
        out[key] = value
    if skipped:
        warnings.warn(f"skipped {skipped} text-encoder LoRA tensors (only the UNet is imported)", stacklevel=3)
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


def _peft_config(metadata: dict[str, str], path: str | os.PathLike) -> Any:
    """The peft ``LoraConfig`` diffusers would build from the file's ``lora_adapter_metadata``, if any."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    from peft import LoraConfig

    try:
        data = json.loads(raw)
        if any(k.startswith("unet.") for k in data):  # pipeline-level layout: one dict per component
            data = {k.removeprefix("unet."): v for k, v in data.items() if k.startswith("unet.")}
        elif any(k.startswith("text_encoder") for k in data):
            return None
        return LoraConfig(**data)
    except (ValueError, TypeError) as e:
        raise B4MError(f"{path}: unreadable {LORA_ADAPTER_METADATA_KEY} ({_first_line(e)})") from None


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
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    sgm = any(part in key for key in folded for part in _SGM_PARTS)
    if sgm and any(part in key for key in folded for part in _DIFFUSERS_PARTS):
        # diffusers would silently drop the SGM-named half of such a file.
        raise B4MError(f"{path}: mixes SGM (input_blocks…) and diffusers (down_blocks…) kohya names")
    # diffusers' converter has no rule for kohya's diffusers-named SDXL added embedding; its SGM name works.
    state = {_KOHYA_ALIASES.get(k.split(".")[0], k.split(".")[0]) + k[k.index(".") :]: v for k, v in folded.items()}
    try:
        if sgm:
            lpb = _layers_per_block(unet_config, path)
            state = _maybe_map_sgm_blocks_to_diffusers(state, SimpleNamespace(layers_per_block=lpb))
        state, _ = _convert_non_diffusers_lora_to_diffusers(state)
    except (ValueError, KeyError, IndexError) as e:
        raise B4MError(f"{path}: diffusers cannot convert its kohya names ({_first_line(e)})") from e
    return convert_unet_state_dict_to_peft(state)


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
    """Read a plain LoRA file (diffusers/peft, old diffusers, or kohya in diffusers or SGM naming).

    Args:
        path: A ``.safetensors`` LoRA file.
        unet_config: The UNet's config (or the UNet); needed for kohya files in SGM naming.

    Returns:
        ``(factors, metadata)``: factors keyed by diffusers module name, float32, with alpha/rank folded into
        ``up``; the file's metadata (all strings) without safetensors' ``format`` entry. Text-encoder tensors are
        skipped with a warning.

    Raises:
        B4MError: Unreadable file, NaN/Inf values, no LoRA keys, an up without its down (or the reverse),
            inconsistent ranks, unsupported LoRA variants or names diffusers cannot map.
    """
    tensors, metadata = load_safetensors(path)
    fmt = detect_format(tensors, path)
    groups = _pair(_unet_tensors(tensors, fmt), fmt, path)
    peft_config = _peft_config(metadata, path) if fmt == "peft" else None
    folded = _folded(groups, fmt, peft_config)
    if fmt == "kohya":
        peft_sd = _kohya_to_peft(folded, unet_config, path)
    else:
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

        peft_sd = convert_unet_state_dict_to_peft(folded)
    metadata.pop("format", None)
    return _to_factors(peft_sd, len(groups), path), metadata
