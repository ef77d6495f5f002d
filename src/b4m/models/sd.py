"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, cross-attention on its last hidden state.

SD 2.x 768 models predict velocity; that comes from the scheduler config's ``prediction_type``, which the training
scheduler and every sampler inherit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from .base import Conditioning
from .diffusers_common import DiffusersModel, module_device, tokenize


class StableDiffusionModel(DiffusersModel):
    """SD 1.x/2.x around diffusers components (see :class:`~b4m.models.diffusers_common.DiffusersModel`)."""

    family = "sd"
    pipeline_class = StableDiffusionPipeline
    components = ("vae", "text_encoder", "tokenizer", "unet")

    def __init__(
        self,
        *,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        identity: str,
        resolution: int | None = None,
    ) -> None:
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        super().__init__(vae=vae, unet=unet, scheduler=scheduler, identity=identity, resolution=resolution)

    @classmethod
    def load_kwargs(cls) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def _pipeline_extras(self) -> dict[str, Any]:
        return self.load_kwargs()

    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder]

    def _fallback_resolution(self) -> int:
        return 768 if self.prediction_type == "v_prediction" else 512

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int] | None = None) -> Conditioning:
        """The text encoder's last hidden state ``(B, 77, D)`` (as diffusers' SD pipeline with ``clip_skip`` None).

        ``""`` gives SD's unconditional embedding (the encoding of the empty prompt). ``size`` is not used.
        """
        del size
        tokens = tokenize(self.tokenizer, prompts)
        device = module_device(self.text_encoder)
        mask = (
            tokens.attention_mask.to(device)
            if getattr(self.text_encoder.config, "use_attention_mask", False)
            else None
        )
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return Conditioning(hidden.to(self.device))
