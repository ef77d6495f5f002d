"""FLUX.2 [klein] (diffusers' ``Flux2KleinPipeline``): a rectified-flow transformer on patchified, packed latents with
one Qwen3 text encoder.

Built on :class:`~b4m.models.flux.FluxModel`, whose training schedule it shares; what differs (facts from diffusers'
``pipeline_flux2_klein.py`` and ``train_dreambooth_lora_flux2_klein.py``):

- **Latents** are the transformer's token layout before packing: the FLUX.2 VAE's posterior mean ``(B, C, H/8, W/8)``
  patchified 2×2 into ``(B, 4C, H/16, W/16)`` (128 channels for klein's 32 latent channels) and normalised with the
  VAE's batch-norm statistics, ``(z - running_mean) / sqrt(running_var + eps)``, as the DreamBooth script and the
  pipeline's ``_encode_vae_image`` do. :meth:`Flux2KleinModel.predict` packs them into ``(B, HW, 4C)`` tokens (a plain
  reshape: one token per patchified pixel) with their 4-axis ids ``(t, h, w, l) = (0, h, w, 0)`` and unpacks the
  output, so the loop's per-pixel MSE is the script's loss. Images must be a multiple of 16 px (2 × the VAE factor).
- **Conditioning**: ``hidden`` is what ``Flux2KleinPipeline.encode_prompt`` makes (its own function is called): the
  prompt in Qwen3's chat template (thinking off), padded to :attr:`~Flux2KleinModel.max_sequence_length` tokens, and
  the hidden states of layers 9, 18 and 27 stacked per token into ``(B, T, 3·D)``. The text ids ``(0, 0, 0, l)`` are
  built in :meth:`~Flux2KleinModel.predict`; ``extra`` is empty (no pooled embedding).
- **Noise**: as FLUX.1 (:class:`~b4m.models.flux.FluxModel`): ``x_σ = (1 - σ)·x + σ·ε``, target ``ε - x``, the loop's
  integer ``t`` is the index ``N-1-t`` into a fresh scheduler's timesteps and sigmas (the config's static shift where
  ``use_dynamic_shifting`` is off; none where it is on: the script's uniform ``weighting_scheme="none"``), and the
  transformer gets ``timesteps[N-1-t] / 1000``.
- **Guidance**: klein base is not guidance-distilled and its transformer has no guidance embedding, so training feeds
  none (the script's ``guidance=None`` where ``guidance_embeds`` is off) and sampling runs true classifier-free
  guidance through the pipeline (an unconditional pass on ``request.negative_prompt``, default "" as the pipeline's;
  scale default 4.0, the pipeline's). A step-distilled klein (the pipeline's ``is_distilled``) ignores the scale (the
  pipeline runs no unconditional pass); its default is 1.0. A transformer with ``guidance_embeds`` gets
  :attr:`~b4m.models.flux.FluxModel.train_guidance` in training, as FLUX.1's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from torch import nn

from ..errors import B4MError
from .base import Conditioning, OnImages, SampleRequest
from .diffusers_common import module_device
from .flux import MAX_SEQUENCE_LENGTH, TRAIN_GUIDANCE, FluxModel

#: Qwen3 layers whose hidden states Flux2KleinPipeline stacks (its ``text_encoder_out_layers`` default).
TEXT_LAYERS = (9, 18, 27)
#: Flux2KleinPipeline's ``guidance_scale`` default (true CFG on the base model).
SAMPLE_GUIDANCE = 4.0


class Flux2KleinModel(FluxModel):
    """FLUX.2 [klein] around diffusers components; PLP attaches to :attr:`denoiser`, the ``Flux2Transformer2DModel``.

    Attributes:
        vae: The ``AutoencoderKLFlux2``, always in float32 (its batch-norm statistics normalise the latents).
        is_distilled: The pipeline's ``is_distilled`` (step-distilled klein: guidance is ignored).
    """

    family: ClassVar[str] = "flux2"
    pipeline_class: ClassVar[type] = Flux2KleinPipeline
    components: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "tokenizer", "transformer")
    default_guidance = SAMPLE_GUIDANCE

    def __init__(
        self,
        *,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        transformer: Flux2Transformer2DModel,
        scheduler: SchedulerMixin,
        identity: str,
        resolution: int | None = None,
        is_distilled: bool = False,
        train_guidance: float = TRAIN_GUIDANCE,
    ) -> None:
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.is_distilled = bool(is_distilled)
        if self.is_distilled:
            self.default_guidance = 1.0
        self._hold(vae, transformer, scheduler, identity, resolution, train_guidance)

    @classmethod
    def from_pipeline(cls, pipe: Flux2KleinPipeline, *, identity: str, resolution: int | None = None) -> FluxModel:
        """Wrap the components of a loaded ``Flux2KleinPipeline`` (the objects themselves, not copies)."""
        parts = {name: getattr(pipe, name) for name in cls.components}
        distilled = bool(pipe.config.get("is_distilled", False))
        return cls(**parts, scheduler=pipe.scheduler, identity=identity, resolution=resolution, is_distilled=distilled)

    @classmethod
    def load_kwargs(cls) -> dict[str, Any]:
        return {}

    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder]

    # ----------------------------------------------------------------------------------------------------------------
    # Encoding

    @property
    def max_sequence_length(self) -> int:
        """Flux2KleinPipeline's 512 tokens, capped by the tokenizer's own limit (no cap for Qwen3's)."""
        return min(MAX_SEQUENCE_LENGTH, int(self.tokenizer.model_max_length))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int] | None = None) -> Conditioning:
        """As ``Flux2KleinPipeline.encode_prompt`` (its own function): Qwen3's layers :data:`TEXT_LAYERS` stacked per
        token, ``(B, T, 3·D)``. "" is encoded like any prompt (it is the pipeline's unconditional input). ``size`` is
        not used."""
        del size
        hidden = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            prompt=list(prompts),
            device=module_device(self.text_encoder),
            max_sequence_length=self.max_sequence_length,
            hidden_states_layers=TEXT_LAYERS,
        )
        return Conditioning(hidden.to(self.device))

    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's batch-norm mean and standard deviation ``(1, 4C, 1, 1)``, as the pipeline reads them."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, 4C, H/2f, W/2f)`` of images in ``[-1, 1]``: the posterior mean patchified 2×2 and normalised
        with the VAE's batch-norm statistics (see the module docstring), float32 on :attr:`device`."""
        raw = self.vae.encode(pixels.to(module_device(self.vae), torch.float32)).latent_dist.mode()
        if raw.shape[-2] % 2 or raw.shape[-1] % 2:
            raise B4MError(
                f"FLUX.2 patchifies 2×2 latent pixels: images must be a multiple of {2 * self.vae_factor} px, got "
                f"{pixels.shape[-2]}×{pixels.shape[-1]}"
            )
        latents = Flux2KleinPipeline._patchify_latents(raw)
        mean, std = self._bn_stats(latents)
        return ((latents - mean) / std).to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in about ``[-1, 1]`` from latents in the transformer's layout (those of
        :meth:`encode_images`)."""
        z = latents.to(module_device(self.vae), torch.float32)
        mean, std = self._bn_stats(z)
        return self.decode_vae_latents(Flux2KleinPipeline._unpatchify_latents(z * std + mean))

    @torch.no_grad()
    def decode_vae_latents(self, raw: torch.Tensor) -> torch.Tensor:
        """Images from the VAE's own latents ``(B, C, H/f, W/f)`` (what the pipeline returns as ``"latent"``)."""
        return self.vae.decode(raw.to(module_device(self.vae), torch.float32), return_dict=False)[0]

    # ----------------------------------------------------------------------------------------------------------------
    # Training

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's output in latent layout: the tokens of ``noisy`` with their ids ``(0, h, w, 0)``, text ids
        ``(0, 0, 0, l)``, the timestep of :meth:`model_timesteps`, no guidance unless the transformer embeds it."""
        device, dtype = self.device, self.dtype
        b, c, h, w = noisy.shape
        noisy = noisy.to(device, dtype)
        hidden = cond.hidden.to(device, dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), self.train_guidance, device=device, dtype=torch.float32)
        out = self.denoiser(
            hidden_states=Flux2KleinPipeline._pack_latents(noisy),
            timestep=self.model_timesteps(timesteps).to(device, dtype),
            guidance=guidance,
            encoder_hidden_states=hidden,
            txt_ids=self._constant(
                ("txt_ids", *hidden.shape[:2], device), lambda: Flux2KleinPipeline._prepare_text_ids(hidden).to(device)
            ),
            img_ids=self._constant(
                ("img_ids", b, h, w, device), lambda: Flux2KleinPipeline._prepare_latent_ids(noisy).to(device)
            ),
            return_dict=False,
        )[0]
        return out.transpose(1, 2).reshape(b, c, h, w)  # _unpack_latents_with_ids for these ids

    # ----------------------------------------------------------------------------------------------------------------
    # Sampling

    def pipeline(self, scheduler: SchedulerMixin | None = None) -> Flux2KleinPipeline:
        """A ``Flux2KleinPipeline`` around this model's own component objects (adapters included), progress bar off."""
        parts = {name: getattr(self, name) for name in self.components}
        pipe = Flux2KleinPipeline(**parts, scheduler=scheduler or self.make_sampler(), is_distilled=self.is_distilled)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample(self, request: SampleRequest, on_images: OnImages | None = None) -> list[Image.Image]:
        """One image per (prompt, seed), prompt-major, through ``Flux2KleinPipeline`` with precomputed embeddings.

        ``request.steps`` steps of the pipeline's schedule (its empirical resolution- and step-dependent shift
        included). Guidance above 1 runs the pipeline's classifier-free guidance against ``request.negative_prompt``
        (unless the model is step-distilled). Each seed gets its own CPU generator, so an image depends only on its
        seed. The pipeline returns the VAE's latents, decoded here one at a time with the float32 VAE.
        """
        if not request.prompts or not request.seeds:
            return []
        height = request.height or self.resolution
        width = request.width or self.resolution
        pipe = self.pipeline(self.make_sampler(request.scheduler))
        n = len(request.seeds)
        scale = self.guidance(request)
        images: list[Image.Image] = []
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            with torch.no_grad():
                negative = None
                if scale > 1 and not self.is_distilled:
                    negative = self.encode_prompts([request.negative_prompt]).to(self.device, self.dtype).hidden
                    negative = negative.expand(n, -1, -1)
                for index, prompt in enumerate(request.prompts):
                    cond = self.encode_prompts([prompt]).to(self.device, self.dtype)
                    raw = pipe(
                        prompt_embeds=cond.hidden.expand(n, -1, -1),
                        negative_prompt_embeds=negative,
                        height=height,
                        width=width,
                        num_inference_steps=self.sample_steps(request),
                        guidance_scale=scale,
                        generator=[torch.Generator(device="cpu").manual_seed(int(s)) for s in request.seeds],
                        output_type="latent",
                    ).images
                    first = len(images)
                    for row in raw:
                        images += self.image_processor.postprocess(
                            self.decode_vae_latents(row[None]), output_type="pil"
                        )
                    if on_images is not None:
                        on_images(index, images[first:])
        finally:
            self.denoiser.train(was_training)
        return images


def transformer_skeleton(folder: str | Path) -> Flux2Transformer2DModel:
    """A klein folder's transformer with its structure on the meta device (no weights read): for dry runs."""
    config = Flux2Transformer2DModel.load_config(str(Path(folder) / "transformer"))
    with torch.device("meta"):
        return Flux2Transformer2DModel.from_config(config)
