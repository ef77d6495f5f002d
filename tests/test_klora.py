"""K-LoRA (b4m.adapter.klora, b4m.baselines.klora, b4m generate --combine): the Top-K scores and γ against hand
computations, exactly one LoRA added per layer and step, the step scale's flip from content to style, the sampler's
step announcements (b4m.models.steps) on the world and on a diffusers pipeline, the baseline through run_method with
direct merge's stage-1 LoRAs, and the command on two LoRA files. Tiny models, CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from b4m import B4MError
from b4m.adapter.klora import (
    KLoRALinear,
    KLoRASettings,
    add_klora,
    balance,
    klora_layers,
    remove_klora,
    style_factor,
    topk_sum,
)
from b4m.baselines import KLoRAResult, applied, klora_applied, run_method
from b4m.cli import app
from b4m.loading import load_model
from b4m.lora_files import load_lora, save_lora
from b4m.models.base import SampleRequest
from b4m.models.steps import step_listener
from conftest import TINY_SDXL_UNET, make_unet, unet_inputs
from tiny_pipelines import save_tiny_sd
from toy_model import ToyModel

runner = CliRunner()
FAST = {"steps": 2, "grad_accum": 1, "lr": 1e-2, "checkpoint_every": 100}
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: a second thread only spins (see tests/test_bench.py)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    return load_model("world")


def ints(shape, seed: int, low: int = -3, high: int = 4) -> torch.Tensor:
    """Integer-valued float32: every product and sum below is exact."""
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed)).float()


def int_linear(n: int = 5, m: int = 6, seed: int = 0) -> nn.Linear:
    layer = nn.Linear(n, m)
    with torch.no_grad():
        layer.weight.copy_(ints((m, n), seed))
        layer.bias.copy_(ints((m,), seed + 1))
    return layer


def loras_for(model: nn.Module, suffixes: tuple[str, ...], rank: int, seed: int, std: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        n: (torch.randn(m.out_features, rank, generator=g) * std, torch.randn(rank, m.in_features, generator=g) * std)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.endswith(suffixes)
    }


# --------------------------------------------------------------------------------------------------------------------
# The math, on nn.Linear


def test_topk_scores_and_gamma_equal_a_hand_computation():
    content = (ints((6, 2), 1), ints((2, 5), 2))
    style = (ints((6, 3), 3), ints((3, 5), 4))
    layer = KLoRALinear(int_linear(), "l", content, style)
    by_hand = []
    for up, down in (content, style):
        entries = sorted((abs(v) for v in (up @ down).flatten().tolist()), reverse=True)
        by_hand.append(sum(entries[: 2 * 3]))  # K = rc·rs = 6
    assert layer.scores == tuple(by_hand)
    assert layer.sums == tuple(float((u @ d).abs().sum()) for u, d in (content, style))
    assert topk_sum(torch.tensor([[1.0, -5.0], [3.0, 2.0]]), 2) == 8.0
    assert topk_sum(torch.tensor([[1.0, -5.0]]), 9) == 6.0  # K capped at the layer's size
    assert KLoRALinear(int_linear(), "l", content, style, top_k=1).scores == tuple(
        max(abs(v) for v in (u @ d).flatten().tolist()) for u, d in (content, style)
    )
    # γ: the mean of Σ|ΔWc| / Σ|ΔWs| over layers, then again without those at 3× the mean or more.
    assert balance([(2, 1), (8, 2), (3, 1), (100, 1), (5, 0)]) == 3.0  # 100 is dropped, (5, 0) has no ratio
    assert balance([]) == 1.0
    model = nn.ModuleDict({"a": int_linear(seed=5), "b": int_linear(seed=6)})
    c = {"a": content, "b": (ints((6, 2), 7), ints((2, 5), 8))}
    s = {"a": style, "b": (ints((6, 3), 9), ints((3, 5), 10))}
    klora = add_klora(model, c, s)
    ratios = [float((c[k][0] @ c[k][1]).abs().sum()) / float((s[k][0] @ s[k][1]).abs().sum()) for k in "ab"]
    assert klora.gamma == sum(ratios) / 2


@pytest.mark.parametrize("conv", [False, True])
def test_the_winning_lora_alone_is_added_exactly(conv):
    base = int_linear()
    content = (ints((6, 2), 1), ints((2, 5), 2))
    style = (ints((6, 3), 3), ints((3, 5), 4))
    if conv:  # a 1×1 convolution (SD 1.x's proj_in/proj_out) is the same linear map per pixel
        conv_layer = nn.Conv2d(5, 6, 1)
        with torch.no_grad():
            conv_layer.weight.copy_(base.weight[:, :, None, None])
            conv_layer.bias.copy_(base.bias)
        base = conv_layer
    model = nn.Sequential(base)
    # γ chosen so that content wins while S(f) = 1.5·f + 0.5 < 1, i.e. before a third of the sampling.
    probe = KLoRALinear(base, "0", content, style)
    klora = add_klora(model, {"0": content}, {"0": style}, KLoRASettings(gamma=probe.scores[0] / probe.scores[1]))
    x = ints((4, 3, 5), 11)
    if conv:
        x = x.permute(0, 2, 1)[..., None]  # (batch, channels, h, w)
    with pytest.raises(B4MError, match="no sampling step yet"):
        model(x)
    for index, role, (up, down) in ((0, "content", content), (9, "style", style)):
        klora.begin_step(index, 10)
        assert klora.choices() == {"0": role}
        delta = torch.einsum("oi,bihw->bohw", up @ down, x) if conv else x @ (up @ down).T
        expected = base(x) + delta
        assert torch.equal(model(x), expected)
    remove_klora(model)
    assert model[0] is base and not klora_layers(model)


def test_the_step_scale_favours_content_early_and_style_late():
    settings = KLoRASettings()
    assert [style_factor(f, settings) for f in (0.0, 0.5, 0.9)] == [0.5, 1.25, 1.85]  # s: α·f + β, α 1.5, β 0.5
    star = KLoRASettings(schedule="s*")
    assert star.beta_value == pytest.approx(1.275)  # β = 0.85·α
    assert style_factor(0.1, star) == pytest.approx(1.425) and style_factor(0.2, star) == pytest.approx(0.075)
    unet = make_unet(TINY_SDXL_UNET)
    content = loras_for(unet, ATTENTION, 4, seed=1, std=0.2)
    style = loras_for(unet, ATTENTION, 4, seed=2, std=0.2)
    klora = add_klora(unet, content, style)
    counts = []
    for i in range(10):
        klora.begin_step(i, 10)
        s = style_factor(i / 10, settings)
        for layer in klora.layers.values():  # the paper's rule, layer by layer
            assert layer.choice == ("content" if layer.scores[0] / klora.gamma > layer.scores[1] * s else "style")
        counts.append(sum(c == "content" for c in klora.choices().values()))
    assert counts == sorted(counts, reverse=True)  # layers only ever go over to the style LoRA
    assert counts[0] > len(content) / 2 > counts[-1]  # mostly content at the first step, mostly style at the last


def test_a_layer_only_one_lora_adapts_keeps_it_and_modules_are_checked():
    model = nn.ModuleDict({"a": int_linear(seed=1), "b": int_linear(seed=2), "c": nn.Conv2d(5, 6, 3)})
    c = {"a": (ints((6, 2), 1), ints((2, 5), 2))}
    s = {"b": (ints((6, 1), 3), ints((1, 5), 4))}
    klora = add_klora(model, c, s)
    for i in range(4):
        klora.begin_step(i, 4)
        assert klora.choices() == {"a": "content", "b": "style"}
    remove_klora(model)
    with pytest.raises(B4MError, match="module c is a Conv2d, not a linear layer or 1×1 convolution"):
        add_klora(model, {"c": (torch.zeros(6, 1), torch.zeros(1, 5))}, {})
    with pytest.raises(B4MError, match="module nope does not exist in the model"):
        add_klora(model, {"nope": c["a"]}, s)
    with pytest.raises(B4MError, match=r"a: style LoRA up \(6, 1\) / down \(1, 4\) does not fit the 5→6 layer"):
        add_klora(model, c, {"a": (ints((6, 1), 3), ints((1, 4), 4))})
    assert isinstance(model["a"], nn.Linear) and not klora_layers(model)  # nothing changed by a refused call
    with pytest.raises(B4MError, match="step 4 of 4 is not a sampling step"):
        add_klora(model, c, s).begin_step(4, 4)
    with pytest.raises(B4MError, match="schedule must be one of s, s\\*"):
        KLoRASettings(schedule="t")


# --------------------------------------------------------------------------------------------------------------------
# The sampler's step announcements


def fractions_seen(model, request: SampleRequest) -> tuple[list[tuple[int, int]], list[float]]:
    """What the step listener hears and the step fraction K-LoRA has at each call of the denoiser."""
    unet = model.denoiser
    content = loras_for(unet, ATTENTION, 2, seed=1, std=0.05)
    style = loras_for(unet, ATTENTION, 2, seed=2, std=0.05)
    heard, seen = [], []
    with step_listener(lambda i, n: heard.append((i, n))), klora_applied(unet, content, style) as klora:
        hook = unet.register_forward_pre_hook(lambda *_: seen.append(klora.fraction))
        try:
            model.sample(request)
        finally:
            hook.remove()
    assert not klora_layers(unet)
    return heard, seen


@pytest.mark.parametrize("steps", [10, 25])
def test_the_world_sampler_announces_the_true_step_fraction(world, steps):
    request = SampleRequest(["a large dog in plain style"], [0], steps=steps, height=16, width=16)  # 16 px: fast
    heard, seen = fractions_seen(world, request)
    assert heard == [(i, steps) for i in range(steps)]  # one step at a time, not a count of layer calls
    assert seen == [i / steps for i in range(steps)]  # one batched (guided) denoiser call per step


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return load_model(str(save_tiny_sd(tmp_path_factory.mktemp("pipelines") / "tiny-sd")))


@pytest.mark.parametrize(("steps", "scheduler"), [(10, "euler"), (25, "ddim")])
def test_a_diffusers_pipeline_announces_the_true_step_fraction(tiny_sd, steps, scheduler):
    request = SampleRequest(["a cat", "a dog"], [0], steps=steps, guidance_scale=4.0, scheduler=scheduler)
    heard, seen = fractions_seen(tiny_sd, request)
    one_prompt = [i / steps for i in range(steps)]
    assert heard == [(i, steps) for i in range(steps)] * 2  # each prompt is one pipeline call
    assert seen == one_prompt * 2


def sample_counted(model, content, style, request):
    """Images (int16) with K-LoRA on, the distinct choices it made over the steps, and how often one of its layers
    ran in Python."""
    import numpy as np

    choices, calls = [], []
    with klora_applied(model.denoiser, content, style) as klora:
        hook = next(iter(klora.layers.values())).register_forward_pre_hook(lambda *_: calls.append(1))
        with step_listener(lambda i, n: choices.append(tuple(klora.choices().values()))):
            images = np.stack([np.asarray(im, np.int16) for im in model.sample(request)])
        hook.remove()
    return images, len(set(choices)), len(calls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_step_choice_reaches_a_cuda_graph_of_the_denoiser(tmp_path):
    """SD/SDXL sample through CUDA graphs captured once (b4m.cuda_graphs): K-LoRA's in-place masks must steer every
    replay as they steer eager calls."""
    import numpy as np

    from tiny_pipelines import save_tiny_sdxl

    model = load_model(str(save_tiny_sdxl(tmp_path / "sdxl")), device="cuda")
    content = loras_for(model.denoiser, ATTENTION, 4, seed=1, std=0.3)
    style = loras_for(model.denoiser, ATTENTION, 4, seed=2, std=0.3)
    request = SampleRequest(["a photo of a cat"], [0, 1], steps=8, guidance_scale=4.0)
    model.sample_cuda_graphs = False
    eager, eager_choices, eager_calls = sample_counted(model, content, style, request)
    model.sample_cuda_graphs = True
    graphed, graphed_choices, graphed_calls = sample_counted(model, content, style, request)
    assert eager_choices == graphed_choices > 2  # the layers change sides during sampling
    assert graphed_calls < eager_calls == 8  # replays run no Python: the layer ran only to warm up and capture
    assert np.abs(graphed - eager).max() <= 1
    without = np.stack([np.asarray(im, np.int16) for im in model.sample(request)])
    assert np.abs(graphed - without).max() > 10  # and the LoRAs did something


# --------------------------------------------------------------------------------------------------------------------
# The baseline


def test_klora_runs_through_run_method_on_direct_merges_loras(tmp_path):
    model = ToyModel()
    from test_baselines import state, toy_sets  # the toy setup every baseline test uses

    before = state(model.denoiser)
    content_sets, style_sets = toy_sets(model)
    cache: dict = {}
    lora = {"lora": {"rank": 4}, "train": FAST}
    direct = run_method("direct_merge", content_sets, style_sets, model, lora, out=tmp_path / "dm", cache=cache)
    config = {**lora, "content_scale": 0.5, "klora": {"schedule": "s*"}}
    result = run_method("klora", content_sets, style_sets, model, config, out=tmp_path / "kl", cache=cache)
    assert isinstance(result, KLoRAResult) and result.factors == {} and result.settings.schedule == "s*"
    assert result.info["content"]["reused"] and result.info["style"]["reused"]  # trained once, for both methods
    assert sorted(k.split("/")[0] for k in cache) == ["lora", "lora"]
    assert result.parts["content"] is direct.parts["content"] and result.parts["style"] is direct.parts["style"]
    for name, (up, down) in result.parts["content"].factors().items():
        assert torch.equal(result.content[name][0], 0.5 * up) and torch.equal(result.content[name][1], down)

    # Sampling attaches K-LoRA: at a step, the denoiser is the base model with each layer's chosen LoRA merged.
    inputs = unet_inputs(model.denoiser)
    with result.applied(model.denoiser) as klora, torch.no_grad():
        klora.begin_step(3, 10)
        out = model.denoiser(**inputs).sample
        chosen = {n: (result.content if c == "content" else result.style)[n] for n, c in klora.choices().items()}
    with applied(model.denoiser, chosen), torch.no_grad():
        torch.testing.assert_close(out, model.denoiser(**inputs).sample, rtol=1e-4, atol=1e-5)
    after = model.denoiser.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)

    # Its export: the two LoRAs and a JSON of the settings (no single plain LoRA can hold K-LoRA).
    info = json.loads(result.save(tmp_path / "pair.safetensors").read_text())
    assert info["settings"]["schedule"] == "s*" and "--combine k-lora" in info["apply"]
    for role in ("content", "style"):
        loaded, _ = load_lora(tmp_path / info[f"{role}_lora"])
        ours = getattr(result, role)
        assert sorted(loaded) == sorted(ours) and all(torch.equal(loaded[n][0], ours[n][0]) for n in ours)


# --------------------------------------------------------------------------------------------------------------------
# b4m generate with two LoRA files


@pytest.fixture(scope="module")
def world_loras(world, tmp_path_factory):
    """A content LoRA on q/k/v and a style LoRA (kohya) on q/k/out of every attention of the world's UNet."""
    folder = tmp_path_factory.mktemp("loras")
    content = loras_for(world.denoiser, ("to_q", "to_k", "to_v"), 4, seed=1, std=0.1)
    style = loras_for(world.denoiser, ("to_q", "to_k", "to_out.0"), 2, seed=2, std=0.15)
    save_lora(content, folder / "content.safetensors")
    save_lora(style, folder / "style.safetensors", format="kohya", unet_config=world.denoiser)
    return folder


@pytest.mark.parametrize("combine", ["k-lora", "sum"])
def test_generate_combines_two_lora_files(world_loras, tmp_path, combine):
    from PIL import Image

    loras = ["--content-lora", str(world_loras / "content.safetensors")]
    loras += ["--style-lora", str(world_loras / "style.safetensors")]
    args = ["generate", *loras, "--combine", combine, "a large dog in plain style", "-n", "2", "--steps", "3"]
    result = runner.invoke(app, [*args, "--style-scale", "0.5", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_seed0.png", "00_seed1.png", "grid.png"]
    meta = json.loads(Image.open(tmp_path / "00_seed1.png").text["b4m"])
    assert meta["combine"] == combine and meta["style_scale"] == 0.5 and meta["model"] == "world"
    assert meta["prompt"] == "a large dog in plain style" and meta["content_lora"].endswith("content.safetensors")
    if combine == "k-lora":
        assert meta["k_lora"]["schedule"] == "s" and meta["k_lora"]["beta"] == 0.5 and meta["k_lora"]["gamma"] > 0


def test_generate_refuses_bad_lora_files_in_one_line_before_loading_a_model(world_loras, tmp_path, monkeypatch):
    import b4m.runs.generation as generate_module

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(generate_module, "load_model", no_loading)
    c, s = str(world_loras / "content.safetensors"), str(world_loras / "style.safetensors")
    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "plain.safetensors")
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # 96→96 in the world's UNet
    one = {name: (torch.zeros(7, 1), torch.zeros(1, 7))}
    save_lora(one, tmp_path / "other.safetensors")
    for base in ("sd_v1", "sdxl_base_v1-0"):  # kohya's record of the base model
        save_lora(one, tmp_path / f"{base}.safetensors", metadata={"ss_base_model_version": base})
    other, sd1, sdxl = (str(tmp_path / f"{n}.safetensors") for n in ("other", "sd_v1", "sdxl_base_v1-0"))

    def error(*flags: str) -> str:
        result = runner.invoke(app, ["generate", *flags, "a dog", "-o", str(tmp_path / "out")])
        assert isinstance(result.exception, B4MError), result.output
        assert "\n" not in str(result.exception)
        return str(result.exception)

    assert error("--content-lora", c).startswith(f"{c}: --content-lora needs --style-lora too")
    assert error("--style-lora", s).startswith(f"{s}: --style-lora needs --content-lora too")
    assert error("--content-lora", "nope.safetensors", "--style-lora", s) == "nope.safetensors: no such file"
    assert error("--content-lora", c, "--style-lora", str(tmp_path / "plain.safetensors")).startswith(
        f"{tmp_path / 'plain.safetensors'}: not a LoRA file"
    )
    assert error("--content-lora", other, "--style-lora", s).startswith(f"{other}, {s}: module {name} is 7→7 in one")
    assert error("--content-lora", sd1, "--style-lora", sdxl) == (
        f"{sd1}, {sdxl}: LoRAs of different base models (sd_v1 vs sdxl_base_v1-0)"
    )
    assert error("--content-lora", other, "--style-lora", other) == (
        f"{other}: module {name}: LoRA up (7, 1) / down (1, 7) does not fit the model's layer (out 96, in 96); "
        "expected up (96, r) and down (r, 96) (base model world; --model names the LoRA's own)"
    )
    assert error("--content-lora", c, "--style-lora", s, "--merge").startswith("--merge folds one fixed ΔW")
    assert error("--content-lora", c, "--style-lora", s, "--combine", "mean").startswith("--combine must be one of")
    assert not (tmp_path / "out").exists()
