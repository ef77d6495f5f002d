"""B-LoRA (Frenkel et al. 2024): content and style live in two specific transformer blocks of the UNet.

B-LoRA trains one LoRA on q/k/v/out of two attention blocks of SDXL's decoder, ``up_blocks.0.attentions.0``
(content) and ``up_blocks.0.attentions.1`` (style), on one concept's images; combining takes the content block's
LoRA from the content run and the style block's LoRA from the style run. So each concept gets one run here too
(both blocks, its main sets; reusable across pairs with a shared cache), and the composed adapter touches those two
blocks only: every other weight of the model stays bit-identical.

**The block rule for other UNets** (:func:`blora_blocks`): the lowest-resolution decoder block that has at least two
attention modules, i.e. the first ``up_blocks.K`` (diffusers orders the decoder from low to high resolution) with
``attentions.0`` and ``attentions.1``; content = ``attentions.0``, style = ``attentions.1``. This is SDXL's own
choice restated, and it gives:

- SDXL: ``up_blocks.0`` (32×32 latents at 1024 px, 1280 channels, 10 transformer layers each): B-LoRA's blocks.
- SD 1.x/2.x: ``up_blocks.1`` (their ``up_blocks.0`` is an ``UpBlock2D`` without attention; ``up_blocks.1`` is the
  lowest-resolution decoder block with attention, 16×16 latents at 512 px, 1280 channels, 1 transformer layer each).
- The built-in world's UNet (up blocks ``CrossAttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D``): ``up_blocks.0`` (its
  192-channel, lowest-resolution decoder level), the same position as SDXL's.

The rule keeps the decoder's first attention level, where B-LoRA found the content/style split, and never reaches into
the encoder or the mid block; pass ``BLoRAConfig.blocks`` to choose other blocks.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..adapter.config import DEFAULT_TARGETS, PLPConfig
from ..adapter.file import AdapterFile
from ..errors import B4MError
from ..lora_files import Factors
from ..models.base import DiffusionModel
from ..training.config import TrainConfig
from ..training.runs import RunRecord, memoized, pair_info, run_key, train_adapter
from ..training.sets import TrainSet
from .common import MethodResult, lora_train_config, main_sets, plain_lora

_DECODER_ATTENTION = re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)")


def blora_blocks(unet: nn.Module) -> tuple[str, str]:
    """(content block, style block) module-name prefixes for ``unet`` by the rule of the module docstring.

    Works on any module tree with diffusers' decoder naming, including a meta-device skeleton
    (:func:`b4m.unet_skeleton.unet_skeleton`).

    Raises:
        B4MError: No decoder block has two attention modules (e.g. a transformer denoiser).
    """
    found: dict[int, set[int]] = {}
    for name, _ in unet.named_modules():
        match = _DECODER_ATTENTION.fullmatch(name)
        if match:
            found.setdefault(int(match[1]), set()).add(int(match[2]))
    for block in sorted(found):
        if {0, 1} <= found[block]:
            return f"up_blocks.{block}.attentions.0", f"up_blocks.{block}.attentions.1"
    raise B4MError(
        f"{type(unet).__name__}: no decoder block (up_blocks.K) with two attention modules; B-LoRA needs the "
        "blocks named explicitly (BLoRAConfig.blocks)"
    )


def blora_targets(blocks: Sequence[str], projections: Sequence[str] = DEFAULT_TARGETS) -> str:
    """A full-match regex (PLP's targeting rule) for the attention projections inside ``blocks``."""
    prefixes = "|".join(re.escape(b) for b in blocks)
    names = "|".join(re.escape(p) for p in projections)
    return rf"({prefixes})\..*\.({names})"


def _in_block(name: str, block: str) -> bool:
    return name.startswith(block + ".")


@dataclass
class BLoRAConfig:
    """B-LoRA's settings. ``lora.targets`` is replaced by the two blocks' attention projections."""

    lora: PLPConfig = field(default_factory=plain_lora)
    train: TrainConfig = field(default_factory=lora_train_config)
    blocks: list[str] | None = None  # [content block, style block]; None: blora_blocks(model.denoiser)
    content_scale: float = 1.0  # B-LoRA's inference-time content_alpha
    style_scale: float = 1.0  # style_alpha

    def __post_init__(self) -> None:
        if self.blocks is not None:
            if len(self.blocks) != 2 or self.blocks[0] == self.blocks[1]:
                raise B4MError(f"blocks must be two different module prefixes, got {self.blocks!r}")
            self.blocks = list(self.blocks)


def compose(content: AdapterFile, style: AdapterFile, blocks: Sequence[str]) -> AdapterFile:
    """The content run's LoRA in ``blocks[0]`` and the style run's in ``blocks[1]``, as one adapter (role fused)."""
    content_block, style_block = blocks
    tensors = {}
    for name in content.modules:
        if _in_block(name, content_block):
            tensors[name] = {k: v.clone() for k, v in content.tensors[name].items()}
    for name in style.modules:
        if _in_block(name, style_block):
            tensors[name] = {k: v.clone() for k, v in style.tensors[name].items()}
    if not any(_in_block(n, content_block) for n in tensors) or not any(_in_block(n, style_block) for n in tensors):
        raise B4MError(f"the runs adapt nothing in {content_block} and/or {style_block}")
    config = PLPConfig.from_dict({**content.config.to_dict(), "targets": sorted(tensors), "exclude": []})
    return AdapterFile(config, "fused", tensors, {"method": "blora", "blocks": ",".join(blocks)})


def scaled_factors(adapter: AdapterFile, blocks: Sequence[str], content_scale: float, style_scale: float) -> Factors:
    """The composed adapter's factors, the content block's ΔW times ``content_scale``, the style's ``style_scale``."""
    out = {}
    for name, (up, down) in adapter.factors().items():
        scale = content_scale if _in_block(name, blocks[0]) else style_scale
        out[name] = (up if scale == 1.0 else up * scale, down)
    return out


def blora_stage1(
    role: str,
    sets: Sequence[TrainSet],
    model: DiffusionModel,
    config: BLoRAConfig,
    blocks: Sequence[str],
    out: str | Path,
    cache: dict | None,
) -> tuple[RunRecord, bool]:
    """One concept's B-LoRA run (both blocks, its main sets), from ``cache`` when done before."""
    mains = main_sets(sets)
    lora = PLPConfig.from_dict({**config.lora.to_dict(), "targets": blora_targets(blocks), "exclude": []})
    key = run_key("blora", role, mains, model.identity, lora, config.train)
    folder = Path(out) / f"blora-{role}"
    return memoized(cache, key, lambda: train_adapter(model, mains, config.train, folder, role, plp=lora))


def run(
    content_sets: Sequence[TrainSet],
    style_sets: Sequence[TrainSet],
    model: DiffusionModel,
    config: BLoRAConfig,
    out: str | Path,
    cache: dict | None = None,
) -> MethodResult:
    t0 = time.perf_counter()
    blocks = config.blocks or list(blora_blocks(model.denoiser))
    content, c_reused = blora_stage1("content", content_sets, model, config, blocks, out, cache)
    style, s_reused = blora_stage1("style", style_sets, model, config, blocks, out, cache)
    adapter = compose(content.adapter, style.adapter, blocks)
    info = pair_info(config, t0, (content, c_reused), (style, s_reused), blocks=blocks)
    factors = scaled_factors(adapter, blocks, config.content_scale, config.style_scale)
    parts = {"content": content.adapter, "style": style.adapter}
    return MethodResult("blora", factors, info, adapter=adapter, parts=parts)
