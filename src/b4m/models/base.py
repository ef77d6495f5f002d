"""The one interface every base model implements (SDXL, SD 1.x/2.x, the built-in world, later DiT models).

The trainer and the stages only talk to :class:`DiffusionModel`; they never import diffusers pipelines. A model
adapter owns its denoiser (the module PLP attaches to), its text and image encoders, its training noise scheduler
and its sampler.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn


@dataclass
class Conditioning:
    """Text conditioning of a batch: what the denoiser needs besides noisy latents and timesteps.

    ``hidden`` is the cross-attention context ``(B, T, D)``; ``extra`` holds model-specific tensors with the batch
    first (SDXL: ``text_embeds`` ``(B, P)`` and ``time_ids`` ``(B, 6)``).
    """

    hidden: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index) -> Conditioning:
        """Rows of the batch (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Conditioning(self.hidden[index], {k: v[index] for k, v in self.extra.items()})

    def to(self, device=None, dtype=None) -> Conditioning:
        return self.apply(lambda t: t.to(device, dtype))

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """``fn`` applied to every tensor (``hidden`` and each of ``extra``)."""
        return Conditioning(fn(self.hidden), {k: fn(v) for k, v in self.extra.items()})

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        return Conditioning(
            torch.cat([c.hidden for c in items]),
            {k: torch.cat([c.extra[k] for c in items]) for k in items[0].extra},
        )


#: ``on_images(prompt_index, images)``: a prompt's images, in seed order, as soon as they are decoded.
OnImages = Callable[[int, list[Image.Image]], None]


@dataclass
class SampleRequest:
    """What to generate. One image per (prompt, seed) pair, in prompt-major order."""

    prompts: list[str]
    seeds: list[int]
    negative_prompt: str = ""
    steps: int | None = None  # None: the model's default (DiffusionModel.default_steps)
    guidance_scale: float | None = None  # None: the model's default (DiffusionModel.default_guidance)
    height: int | None = None  # None: the model's default resolution
    width: int | None = None
    scheduler: str | None = None  # None: the model's default; else a name from SCHEDULERS


class DiffusionModel(ABC):
    """A base text-to-image model as the trainer sees it."""

    #: Identity of the base model, stored in every adapter file (fuse refuses files of different base models).
    identity: str
    #: The module PLP attaches to (a diffusers UNet2DConditionModel or transformer).
    denoiser: nn.Module
    #: Default training and sampling resolution in pixels.
    resolution: int
    #: Classifier-free guidance scale used when a request leaves it as None.
    default_guidance: float = 5.0
    #: Sampling steps used when a request leaves them as None (FLUX.1 schnell: 4).
    default_steps: int = 25

    #: Reserved tokens meant as placeholders, where the text encoder has a closed vocabulary (the built-in world).
    placeholders: tuple[str, ...] = ()

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` the text encoder cannot tell apart (all read as one unknown token), in order; none
        for the CLIP tokenizers of SD and SDXL, which spell any word out of sub-words."""
        return []

    def aux_prompts(self, role: str) -> list[str] | None:
        """Prompts for the auxiliary sets generated for a ``role`` run (``content``: other styles; ``style``: other
        contents) when the user gives none, or None for b4m's built-in everyday ones."""
        return None

    def guidance(self, request: SampleRequest) -> float:
        """The request's guidance scale, or this model's default."""
        return self.default_guidance if request.guidance_scale is None else request.guidance_scale

    def sample_steps(self, request: SampleRequest) -> int:
        """The request's sampling steps, or this model's default."""
        return self.default_steps if request.steps is None else request.steps

    def defaults_note(self) -> str:
        """A line saying which defaults this model brings that differ from the usual ones (FLUX.1 schnell: steps,
        guidance, T5 tokens), for a command's log; "" where none do."""
        return ""

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusionModel:
        """Move every component (weights in ``dtype`` if given; adapters stay in their own dtype)."""

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int] | None = None) -> Conditioning:
        """Text conditioning for ``prompts`` (``size`` = image (height, width), for models that condition on it)."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents (scaled as the denoiser expects) of images ``(B, 3, H, W)`` in ``[-1, 1]``."""

    @abstractmethod
    def text_encoders(self) -> list[nn.Module]:
        """The text encoder modules (8-bit base weights quantize them with the denoiser:
        :func:`b4m.models.quantize.quantize_base`)."""

    @abstractmethod
    def offload_encoders(self) -> None:
        """Move the text and image encoders to the CPU (after latents and embeddings are cached)."""

    def restore_encoders(self) -> None:  # noqa: B027 (not abstract: models that never offload need nothing)
        """Undo :meth:`offload_encoders`: the encoders back on :attr:`device` (a model reused by the next stage of
        one process, :func:`b4m.loading.shared_models`)."""

    def use_resolution(self, resolution: int | None) -> None:  # noqa: B027 (the world's resolution is fixed)
        """Make ``resolution`` (None: the native one) the default of training and sampling, as loading with
        ``resolution=`` does (a model reused by the next stage, :func:`b4m.loading.shared_models`)."""

    @property
    @abstractmethod
    def num_train_timesteps(self) -> int: ...

    @abstractmethod
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion ``x_t`` for the training scheduler."""

    @abstractmethod
    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser should predict (noise for epsilon models, velocity for v-prediction models)."""

    @abstractmethod
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's output for a batch."""

    @abstractmethod
    def sample(self, request: SampleRequest, on_images: OnImages | None = None) -> list[Image.Image]:
        """Generate images with the denoiser as it is now (adapters attached, merged or not); ``on_images`` is
        called with each prompt's index and images (in seed order) as soon as they are decoded (b4m generate
        writes them then, so an interrupted call keeps what it drew)."""
