"""The device a command runs on when none is named; whether a weight is stored as a plain tensor."""

from __future__ import annotations

import torch
from torch import nn


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_plain(weight: torch.Tensor) -> bool:
    """``weight`` is an ordinary tensor (or parameter), not a tensor subclass that stores it otherwise (torchao's
    8-bit weights: :mod:`b4m.models.quantize`), which cannot be written into or copied at full width for free."""
    return type(weight) in (torch.Tensor, nn.Parameter)
