"""The device a command runs on when none is named; whether a weight is stored as a plain tensor; attention kernels
to avoid; host-to-device copies that do not stop the host."""

from __future__ import annotations

import torch
from torch import nn

from .switch import Switch


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


#: On by default since 2026-12-07 (docs/benchmarks.md, "Two changes to the stage-1 step": bench/speed.py's
#: ``stage1/graphs-1x16-run10-async`` row against ``-run10`` on an H100, 3-6% of the step): :func:`to_device_async`
#: copies without a host sync. ``with async_copies(False):`` copies as before the switch (the speed rows' baseline).
async_copies = Switch("async_copies", default=True)


def to_device_async(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device`` (in ``dtype``, if given), the same values; inside :data:`async_copies` a CPU tensor bound
    for a CUDA device is cast on the CPU and goes through pinned memory with ``non_blocking=True``, queued on the
    stream like a kernel; anything else is a plain ``t.to(device, dtype)``, as before the switch.

    A blocking copy from pageable memory synchronises the stream: the host waits there until the GPU has run all
    the work queued before it, so a loop that copies its batch in every step cannot prepare step n + 1 while the GPU
    runs step n. The pinned staging buffer is kept by torch's host allocator until the copy has run."""
    device = torch.device(device)
    if async_copies and device.type == "cuda" and t.device.type == "cpu":
        return t.to(dtype).pin_memory().to(device, non_blocking=True)
    return t.to(device, dtype)
