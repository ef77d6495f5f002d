"""FLUX.2 [klein] behind the DiffusionModel interface, on a tiny klein base-like pipeline saved with save_pretrained
and loaded offline by b4m's own loader: the transformer calls as Flux2KleinPipeline makes them (true CFG included), the
prompt and image encodings, flow matching, the commands end to end, the exported LoRA in diffusers, and the dry run."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from b4m.adapter.config import KLEIN_TARGETS
from b4m.adapter.file import attached, load_adapter
from b4m.cli import app
from b4m.loading import load_model
from b4m.lora_files import load_lora
from b4m.models.flux2 import Flux2KleinModel
from conftest import cli_ok
from tiny_pipelines import dog_and_yarn, save_square_images, save_tiny_flux2

runner = CliRunner()
# The adapted modules of the tiny transformer (one double, one single block): the single block's fused
# to_qkv_mlp_proj (16 → 3·16 + 2·48 = 144) and to_out (16 + 48 = 64 → 16) are not square; the top-level proj_out and
# the feed-forward layers are not adapted.
DOUBLE = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SINGLE = ("attn.to_qkv_mlp_proj", "attn.to_out")
EXPECTED = sorted(
    [f"transformer_blocks.0.attn.{m}" for m in DOUBLE] + [f"single_transformer_blocks.0.{m}" for m in SINGLE]
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save_tiny_flux2(tmp_path_factory.mktemp("klein") / "tiny-klein"))


@pytest.fixture(scope="module")
def model(folder):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        loaded = load_model(folder, resolution=32)
    assert isinstance(loaded, Flux2KleinModel) and loaded.identity == "flux2:tiny-klein"
    assert not loaded.is_distilled and loaded.default_guidance == 4.0
    return loaded


def _calls_of(model, pipe, **kwargs):
    """The transformer's keyword inputs and outputs during one pipeline call."""
    calls = []

    def hook(module, args, kw, output):
        calls.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in kw.items()}, output[0].clone()))

    handle = model.denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs)
    finally:
        handle.remove()
    return calls


def test_predict_and_encode_prompts_are_flux2_klein_pipelines(model):
    """encode_prompts equals the pipeline's encode_prompt; predict(x, t, cond) equals the transformer output the
    pipeline gets for the same tokens at the same σ (its packing, ids, timestep/1000, no guidance), unpacked."""
    prompt = "a photo of sks dog"
    cond = model.encode_prompts([prompt])
    assert cond.hidden.shape == (1, model.max_sequence_length, 24) and not cond.extra
    t = 700
    sigma = float(model.sigmas(torch.tensor([t]))[0])
    # A scheduler without shift, so that the pipeline's one step runs exactly at σ.
    pipe = model.pipeline(FlowMatchEulerDiscreteScheduler(shift=1.0))
    embeds, text_ids = pipe.encode_prompt(prompt, max_sequence_length=model.max_sequence_length)
    torch.testing.assert_close(embeds, cond.hidden)
    ((kwargs, out),) = _calls_of(
        model, pipe, prompt_embeds=cond.hidden, num_inference_steps=1, sigmas=[sigma], guidance_scale=1.0
    )
    torch.testing.assert_close(kwargs["timestep"], model.model_timesteps(torch.tensor([t])))
    assert kwargs["guidance"] is None
    assert torch.equal(kwargs["txt_ids"], text_ids)
    img_ids = kwargs["img_ids"]
    noisy = Flux2KleinPipeline._unpack_latents_with_ids(kwargs["hidden_states"], img_ids, 8, 8)
    assert noisy.shape == (1, 16, 8, 8)
    assert torch.equal(img_ids, Flux2KleinPipeline._prepare_latent_ids(noisy))
    with torch.no_grad():
        pred = model.predict(noisy, torch.tensor([t]), cond)
    expected = Flux2KleinPipeline._unpack_latents_with_ids(out, img_ids, 8, 8)
    torch.testing.assert_close(pred, expected, rtol=1e-5, atol=1e-5)


def test_sampling_runs_true_cfg_against_the_negative_prompt(model):
    """Guidance 4 (klein base's default) makes the pipeline's unconditional pass on the encoding of "" that b4m
    passes in; the images depend only on their seeds."""
    calls = _calls_of(
        model,
        model.pipeline(),
        prompt_embeds=model.encode_prompts(["a cat"]).hidden,
        negative_prompt_embeds=model.encode_prompts([""]).hidden,
        num_inference_steps=1,
        guidance_scale=model.default_guidance,
    )
    assert len(calls) == 2
    torch.testing.assert_close(calls[1][0]["encoder_hidden_states"], model.encode_prompts([""]).hidden)
    from b4m.models.base import SampleRequest

    a = model.sample(SampleRequest(prompts=["a cat"], seeds=[3, 4], steps=2, height=32, width=32))
    b = model.sample(SampleRequest(prompts=["a cat"], seeds=[4], steps=2, height=32, width=32))
    assert [im.size for im in a] == [(32, 32), (32, 32)]
    assert np.array_equal(np.asarray(a[1]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    # The negative prompt is the unconditional input under guidance, and unused without it (scale 1).
    for scale, differs in ((model.default_guidance, True), (1.0, False)):
        req = dict(prompts=["a cat"], seeds=[4], steps=2, height=32, width=32, guidance_scale=scale)
        plain = model.sample(SampleRequest(**req))[0]
        negated = model.sample(SampleRequest(**req, negative_prompt="a dog painting"))[0]
        assert np.array_equal(np.asarray(plain), np.asarray(negated)) != differs


def test_add_noise_target_and_latents(model):
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    t = torch.tensor([0, 250, 500, 999])
    # The config shifts at sampling time only (use_dynamic_shifting): σ = (t + 1) / N in training, the DreamBooth
    # script's sigmas for uniform indices into the scheduler's timesteps.
    sigma = (t + 1).float() / 1000
    fresh = FlowMatchEulerDiscreteScheduler.from_config(model.sampling_scheduler.config)
    torch.testing.assert_close(model.sigmas(t), fresh.sigmas[999 - t])
    torch.testing.assert_close(model.sigmas(t), sigma)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(model.add_noise(x, noise, t), (1 - s) * x + s * noise)
    torch.testing.assert_close(model.target(x, noise, t), noise - x)
    kept = model.train_scheduler
    model.train_scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # a static shift is applied
    try:
        shifted = 3 * sigma / (1 + 2 * sigma)
        torch.testing.assert_close(model.sigmas(t), shifted)
        s = shifted.view(-1, 1, 1, 1)
        torch.testing.assert_close(model.add_noise(x, noise, t), (1 - s) * x + s * noise)
    finally:
        model.train_scheduler = kept
    # Latents: the posterior mean patchified 2×2 and normalised with the VAE's batch-norm statistics, as the
    # pipeline encodes reference images; decoding inverts the normalisation and the patchification.
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = model.vae.encode(pixels).latent_dist.mode()  # (2, 4, 16, 16)
    patches = z.view(2, 4, 8, 2, 8, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 16, 8, 8)
    bn = model.vae.bn
    assert not torch.allclose(bn.running_mean, torch.zeros(16))  # the tiny VAE's statistics matter
    mine = model.encode_images(pixels)
    torch.testing.assert_close(
        mine,
        (patches - bn.running_mean.view(1, -1, 1, 1))
        / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + model.vae.config.batch_norm_eps),
    )
    torch.testing.assert_close(mine, model.pipeline()._encode_vae_image(pixels, generator=None))
    with torch.no_grad():
        torch.testing.assert_close(model.decode_latents(mine), model.vae.decode(z).sample, rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="multiple of 4 px"):
        model.encode_images(torch.zeros(1, 3, 30, 30))


def test_commands_end_to_end_and_the_exported_lora_in_diffusers(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fast = ["--steps", "2", "--rank", "4", "--resolution", "32", "--model", folder]
    refs = dog_and_yarn(tmp_path)
    dog, yarn, aux, caux = refs["dog"], refs["yarn"], refs["aux"], refs["content_aux"]
    out = cli_ok(
        "content", "--images", dog, "--prompt", "a photo of sks dog", "--aux", aux, "-o", tmp_path / "c", *fast
    )
    assert "fused_lora_comfyui" not in out.output and "content_lora_comfyui.safetensors" in out.output
    cli_ok("style", "--images", yarn, "--prompt", "a cat in sks style", "--aux", caux, "-o", tmp_path / "s", *fast)
    cli_ok("make", "--content", tmp_path / "c", "--style", tmp_path / "s", "-o", tmp_path / "m", "--steps", "2")
    content = load_adapter(tmp_path / "c" / "content.b4m.safetensors")
    made = load_adapter(tmp_path / "m" / "fused.b4m.safetensors")
    assert content.config.base_model == "flux2:tiny-klein"
    assert content.config.targets == KLEIN_TARGETS  # none given: the transformer's own, recorded as used
    assert sorted(made.modules) == EXPECTED
    fused_qkv = content.tensors["single_transformer_blocks.0.attn.to_qkv_mlp_proj"]
    assert fused_qkv["up_learned"].abs().sum() > 0  # the content half (B, paper assignment) of a 16 → 144 layer
    # The kohya/BFL export (ComfyUI) reads back as the factors too (issue 17).
    kohya, _ = load_lora(tmp_path / "m" / "fused_lora_comfyui.safetensors")
    assert sorted(kohya) == EXPECTED
    for name, (up, down) in made.factors().items():
        torch.testing.assert_close(kohya[name][0] @ kohya[name][1], up @ down, rtol=1e-5, atol=1e-7)

    # The diffusers-format export loads with Flux2KleinPipeline.load_lora_weights and gives the transformer output
    # b4m's adapter gives.
    lora = tmp_path / "m" / "fused_lora_diffusers.safetensors"
    with safe_open(str(lora), "pt") as f:
        names = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in f.keys()})  # noqa: SIM118
    assert names == EXPECTED
    pipe = Flux2KleinPipeline.from_pretrained(folder)
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

    out = tmp_path / "g"
    args = ("generate", tmp_path / "m", "a sks dog in sks style", "-n", "2", "--seed", "7", "--steps", "2")
    cli_ok(*args, "-o", out, "--resolution", "32")
    a = np.asarray(Image.open(out / "00_seed7.png"))
    assert a.shape == (32, 32, 3) and not np.array_equal(a, np.asarray(Image.open(out / "00_seed8.png")))

    # b4m reads its klein LoRA files back (issue 17): the factors it wrote, and generate with two plain LoRAs.
    read, _ = load_lora(lora)
    assert sorted(read) == EXPECTED
    for name, (up, down) in made.factors().items():
        assert torch.equal(read[name][0], up) and torch.equal(read[name][1], down), name
    loras = [
        f"--{role}-lora={tmp_path / role[0] / f'{role}_lora_diffusers.safetensors'}" for role in ("content", "style")
    ]
    for combine in ("sum", "k-lora"):
        out = tmp_path / f"g-{combine}"
        cli_ok(
            "generate",
            "a sks dog in sks style",
            *loras,
            "--combine",
            combine,
            "--model",
            folder,
            "-n",
            "1",
            "--steps",
            "2",
            "--resolution",
            "32",
            "-o",
            out,
        )
        assert np.asarray(Image.open(out / "00_seed0.png")).shape == (32, 32, 3)


def _transformer_inputs(transformer) -> dict:
    g = torch.Generator().manual_seed(3)
    cfg = transformer.config
    text = torch.randn(1, 5, cfg.joint_attention_dim, generator=g)
    return dict(
        hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
        encoder_hidden_states=text,
        timestep=torch.tensor([0.6]),
        img_ids=Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, cfg.in_channels, 4, 4)),
        txt_ids=Flux2KleinPipeline._prepare_text_ids(text),
        guidance=None,
    )


def test_dry_run_lists_the_klein_targets(folder):
    output = cli_ok("dry-run", "--model", folder, "--rank", "4", "--modules").output
    listed = sorted(set(re.findall(r"(?:single_)?transformer_blocks\.\d+\.[\w.]+", output)))
    assert listed == EXPECTED
    for name, shape in (("attn.to_qkv_mlp_proj", "16 → 144"), ("attn.to_out", "64 → 16")):
        line = next(x for x in output.splitlines() if f"single_transformer_blocks.0.{name}" in x)
        assert all(n in line for n in re.findall(r"\d+", shape)), line


def test_a_rank_too_large_for_klein_is_refused_before_the_model_loads(folder, tmp_path, monkeypatch):
    import b4m.runs.stages as stages

    monkeypatch.setattr(stages, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    dog = save_square_images(tmp_path / "dog", 2, (120, 60, 20))
    args = ["content", "--images", dog, "--prompt", "a photo of sks dog", "-o", tmp_path / "c", "--model", folder]
    result = runner.invoke(app, [str(a) for a in [*args, "--rank", "17"]])
    assert result.exit_code != 0 and "rank 17 is larger than the narrowest adapted layer" in str(result.exception)
