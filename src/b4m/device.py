"""The device a command runs on when none is named."""

from __future__ import annotations

import torch


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"
