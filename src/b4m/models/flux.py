"""FLUX.1 (diffusers' ``FluxPipeline``): a rectified-flow transformer on packed latents, T5 and CLIP text encoders.

How FLUX fits :class:`~b4m.models.base.DiffusionModel` (facts from diffusers' ``pipeline_flux.py`` and its
``train_dreambooth_lora_flux.py``):

- **Latents** stay in the VAE's layout ``(B, 16, H/8, W/8)``, shifted and scaled as the transformer expects
  (``(z - shift_factor) · scaling_factor``); :meth:`FluxModel.predict` packs them into 2×2 patches (``(B, HW/4, 64)``
  tokens) with their image ids, calls the transformer and unpacks its output, so the training loop's per-pixel MSE is
  the DreamBooth script's loss.
- **Conditioning**: ``hidden`` is T5's last hidden state ``(B, T, 4096)`` and ``extra["pooled"]`` CLIP's pooled output
  ``(B, 768)``, as ``FluxPipeline.encode_prompt`` makes them; the text ids are zeros (built in :meth:`predict`).
- **Noise** (flow matching): ``x_σ = (1 - σ)·x + σ·ε``, target ``ε - x``. The loop's integer timestep ``t`` in
  ``0 … N-1`` (higher is noisier) is the index ``N-1-t`` into the training scheduler's (descending) ``timesteps`` and
  ``sigmas``: a uniform ``t`` is the script's default ``weighting_scheme="none"`` (uniform indices into the scheduler's
  timesteps, then their sigmas). The training scheduler is a fresh ``FlowMatchEulerDiscreteScheduler`` from the model's
  scheduler config, so the shift is the config's: applied (``σ' = s·σ / (1 + (s-1)·σ)``) when
  ``use_dynamic_shifting`` is off, none when it is on (FLUX.1-dev: its resolution-dependent ``mu`` shift is for
  sampling only), i.e. ``σ = (t + 1) / N`` there. The transformer gets ``timesteps[N-1-t] / 1000``, as the script
  and the pipeline pass it.
- **Guidance**: FLUX.1-dev is guidance-distilled (``guidance_embeds``): the guidance scale is an input of the
  transformer, not classifier-free guidance. Training feeds :data:`TRAIN_GUIDANCE` (3.5, the DreamBooth script's
  ``--guidance_scale`` default, which is also the pipeline's sampling default: the adapter learns at the guidance it
  is used at); sampling feeds the request's scale (default 3.5) and never runs an unconditional pass.
- **FLUX.1 schnell** is timestep-distilled and has no guidance embedding (its transformer config says
  ``guidance_embeds: false``). A FLUX.1 transformer without one gets schnell's sampling defaults from diffusers'
  ``FluxPipeline`` documentation (:data:`SCHNELL_DEFAULTS`): 4 steps, guidance scale 0 (the pipeline ignores it) and
  256 T5 tokens (``max_sequence_length``, in training too, so that training and sampling encode alike); a request's
  own steps and guidance, and a :attr:`FluxModel.max_sequence_length` set on the model, win.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from torch import nn

from ..device import avoid_cudnn_attention
from ..errors import B4MError
from .base import Conditioning, DiffusionModel, OnImages, SampleRequest
from .diffusers_common import ComponentPlacement, _to_float32, module_device, tokenize, vae_scale_factor
from .steps import announcing

#: The guidance-embedding input during training on guidance-distilled models (FLUX.1-dev): the default of
#: ``--guidance_scale`` in diffusers' ``train_dreambooth_lora_flux.py`` ("the FLUX.1 dev variant is a guidance
#: distilled model"), and FluxPipeline's default guidance_scale.
TRAIN_GUIDANCE = 3.5
#: T5 tokens per prompt: FluxPipeline's ``max_sequence_length`` default (capped by the tokenizer's own limit).
MAX_SEQUENCE_LENGTH = 512
#: FluxPipeline's ``default_sample_size`` (latent pixels): 128 × the VAE factor 8 = 1024 px for FLUX.1.
DEFAULT_SAMPLE_SIZE = 128
#: FLUX.1 schnell's sampling defaults (a FLUX.1 transformer without a guidance embedding), as diffusers'
#: FluxPipeline documentation runs it: ``num_inference_steps=4``, ``guidance_scale=0.0``, ``max_sequence_length=256``.
SCHNELL_DEFAULTS = {"steps": 4, "guidance": 0.0, "max_sequence_length": 256}


class FluxModel(ComponentPlacement, DiffusionModel):
    """FLUX.1 around diffusers components; PLP attaches to :attr:`denoiser`, the ``FluxTransformer2DModel``.

    Attributes:
        vae: The autoencoder, always in float32.
        train_scheduler: A fresh ``FlowMatchEulerDiscreteScheduler`` from the model's scheduler config (never stepped).
        sampling_scheduler: The model's own scheduler; sampling uses a fresh copy of it.
        train_guidance: The guidance-embedding value during training (models with ``guidance_embeds``).
        dtype: Weight dtype of the transformer and text encoders.
    """

    family: ClassVar[str] = "flux"
    pipeline_class: ClassVar[type] = FluxPipeline
    components: ClassVar[tuple[str, ...]] = (
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "transformer",
    )
    default_guidance = TRAIN_GUIDANCE

    def __init__(
        self,
        *,
        vae: AutoencoderKL,
        text_encoder: nn.Module,
        text_encoder_2: nn.Module,
        tokenizer: Any,
        tokenizer_2: Any,
        transformer: FluxTransformer2DModel,
        scheduler: SchedulerMixin,
        identity: str,
        resolution: int | None = None,
        train_guidance: float = TRAIN_GUIDANCE,
    ) -> None:
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self._hold(vae, transformer, scheduler, identity, resolution, train_guidance)
        self._text_tokens: int | None = None  # set: max_sequence_length as the user asked
        if self.is_schnell:
            self.default_steps, self.default_guidance = SCHNELL_DEFAULTS["steps"], SCHNELL_DEFAULTS["guidance"]

    def _hold(self, vae, transformer, scheduler, identity: str, resolution: int | None, train_guidance: float) -> None:
        """What every FLUX family's model keeps beside its text encoders: the VAE (float32, frozen), the transformer
        as :attr:`denoiser`, a fresh training scheduler and the sampling one, the latent geometry, the resolution."""
        self.vae = _to_float32(vae).eval().requires_grad_(False)
        self.denoiser = transformer
        self.train_scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.sampling_scheduler = scheduler
        self.train_guidance = train_guidance
        self.identity = identity
        self.dtype = transformer.dtype
        self.vae_factor = vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_factor * 2)
        self.resolution = resolution or self._native_resolution()
        # Tensors a training step needs that depend only on shapes and devices (the schedule's tables, position
        # ids), made once on their device: building them on the CPU and copying them over in every step is not
        # allowed while a CUDA graph of the step is captured (train.cuda_graphs, the fast preset).
        self._constants: dict[tuple, torch.Tensor] = {}

    def _constant(self, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()`` the first time ``key`` is asked for, the same tensor afterwards (see :meth:`_hold`)."""
        if key not in self._constants:
            self._constants[key] = build()
        return self._constants[key]

    @classmethod
    def from_pipeline(cls, pipe: FluxPipeline, *, identity: str, resolution: int | None = None) -> FluxModel:
        """Wrap the components of a loaded ``FluxPipeline`` (the objects themselves, not copies)."""
        parts = {name: getattr(pipe, name) for name in cls.components}
        return cls(**parts, scheduler=pipe.scheduler, identity=identity, resolution=resolution)

    @classmethod
    def load_kwargs(cls) -> dict[str, Any]:
        """Keywords for ``FluxPipeline.from_pretrained``: the optional IP-adapter parts are not loaded."""
        return {"image_encoder": None, "feature_extractor": None}

    def _native_resolution(self) -> int:
        """FluxPipeline's default size: its ``default_sample_size`` times the VAE factor (1024 for FLUX.1)."""
        return DEFAULT_SAMPLE_SIZE * self.vae_factor

    @property
    def transformer(self) -> FluxTransformer2DModel:
        return self.denoiser

    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    # ----------------------------------------------------------------------------------------------------------------
    # Placement

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Self:
        avoid_cudnn_attention(device)  # its backward fails at FLUX's shapes (H200, torch 2.11)
        return super().to(device, dtype)

    def use_resolution(self, resolution: int | None) -> None:
        self.resolution = resolution or self._native_resolution()

    # ----------------------------------------------------------------------------------------------------------------
    # Encoding

    @property
    def is_schnell(self) -> bool:
        """A FLUX.1 transformer without a guidance embedding: FLUX.1 schnell (timestep-distilled). Never klein."""
        return self.family == "flux" and not self.denoiser.config.guidance_embeds

    def defaults_note(self) -> str:
        if not self.is_schnell:
            return ""
        steps, guidance, tokens = SCHNELL_DEFAULTS.values()
        return (
            f"{self.identity} has no guidance embedding (FLUX.1 schnell): {steps} sampling steps, guidance "
            f"{guidance:g} (not used) and {tokens} T5 tokens unless set"
        )

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt: as set, else FluxPipeline's 512 (schnell: 256); capped by the tokenizer's limit."""
        default = SCHNELL_DEFAULTS["max_sequence_length"] if self.is_schnell else MAX_SEQUENCE_LENGTH
        return min(self._text_tokens or default, int(self.tokenizer_2.model_max_length))

    @max_sequence_length.setter
    def max_sequence_length(self, tokens: int) -> None:
        if tokens < 1:
            raise B4MError(f"max_sequence_length must be at least 1, got {tokens}")
        self._text_tokens = int(tokens)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], size: tuple[int, int] | None = None) -> Conditioning:
        """As ``FluxPipeline.encode_prompt``: ``hidden`` = T5's last hidden state ``(B, T, D)`` (``T`` =
        :attr:`max_sequence_length`, padded), ``extra["pooled"]`` = CLIP's pooled output ``(B, P)``. "" is encoded
        like any prompt (FLUX has no zeroed unconditional embedding). ``size`` is not used."""
        del size
        clip_ids = tokenize(self.tokenizer, prompts).input_ids.to(module_device(self.text_encoder))
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(
            list(prompts),
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(module_device(self.text_encoder_2))
        hidden = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return Conditioning(hidden.to(self.device), {"pooled": pooled.to(self.device)})

    def _latent_affine(self) -> tuple[float, float]:
        cfg = self.vae.config
        return float(cfg.get("shift_factor") or 0.0), float(cfg.get("scaling_factor") or 1.0)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, H/f, W/f)`` of images in ``[-1, 1]``: ``(z - shift_factor) · scaling_factor`` with ``z``
        the posterior's mean (not a sample: cached latents stay valid), float32 on :attr:`device`."""
        raw = self.vae.encode(pixels.to(module_device(self.vae), torch.float32)).latent_dist.mode()
        shift, scale = self._latent_affine()
        return ((raw - shift) * scale).to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in about ``[-1, 1]`` from latents in the transformer's scale (unpacked)."""
        shift, scale = self._latent_affine()
        z = latents.to(module_device(self.vae), torch.float32) / scale + shift
        return self.vae.decode(z, return_dict=False)[0]

    # ----------------------------------------------------------------------------------------------------------------
    # Training

    @property
    def num_train_timesteps(self) -> int:
        return self.train_scheduler.config.num_train_timesteps

    def _schedule_index(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Index into the training scheduler's descending schedule of the loop's timesteps (higher is noisier), on
        their device. The range is checked on CPU tensors only: on a GPU the check would wait for the device in
        every step (and cannot run inside a CUDA graph); the loop draws its timesteps in range on the CPU."""
        t = timesteps.long()
        n = self.num_train_timesteps
        if t.device.type == "cpu" and t.numel() and (t.min() < 0 or t.max() >= n):
            raise B4MError(f"timesteps must be in 0 … {n - 1}")
        return n - 1 - t

    def _schedule(self, name: str, device: torch.device) -> torch.Tensor:
        """The training scheduler's ``sigmas`` or ``timesteps``, float32 on ``device`` (kept per scheduler object)."""
        scheduler = self.train_scheduler
        return self._constant((name, scheduler, device), lambda: getattr(scheduler, name).to(device, torch.float32))

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """σ of the loop's integer ``timesteps`` (float32, on their device): ``train_scheduler.sigmas[N-1-t]``."""
        return self._schedule("sigmas", timesteps.device)[self._schedule_index(timesteps)]

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep input: ``train_scheduler.timesteps[N-1-t] / 1000`` (what the pipeline and the
        DreamBooth script pass; ``σ`` itself for FLUX.1's N = 1000)."""
        return self._schedule("timesteps", timesteps.device)[self._schedule_index(timesteps)] / 1000

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas(timesteps.to(latents.device)).view(-1, *([1] * (latents.dim() - 1)))
        return ((1.0 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The flow-matching velocity ``noise - latents`` (independent of the timestep)."""
        del timesteps
        return noise - latents

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's output in latent layout: packed input with its image ids, zero text ids, the timestep of
        :meth:`model_timesteps`, and :attr:`train_guidance` where the transformer embeds guidance."""
        device, dtype = self.device, self.dtype
        b, c, h, w = noisy.shape
        if h % 2 or w % 2:
            raise B4MError(
                f"FLUX packs 2×2 latent patches: latent size {h}×{w} must be even (images a multiple of "
                f"{2 * self.vae_factor} px)"
            )
        packed = FluxPipeline._pack_latents(noisy.to(device, dtype), b, c, h, w)
        img_ids = self._constant(
            ("img_ids", h, w, device, dtype),
            lambda: FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype),
        )
        hidden = cond.hidden.to(device, dtype)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), self.train_guidance, device=device, dtype=torch.float32)
        out = self.denoiser(
            hidden_states=packed,
            timestep=self.model_timesteps(timesteps).to(device, dtype),
            guidance=guidance,
            pooled_projections=cond.extra["pooled"].to(device, dtype),
            encoder_hidden_states=hidden,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, h * self.vae_factor, w * self.vae_factor, self.vae_factor)

    # ----------------------------------------------------------------------------------------------------------------
    # Sampling

    def make_sampler(self, name: str | None = None) -> SchedulerMixin:
        """A fresh copy of the model's flow-matching scheduler, announcing its steps (:mod:`b4m.models.steps`).
        The named samplers of :data:`b4m.models.schedulers.SCHEDULERS` are DDPM-family ones: refused for FLUX."""
        if name not in (None, "default"):
            raise B4MError(
                f"{self.identity}: FLUX samples with its own flow-matching scheduler; --scheduler {name} is "
                "for SD and SDXL"
            )
        return announcing(type(self.sampling_scheduler).from_config(self.sampling_scheduler.config))

    def pipeline(self, scheduler: SchedulerMixin | None = None) -> FluxPipeline:
        """A ``FluxPipeline`` around this model's own component objects (adapters included), progress bar off."""
        parts = {name: getattr(self, name) for name in self.components}
        pipe = FluxPipeline(**parts, scheduler=scheduler or self.make_sampler())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample(self, request: SampleRequest, on_images: OnImages | None = None) -> list[Image.Image]:
        """One image per (prompt, seed), prompt-major, through ``FluxPipeline`` with precomputed embeddings.

        ``request.steps`` steps (default :attr:`default_steps`) of the pipeline's schedule (its resolution-dependent
        shift included); the guidance scale goes to the guidance embedding (FLUX.1-dev; ignored by models without
        one), with no unconditional pass, so ``request.negative_prompt`` is not used. Each seed gets its own CPU
        generator, so an image depends only on its seed. The latents come back packed and are decoded here with the
        float32 VAE.
        """
        if not request.prompts or not request.seeds:
            return []
        height = request.height or self.resolution
        width = request.width or self.resolution
        pipe = self.pipeline(self.make_sampler(request.scheduler))
        n = len(request.seeds)
        images: list[Image.Image] = []
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            with torch.no_grad():
                for index, prompt in enumerate(request.prompts):
                    cond = self.encode_prompts([prompt]).to(self.device, self.dtype)
                    packed = pipe(
                        prompt_embeds=cond.hidden.expand(n, -1, -1),
                        pooled_prompt_embeds=cond.extra["pooled"].expand(n, -1),
                        height=height,
                        width=width,
                        num_inference_steps=self.sample_steps(request),
                        guidance_scale=self.guidance(request),
                        generator=[torch.Generator(device="cpu").manual_seed(int(s)) for s in request.seeds],
                        output_type="latent",
                    ).images
                    latents = FluxPipeline._unpack_latents(packed, height, width, self.vae_factor)
                    first = len(images)
                    for row in latents:  # one decode at a time: a 1024 px float32 decode is memory hungry
                        images += self.image_processor.postprocess(self.decode_latents(row[None]), output_type="pil")
                    if on_images is not None:
                        on_images(index, images[first:])
        finally:
            self.denoiser.train(was_training)
        return images


def transformer_skeleton(folder: str | Path) -> FluxTransformer2DModel:
    """A FLUX folder's transformer with its structure on the meta device (no weights read): for dry runs."""
    config = FluxTransformer2DModel.load_config(str(Path(folder) / "transformer"))
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(config)
