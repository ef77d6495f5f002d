"""What the diffusers UNet models (SD 1.x/2.x and SDXL) share: placement, latents, noise, prediction and sampling.

A subclass adds its text encoders (:meth:`DiffusersModel.encode_prompts`, :meth:`DiffusersModel.text_encoders`)
and says which diffusers pipeline class samples it. Sampling builds that pipeline around the very component objects
this model holds, so PLP layers attached to :attr:`DiffusersModel.denoiser` take part.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Self

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from torch import nn

from ..cuda_graphs import graphed_sampling
from ..errors import B4MError
from .base import Conditioning, DiffusionModel, OnImages, SampleRequest
from .schedulers import make_scheduler
from .steps import announcing


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The weight dtype used when none is asked for: float32 on the CPU, bfloat16 (else float16) on CUDA.

    Args:
        device: Where the model will run.

    Returns:
        The dtype for the denoiser and text encoders (the VAE always stays in float32).
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.float32


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """How many pixels one latent pixel covers along each side (8 for SD and SDXL)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _to_float32(module: nn.Module) -> nn.Module:
    """Cast to float32 unless already there (diffusers warns on every dtype cast of a VAE)."""
    if any(p.dtype != torch.float32 for p in module.parameters() if p.is_floating_point()):
        module.to(dtype=torch.float32)
    return module


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> Any:
    """Tokens (``input_ids``, ``attention_mask``: ``(B, model_max_length)``), padded and truncated as diffusers'
    pipelines do."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter."""
    return next(module.parameters()).device


class ComponentPlacement:
    """Where a diffusers-built model's parts live: the denoiser and text encoders on one device in the model's dtype,
    the VAE in float32 beside them, the encoders offloaded to the CPU and back. Shared by the UNet models
    (:class:`DiffusersModel`) and the FLUX transformers (:class:`b4m.models.flux.FluxModel`)."""

    denoiser: nn.Module
    vae: nn.Module
    dtype: torch.dtype
    text_encoders: Callable[[], list[nn.Module]]  # (each model's own: abstract in DiffusionModel)

    @property
    def device(self) -> torch.device:
        return module_device(self.denoiser)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Self:
        """Move every component to ``device``; denoiser and text encoders in ``dtype`` if given, the VAE in float32.

        Adapters attached to the denoiser keep their own dtype (:meth:`b4m.adapter.layer.PLPLinear._apply`).
        """
        self.denoiser.to(device=device, dtype=dtype)
        for encoder in self.text_encoders():
            encoder.to(device=device, dtype=dtype)
        _to_float32(self.vae).to(device)
        if dtype is not None:
            self.dtype = dtype
        return self

    def offload_encoders(self) -> None:
        """Move the VAE and the text encoders to the CPU; encoding still works there (results come back on
        :attr:`device`)."""
        self.vae.to("cpu")
        for encoder in self.text_encoders():
            encoder.to("cpu")

    def restore_encoders(self) -> None:
        """Undo :meth:`offload_encoders`: the VAE and the text encoders back on :attr:`device`."""
        self.vae.to(self.device)
        for encoder in self.text_encoders():
            encoder.to(self.device)


class DiffusersModel(ComponentPlacement, DiffusionModel):
    """A diffusers UNet text-to-image model: VAE, UNet, training (DDPM) scheduler, default sampling scheduler.

    Attributes:
        vae: The autoencoder, always in float32 (SDXL's VAE overflows in float16).
        denoiser: The UNet (``unet`` is an alias).
        train_scheduler: A :class:`DDPMScheduler` from the model's scheduler config (same betas and prediction type).
        sampling_scheduler: The model's own scheduler; its config is the base of every sampler made by name.
        dtype: Weight dtype of the denoiser and text encoders.
        identity: See :class:`~b4m.models.base.DiffusionModel`. A plain attribute: set it to override.
    """

    #: Short family tag used in identities ("sd", "sdxl").
    family: ClassVar[str]
    #: The diffusers pipeline class that samples (and loads) this model.
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    #: Pipeline component names this class takes besides ``scheduler`` (constructor keywords of the same names).
    components: ClassVar[tuple[str, ...]]
    #: ``Conditioning.extra`` keys the pipeline takes as precomputed embeddings, by pipeline argument name.
    pipeline_embeds: ClassVar[dict[str, str]] = {}
    #: Sample on a GPU with CUDA graphs of the denoiser's calls (:func:`b4m.cuda_graphs.graphed_sampling`); set it to
    #: False on an instance or the class to sample eagerly.
    sample_cuda_graphs: bool = True

    def __init__(
        self,
        *,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        identity: str,
        resolution: int | None = None,
    ) -> None:
        self.vae = _to_float32(vae).eval().requires_grad_(False)
        self.denoiser = unet
        self.train_scheduler = DDPMScheduler.from_config(scheduler.config)
        self.sampling_scheduler = scheduler
        self.identity = identity
        self.dtype = unet.dtype
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae))
        self.resolution = resolution or self._native_resolution()

    # ----------------------------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_pipeline(cls, pipe: DiffusionPipeline, *, identity: str, resolution: int | None = None) -> DiffusersModel:
        """Wrap the components of a loaded diffusers pipeline (the objects themselves, not copies).

        Args:
            pipe: A pipeline of :attr:`pipeline_class`.
            identity: The base model's identity string.
            resolution: Default resolution; None: the UNet's native one.

        Returns:
            The model.
        """
        parts = {name: getattr(pipe, name) for name in cls.components}
        return cls(
            **parts,
            scheduler=pipe.scheduler,
            identity=identity,
            resolution=resolution,
            **cls._options_from_pipeline(pipe),
        )

    @classmethod
    def _options_from_pipeline(cls, pipe: DiffusionPipeline) -> dict[str, Any]:
        """Extra constructor keywords read from a pipeline's config (none by default)."""
        del pipe
        return {}

    @classmethod
    def load_kwargs(cls) -> dict[str, Any]:
        """Keywords for ``pipeline_class.from_pretrained``/``from_single_file`` (skip optional parts we don't use)."""
        return {}

    @abstractmethod
    def text_encoders(self) -> list[nn.Module]:
        """The text encoder modules (moved and cast together with the denoiser)."""

    @abstractmethod
    def _pipeline_extras(self) -> dict[str, Any]:
        """Keywords of :attr:`pipeline_class` besides the components and the scheduler."""

    def _native_resolution(self) -> int:
        """UNet sample size times the VAE factor (1024 SDXL, 512 SD 1.x, 768 SD 2.x-v); else the family default."""
        size = self.denoiser.config.get("sample_size")
        if isinstance(size, (list, tuple)):
            size = size[0]
        if isinstance(size, int) and size > 0:
            return size * vae_scale_factor(self.vae)
        return self._fallback_resolution()

    @abstractmethod
    def _fallback_resolution(self) -> int:
        """The family's usual resolution, for a UNet config without ``sample_size``."""

    # ----------------------------------------------------------------------------------------------------------------
    # Placement

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.denoiser

    @property
    def prediction_type(self) -> str:
        """``epsilon``, ``v_prediction`` or ``sample``, from the scheduler config."""
        return self.train_scheduler.config.prediction_type

    def use_resolution(self, resolution: int | None) -> None:
        self.resolution = resolution or self._native_resolution()

    # ----------------------------------------------------------------------------------------------------------------
    # Latents

    def _latent_affine(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float, float]:
        """``(mean, std, scale)`` with ``scaled = (raw - mean) * scale / std``.

        ``mean``/``std`` come from the VAE config's ``latents_mean``/``latents_std`` where both are set (as diffusers'
        SDXL pipeline does), else ``mean`` is ``shift_factor`` (0 when absent) and ``std`` is 1.
        """
        cfg = self.vae.config
        scale = cfg.get("scaling_factor", 1.0)
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            return torch.tensor(mean).view(shape).to(like), torch.tensor(std).view(shape).to(like), scale
        return cfg.get("shift_factor") or 0.0, 1.0, scale

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents of images ``(B, 3, H, W)`` in ``[-1, 1]``, as float32 on :attr:`device`.

        The VAE runs in float32 on its own device. Latents are the mean of the VAE's posterior
        (``latent_dist.mode()``), not a sample of it, so the same image always gives the same latents (cached
        latents stay valid); the posterior's standard deviation is tiny for these VAEs, so nothing is lost in
        practice.
        """
        x = pixels.to(module_device(self.vae), torch.float32)
        raw = self.vae.encode(x).latent_dist.mode()
        mean, std, scale = self._latent_affine(raw)
        return ((raw - mean) * scale / std).to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in about ``[-1, 1]`` (float32, on the VAE's device) from scaled latents."""
        z = latents.to(module_device(self.vae), torch.float32)
        mean, std, scale = self._latent_affine(z)
        return self.vae.decode(z * std / scale + mean, return_dict=False)[0]

    # ----------------------------------------------------------------------------------------------------------------
    # Training

    @property
    def num_train_timesteps(self) -> int:
        return self.train_scheduler.config.num_train_timesteps

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.train_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        kind = self.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.train_scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        raise B4MError(f"{self.identity}: unsupported scheduler prediction_type {kind!r}")

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's output; inputs are moved to the denoiser's device and cast to its dtype."""
        device, dtype = self.device, self.dtype
        extra = {k: v.to(device, dtype) for k, v in cond.extra.items()} or None
        return self.denoiser(
            noisy.to(device, dtype),
            timesteps.to(device),
            encoder_hidden_states=cond.hidden.to(device, dtype),
            added_cond_kwargs=extra,
            return_dict=False,
        )[0]

    # ----------------------------------------------------------------------------------------------------------------
    # Sampling

    def make_sampler(self, name: str | None = None) -> SchedulerMixin:
        """A fresh sampling scheduler: ``name`` from :data:`~b4m.models.schedulers.SCHEDULERS`, or the model's own;
        either announces its steps (:mod:`b4m.models.steps`)."""
        if name is None:
            return announcing(type(self.sampling_scheduler).from_config(self.sampling_scheduler.config))
        return make_scheduler(name, self.sampling_scheduler.config)

    def pipeline(self, scheduler: SchedulerMixin | None = None) -> DiffusionPipeline:
        """A diffusers pipeline around this model's own component objects (adapters included), progress bar off."""
        parts = {name: getattr(self, name) for name in self.components}
        pipe = self.pipeline_class(**parts, scheduler=scheduler or self.make_sampler(), **self._pipeline_extras())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _prompt_kwargs(self, prompt: str, negative: str, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The pipeline's ``prompt_embeds``-style arguments for one prompt, from :meth:`encode_prompts`.

        Encoding here rather than in the pipeline keeps sampling's conditioning identical to training's and works
        with encoders offloaded to the CPU (the SD pipeline would feed them tokens on the denoiser's device).
        """
        cond = self.encode_prompts([prompt, negative], size=size).to(self.device, self.dtype)
        kwargs = {"prompt_embeds": cond.hidden[:1], "negative_prompt_embeds": cond.hidden[1:]}
        for key, name in self.pipeline_embeds.items():
            kwargs[name] = cond.extra[key][:1]
            kwargs[f"negative_{name}"] = cond.extra[key][1:]
        return kwargs

    def sample(self, request: SampleRequest, on_images: OnImages | None = None) -> list[Image.Image]:
        """One image per (prompt, seed), prompt-major.

        Each prompt is one pipeline call with one CPU generator per seed, so an image's starting noise (and the
        ancestral samplers' noise) depends only on its seed. Prompts are encoded by :meth:`encode_prompts` (the
        pipeline's own rules, "" included); the pipeline returns latents, which this model decodes with its float32
        VAE. The denoiser is put in eval mode for the call and restored after.
        """
        if not request.prompts or not request.seeds:
            return []
        height = request.height or self.resolution
        width = request.width or self.resolution
        pipe = self.pipeline(self.make_sampler(request.scheduler))
        images: list[Image.Image] = []
        was_training = self.denoiser.training
        self.denoiser.eval()
        graphs = graphed_sampling(self.denoiser) if self.sample_cuda_graphs else contextlib.nullcontext()
        try:
            with torch.no_grad(), graphs:
                for index, prompt in enumerate(request.prompts):
                    latents = pipe(
                        **self._prompt_kwargs(prompt, request.negative_prompt, (height, width)),
                        height=height,
                        width=width,
                        num_inference_steps=self.sample_steps(request),
                        guidance_scale=self.guidance(request),
                        num_images_per_prompt=len(request.seeds),
                        generator=[torch.Generator(device="cpu").manual_seed(int(s)) for s in request.seeds],
                        output_type="latent",
                    ).images
                    first = len(images)
                    for row in latents:  # decode one at a time: a 1024 px float32 decode is memory hungry
                        images += self.image_processor.postprocess(self.decode_latents(row[None]), output_type="pil")
                    if on_images is not None:
                        on_images(index, images[first:])
        finally:
            self.denoiser.train(was_training)
        return images
