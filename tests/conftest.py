"""Tiny diffusers models built in code: nothing is downloaded."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

TINY_SD_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24,
    attention_head_dim=4,
    norm_num_groups=8,
)

# SDXL's layout in miniature: no attention in the first down block, two transformer layers deeper down,
# text_time added conditioning with a pooled text embedding.
TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=40,
    attention_head_dim=(2, 4),
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=4 * 6 + 24,
)


def make_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def unet_inputs(unet: UNet2DConditionModel, batch: int = 2, seed: int = 1) -> dict:
    """Random inputs that fit ``unet`` (with SDXL's added conditioning when the config asks for it)."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    inputs = dict(
        sample=torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        timestep=torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
        encoder_hidden_states=torch.randn(batch, 7, cfg.cross_attention_dim, generator=g),
    )
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, pooled, generator=g),
            time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch),
        )
    return inputs


@pytest.fixture
def sd_unet() -> UNet2DConditionModel:
    return make_unet(TINY_SD_UNET)


@pytest.fixture
def sdxl_unet() -> UNet2DConditionModel:
    return make_unet(TINY_SDXL_UNET)


def cli_ok(*args):
    """``b4m ARGS`` in this process (typer's runner), which must exit 0; returns the result."""
    from typer.testing import CliRunner

    from b4m.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def watch_encoders(monkeypatch, model_class) -> dict:
    """Record where ``model_class``'s text encoders are (``on_device``: after a restore, not after an offload) at
    each call of its ``sample`` (``samples``) and ``predict`` (``steps``: training; sampling's denoiser calls go
    through the pipeline, not ``predict``)."""
    state = {"on_device": True, "samples": [], "steps": []}

    def spy(name):
        real = getattr(model_class, name)

        def call(self, *args, **kwargs):
            if name in ("sample", "predict"):
                state["samples" if name == "sample" else "steps"].append(state["on_device"])
            else:
                state["on_device"] = name == "restore_encoders"
            return real(self, *args, **kwargs)

        return call

    for name in ("offload_encoders", "restore_encoders", "sample", "predict"):
        monkeypatch.setattr(model_class, name, spy(name))
    return state
