"""The world's base text-to-image model: a small word-level text encoder and a diffusers UNet2DConditionModel.

The UNet has cross-attention with to_q/to_k/to_v/to_out.0 exactly like SDXL's, so PLP adapts it the same way. It
works in pixel space (no VAE): at 32–64 px a latent space buys little, and ground truth stays exact.
:class:`WorldModel` implements :class:`~b4m.models.base.DiffusionModel`, so every command takes ``--model world``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from huggingface_hub import load_torch_model, save_torch_state_dict
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import B4MError, first_line
from ..models.base import Conditioning, DiffusionModel, OnImages, SampleRequest
from ..models.schedulers import make_scheduler
from .catalog import PLACEHOLDERS, default_catalog
from .vocab import Vocab, build_vocab, tokenize

MAX_FILE_BYTES = 15 * 2**20  # weights are sharded below 16 MiB per file (what the GPU machine can send back)
MAX_TOKENS = 16  # <bos> + the longest caption (12 words) + <eos>, padded


@dataclass
class TextEncoderConfig:
    vocab_size: int = 128
    width: int = 256
    layers: int = 3
    heads: int = 4
    max_tokens: int = MAX_TOKENS


class WorldTextEncoder(nn.Module):
    """Token + position embeddings and a pre-norm transformer encoder; returns every token's hidden state."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(config.vocab_size, config.width)
        self.positions = nn.Parameter(torch.zeros(config.max_tokens, config.width))
        layer = nn.TransformerEncoderLayer(
            config.width,
            config.heads,
            4 * config.width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.positions, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, width)
        h = self.tokens(ids) + self.positions[: ids.shape[1]]
        return self.norm(self.encoder(h))


def default_unet_config(resolution: int, text_width: int) -> dict:
    """A small pixel-space UNet with SDXL's attention layout (cross-attention in the deeper blocks)."""
    return dict(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=(48, 96, 192),  # ~14 M parameters: the shipped weights must stay under 40 MB
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=24,
        norm_num_groups=16,
    )


@dataclass
class WorldModelConfig:
    resolution: int = 32
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: dict = field(default_factory=dict)  # empty: default_unet_config(resolution, text.width)
    prediction_type: str = "epsilon"
    beta_schedule: str = "squaredcos_cap_v2"
    scheduler: str = "ddim"  # sampling defaults, measured on the shipped model (docs/world.md)
    guidance_scale: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = TextEncoderConfig(**self.text)
        if not self.unet:
            self.unet = default_unet_config(self.resolution, self.text.width)


class WorldModel(DiffusionModel):
    """The built-in world's base model behind the common interface."""

    def __init__(self, config: WorldModelConfig, vocab: Vocab | None = None, identity: str = "world") -> None:
        self.config = config
        self.vocab = vocab or build_vocab()
        if len(self.vocab) > config.text.vocab_size:
            raise B4MError(
                f"vocabulary of {len(self.vocab)} words exceeds the text encoder's {config.text.vocab_size}"
            )
        self.text_encoder = WorldTextEncoder(config.text)
        self.denoiser = UNet2DConditionModel(**config.unet)
        self.train_scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_schedule=config.beta_schedule, prediction_type=config.prediction_type
        )
        self.identity = identity
        self.resolution = config.resolution
        self.default_guidance = config.guidance_scale
        self.held_out: list[tuple[str, str]] = []  # (content, style) pairs never shown together in pretraining

    # -- DiffusionModel ---------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device, dtype=None) -> WorldModel:
        self.denoiser.to(device, dtype)
        self.text_encoder.to(device, dtype)
        return self

    placeholders = PLACEHOLDERS

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in dict.fromkeys(tokenize(text)) if w not in self.vocab]

    def aux_prompts(self, role: str) -> list[str]:
        """Known contents in known styles (a content run) or drawn plainly (a style run), in the words of the
        captions the model was trained on; the everyday prompts of SD and SDXL are mostly unknown words here."""
        catalog = default_catalog()
        contents = [c.name for c in catalog.known_contents if c.name in self.vocab]
        styles = [s.name for s in catalog.known_styles if s.name != "plain" and s.name in self.vocab]
        if role == "content":
            return [f"a large {c} in {s} style" for c, s in zip(contents, styles, strict=False)]
        return [f"a large {c} in plain style" for c in contents]

    def tokens(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.vocab.encode(p, self.config.text.max_tokens) for p in prompts], dtype=torch.long)

    def encode_prompts(self, prompts: Sequence[str], size=None) -> Conditioning:
        ids = self.tokens(prompts).to(next(self.text_encoder.parameters()).device)
        return Conditioning(self.text_encoder(ids).to(self.device))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(self.device)  # pixel space: the "latents" are the images in [-1, 1]

    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder]

    def offload_encoders(self) -> None:
        pass  # the text encoder is a few MB; it stays where it is

    @property
    def num_train_timesteps(self) -> int:
        return self.train_scheduler.config.num_train_timesteps

    def add_noise(self, latents, noise, timesteps):
        return self.train_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        if self.config.prediction_type == "v_prediction":
            return self.train_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def predict(self, noisy, timesteps, cond: Conditioning):
        return self.denoiser(noisy, timesteps, encoder_hidden_states=cond.hidden).sample

    @torch.no_grad()
    def sample(self, request: SampleRequest, on_images: OnImages | None = None) -> list[Image.Image]:
        images = [Image.fromarray(a) for a in self.sample_arrays(request)]
        n = len(request.seeds)
        for index in range(len(request.prompts) if on_images is not None else 0):  # 32-px batches: all at once
            on_images(index, images[index * n : (index + 1) * n])
        return images

    @torch.no_grad()
    def sample_arrays(self, request: SampleRequest, batch_size: int = 256) -> np.ndarray:
        """Images as uint8 (N, H, W, 3), one per (prompt, seed), prompt-major, with classifier-free guidance."""
        return self.sample_pairs([(p, s) for p in request.prompts for s in request.seeds], request, batch_size)

    @torch.no_grad()
    def sample_pairs(
        self, pairs: Sequence[tuple[str, int]], request: SampleRequest, batch_size: int = 256
    ) -> np.ndarray:
        """Images as uint8 (N, H, W, 3), one per (prompt, seed) pair; ``request`` gives all but prompts and seeds."""
        res = request.height or self.resolution
        scheduler = make_scheduler(request.scheduler or self.config.scheduler, self.train_scheduler.config)
        guidance = self.guidance(request)
        was_training = self.denoiser.training
        self.denoiser.eval()
        out = []
        uncond = self.encode_prompts([request.negative_prompt])
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            cond = self.encode_prompts([p for p, _ in chunk])
            noise = torch.stack(
                [torch.randn(3, res, res, generator=torch.Generator().manual_seed(s)) for _, s in chunk]
            ).to(self.device, cond.hidden.dtype)
            x = noise * scheduler.init_noise_sigma
            scheduler.set_timesteps(self.sample_steps(request), device=self.device)
            ctx = torch.cat([uncond.hidden.expand(len(chunk), -1, -1), cond.hidden])
            for t in scheduler.timesteps:
                inp = scheduler.scale_model_input(torch.cat([x, x]), t)
                eps_u, eps_c = self.denoiser(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
                x = scheduler.step(eps, t, x).prev_sample
            out.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
        self.denoiser.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, res, res, 3), np.uint8)

    # -- files ------------------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """``world_model.json``, ``vocab.json`` and the weights, written by ``huggingface_hub.save_torch_state_dict``.

        Weights are fp16, sharded into files under 16 MiB: ``unet.safetensors``, or ``unet-00001-of-00002.safetensors``
        ... and ``unet.safetensors.index.json``; the same for ``text_encoder``. Everything is written to a temporary
        folder beside ``folder`` that then takes its place (files of an earlier ``folder`` that are not the model's,
        e.g. ``holdout.json``, are carried over): a crash never leaves a half-written model or a mix of layouts.
        """
        folder = Path(folder)
        tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = {"b4m_world_model": json.dumps(asdict(self.config))}
        for name, module in (("unet", self.denoiser), ("text_encoder", self.text_encoder)):
            save_torch_state_dict(
                _half(module.state_dict()),
                tmp,
                filename_pattern=f"{name}{{suffix}}.safetensors",
                max_shard_size=MAX_FILE_BYTES,
                metadata=meta,
            )
        self.vocab.save(tmp / "vocab.json")
        (tmp / "world_model.json").write_text(json.dumps(asdict(self.config), indent=2))
        if folder.is_dir():
            ours = re.compile(r"(unet|text_encoder)(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
            for f in folder.iterdir():
                if f.is_file() and not (tmp / f.name).exists() and not ours.fullmatch(f.name):
                    shutil.copy2(f, tmp / f.name)
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
        return folder


def _half(state: dict) -> dict:
    """fp16 on disk (the shipped files must stay small); loaded back as fp32."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def read_world_config(folder: str | Path) -> WorldModelConfig:
    """The config of the world model in ``folder`` (its ``world_model.json``; no weights are read)."""
    config_file = Path(folder) / "world_model.json"
    if not config_file.exists():
        raise B4MError(f"{folder}: not a world model folder (no world_model.json)")
    try:
        return WorldModelConfig(**json.loads(config_file.read_text()))
    except (ValueError, TypeError) as e:
        raise B4MError(f"{config_file}: not a world model config ({first_line(e)})") from None


def load_world_model(folder: str | Path, device: str = "cpu", identity: str = "world") -> WorldModel:
    folder = Path(folder)
    config = read_world_config(folder)
    model = WorldModel(config, Vocab.load(folder / "vocab.json"), identity)
    for module, name in ((model.denoiser, "unet"), (model.text_encoder, "text_encoder")):
        _load_weights(module, folder, name)
    holdout = folder / "holdout.json"
    if holdout.exists():  # the combinations pretraining never showed together (the quality bar's prompts)
        model.held_out = [tuple(p) for p in json.loads(holdout.read_text())["held_out"]]
    model.denoiser.eval()
    model.text_encoder.eval().requires_grad_(False)  # a base model: its text encoder is never trained
    return model.to(device)


def _load_weights(module: nn.Module, folder: Path, name: str) -> None:
    """Load ``name.safetensors`` or, when sharded, the shards listed in ``name.safetensors.index.json`` into
    ``module`` (fp16 files into fp32 parameters) through ``huggingface_hub.load_torch_model``; one-line errors."""
    index, single = folder / f"{name}.safetensors.index.json", folder / f"{name}.safetensors"
    try:
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            present = [s for s in shards if (folder / s).is_file()]
            if len(present) < len(shards):
                raise B4MError(f"{folder}: {len(present)} of {len(shards)} {name} shards present ({index.name})")
            load_torch_model(module, folder, strict=True, filename_pattern=f"{name}{{suffix}}.safetensors")
        elif single.is_file():
            load_torch_model(module, single, strict=True)
        else:
            raise B4MError(f"{folder}: no {name}.safetensors (or {index.name} and its shards)")
    except RuntimeError as e:  # missing, unexpected or misshapen tensors (the library's and torch's strict errors)
        expected, stored = set(module.state_dict()), _stored_names(folder, name)
        missing, unexpected = len(expected - stored), len(stored - expected)
        detail = f"{missing} missing, {unexpected} unexpected tensors"
        if not missing and not unexpected:
            detail = "tensors of other shapes"
        raise B4MError(f"{folder / name}*.safetensors: does not fit the config ({detail})") from e
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise B4MError(f"{folder / name}*.safetensors: not readable ({first_line(e)})") from e
    for key, value in module.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise B4MError(f"{folder / name}*.safetensors: tensor {key} holds NaN or Inf values")


def _stored_names(folder: Path, name: str) -> set[str]:
    """The tensor names the files of ``name`` hold (for the error message)."""
    index = folder / f"{name}.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(str(folder / f"{name}.safetensors"), framework="pt") as f:
        return set(f.keys())
