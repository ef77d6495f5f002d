"""Plain LoRA files for FLUX.2 [klein] transformers (b4m.lora_files with family="flux2"; issue 17): the diffusers/peft
format written, read back and checked against diffusers' own FLUX.2 loaders on a tiny ``Flux2Transformer2DModel``
built in code (no hub access)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from safetensors.torch import save_file

import b4m
from b4m.lora_files import applied, load_lora, save_lora
from b4m.lora_files.write import _diffusers_payload
from test_lora_flux import assert_factors_equal, lora_layers, random_factors, scalings
from tiny_pipelines import KLEIN_TRANSFORMER

# Two double and two single blocks of the tests' tiny klein (hidden 16, MLP 48: to_qkv_mlp_proj 16 → 144, to_out
# 64 → 16), with a guidance embedding so that every kind of linear layer FLUX.2 has is there.
TINY_KLEIN = {**KLEIN_TRANSFORMER, "num_layers": 2, "num_single_layers": 2, "guidance_embeds": True}
TOL = dict(rtol=1e-4, atol=1e-4)


def make_klein(seed: int = 0) -> Flux2Transformer2DModel:
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(**TINY_KLEIN).eval()


def klein_inputs(model: Flux2Transformer2DModel) -> dict:
    """Random inputs as Flux2KleinPipeline makes them: 2×3 image tokens, 4 text tokens, two timesteps."""
    cfg, g = model.config, torch.Generator().manual_seed(1)
    text = torch.randn(2, 4, cfg.joint_attention_dim, generator=g)
    return dict(
        hidden_states=torch.randn(2, 6, cfg.in_channels, generator=g),
        encoder_hidden_states=text,
        timestep=torch.tensor([0.3, 0.8]),
        img_ids=Flux2KleinPipeline._prepare_latent_ids(torch.zeros(2, cfg.in_channels, 2, 3)),
        txt_ids=Flux2KleinPipeline._prepare_text_ids(text),
        guidance=torch.full((2,), 3.5) if cfg.guidance_embeds else None,
    )


@torch.no_grad()
def outputs(model) -> torch.Tensor:
    return model(**klein_inputs(model), return_dict=False)[0]


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def klein_pipeline(transformer) -> Flux2KleinPipeline:
    """A klein pipeline around ``transformer`` only (no VAE or text encoder: only the transformer takes the LoRA)."""
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )


# --------------------------------------------------------------------------------------------------------------------
# 1. The diffusers format: written, read back by b4m, loaded by diffusers


@pytest.mark.parametrize("loader", ["pipeline", "load_lora_adapter"])
def test_diffusers_format_reads_back_and_loads_in_diffusers(loader, tmp_path):
    """Every nn.Linear of the transformer (blocks, fused single-block layers, embedders, modulations, norm_out,
    proj_out) at mixed ranks: b4m reads back the factors it wrote bit for bit, and the transformer with the file
    loaded by diffusers (Flux2KleinPipeline.load_lora_weights, or the model's load_lora_adapter) gives the output of
    b4m's own merge of those factors."""
    model = make_klein()
    factors = random_factors(model, linear_names(model), ranks=(2, 4, 4, 3))
    path = tmp_path / "klein_diffusers.safetensors"
    assert save_lora(factors, path, format="diffusers", family="flux2", metadata={"trigger": "sks"}) is None

    read, meta = load_lora(path)
    assert_factors_equal(read, factors)
    assert meta["trigger"] == "sks"
    with applied(model, read):
        ours = outputs(model)
    base = outputs(model)
    assert not torch.allclose(ours, base, **TOL)  # the LoRA does change the output

    theirs_model = make_klein()
    if loader == "pipeline":
        klein_pipeline(theirs_model).load_lora_weights(str(path))
    else:
        theirs_model.load_lora_adapter(str(path), prefix="transformer")
    assert set(lora_layers(theirs_model)) == set(factors)
    assert scalings(theirs_model) == {1.0}
    torch.testing.assert_close(outputs(theirs_model), ours, **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_file_reads_back_as_its_float32_values(dtype, tmp_path):
    model = make_klein()
    factors = random_factors(
        model, ["single_transformer_blocks.0.attn.to_qkv_mlp_proj", "transformer_blocks.1.ff.linear_in"]
    )
    path = tmp_path / "klein_half.safetensors"
    save_lora(factors, path, format="diffusers", family="flux2", dtype=dtype)
    rounded = {name: (up.to(dtype).float(), down.to(dtype).float()) for name, (up, down) in factors.items()}
    assert_factors_equal(load_lora(path)[0], rounded)


def test_klein_module_names_are_checked(tmp_path):
    model = make_klein()
    factors = random_factors(model, ["single_transformer_blocks.0.attn.to_out"])
    flux1_only = {"single_transformer_blocks.0.proj_out": factors["single_transformer_blocks.0.attn.to_out"]}
    with pytest.raises(b4m.B4MError, match=r"proj_out is not a linear layer of a FLUX.2 \[klein\] transformer"):
        save_lora(flux1_only, tmp_path / "bad.safetensors", format="diffusers", family="flux2")
    assert not (tmp_path / "bad.safetensors").exists()

    # A peft file that mixes FLUX.1-only and klein-only modules is no transformer's.
    save_lora(factors, tmp_path / "klein.safetensors", format="diffusers", family="flux2")
    save_lora(flux1_only, tmp_path / "flux1.safetensors", format="diffusers", family="flux")
    mixed = {**load_lora(tmp_path / "klein.safetensors")[0], **load_lora(tmp_path / "flux1.safetensors")[0]}
    save_file(_diffusers_payload(mixed, torch.float32, "transformer")[0], str(tmp_path / "mixed.safetensors"))
    with pytest.raises(b4m.B4MError, match=r"mix FLUX.1 and FLUX.2 \[klein\] layers"):
        load_lora(tmp_path / "mixed.safetensors")
