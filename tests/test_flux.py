"""FLUX.1 behind the DiffusionModel interface, on a tiny FLUX.1-dev-like pipeline saved with save_pretrained and
loaded offline by b4m's own loader: the transformer call as FluxPipeline makes it, flow matching, the commands end to
end, the exported LoRA in diffusers, and the dry run."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from PIL import Image
from typer.testing import CliRunner

from b4m.adapter.config import FLUX_TARGETS
from b4m.adapter.file import attached, load_adapter
from b4m.cli import app
from b4m.files import load_safetensors
from b4m.loading import load_model
from b4m.lora_files import load_lora
from b4m.models.flux import TRAIN_GUIDANCE, FluxModel
from conftest import cli_ok
from tiny_pipelines import dog_and_yarn, save_square_images, save_tiny_flux

runner = CliRunner()
# The adapted modules of the tiny transformer (one double, one single block): proj_mlp (16 → 64) and proj_out
# (80 → 16) are not square; the top-level proj_out is not adapted.
DOUBLE = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
EXPECTED = sorted(
    [f"transformer_blocks.0.attn.{m}" for m in DOUBLE] + [f"single_transformer_blocks.0.{m}" for m in SINGLE]
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux"))


@pytest.fixture(scope="module")
def model(folder):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        loaded = load_model(folder, resolution=32)
    assert isinstance(loaded, FluxModel) and loaded.identity == "flux:tiny-flux"
    return loaded


def test_predict_is_the_transformer_call_of_flux_pipeline(model):
    """predict(x, t, cond) equals the transformer output FluxPipeline gets for the same latents at the same σ (its
    packing, image/text ids, timestep/1000 and guidance), unpacked; and encode_prompts equals the pipeline's."""
    prompt = "a photo of sks dog"
    cond = model.encode_prompts([prompt])
    t = 700
    sigma = float(model.sigmas(torch.tensor([t]))[0])
    calls = []

    def hook(module, args, kwargs, output):
        calls.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, output[0].clone()))

    # A scheduler without shift, so that the pipeline's one step runs exactly at σ.
    pipe = model.pipeline(FlowMatchEulerDiscreteScheduler(shift=1.0))
    embeds, pooled, _ = pipe.encode_prompt(prompt, max_sequence_length=model.max_sequence_length)
    torch.testing.assert_close(embeds, cond.hidden)
    torch.testing.assert_close(pooled, cond.extra["pooled"])
    handle = model.denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(
                prompt_embeds=cond.hidden,
                pooled_prompt_embeds=cond.extra["pooled"],
                height=32,
                width=32,
                num_inference_steps=1,
                sigmas=[sigma],
                guidance_scale=TRAIN_GUIDANCE,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            )
    finally:
        handle.remove()
    ((kwargs, out),) = calls
    torch.testing.assert_close(kwargs["timestep"], model.model_timesteps(torch.tensor([t])))
    assert kwargs["guidance"].tolist() == [TRAIN_GUIDANCE]
    noisy = FluxPipeline._unpack_latents(kwargs["hidden_states"], 32, 32, model.vae_factor)
    assert noisy.shape == (1, 16, 16, 16)
    with torch.no_grad():
        pred = model.predict(noisy, torch.tensor([t]), cond)
    torch.testing.assert_close(pred, FluxPipeline._unpack_latents(out, 32, 32, model.vae_factor), rtol=1e-5, atol=1e-5)
    # The guidance embedding is an input that matters, so the value fed in training is not moot.
    model.train_guidance = 1.0
    try:
        with torch.no_grad():
            assert not torch.allclose(model.predict(noisy, torch.tensor([t]), cond), pred)
    finally:
        model.train_guidance = TRAIN_GUIDANCE


def test_add_noise_and_target_are_flow_matching_on_the_schedulers_sigmas(model):
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    t = torch.tensor([0, 250, 500, 999])
    # FLUX.1-dev's config shifts at sampling time only (use_dynamic_shifting): σ = (t + 1) / N in training, the
    # DreamBooth script's sigmas for uniform indices into the scheduler's timesteps.
    sigma = (t + 1).float() / 1000
    fresh = FlowMatchEulerDiscreteScheduler.from_config(model.sampling_scheduler.config)
    torch.testing.assert_close(model.sigmas(t), fresh.sigmas[999 - t])
    torch.testing.assert_close(model.sigmas(t), sigma)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(model.add_noise(x, noise, t), (1 - s) * x + s * noise)
    torch.testing.assert_close(model.target(x, noise, t), noise - x)
    # A static shift (use_dynamic_shifting off) is applied: σ' = 3σ / (1 + 2σ).
    kept = model.train_scheduler
    model.train_scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    try:
        shifted = 3 * sigma / (1 + 2 * sigma)
        torch.testing.assert_close(model.sigmas(t), shifted)
        torch.testing.assert_close(model.model_timesteps(t), shifted)
        s = shifted.view(-1, 1, 1, 1)
        torch.testing.assert_close(model.add_noise(x, noise, t), (1 - s) * x + s * noise)
    finally:
        model.train_scheduler = kept
    # Latents: (z - shift_factor) · scaling_factor of the posterior mean.
    pixels = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    z = model.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(model.encode_images(pixels), (z - 0.1159) * 0.3611)


def test_commands_end_to_end_and_the_exported_lora_in_diffusers(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fast = ["--steps", "2", "--rank", "4", "--resolution", "32", "--model", folder]
    refs = dog_and_yarn(tmp_path)
    dog, yarn, aux, caux = refs["dog"], refs["yarn"], refs["aux"], refs["content_aux"]
    cli_ok("content", "--images", dog, "--prompt", "a photo of sks dog", "--aux", aux, "-o", tmp_path / "c", *fast)
    cli_ok("style", "--images", yarn, "--prompt", "a cat in sks style", "--aux", caux, "-o", tmp_path / "s", *fast)
    cli_ok("make", "--content", tmp_path / "c", "--style", tmp_path / "s", "-o", tmp_path / "m", "--steps", "2")
    content = load_adapter(tmp_path / "c" / "content.b4m.safetensors")
    made = load_adapter(tmp_path / "m" / "fused.b4m.safetensors")
    assert content.config.base_model == "flux:tiny-flux"
    assert content.config.targets == FLUX_TARGETS  # none given: the transformer's own, recorded as used
    assert sorted(made.modules) == EXPECTED
    assert content.tensors["single_transformer_blocks.0.proj_out"]["up_learned"].abs().sum() > 0

    # The diffusers-format export loads with FluxPipeline.load_lora_weights and gives the transformer b4m's
    # adapter gives.
    lora = tmp_path / "m" / "fused_lora_diffusers.safetensors"
    factors, _ = load_lora(lora)
    assert sorted(factors) == EXPECTED
    pipe = FluxPipeline.from_pretrained(folder)
    inputs = _transformer_inputs(pipe.transformer)
    with torch.no_grad():
        base = pipe.transformer(**inputs, return_dict=False)[0]
        pipe.load_lora_weights(str(lora))
        theirs = pipe.transformer(**inputs, return_dict=False)[0]
        model = load_model(folder, resolution=32)
        with attached(model.denoiser, made):
            ours = model.denoiser(**inputs, return_dict=False)[0]
    assert not torch.allclose(theirs, base, atol=1e-4)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "m" / "fused_lora_comfyui.safetensors").is_file()  # kohya/BFL names
    # b4m export writes the same files from the adapter (the FLUX layouts, not the UNet's)
    for fmt, name in (("diffusers", "fused_lora_diffusers"), ("kohya", "fused_lora_comfyui")):
        again = tmp_path / f"export-{fmt}.safetensors"
        cli_ok("export", tmp_path / "m" / "fused.b4m.safetensors", "-o", again, "--format", fmt)
        assert sorted(load_safetensors(again)[0]) == sorted(
            load_safetensors(tmp_path / "m" / f"{name}.safetensors")[0]
        )

    out = tmp_path / "g"
    args = ("generate", tmp_path / "m", "a sks dog in sks style", "-n", "2", "--seed", "7", "--steps", "2")
    cli_ok(*args, "-o", out, "--resolution", "32")
    a = np.asarray(Image.open(out / "00_seed7.png"))
    assert a.shape == (32, 32, 3) and not np.array_equal(a, np.asarray(Image.open(out / "00_seed8.png")))


def _transformer_inputs(transformer) -> dict:
    g = torch.Generator().manual_seed(3)
    cfg = transformer.config
    return dict(
        hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 5, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.6]),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
        txt_ids=torch.zeros(5, 3),
        guidance=torch.tensor([TRAIN_GUIDANCE]),
    )


def test_dry_run_lists_the_flux_targets(folder):
    output = cli_ok("dry-run", "--model", folder, "--rank", "4", "--modules").output
    listed = sorted(set(re.findall(r"(?:single_)?transformer_blocks\.\d+\.[\w.]+", output)))
    assert listed == EXPECTED
    assert not re.search(r"^\s*proj_out\b", output, re.M)  # the final output layer is not adapted
    for name, shape in (("proj_mlp", "16 → 64"), ("proj_out", "80 → 16")):
        line = next(x for x in output.splitlines() if f"single_transformer_blocks.0.{name}" in x)
        assert all(n in line for n in re.findall(r"\d+", shape)), line


def test_a_rank_too_large_for_flux_is_refused_before_the_model_loads(folder, tmp_path, monkeypatch):
    import b4m.runs.stages as stages

    monkeypatch.setattr(stages, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    dog = save_square_images(tmp_path / "dog", 2, (120, 60, 20))
    args = ["content", "--images", dog, "--prompt", "a photo of sks dog", "-o", tmp_path / "c", "--model", folder]
    result = runner.invoke(app, [str(a) for a in [*args, "--rank", "100000"]])
    assert result.exit_code != 0 and "rank 100000 is larger than the narrowest adapted layer" in str(result.exception)
