"""FLUX.1 and FLUX.2 [klein] transformer LoRA files: which Black Forest Labs (BFL) layer holds each diffusers module
(one :class:`Layout` per family: :data:`FLUX1`, :data:`FLUX2`), and the kohya tensors of the fused ``qkv`` /
``linear1`` layers (writing) and the per-module factors in them (reading).

FLUX.2 [klein] (``Flux2Transformer2DModel``) fuses in BFL's way already: its single blocks' ``attn.to_qkv_mlp_proj``
and ``attn.to_out`` are BFL's ``linear1`` and ``linear2``, so only the double blocks' ``qkv`` carry block-diagonal
factors; ComfyUI reads both formats (``model_base.Flux2`` is a ``Flux``: ``transformer.<module>`` keys through
``flux_to_diffusers``, ``lora_unet_<BFL layer>`` keys directly). The rest of this note is FLUX.1's, and holds for
klein's double blocks.

Module names are relative to diffusers' ``FluxTransformer2DModel`` (``transformer_blocks.0.attn.to_q``). The
diffusers format needs no renaming: peft keys under :data:`PREFIX` (``transformer.<module>.lora_A.weight``). The
kohya/BFL format (``lora_unet_<BFL layer>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, what kohya
sd-scripts writes for FLUX.1 and ComfyUI reads) follows the BFL checkpoint, which fuses q, k, v into one ``qkv``
linear (double blocks: ``img_attn_qkv`` = to_q/to_k/to_v, ``txt_attn_qkv`` = add_q/k/v_proj) and q, k, v and
``proj_mlp`` into ``linear1`` (single blocks; ``linear2`` = ``proj_out``, fed the attention output then the MLP
output, as in diffusers). A fused layer's LoRA is exact with ``down = [down_q; down_k; …]`` and ``up =
blockdiag(up_q, up_k, …)`` and alpha = its rank Σr (k·r for parts of rank r), so loaders apply scale 1. A part
without a LoRA is a zero block of the largest present rank, so equal-rank parts give rank k·r, which diffusers'
converter splits back into rank-r parts. :data:`FUSED_KEY` metadata records the block ranks and zero parts.

Reading a fused layer: by the metadata's blocks (files b4m wrote: rank preserving, zero parts dropped), else by k
equal blocks where ``up`` is block-diagonal in them (as diffusers does), else (a LoRA trained on the fused layer,
e.g. by sd-scripts) each part gets the whole ``down`` and its rows of ``up``: exact, with the fused rank.

Diffusers' own converter checks every key written. It has no usable rule for BFL layers outside the blocks
(``img_in``, ``final_layer`` …: they come back without the ``transformer.`` prefix and ``load_lora_weights`` drops
them), so those modules are refused in the kohya format (the diffusers format carries them); b4m reads them. It
splits ``linear1`` only at FLUX.1's widths (hidden 3072, MLP 12288: every FLUX.1 checkpoint; diffusers 0.42);
b4m's reader and ComfyUI read any width.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from fractions import Fraction

import torch

from ..errors import B4MError, first_line
from .factors import Factors

FAMILY = "flux"
#: Component prefix of the peft keys (``transformer.<module>.lora_A.weight``).
PREFIX = "transformer"
#: kohya namings for FLUX: BFL block names are the only one (``auto`` picks it).
NAMINGS = ("auto", "bfl")
#: Metadata entry describing the fused layers' block-diagonal factors.
FUSED_KEY = "b4m_fused"
#: Metadata entry naming the family of a kohya file b4m wrote (``flux``, ``flux2``): BFL names alone do not tell
#: FLUX.1's ``linear1``/``linear2``/``img_mlp_*`` from klein's.
FAMILY_KEY = "b4m_family"
FUSED_ABOUT = (
    "fused BFL layers (qkv: q, k, v; linear1: q, k, v, proj_mlp) carry block-diagonal factors: down = [down_1; ...; "
    "down_k], up = blockdiag(up_1, ..., up_k), rank = sum(ranks) (k*r for parts of rank r), alpha = rank; 'ranks' "
    "lists the blocks' ranks in part order, 'zero' the parts that have no LoRA (zero blocks)"
)
KOHYA_NETWORK_MODULE = "networks.lora_flux"
#: FLUX's MLP width over its hidden size (diffusers' ``FluxSingleTransformerBlock`` and ComfyUI use 4).
MLP_RATIO = 4
# FLUX.1's widths, at which diffusers' kohya converter splits linear1 (its rows are hard-coded there).
_FLUX1_LINEAR1_ROWS = 3 * 3072 + 12288

# {diffusers module inside a block: (BFL layer, part index in the fused layer or None)}
_DOUBLE = {
    **{f"attn.to_{x}": ("img_attn_qkv", i) for i, x in enumerate("qkv")},
    **{f"attn.add_{x}_proj": ("txt_attn_qkv", i) for i, x in enumerate("qkv")},
    "attn.to_out.0": ("img_attn_proj", None),
    "attn.to_add_out": ("txt_attn_proj", None),
    "ff.net.0.proj": ("img_mlp_0", None),
    "ff.net.2": ("img_mlp_2", None),
    "ff_context.net.0.proj": ("txt_mlp_0", None),
    "ff_context.net.2": ("txt_mlp_2", None),
    "norm1.linear": ("img_mod_lin", None),
    "norm1_context.linear": ("txt_mod_lin", None),
}
_SINGLE = {
    **{f"attn.to_{x}": ("linear1", i) for i, x in enumerate("qkv")},
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation_lin", None),
}
# Modules outside the blocks (read only: diffusers' kohya loader drops them, see above).
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "proj_out": "final_layer_linear",
    "norm_out.linear": "final_layer_adaLN_modulation_1",  # BFL's (shift, scale) rows are diffusers' (scale, shift)
}
# FLUX.2 (diffusers' Flux2Transformer2DModel; facts from diffusers' _convert_non_diffusers_flux2_lora_to_diffusers
# and _convert_kohya_flux2_lora_to_diffusers): the double blocks' attention as FLUX.1's, a SwiGLU feed-forward
# (ff.linear_in / linear_out = img_mlp_0 / _2), no per-block modulation (three shared ones outside the blocks), and
# single blocks whose fused layers are diffusers modules themselves: to_qkv_mlp_proj = linear1, to_out = linear2.
_DOUBLE2 = {
    **{k: v for k, v in _DOUBLE.items() if v[0].endswith(("_qkv", "_proj"))},
    "ff.linear_in": ("img_mlp_0", None),
    "ff.linear_out": ("img_mlp_2", None),
    "ff_context.linear_in": ("txt_mlp_0", None),
    "ff_context.linear_out": ("txt_mlp_2", None),
}
_SINGLE2 = {"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}
_TOP2 = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img_lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt_lin",
    "single_stream_modulation.linear": "single_stream_modulation_lin",
    "proj_out": "final_layer_linear",
    "norm_out.linear": "final_layer_adaLN_modulation_1",
}
_SWAPPED = "lora_unet_final_layer_adaLN_modulation_1"
# out/in of the BFL layers named alike in both families but holding other modules, at klein's widths (MLP 3·hidden,
# SwiGLU); FLUX.1's are 7, 1/5, 4 and 1/4.
_KLEIN_RATIOS = {"linear1": Fraction(9), "linear2": Fraction(1, 4), "mlp_0": Fraction(6), "mlp_2": Fraction(1, 3)}
_MODULE = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
_LAYER = re.compile(r"lora_unet_(double_blocks|single_blocks)_(\d+)_(\w+)")
# Keys of a FLUX kohya file (no SD/SDXL kohya name starts so).
_FLUX_KOHYA = re.compile(
    r"lora_unet_((double|single)_blocks_|(img|txt)_in\.|(time|vector|guidance)_in_|final_layer_"
    r"|(double|single)_stream_modulation_)"
)


def _parts(table: Mapping[str, tuple[str, int | None]]) -> dict[str, list[str]]:
    out: dict[str, dict[int, str]] = {}
    for inner, (layer, part) in table.items():
        out.setdefault(layer, {})[part or 0] = inner
    return {layer: [parts[i] for i in sorted(parts)] for layer, parts in out.items()}


class Layout:
    """One FLUX family's diffusers modules and the BFL layers (kohya key bases) that hold them."""

    def __init__(self, family: str, title: str, double: dict, single: dict, top: dict[str, str]) -> None:
        self.family, self.title, self.top = family, title, top
        self.blocks = {
            "transformer_blocks": ("double_blocks", double),
            "single_transformer_blocks": ("single_blocks", single),
        }
        # {BFL block kind: (diffusers block kind, {BFL layer: [diffusers modules in part order]})}
        self.inner = {bfl: (kind, _parts(table)) for kind, (bfl, table) in self.blocks.items()}

    def holds(self, name: str) -> bool:
        """Whether ``name`` is a linear module of this family's transformer (diffusers naming)."""
        match = _MODULE.fullmatch(name)
        return match[3] in self.blocks[match[1]][1] if match is not None else name in self.top


FLUX1 = Layout(FAMILY, "FLUX.1", _DOUBLE, _SINGLE, _TOP)
FLUX2 = Layout("flux2", "FLUX.2 [klein]", _DOUBLE2, _SINGLE2, _TOP2)
#: The layouts by model family (``save_lora``'s ``family``).
LAYOUTS = {FLUX1.family: FLUX1, FLUX2.family: FLUX2}


def bfl_layer(name: str, path: str | os.PathLike, layout: Layout = FLUX1) -> tuple[str, int | None]:
    """The kohya key base (``lora_unet_<BFL layer>``) of the layer holding the diffusers module ``name``, and the
    module's part index in it (None for an unfused layer).

    Raises:
        B4MError: ``name`` is not a linear module of the layout's transformer.
    """
    match = _MODULE.fullmatch(name)
    if match is not None and match[3] in layout.blocks[match[1]][1]:
        bfl, table = layout.blocks[match[1]]
        layer, part = table[match[3]]
        return f"lora_unet_{bfl}_{match[2]}_{layer}", part
    if match is None and name in layout.top:
        return f"lora_unet_{layout.top[name]}", None
    raise B4MError(f"{path}: module {name} is not a linear layer of a {layout.title} transformer (diffusers naming)")


def layer_modules(base: str, path: str | os.PathLike, layout: Layout = FLUX1) -> list[str]:
    """The diffusers modules the BFL layer ``base`` (a kohya key base) holds, in part order (one if unfused).

    Raises:
        B4MError: ``base`` is no layer of the layout's transformer in the BFL/kohya naming.
    """
    match = _LAYER.fullmatch(base)
    if match is not None and match[3] in layout.inner[match[1]][1]:
        kind, layers = layout.inner[match[1]]
        return [f"{kind}.{match[2]}.{inner}" for inner in layers[match[3]]]
    top = [name for name, layer in layout.top.items() if base == f"lora_unet_{layer}"]
    if match is None and top:
        return top
    raise B4MError(f"{path}: {base} is not a {layout.title} layer in the BFL/kohya naming")


def is_flux_file(keys: list[str], fmt: str) -> bool:
    """Whether a LoRA file's keys (of format ``fmt``, see :func:`~b4m.lora_files.read.detect_format`) are FLUX's:
    kohya keys of BFL layers, or peft keys under ``transformer.``."""
    if fmt == "kohya":
        return any(_FLUX_KOHYA.match(key) for key in keys)
    return fmt == "peft" and any(key.removeprefix("base_model.model.").startswith(f"{PREFIX}.") for key in keys)


def check_modules(names: list[str], path: str | os.PathLike, layout: Layout = FLUX1) -> None:
    """Refuse module names that are not linear layers of the layout's transformer."""
    for name in names:
        bfl_layer(name, path, layout)


def layout_of(names: list[str], path: str | os.PathLike) -> Layout:
    """The family whose transformer has every module of ``names`` (diffusers naming; FLUX.1 where both have them:
    the double blocks' attention is named alike).

    Raises:
        B4MError: No family has them all; the message names a module of neither.
    """
    for layout in LAYOUTS.values():
        if all(layout.holds(name) for name in names):
            return layout
    titles = " or ".join(layout.title for layout in LAYOUTS.values())
    stray = next((n for n in names if not any(layout.holds(n) for layout in LAYOUTS.values())), None)
    if stray is None:
        raise B4MError(f"{path}: its modules mix {' and '.join(x.title for x in LAYOUTS.values())} layers")
    raise B4MError(f"{path}: module {stray} is not a linear layer of a {titles} transformer (diffusers naming)")


def resolve_naming(naming: str, path: str | os.PathLike) -> str:
    if naming not in NAMINGS:
        raise B4MError(f"{path}: FLUX kohya files use BFL names; kohya_naming must be in {NAMINGS}, got {naming!r}")
    return "bfl"


def _check_with_diffusers(layers: Mapping[str, list[str]], path: str | os.PathLike, layout: Layout) -> None:
    """Run each layer's key through diffusers' kohya converter of the family (FLUX.1's with placeholder tensors of
    FLUX.1's shapes; FLUX.2's): it must come back as ``transformer.<module>`` for every part, or
    ``load_lora_weights`` would lose it."""
    from diffusers.loaders import lora_conversion_utils as conversion

    convert = conversion._convert_kohya_flux_lora_to_diffusers
    if layout is FLUX2:
        convert = conversion._convert_kohya_flux2_lora_to_diffusers
    log = logging.getLogger(convert.__module__)  # FLUX.2's warns of the keys it drops; the error below says so
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        for base, names in layers.items():
            _check_layer(base, names, convert, path, layout)
    finally:
        log.setLevel(level)


def _check_layer(base: str, names: list[str], convert, path: str | os.PathLike, layout: Layout) -> None:
    """One layer's key through ``convert`` (see :func:`_check_with_diffusers`)."""
    parts = layer_modules(base, path, layout)
    rows = _FLUX1_LINEAR1_ROWS if len(parts) == 4 else len(parts)
    state = {
        f"{base}.lora_down.weight": torch.zeros(len(parts), 1),
        f"{base}.lora_up.weight": torch.zeros(rows, len(parts)),
        f"{base}.alpha": torch.tensor(float(len(parts))),
    }
    try:
        keys = set(convert(state))
    except (ValueError, KeyError, IndexError, AssertionError) as e:
        raise B4MError(f"{path}: diffusers cannot convert the kohya key {base} ({first_line(e)})") from None
    if keys != {f"{PREFIX}.{m}.lora_{ab}.weight" for m in parts for ab in "AB"}:
        raise B4MError(
            f"{path}: module {names[0]}: diffusers' {layout.title} kohya loader does not load it (kohya key "
            f"{base}); export it with format='diffusers'"
        )


def _fuse(
    base: str, parts: list[str], factors: Factors, path: str | os.PathLike
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(up, down, block ranks)`` of a fused layer: blockdiag of the parts' ups, stack of their downs, zero blocks
    for parts without factors."""
    present = [m for m in parts if m in factors]
    widths = {int(factors[m][1].shape[1]) for m in present}
    if len(widths) != 1:
        raise B4MError(f"{path}: {base}: fused modules {', '.join(present)} differ in in-features {sorted(widths)}")
    n = widths.pop()
    r = max(int(factors[m][1].shape[0]) for m in present)
    ups, downs = [], []
    for i, name in enumerate(parts):
        height = n if i < 3 else MLP_RATIO * n  # q, k, v: hidden → hidden; proj_mlp: hidden → 4·hidden
        if name in factors:
            up, down = factors[name]
            if i < 3 and up.shape[0] != n:
                raise B4MError(f"{path}: module {name}: LoRA up {tuple(up.shape)} should have {n} rows (hidden size)")
            ups.append(up.float())
            downs.append(down.float())
        else:
            ups.append(torch.zeros(height, r))
            downs.append(torch.zeros(r, n))
    return torch.block_diag(*ups), torch.cat(downs), [int(d.shape[0]) for d in downs]


def kohya_payload(
    factors: Factors, dtype: torch.dtype, path: str | os.PathLike, layout: Layout = FLUX1
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The BFL/kohya tensors of ``factors`` (fused layers block-diagonal, alpha = rank everywhere) and their
    metadata (sd-scripts' network entries, :data:`FUSED_KEY`, :data:`FAMILY_KEY`).

    Raises:
        B4MError: An unknown module, a module diffusers' kohya loader would lose, or fused parts that do not fit.
    """
    layers: dict[str, list[str]] = {}
    for name in factors:
        layers.setdefault(bfl_layer(name, path, layout)[0], []).append(name)
    _check_with_diffusers(layers, path, layout)
    tensors, fused = {}, {}
    for base in layers:
        parts = layer_modules(base, path, layout)
        if len(parts) == 1:
            up, down = factors[parts[0]]
        else:
            up, down, ranks = _fuse(base, parts, factors, path)
            fused[base] = {"ranks": ranks, "zero": [i for i, m in enumerate(parts) if m not in factors]}
        rank = int(down.shape[0])
        exact = float(torch.tensor(float(rank), dtype=dtype)) == rank  # bf16 holds integers exactly only to 256
        tensors[f"{base}.lora_down.weight"] = down.to(dtype)
        tensors[f"{base}.lora_up.weight"] = up.to(dtype)
        tensors[f"{base}.alpha"] = torch.tensor(float(rank), dtype=dtype if exact else torch.float32)
    ranks = Counter(int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight"))
    dim = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
    meta = {"ss_network_dim": dim, "ss_network_alpha": dim, "ss_network_module": KOHYA_NETWORK_MODULE}
    meta[FAMILY_KEY] = layout.family
    if fused:
        meta[FUSED_KEY] = json.dumps({"about": FUSED_ABOUT, "layers": fused}, sort_keys=True)
    return tensors, meta


def _fused_metadata(metadata: Mapping[str, str], path: str | os.PathLike) -> dict[str, dict]:
    raw = metadata.get(FUSED_KEY)
    if not raw:
        return {}
    try:
        layers = json.loads(raw)["layers"]
        return {k: {"ranks": list(map(int, v["ranks"])), "zero": list(map(int, v["zero"]))} for k, v in layers.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise B4MError(f"{path}: unreadable {FUSED_KEY} metadata ({first_line(e)})") from None


def _block_diagonal(up: torch.Tensor, heights: list[int], ranks: list[int]) -> bool:
    row = col = 0
    for height, rank in zip(heights, ranks, strict=True):
        rows = up[row : row + height]
        if rows[:, :col].any() or rows[:, col + rank :].any():
            return False
        row, col = row + height, col + rank
    return True


def _split(base: str, parts: list[str], up: torch.Tensor, down: torch.Tensor, info: dict | None, path) -> Factors:
    """Per-module factors of a fused layer (see the module docstring for the three cases)."""
    n, rank = int(down.shape[1]), int(down.shape[0])
    heights = [n, n, n] + ([int(up.shape[0]) - 3 * n] if len(parts) == 4 else [])
    if sum(heights) != up.shape[0] or heights[-1] <= 0:
        raise B4MError(
            f"{path}: {base}: LoRA up {tuple(up.shape)} / down {tuple(down.shape)} do not split into "
            f"{', '.join(p.rsplit('.', 1)[-1] for p in parts)} of a FLUX block with hidden size {n}"
        )
    ranks, zero = (info["ranks"], info["zero"]) if info else ([rank // len(parts)] * len(parts), [])
    if sum(ranks) != rank or len(ranks) != len(parts):
        if info:
            raise B4MError(f"{path}: {base}: {FUSED_KEY} metadata (ranks {ranks}) does not fit rank {rank}")
        ranks = None
    rows = up.split(heights)
    if ranks is not None and _block_diagonal(up, heights, ranks):
        cols = [list(range(sum(ranks[:i]), sum(ranks[: i + 1]))) for i in range(len(ranks))]
        return {
            name: (rows[i][:, cols[i]].contiguous(), down[cols[i]].contiguous())
            for i, name in enumerate(parts)
            if i not in zero
        }
    return {name: (rows[i].contiguous(), down.clone()) for i, name in enumerate(parts)}


def _known(base: str, layout: Layout) -> bool:
    try:
        layer_modules(base, "", layout)
    except B4MError:
        return False
    return True


def kohya_layout(folded: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Layout:
    """The family of a BFL/kohya FLUX file: the one :data:`FAMILY_KEY` names (files b4m wrote), else the only one
    with every layer, else klein where a layer named alike in both has klein's widths (:data:`_KLEIN_RATIOS`), else
    FLUX.1 (whose errors then name what is not its)."""
    if metadata.get(FAMILY_KEY) in LAYOUTS:
        return LAYOUTS[metadata[FAMILY_KEY]]
    bases = {key.split(".")[0] for key in folded}
    fits = [layout for layout in LAYOUTS.values() if all(_known(base, layout) for base in bases)]
    if len(fits) == 1:
        return fits[0]
    for base in bases if fits else ():
        ratio = _KLEIN_RATIOS.get(base.split("_", 5)[-1].removeprefix("img_").removeprefix("txt_"))
        up, down = folded[f"{base}.lora_up.weight"], folded[f"{base}.lora_down.weight"]
        if ratio is not None and Fraction(int(up.shape[0]), int(down.shape[1])) == ratio:
            return FLUX2
    return FLUX1


def kohya_factors(folded: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str | os.PathLike) -> Factors:
    """Factors of a BFL/kohya FLUX.1 or klein file (:func:`kohya_layout`) from its tensors (float32, alpha/rank
    folded into ``up``, no alpha keys).

    Raises:
        B4MError: A key of no FLUX.1 layer, a fused layer that does not split, or unreadable :data:`FUSED_KEY`.
    """
    fused = _fused_metadata(metadata, path)
    layout = kohya_layout(folded, metadata)
    factors: Factors = {}
    for base in sorted({key.split(".")[0] for key in folded}):
        up, down = folded[f"{base}.lora_up.weight"], folded[f"{base}.lora_down.weight"]
        parts = layer_modules(base, path, layout)
        if len(parts) > 1:
            factors.update(_split(base, parts, up, down, fused.get(base), path))
        else:
            up = torch.cat(up.chunk(2)[::-1]) if base == _SWAPPED else up
            factors[parts[0]] = (up.contiguous(), down.contiguous())
    return factors
