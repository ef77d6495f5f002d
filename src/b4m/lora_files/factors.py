"""The plain LoRA interchange type, :data:`Factors`, and merging factors into a model's weights."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from ..adapter.layer import add_to_weight
from ..errors import B4MError

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""``{module name: (up m×r, down r×n)}`` with ``ΔW = up @ down`` (every scale folded into ``up``); module names are
relative to the denoiser, in diffusers spelling."""


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
        add_to_weight(weight, (up.float() @ down.float()).to(weight.device) * float(scale), f"module {name}")


@contextlib.contextmanager
def applied(denoiser: nn.Module, factors: Factors, *, scale: float = 1.0) -> Iterator[nn.Module]:
    """Merge ``factors`` into ``denoiser``'s weights for the duration of the block, then put the exact original
    weights back (a copy of each touched weight is kept, so nothing drifts through rounding)."""
    check_factors_fit(factors, denoiser, "<factors>")
    saved = {}
    for name in factors:
        module = denoiser.get_submodule(name)
        weight = getattr(module, "base_layer", module).weight
        saved[name] = (weight, weight.detach().clone())
    try:
        apply_factors(denoiser, factors, scale=scale)
        yield denoiser
    finally:
        with torch.no_grad():
            for weight, original in saved.values():
                weight.copy_(original)


def check_factors(factors: Factors, path: str | os.PathLike) -> None:
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
