"""8-bit frozen base weights: torchao's weight-only quantization of a denoiser's linear layers.

``base_weights = "int8"`` (or ``"float8"``) stores every ``nn.Linear`` weight of the denoiser and of the text
encoders (:func:`quantize_base`) in 8 bits with one
scale per output row (torchao's ``Int8WeightOnlyConfig`` / ``Float8WeightOnlyConfig`` through ``quantize_``, what
diffusers' ``TorchAoConfig`` applies on load and what peft trains LoRAs on); the layers stay ``nn.Linear`` whose
weight is a torchao tensor subclass, so a PLP adapter wraps them as any other linear layer and trains in float32 on
top (the gradient reaches the input through torchao's linear; the frozen weight gets none). The quantization is done
after loading, layer by layer on the target device, before the rest of the model moves there: the GPU never holds
the denoiser at full width.

What the 8-bit weight cannot do: take a merged ΔW without rounding it to 8 bits (merging is refused:
:func:`b4m.adapter.layer.add_to_weight`; sampling runs the adapter unmerged). It saves memory in training together
with gradient checkpointing: torchao's weight-only linear casts the 8-bit weight to the compute dtype for each matmul,
and a layer whose activations are kept for the backward pass keeps that copy too.

torchao is optional (``pip install 'b4m[lowmem]'``); :func:`require_quantization` says so in one line before any
weights load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import B4MError

if TYPE_CHECKING:  # torch where a module is handled: require_quantization, a check of the settings, needs none
    import torch
    from torch import nn

    from .base import DiffusionModel

#: ``base_weights`` values that quantize, and torchao's config class of each.
CONFIGS = {"int8": "Int8WeightOnlyConfig", "float8": "Float8WeightOnlyConfig"}
#: ``base_weights`` values that do not: ``"full"``, the loading dtype's full width; ``"auto"``, the same where it is
#: decided (:func:`quantize_weights`; make and generate first take the setting of the run they read, :mod:`b4m.runs`).
FULL_WIDTH = ("auto", "full")
INSTALL = "pip install 'b4m[lowmem]'"


def require_quantization(base_weights: str) -> None:
    """Check that ``base_weights`` can be had here: one of :data:`FULL_WIDTH`, or a mode of :data:`CONFIGS` with
    torchao importable.

    Raises:
        B4MError: An unknown mode, or torchao missing (one line naming the install command).
    """
    if base_weights in FULL_WIDTH:
        return
    if base_weights not in CONFIGS:
        raise B4MError(f"base_weights must be auto, full, {' or '.join(CONFIGS)}, got {base_weights!r}")
    try:
        importlib.import_module("torchao.quantization")
    except ImportError as e:
        raise B4MError(f"base_weights = {base_weights!r} needs torchao, which is not installed: {INSTALL}") from e


def quantize_weights(module: nn.Module, base_weights: str, device: torch.device | str | None = None) -> int:
    """Store the weights of ``module``'s ``nn.Linear`` layers in 8 bits (``base_weights``: a key of
    :data:`CONFIGS`; ``"auto"`` does nothing), in place, each moved to ``device`` first if given. Layers already
    quantized are left as they are. Returns the number of layers quantized.

    Quantize after casting ``module`` to its compute dtype: torchao keeps the dtype the weight had (a later ``.to``
    with another dtype does not change it)."""
    require_quantization(base_weights)
    if base_weights in FULL_WIDTH:
        return 0
    from torch import nn
    from torchao import quantization

    from ..device import is_plain

    config = getattr(quantization, CONFIGS[base_weights])()
    counts = {}  # a weight tied to another module's (Qwen3's lm_head and its embedding) is left whole: a quantized
    for _, p in module.named_parameters(remove_duplicate=False):  # copy of it would add memory, not save it
        counts[id(p)] = counts.get(id(p), 0) + 1
    picked = [
        m
        for m in module.modules()
        if isinstance(m, nn.Linear)
        and is_plain(m.weight)
        and m.weight.dtype.is_floating_point
        and counts[id(m.weight)] == 1
    ]
    chosen = {id(m) for m in picked}
    quantization.quantize_(module, config, filter_fn=lambda m, _name: id(m) in chosen, device=device)
    return len(picked)


def quantize_base(model: DiffusionModel, base_weights: str, device: torch.device | str | None = None) -> int:
    """Store the frozen base model's linear weights in 8 bits: the denoiser's and the text encoders' (T5-XXL,
    Qwen3, CLIP), not the VAE's, as kohya's ``--fp8_base`` and ai-toolkit's ``quantize`` / ``quantize_te`` do. FLUX.1's
    T5-XXL is 9.5 GB in bf16: at full width, with an 8-bit transformer (12 GB), a 24 GB card would hold both while
    the prompts are encoded and the auxiliary sets sampled. Returns the number of layers quantized."""
    return sum(quantize_weights(m, base_weights, device) for m in (model.denoiser, *model.text_encoders()))


def is_quantized(module: nn.Module) -> bool:
    """Some linear layer of ``module`` has a weight that is not a plain tensor (8-bit: :func:`quantize_weights`)."""
    from torch import nn

    from ..device import is_plain

    return any(isinstance(m, nn.Linear) and not is_plain(m.weight) for m in module.modules())


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes that ``t`` holds: a tensor subclass's inner tensors (torchao's ``qdata``, ``scale``, …), else its own."""
    from ..device import is_plain

    if is_plain(t) or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)


def linear_weight_bytes(module: nn.Module) -> int:
    """Bytes of the weights of ``module``'s ``nn.Linear`` layers (quantized ones at their stored size)."""
    from torch import nn

    return sum(tensor_bytes(m.weight) for m in module.modules() if isinstance(m, nn.Linear))
