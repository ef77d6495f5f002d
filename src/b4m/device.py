"""The device a command runs on when none is named; whether a weight is stored as a plain tensor; attention kernels
to avoid."""

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


def avoid_cudnn_attention(device: torch.device | str) -> None:
    """Keep ``scaled_dot_product_attention`` off cuDNN's kernel for the rest of the process, on a CUDA device.

    On an H200 with torch 2.11 (cuDNN 9), FLUX.1-dev's training steps at full size failed in the attention backward
    (``mha_graph.execute(...).is_good()``), which then spoilt the process with an illegal memory access: a plain
    diffusers + peft step as much as b4m's, with and without gradient checkpointing. Without cuDNN's kernel every
    step ran (torch picks flash attention). ``bench/attention_probe.py`` did not reproduce the failure on contiguous
    tensors of the same shapes, where cuDNN's kernel ran and was the fastest (docs/benchmarks.md, "FLUX.1-dev at full
    size"). Process-wide, not a context: gradient checkpointing recomputes the forward inside the backward, and a
    CUDA graph replays the kernels it captured.
    """
    if torch.device(device).type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
