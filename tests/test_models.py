"""The SD and SDXL model adapters on tiny pipelines built in code (tests/tiny_pipelines.py)."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from b4m import B4MError, PLPConfig, add_plp, plp_layers, remove_plp
from b4m.loading import MODEL_LOADERS, load_model, register_model
from b4m.models.base import Conditioning, SampleRequest
from b4m.models.loading import detect_checkpoint
from b4m.models.schedulers import SCHEDULERS, make_scheduler
from b4m.models.sd import StableDiffusionModel
from b4m.models.sdxl import StableDiffusionXLModel
from tiny_pipelines import IMAGE_SIZE, SD_TEXT, SDXL_POOLED, SDXL_TEXT, save_tiny_sd, save_tiny_sdxl

LATENT = IMAGE_SIZE // 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "sdxl": save_tiny_sdxl(root / "tiny-sdxl"),
        "sd": save_tiny_sd(root / "tiny-sd"),
        "sd_v": save_tiny_sd(root / "tiny-sd-v", prediction_type="v_prediction"),
    }


@pytest.fixture(scope="module")
def sdxl(folders):
    """Shared by tests that leave it unchanged; tests that attach adapters load their own."""
    return load_model(str(folders["sdxl"]))


@pytest.fixture(scope="module")
def sd(folders):
    return load_model(str(folders["sd"]))


def pixels(batch: int = 2, size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def arrays(images) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for im in images]


# --------------------------------------------------------------------------------------------------------------------
# Loading


def test_load_model_class_identity_resolution(folders, sdxl, sd):
    assert isinstance(sdxl, StableDiffusionXLModel)
    assert isinstance(sd, StableDiffusionModel)
    assert sdxl.identity == "sdxl:tiny-sdxl"
    assert sd.identity == "sd:tiny-sd"
    # native resolution: UNet sample size 16 × VAE factor 2
    assert sdxl.resolution == sd.resolution == IMAGE_SIZE
    assert load_model(str(folders["sd"]), resolution=48).resolution == 48
    assert load_model(str(folders["sd"]), identity="sd:my-base").identity == "sd:my-base"
    assert sdxl.device == torch.device("cpu")
    assert sdxl.train_scheduler.config.prediction_type == "epsilon"
    assert sdxl.num_train_timesteps == 1000


def test_dtype_applies_to_denoiser_and_text_encoders_not_vae(folders):
    model = load_model(str(folders["sdxl"]), dtype=torch.bfloat16)
    assert model.unet.dtype == torch.bfloat16
    assert model.text_encoder.dtype == model.text_encoder_2.dtype == torch.bfloat16
    assert model.vae.dtype == torch.float32
    cond = model.encode_prompts(["a cat"])
    noisy = torch.randn(1, 4, LATENT, LATENT)
    assert model.predict(noisy, torch.tensor([10]), cond).dtype == torch.bfloat16


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_fp16_files_load_as_bf16_with_the_same_values(folders, tmp_path, variant):
    """Weights stored in float16 for a bfloat16 run load as stored and are cast after the move (on a GPU, there):
    the model is the one a cast while loading gives, weight for weight."""
    from diffusers import StableDiffusionXLPipeline

    from b4m.models.loading import stored_half_dtypes

    folder = tmp_path / "fp16"
    pipe = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"])
    pipe.unet.half(), pipe.text_encoder.half(), pipe.text_encoder_2.half()
    pipe.save_pretrained(folder, variant=variant)
    assert stored_half_dtypes(folder, variant) == {
        "text_encoder": torch.float16,
        "text_encoder_2": torch.float16,
        "unet": torch.float16,
    }
    assert stored_half_dtypes(folder, "other" if variant is None else None) == {}  # no such files
    asked = []
    real = StableDiffusionXLPipeline.from_pretrained.__func__
    with pytest.MonkeyPatch.context() as mp:  # what diffusers is asked to load: the files' own dtype
        mp.setattr(
            StableDiffusionXLPipeline,
            "from_pretrained",
            classmethod(lambda c, *a, **k: asked.append(k) or real(c, *a, **k)),
        )
        model = load_model(str(folder), dtype=torch.bfloat16, variant=variant)
    assert [k.get("dtype", k.get("torch_dtype"))["unet"] for k in asked] == [torch.float16]
    assert model.unet.dtype == model.text_encoder.dtype == model.text_encoder_2.dtype == torch.bfloat16
    assert model.vae.dtype == torch.float32
    for module, stored in [(model.unet, pipe.unet), (model.text_encoder_2, pipe.text_encoder_2)]:
        want = {k: v.to(torch.bfloat16) for k, v in stored.state_dict().items() if v.is_floating_point()}
        got = module.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())


def test_folder_with_other_class_name_but_text_time_unet_is_sdxl(folders, tmp_path):
    copy = shutil.copytree(folders["sdxl"], tmp_path / "renamed")
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "MyXLPipeline"}))
    assert isinstance(load_model(str(copy)), StableDiffusionXLModel)


def test_unsupported_pipeline_class(folders, tmp_path):
    copy = shutil.copytree(folders["sd"], tmp_path / "other")
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(B4MError, match=r"other: unsupported pipeline 'KandinskyPipeline'"):
        load_model(str(copy))


def test_bad_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(B4MError, match=r"empty: not a diffusers model folder \(no model_index.json\)"):
        load_model(str(tmp_path / "empty"))
    missing = tmp_path / "nothing-here"
    with pytest.raises(B4MError) as err:
        load_model(str(missing))
    assert str(err.value) == f"{missing}: no such file or folder"
    for name in ("missing.safetensors", "models/missing.safetensors", "a/b/c"):
        with pytest.raises(B4MError, match=f"^{name}: no such file or folder$"):
            load_model(name)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not really a pickle")
    with pytest.raises(B4MError, match=r"model.ckpt: .ckpt checkpoints are pickles .* convert it to .safetensors"):
        load_model(str(pickle))


def test_registry_names_come_first(sd):
    calls = []

    def loader(**kwargs):
        calls.append(kwargs)
        return sd

    register_model("tiny-registered", loader)
    try:
        assert load_model("tiny-registered", resolution=64) is sd
    finally:
        del MODEL_LOADERS["tiny-registered"]
    assert calls == [{"device": "cpu", "dtype": None, "variant": None, "resolution": 64}]


# --------------------------------------------------------------------------------------------------------------------
# Single-file checkpoints (detection only: loading one needs real weights and configs from the Hub)


def test_detect_checkpoint(tmp_path):
    def t():
        return torch.zeros(2)

    sdxl_file, sd_file, other = tmp_path / "xl.safetensors", tmp_path / "sd.safetensors", tmp_path / "o.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": t(),
            "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": t(),
            "conditioner.embedders.1.model.text_projection": t(),
        },
        sdxl_file,
    )
    save_file({"model.diffusion_model.input_blocks.0.0.weight": t(), "cond_stage_model.transformer.x": t()}, sd_file)
    save_file({"unet.conv_in.weight": t()}, other)
    assert detect_checkpoint(sdxl_file) is StableDiffusionXLModel
    assert detect_checkpoint(str(sd_file)) is StableDiffusionModel
    with pytest.raises(B4MError, match=r"o.safetensors: not an SD or SDXL checkpoint"):
        detect_checkpoint(other)
    with pytest.raises(B4MError, match=r"o.safetensors: not an SD or SDXL checkpoint"):
        load_model(str(other))  # detection runs before anything is loaded
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x00" * 16)
    with pytest.raises(B4MError, match=r"broken.safetensors: not a readable .safetensors file"):
        detect_checkpoint(garbage)
    with pytest.raises(B4MError, match=r"w.pt: .pt checkpoints are pickles"):
        detect_checkpoint(tmp_path / "w.pt")


# --------------------------------------------------------------------------------------------------------------------
# Text conditioning


def test_sdxl_encode_prompts(sdxl):
    cond = sdxl.encode_prompts(["a photo of a cat", "a dog", "a photo of a cat"], size=(48, 64))
    assert cond.hidden.shape == (3, 77, sum(SDXL_TEXT))
    assert cond.extra["text_embeds"].shape == (3, SDXL_POOLED)
    assert torch.equal(cond.extra["time_ids"], torch.tensor([[48.0, 64, 0, 0, 48, 64]] * 3))
    # the same prompt twice in a batch: equal up to the rounding of row-blocked matmuls
    torch.testing.assert_close(cond.hidden[0], cond.hidden[2])
    torch.testing.assert_close(cond.extra["text_embeds"][0], cond.extra["text_embeds"][2])
    assert not torch.allclose(cond.hidden[0], cond.hidden[1])
    assert not torch.allclose(cond.extra["text_embeds"][0], cond.extra["text_embeds"][1])
    default = sdxl.encode_prompts(["a dog"])
    assert torch.equal(
        default.extra["time_ids"][0], torch.tensor([IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE])
    )
    torch.testing.assert_close(default.hidden, cond.hidden[1:2])  # batch size changes float rounding
    again = sdxl.encode_prompts(["a dog"])
    assert torch.equal(again.hidden, default.hidden)
    assert torch.equal(again.extra["text_embeds"], default.extra["text_embeds"])


def test_sdxl_encode_prompts_matches_pipeline(sdxl):
    pipe = sdxl.pipeline()
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a photo of a cat", device="cpu")
    cond = sdxl.encode_prompts(["a photo of a cat", ""])
    torch.testing.assert_close(cond.hidden[:1], embeds)  # batch size changes float rounding
    torch.testing.assert_close(cond.extra["text_embeds"][:1], pooled)  # batch size changes float rounding
    # force_zeros_for_empty_prompt: "" is the pipeline's all-zero unconditional embedding
    assert sdxl.force_zeros_for_empty_prompt
    assert torch.equal(cond.hidden[1:], negative) and not negative.any()
    assert torch.equal(cond.extra["text_embeds"][1:], negative_pooled)


def test_sdxl_empty_prompt_without_force_zeros_encodes_empty_string(folders):
    model = load_model(str(folders["sdxl"]))
    model.force_zeros_for_empty_prompt = False
    cond = model.encode_prompts([""])
    _, negative, _, negative_pooled = model.pipeline().encode_prompt("a cat", device="cpu", negative_prompt="")
    assert cond.hidden.any()
    torch.testing.assert_close(cond.hidden, negative)  # batch size changes float rounding
    torch.testing.assert_close(cond.extra["text_embeds"], negative_pooled)  # batch size changes float rounding


def test_sd_encode_prompts_matches_pipeline(sd):
    cond = sd.encode_prompts(["a photo of a cat", "a dog", ""], size=(48, 48))
    assert cond.hidden.shape == (3, 77, SD_TEXT)
    assert cond.extra == {}
    embeds, negative = sd.pipeline().encode_prompt("a photo of a cat", "cpu", 1, True)
    torch.testing.assert_close(cond.hidden[:1], embeds)  # batch size changes float rounding
    torch.testing.assert_close(cond.hidden[2:], negative)  # batch size changes float rounding
    assert not torch.allclose(cond.hidden[0], cond.hidden[1])


# --------------------------------------------------------------------------------------------------------------------
# Latents, noise, prediction


@pytest.mark.parametrize("name", ["sdxl", "sd"])
def test_encode_images_is_scaled_posterior_mean(name, sdxl, sd):
    model = {"sdxl": sdxl, "sd": sd}[name]
    x = pixels()
    latents = model.encode_images(x)
    assert latents.shape == (2, 4, LATENT, LATENT)
    assert latents.dtype == torch.float32
    with torch.no_grad():
        expected = model.vae.encode(x).latent_dist.mode() * model.vae.config.scaling_factor
    torch.testing.assert_close(latents, expected)
    assert torch.equal(model.encode_images(x), latents)  # deterministic
    decoded = model.decode_latents(latents)
    assert decoded.shape == x.shape


def test_encode_images_shift_factor(folders):
    model = load_model(str(folders["sd"]))
    x = pixels(1)
    plain = model.encode_images(x)
    model.vae.register_to_config(shift_factor=0.25)
    sf = model.vae.config.scaling_factor
    torch.testing.assert_close(model.encode_images(x), plain - 0.25 * sf)


@pytest.mark.parametrize("name", ["sdxl", "sd"])
def test_predict_equals_unet(name, sdxl, sd):
    model = {"sdxl": sdxl, "sd": sd}[name]
    cond = model.encode_prompts(["a cat", "a dog"])
    noisy = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        out = model.predict(noisy, t, cond)
        direct = model.unet(noisy, t, encoder_hidden_states=cond.hidden, added_cond_kwargs=cond.extra or None).sample
    assert out.shape == noisy.shape
    assert torch.equal(out, direct)


def test_noise_and_target_follow_ddpm(sdxl, folders):
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, LATENT, LATENT, generator=g), torch.randn(3, 4, LATENT, LATENT, generator=g)
    t = torch.tensor([0, 500, 999])
    ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.equal(sdxl.add_noise(latents, noise, t), ddpm.add_noise(latents, noise, t))
    assert torch.equal(sdxl.target(latents, noise, t), noise)

    v_model = load_model(str(folders["sd_v"]))
    assert v_model.prediction_type == "v_prediction"
    v_ddpm = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction"
    )
    assert torch.equal(v_model.target(latents, noise, t), v_ddpm.get_velocity(latents, noise, t))
    # v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0: at t=0 almost all noise
    assert not torch.allclose(v_model.target(latents, noise, t), noise)


# --------------------------------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("name", ["sdxl", "sd"])
def test_sample_is_deterministic_per_seed(name, sdxl, sd):
    model = {"sdxl": sdxl, "sd": sd}[name]
    request = SampleRequest(prompts=["a photo of a cat", "a dog"], seeds=[1, 2], steps=3, guidance_scale=4.0)
    first = model.sample(request)
    assert len(first) == 4
    assert all(im.size == (IMAGE_SIZE, IMAGE_SIZE) and im.mode == "RGB" for im in first)
    a, b = arrays(first), arrays(model.sample(request))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], a[1])  # seeds differ
    assert not np.array_equal(a[0], a[2])  # prompts differ
    # an image depends on its seed only, not on the other seeds of the request
    alone = arrays(model.sample(SampleRequest(prompts=["a dog"], seeds=[2], steps=3, guidance_scale=4.0)))
    assert np.abs(alone[0] - a[3]).max() <= 1


def test_sample_size_negative_prompt_and_empty_requests(sd):
    request = SampleRequest(prompts=["a cat"], seeds=[0], steps=2, height=48, width=64)
    (image,) = sd.sample(request)
    assert image.size == (64, 48)
    base = arrays([image])[0]
    negative = arrays(sd.sample(SampleRequest(**{**request.__dict__, "negative_prompt": "a dog"})))[0]
    assert not np.array_equal(base, negative)
    assert sd.sample(SampleRequest(prompts=[], seeds=[0])) == []


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_samples(scheduler, sd, folders):
    made = make_scheduler(scheduler, sd.sampling_scheduler.config)
    assert isinstance(made, SCHEDULERS[scheduler])
    v_config = load_model(str(folders["sd_v"])).sampling_scheduler.config
    assert make_scheduler(scheduler, v_config).config.prediction_type == "v_prediction"
    if "clip_sample" in made.config:  # not in the tiny PNDM config: latent models must not clip
        assert made.config.clip_sample is False
    images = sd.sample(SampleRequest(prompts=["a cat"], seeds=[0, 1], steps=2, scheduler=scheduler))
    assert len(images) == 2


def test_unknown_scheduler(sd):
    with pytest.raises(B4MError, match=r"unknown scheduler 'warp'; valid names: euler, euler_a, dpm\+\+, ddim"):
        make_scheduler("warp", sd.sampling_scheduler.config)
    with pytest.raises(B4MError, match="'warp'"):
        sd.sample(SampleRequest(prompts=["a cat"], seeds=[0], steps=2, scheduler="warp"))


@pytest.mark.parametrize("name", ["sdxl", "sd"])
def test_sample_uses_attached_plp(name, folders):
    model = load_model(str(folders[name]))
    request = SampleRequest(prompts=["a photo of a cat"], seeds=[5], steps=3)
    base = arrays(model.sample(request))[0]
    layers = add_plp(model.denoiser, PLPConfig(rank=4))
    assert layers
    model.denoiser.train()
    zero = arrays(model.sample(request))[0]
    assert model.denoiser.training  # restored after sampling
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for layer in plp_layers(model.denoiser).values():
            layer.up_learned.copy_(torch.randn(layer.up_learned.shape, generator=g))
            layer.down_learned.copy_(torch.randn(layer.down_learned.shape, generator=g))
    learned = arrays(model.sample(request))[0]
    assert np.abs(learned - zero).max() > 0
    remove_plp(model.denoiser)
    assert np.array_equal(arrays(model.sample(request))[0], base)  # the base model again, bit for bit


# --------------------------------------------------------------------------------------------------------------------
# Placement


def test_to_keeps_adapters_and_vae_in_their_dtypes(folders):
    model = load_model(str(folders["sdxl"]))
    add_plp(model.denoiser, PLPConfig(rank=4))
    learned = next(iter(plp_layers(model.denoiser).values())).up_learned
    assert model.to("cpu", torch.bfloat16) is model
    assert model.dtype == torch.bfloat16
    assert model.unet.conv_in.weight.dtype == torch.bfloat16
    layer = next(iter(plp_layers(model.denoiser).values()))
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.up_learned is learned and learned.dtype == torch.float32
    assert layer.up_frozen.dtype == layer.down_frozen.dtype == torch.float32
    assert model.text_encoder_2.dtype == torch.bfloat16
    assert model.vae.dtype == torch.float32
    cond = model.encode_prompts(["a cat"])
    out = model.predict(torch.randn(1, 4, LATENT, LATENT), torch.tensor([3]), cond)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_offload_encoders_keeps_encoding_working(folders):
    model = load_model(str(folders["sd"]))
    before = model.encode_prompts(["a cat"])
    model.offload_encoders()
    assert model.text_encoder.device == model.vae.device == torch.device("cpu")
    after = model.encode_prompts(["a cat"])
    assert isinstance(after, Conditioning)
    assert torch.equal(before.hidden, after.hidden)


@pytest.mark.parametrize("offline", [False, True], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_an_uncached_hub_id_without_the_hub_is_one_line_at_once(tmp_path, offline):
    # The Hub client would retry for about 40 s, printing each retry, then fail in several lines.
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "b4m.cli", "dry-run", "--model", "someone/some-model"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert time.perf_counter() - start < 30
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Retrying" not in proc.stderr
    why = "HF_HUB_OFFLINE is set" if offline else "http://127.0.0.1:9 cannot be reached"
    assert proc.stderr.startswith(f"error: someone/some-model: not in the local Hugging Face cache and {why}")
    assert "hf download someone/some-model" in proc.stderr


def test_cuda_models_keep_attention_off_cudnn_and_cpu_ones_leave_it():
    """FLUX on a GPU avoids cuDNN's attention kernel (its backward failed at FLUX's shapes on an H200); a CPU run
    changes nothing (the switch is process-wide)."""
    from b4m.device import avoid_cudnn_attention

    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        avoid_cudnn_attention("cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        avoid_cudnn_attention(torch.device("cuda", 0))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
