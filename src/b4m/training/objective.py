"""``Objective``: what a run trains and fits the prediction to, when that is not the PLP halves and the diffusion
target (ZipLoRA's merger coefficients, fitted to the predictions of the two LoRAs it merges)."""

from __future__ import annotations

from typing import Protocol

import torch

from ..models.base import Conditioning, DiffusionModel
from .config import TrainConfig


class Objective(Protocol):
    """What a run trains and fits the prediction to, when that is not the PLP halves and the diffusion target.

    ``name`` goes into the resume fingerprint. ``param_groups`` are the optimizer's. ``target`` is called under
    ``torch.no_grad()`` with the micro-step's batch and ``sources`` (for every row, the index in ``sets`` of the set
    it was drawn from) and returns what the prediction is fitted to. ``penalty`` is added to every micro-step's loss.
    ``state_dict``/``load_state_dict`` hold the trained tensors for checkpoints.
    """

    name: str

    def param_groups(self, config: TrainConfig) -> list[dict]: ...

    def target(
        self, model: DiffusionModel, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, sources
    ) -> torch.Tensor: ...

    def penalty(self) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...
