"""Stable Diffusion XL: two CLIP text encoders, pooled text embedding and size conditioning (``time_ids``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .base import Conditioning
from .diffusers_common import DiffusersModel, module_device, tokenize


class StableDiffusionXLModel(DiffusersModel):
    """SDXL around diffusers components (see :class:`~b4m.models.diffusers_common.DiffusersModel`).

    Attributes:
        force_zeros_for_empty_prompt: The pipeline's setting (True for SDXL base): the unconditional embedding is
            all zeros rather than the encoding of "" (SDXL was trained that way).
    """

    family = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    components = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")
    pipeline_embeds = {"text_embeds": "pooled_prompt_embeds"}  # noqa: RUF012 (a ClassVar of the base)

    def __init__(
        self,
        *,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        identity: str,
        resolution: int | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        super().__init__(vae=vae, unet=unet, scheduler=scheduler, identity=identity, resolution=resolution)

    @classmethod
    def _options_from_pipeline(cls, pipe: StableDiffusionXLPipeline) -> dict[str, Any]:
        return {"force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True))}

    @classmethod
    def load_kwargs(cls) -> dict[str, Any]:
        return {"add_watermarker": False, "image_encoder": None, "feature_extractor": None}

    def _pipeline_extras(self) -> dict[str, Any]:
        return {"force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt, "add_watermarker": False}

    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def _fallback_resolution(self) -> int:
        return 1024

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int] | None = None) -> Conditioning:
        """SDXL conditioning as diffusers' SDXL pipeline builds it (``clip_skip`` None, no crop).

        - ``hidden`` ``(B, 77, D1 + D2)``: penultimate hidden states of both encoders, concatenated;
        - ``extra["text_embeds"]`` ``(B, P)``: the pooled, projected output of encoder 2;
        - ``extra["time_ids"]`` ``(B, 6)``: ``(h, w, 0, 0, h, w)`` (original size, crop top-left, target size).

        An empty (or blank) prompt gives the pipeline's unconditional embedding: zeros for ``hidden`` and
        ``text_embeds`` when :attr:`force_zeros_for_empty_prompt` is set, else the encoding of "".

        Args:
            prompts: The captions.
            size: Image ``(height, width)``; None: :attr:`resolution` square.
        """
        hiddens = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenize(tokenizer, prompts).input_ids.to(module_device(encoder))
            out = encoder(ids, output_hidden_states=True)
            hiddens.append(out.hidden_states[-2])
        hidden = torch.cat(hiddens, dim=-1)
        pooled = out.text_embeds
        if self.force_zeros_for_empty_prompt:
            keep = torch.tensor([bool(p.strip()) for p in prompts], device=hidden.device)
            hidden = torch.where(keep[:, None, None], hidden, torch.zeros_like(hidden))
            pooled = torch.where(keep[:, None], pooled, torch.zeros_like(pooled))
        h, w = size or (self.resolution, self.resolution)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(prompts), dtype=torch.float32)
        device = self.device
        return Conditioning(hidden.to(device), {"text_embeds": pooled.to(device), "time_ids": time_ids.to(device)})
