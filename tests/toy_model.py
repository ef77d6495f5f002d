"""A DiffusionModel with no text encoder or VAE, for testing the trainer: the latents are the images."""

from __future__ import annotations

import zlib

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from b4m.models.base import Conditioning, DiffusionModel, SampleRequest
from conftest import TINY_SD_UNET


class ToyModel(DiffusionModel):
    identity = "toy"
    resolution = 8

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.denoiser = UNet2DConditionModel(**TINY_SD_UNET).eval()
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device, dtype=None):
        self.denoiser.to(device, dtype)
        return self

    def encode_prompts(self, prompts, size=None) -> Conditioning:
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            rows.append(torch.randn(1, 7, TINY_SD_UNET["cross_attention_dim"], generator=g))
        return Conditioning(torch.cat(rows))

    def encode_images(self, pixels):
        return torch.nn.functional.avg_pool2d(pixels, pixels.shape[-1] // 8)[:, :3].repeat(1, 2, 1, 1)[:, :4]

    def text_encoders(self) -> list:
        return []  # prompts are hashed to random embeddings

    def offload_encoders(self) -> None:
        pass

    @property
    def num_train_timesteps(self) -> int:
        return 1000

    def add_noise(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        return noise

    def predict(self, noisy, timesteps, cond):
        return self.denoiser(noisy, timesteps, encoder_hidden_states=cond.hidden).sample

    def sample(self, request: SampleRequest):
        raise NotImplementedError("the toy model does not sample")
