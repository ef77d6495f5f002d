"""How fast a run trains when its settings leave it to b4m (``train.speed = "auto"``, the default).

On a CUDA GPU, auto runs the ``fast`` preset's settings: a step's micro-steps as one batch (``fold_accumulation``,
the same draws), each replayed as a CUDA graph, AdamW's fused kernel. None changes what a run trains on (they are
:data:`~b4m.training.checkpoint.SESSION_KEYS`: a run resumes under either). If the first step runs out of GPU
memory, the run starts again with the micro-steps one at a time (graphs kept; with accumulation only), then with
gradient checkpointing and no graphs (fused AdamW kept), then with that and one image per forward
(``rows_per_forward = 1``). On a CPU, or with ``speed = "fixed"`` (set by a preset, or by giving any of these
settings in a config file or a flag), the settings run as given. The run records which it used
(``TrainResult.speed``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import B4MError
from .config import TrainConfig

if TYPE_CHECKING:
    from ..models.base import DiffusionModel

#: The settings auto chooses; giving any of them (or a preset) makes a stage's speed "fixed".
SPEED_KEYS = ("cuda_graphs", "fused_optimizer", "gradient_checkpointing", "fold_accumulation", "rows_per_forward")


class FirstStepOutOfMemory(RuntimeError):
    """The first step of a run ran out of GPU memory (nothing was trained or written yet)."""


class FirstStepNotGraphable(RuntimeError):
    """The first step of a run could not be captured as a CUDA graph (nothing was trained or written yet)."""


def speed_plans(config: TrainConfig, device) -> list[tuple[str, TrainConfig]]:
    """The settings to try in order, each with the line a run reports: one entry unless auto applies."""
    if config.speed != "auto" or getattr(device, "type", str(device)) != "cuda":
        return [("as configured", config)]
    # auto sets every speed setting, rows_per_forward included (a CUDA graph holds a whole micro-step)
    fast = replace(
        config,
        cuda_graphs=True,
        fused_optimizer=True,
        gradient_checkpointing=False,
        fold_accumulation=True,
        rows_per_forward=0,
    )
    unfolded = replace(fast, fold_accumulation=False)
    low = replace(
        config,
        cuda_graphs=False,
        fused_optimizer=True,
        gradient_checkpointing=True,
        fold_accumulation=False,
        rows_per_forward=0,
    )
    plans = [("auto: CUDA graphs, fused AdamW, a step's micro-steps as one batch", fast)]
    if config.grad_accum > 1:  # a folded step is grad_accum micro-steps in one batch: one at a time needs less memory
        plans.append(
            ("auto: CUDA graphs, fused AdamW, one micro-step at a time (one batch ran out of memory)", unfolded)
        )
    plans.append(("auto: gradient checkpointing (CUDA graphs ran out of memory at the first step)", low))
    # the last resort: a micro-step's images one per forward (FLUX.1 at 1024 px on a 24 GB card, with 8-bit weights)
    one = replace(low, rows_per_forward=1)
    plans.append(("auto: gradient checkpointing, one image per forward (checkpointing alone ran out of memory)", one))
    return plans


def enable_gradient_checkpointing(model: DiffusionModel) -> None:
    """Turn on activation checkpointing in the model's denoiser (diffusers' non-reentrant checkpoints per block).

    The PLP layers need nothing special: each block's forward is recomputed in the backward pass, and the gradient
    of every adapter (routed or not) is the one computed without checkpointing.

    Raises:
        B4MError: The denoiser does not support it.
    """
    enable = getattr(model.denoiser, "enable_gradient_checkpointing", None)
    if enable is None:
        raise B4MError(f"{type(model.denoiser).__name__} does not support gradient checkpointing")
    try:
        enable()
    except ValueError as e:  # diffusers models that lack it say so with a ValueError
        raise B4MError(f"{type(model.denoiser).__name__}: {e}") from e
