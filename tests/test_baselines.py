"""The comparison methods (b4m.baselines): values of each method's ΔW, the one training loop, plain-LoRA export
checked against diffusers' own loader, and the uniform run_method interface. Tiny models, CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from torch import nn

import b4m.training.runs as runs_module
from b4m import B4MError, PLPConfig, add_plp, plp_layers
from b4m.adapter.file import apply_adapter
from b4m.baselines import (
    METHODS,
    ZipLoRAConfig,
    add_ziplora,
    applied,
    blora_blocks,
    direct_merge_factors,
    method_config,
    run_method,
    ziplora_merge,
)
from b4m.baselines.common import joint_sets, plain_lora
from b4m.baselines.ziplora import ZipLoRALinear, merge_train_config, similarity, teacher_mode, ziplora_layers
from b4m.lora_files import apply_factors, load_lora
from b4m.method import MakeConfig, make_sets
from b4m.training.config import TrainConfig
from b4m.training.loop import micro_step_loss
from b4m.training.sets import TrainSet
from b4m.unet_skeleton import unet_skeleton
from conftest import TINY_SD_UNET, TINY_SDXL_UNET, make_unet, unet_inputs
from toy_model import ToyModel

TOL = dict(rtol=1e-4, atol=1e-5)
SDXL_CONFIG = Path("/work/shared/reference/sdxl-unet-config.json")
FAST = {"steps": 2, "grad_accum": 1, "lr": 1e-2, "checkpoint_every": 100}
LORA = {"rank": 4}


def toy_sets(model: ToyModel, seed: int = 5) -> tuple[list[TrainSet], list[TrainSet]]:
    """A content set and an auxiliary set (B4M's), and a style set and an auxiliary set."""
    g = torch.Generator().manual_seed(seed)

    def one(name: str, prompt: str, n: int, main: bool = True, weight: float = 1.0) -> TrainSet:
        return TrainSet(name, torch.randn(n, 4, 8, 8, generator=g), model.encode_prompts([prompt] * n), weight, main)

    content = [one("dog", "a sks dog", 3), one("aux-watercolor", "a house in watercolor style", 2, False)]
    style = [one("yarn", "a cat in zwx style", 2), one("aux-teapot", "a photo of a teapot", 2, False)]
    return content, style


def int_factors(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict:
    """Integer-valued factors: every product and sum below is exact in float32."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: (
            torch.randint(-3, 4, (m, rank), generator=g).float(),
            torch.randint(-3, 4, (rank, n), generator=g).float(),
        )
        for name, (m, n) in shapes.items()
    }


def linear_shapes(unet: nn.Module, suffixes: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    return {
        n: (m.out_features, m.in_features)
        for n, m in unet.named_modules()
        if isinstance(m, nn.Linear) and n.endswith(suffixes)
    }


def random_factors(shapes: dict[str, tuple[int, int]], rank: int, seed: int, std: float = 0.1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        n: (torch.randn(m, rank, generator=g) * std, torch.randn(rank, k, generator=g) * std)
        for n, (m, k) in shapes.items()
    }


@torch.no_grad()
def outputs(unet) -> torch.Tensor:
    return unet(**unet_inputs(unet)).sample


def load_with_diffusers(path, config: dict = TINY_SD_UNET):
    """A fresh base UNet with the file loaded the way ``pipe.load_lora_weights`` does it (UNet part only)."""
    unet = make_unet(config)
    sdxl = config is TINY_SDXL_UNET
    pipeline_cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    kwargs = {"unet_config": unet.config} if sdxl else {}
    state_dict, alphas, metadata = pipeline_cls.lora_state_dict(str(path), return_lora_metadata=True, **kwargs)
    assert all("lora" in k for k in state_dict)
    pipeline_cls.load_lora_into_unet(state_dict, network_alphas=alphas, unet=unet, metadata=metadata)
    return unet


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_untouched(model: ToyModel, before: dict[str, torch.Tensor]) -> None:
    """The method took its adapters off again: same modules, bit-identical weights."""
    after = model.denoiser.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not plp_layers(model.denoiser) and not ziplora_layers(model.denoiser)


# --------------------------------------------------------------------------------------------------------------------
# The loop's Objective hook (what ZipLoRA's merge runs on)


class QuadraticObjective:
    """Trains one scalar p against the penalty (p - 3)²; the target is the prediction itself (zero MSE)."""

    name = "quadratic"

    def __init__(self) -> None:
        self.p = nn.Parameter(torch.zeros(()))
        self.sources: list[list[int]] = []

    def param_groups(self, config):
        return [{"params": [self.p], "lr": config.lr}]

    def target(self, model, noisy, timesteps, cond, sources):
        self.sources.append(list(sources))
        return model.predict(noisy, timesteps, cond)

    def penalty(self):
        return (self.p - 3.0) ** 2

    def state_dict(self):
        return {"p": self.p.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.p.copy_(state["p"])


def test_the_loop_trains_an_objective_and_checkpoints_its_state(tmp_path):
    from b4m.training.loop import train

    model = ToyModel()
    before = state(model.denoiser)
    content_sets, style_sets = toy_sets(model)
    sets = [content_sets[1], content_sets[0], style_sets[0]]  # an auxiliary set first: rows go main sets first
    objective = QuadraticObjective()
    config = TrainConfig(
        steps=3,
        lr=0.1,
        optimizer="sgd",
        weight_decay=0.0,
        routing="none",
        grad_accum=2,
        batch_size=2,
        max_grad_norm=None,
        check_every=1,
    )
    result = train(model, None, sets, config, tmp_path, objective=objective)
    assert objective.sources[0] == [1, 1, 2, 2, 0, 0]
    p = 0.0
    for _ in range(3):  # SGD on (p - 3)²; the two micro-steps' halves add up to one full gradient
        p -= 0.1 * 2 * (p - 3.0)
    assert objective.p.item() == pytest.approx(p, rel=1e-6)
    assert result.losses[0][1] == pytest.approx(9.0, rel=1e-6)  # step 1: zero MSE + (0 - 3)²
    assert torch.equal(model.denoiser.state_dict()["conv_in.weight"], before["conv_in.weight"])
    ckpt = tmp_path / "checkpoints" / "step-000003"
    assert (ckpt / "objective.safetensors").exists() and not (ckpt / "adapter.b4m.safetensors").exists()
    with pytest.raises(B4MError, match="needs routing none"):
        train(model, None, sets, TrainConfig(routing="mixed", owned="up"), tmp_path, objective=objective)
    with pytest.raises(B4MError, match="no PLP config given"):
        train(model, None, sets, config, tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# Direct merge (eq. 3)


def test_direct_merge_is_eq3_exactly_with_rank_rc_plus_rs():
    shapes = {"a.to_q": (6, 5), "a.to_k": (6, 7), "a.to_v": (6, 5)}
    content = int_factors({k: shapes[k] for k in ("a.to_q", "a.to_k")}, 3, seed=0)
    style = int_factors({k: shapes[k] for k in ("a.to_q", "a.to_v")}, 2, seed=1)
    merged = direct_merge_factors(content, style, 0.5, 2.0)
    assert sorted(merged) == ["a.to_k", "a.to_q", "a.to_v"]
    up, down = merged["a.to_q"]
    assert up.shape == (6, 5) and down.shape == (5, 5)  # rank 3 + 2
    expected = 0.5 * content["a.to_q"][0] @ content["a.to_q"][1] + 2.0 * style["a.to_q"][0] @ style["a.to_q"][1]
    assert torch.equal(up @ down, expected)
    assert torch.equal(merged["a.to_k"][0] @ merged["a.to_k"][1], 0.5 * content["a.to_k"][0] @ content["a.to_k"][1])
    assert torch.equal(merged["a.to_v"][0] @ merged["a.to_v"][1], 2.0 * style["a.to_v"][0] @ style["a.to_v"][1])
    # Real-valued factors in float64: equal to rounding.
    c64 = {k: (u.double() / 7, d.double() / 3) for k, (u, d) in content.items()}
    s64 = {k: (u.double() / 5, d.double() / 11) for k, (u, d) in style.items()}
    m64 = direct_merge_factors(c64, s64, 0.3, 1.7)["a.to_q"]
    want = 0.3 * c64["a.to_q"][0] @ c64["a.to_q"][1] + 1.7 * s64["a.to_q"][0] @ s64["a.to_q"][1]
    torch.testing.assert_close(m64[0] @ m64[1], want, rtol=1e-12, atol=1e-12)


def test_direct_merge_run_exports_a_lora_that_diffusers_loads(tmp_path):
    model = ToyModel()
    before = state(model.denoiser)
    content_sets, style_sets = toy_sets(model)
    config = {"lora": LORA, "train": FAST, "content_scale": 0.7, "style_scale": 1.3}
    result = run_method("direct_merge", content_sets, style_sets, model, config, out=tmp_path)
    assert_untouched(model, before)
    assert set(result.ranks().values()) == {8}

    reference = make_unet(TINY_SD_UNET)  # the two LoRAs applied one after the other with their weights
    apply_factors(reference, result.parts["content"].factors(), scale=0.7)
    apply_factors(reference, result.parts["style"].factors(), scale=1.3)
    path = result.save(tmp_path / "direct.safetensors")
    torch.testing.assert_close(outputs(load_with_diffusers(path)), outputs(reference), **TOL)
    assert not torch.allclose(outputs(reference), outputs(make_unet(TINY_SD_UNET)), **TOL)
    assert result.info["content"]["steps"] == 2 and not result.info["content"]["reused"]


# --------------------------------------------------------------------------------------------------------------------
# ZipLoRA


def zip_pair(unet: nn.Module):
    """A content LoRA on q/k/v and a style LoRA on q/k/out.0 of every attention (partial overlap, other ranks)."""
    content = random_factors(linear_shapes(unet, ("to_q", "to_k", "to_v")), 3, seed=1)
    style = random_factors(linear_shapes(unet, ("to_q", "to_k", "to_out.0")), 2, seed=2)
    return content, style


def test_ziplora_mergers_start_at_one_so_step_zero_is_the_direct_merge():
    unet = make_unet(TINY_SDXL_UNET)
    content, style = zip_pair(unet)
    layers = add_ziplora(unet, content, style)
    assert sorted(layers) == sorted(set(content) | set(style))
    for name, layer in layers.items():
        n = layer.in_features
        assert torch.equal(layer.merger_content.detach(), torch.ones(n))
        assert torch.equal(layer.merger_style.detach(), torch.ones(n))
        assert layer.has_both == (name in content and name in style)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == {
        f"{name}.{m}" for name in layers for m in ("merger_content", "merger_style")
    }
    reference = make_unet(TINY_SDXL_UNET)
    apply_factors(reference, direct_merge_factors(content, style))
    torch.testing.assert_close(outputs(unet), outputs(reference), **TOL)


def test_similarity_terms_equal_their_closed_forms():
    def layer(n: int, mc: list[float], ms: list[float], both: bool = True) -> ZipLoRALinear:
        pair = (torch.zeros(2, 1), torch.zeros(1, n))
        out = ZipLoRALinear(nn.Linear(n, 2), f"l{n}", pair, pair if both else None)
        with torch.no_grad():
            out.merger_content.copy_(torch.tensor(mc))
            out.merger_style.copy_(torch.tensor(ms))
        return out

    layers = {
        "a": layer(3, [1.0, 2.0, 3.0], [4.0, -5.0, 6.0]),  # m_c · m_s = 4 - 10 + 18 = 12
        "b": layer(2, [1.0, 1.0], [2.0, 0.0]),  # m_c · m_s = 2
        "c": layer(2, [5.0, 5.0], [5.0, 5.0], both=False),  # one LoRA only: no term
    }
    assert similarity(layers, "dot").item() == pytest.approx(12 / 3 + 2 / 2)
    assert similarity(layers, "elementwise").item() == pytest.approx((4 + 10 + 18) / 3 + (2 + 0) / 2)
    cosine = 12 / math.sqrt(14 * 77) + 2 / (math.sqrt(2) * 2)
    assert similarity(layers, "cosine").item() == pytest.approx(cosine, rel=1e-6)
    with pytest.raises(B4MError, match="similarity must be one of"):
        similarity(layers, "l2")


def test_dot_similarity_pushes_from_the_ones_init_and_cosine_does_not():
    """The public implementation's cosine term has no gradient at m_c = m_s = 1 (its issues #9/#10)."""
    grads = {}
    for kind in ("dot", "cosine"):
        pair = (torch.zeros(2, 1), torch.zeros(1, 4))
        layer = ZipLoRALinear(nn.Linear(4, 2), "l", pair, pair)
        similarity({"l": layer}, kind).backward()
        grads[kind] = layer.merger_content.grad
    torch.testing.assert_close(grads["dot"], torch.full((4,), 0.25))  # ∂|m_c·m_s|/n / ∂m_c = m_s / n
    assert grads["cosine"].abs().max() < 1e-6


def test_teacher_rows_run_each_lora_alone():
    unet = make_unet(TINY_SDXL_UNET)
    content, style = zip_pair(unet)
    layers = add_ziplora(unet, content, style, init_content=0.3, init_style=2.0)  # mergers must not matter
    inputs = unet_inputs(unet, batch=2)
    with torch.no_grad(), teacher_mode(layers, torch.tensor([True, False])):
        both = unet(**inputs).sample
    content_only, style_only = make_unet(TINY_SDXL_UNET), make_unet(TINY_SDXL_UNET)
    apply_factors(content_only, content)
    apply_factors(style_only, style)
    with torch.no_grad():
        torch.testing.assert_close(both[:1], content_only(**inputs).sample[:1], **TOL)
        torch.testing.assert_close(both[1:], style_only(**inputs).sample[1:], **TOL)
    assert all(layer.teacher is None for layer in layers.values())


def test_ziplora_export_reproduces_delta_exactly_and_loads_in_diffusers(tmp_path):
    # Exactness: integer factors, mergers that are powers of two.
    shapes = {"x.to_q": (6, 5), "x.to_k": (6, 5)}
    content, style = int_factors(shapes, 3, seed=3), int_factors({"x.to_q": (6, 5)}, 2, seed=4)
    host = nn.Module()
    host.x = nn.Module()
    host.x.to_q, host.x.to_k = nn.Linear(5, 6), nn.Linear(5, 6)
    layers = add_ziplora(host, content, style)
    with torch.no_grad():
        layers["x.to_q"].merger_content.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0, 0.0]))
        layers["x.to_q"].merger_style.copy_(torch.tensor([2.0, -0.5, 1.0, 4.0, 0.25]))
    up, down = layers["x.to_q"].factors()
    assert up.shape == (6, 5) and down.shape == (5, 5)  # rank 3 + 2
    mc, ms = layers["x.to_q"].merger_content.detach(), layers["x.to_q"].merger_style.detach()
    expected = (content["x.to_q"][0] @ content["x.to_q"][1]) * mc + (style["x.to_q"][0] @ style["x.to_q"][1]) * ms
    assert torch.equal(up @ down, expected)
    assert torch.equal(layers["x.to_q"].delta_weight().detach(), expected)
    assert layers["x.to_k"].factors()[0].shape == (6, 3)  # content only: its own rank

    # End to end on a tiny SDXL UNet: the exported file, loaded by diffusers, is the in-memory ZipLoRA model.
    unet = make_unet(TINY_SDXL_UNET)
    content, style = zip_pair(unet)
    layers = add_ziplora(unet, content, style)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for layer in layers.values():
            layer.merger_content.copy_(torch.rand(layer.in_features, generator=g) * 2 - 0.5)
            layer.merger_style.copy_(torch.rand(layer.in_features, generator=g) * 2 - 0.5)
    expected = outputs(unet)
    from b4m.baselines.ziplora import merged_factors
    from b4m.lora_files import save_lora

    factors = merged_factors(layers)
    for fmt in ("diffusers", "kohya"):
        path = tmp_path / f"zip_{fmt}.safetensors"
        save_lora(factors, path, format=fmt, unet_config=unet.config)
        torch.testing.assert_close(outputs(load_with_diffusers(path, TINY_SDXL_UNET)), expected, **TOL)
    loaded, _ = load_lora(tmp_path / "zip_diffusers.safetensors")
    for name, layer in layers.items():
        torch.testing.assert_close(loaded[name][0] @ loaded[name][1], layer.delta_weight().detach())


def test_ziplora_merge_trains_only_the_mergers_on_the_loop_and_resumes_exactly(tmp_path):
    config = ZipLoRAConfig(merge=merge_train_config(steps=4, checkpoint_every=2, check_every=1))
    model = ToyModel()
    before = state(model.denoiser)
    content_sets, style_sets = toy_sets(model)
    content, style = zip_pair(model.denoiser)
    factors, mergers, result = ziplora_merge(model, content, style, content_sets, style_sets, config, tmp_path / "a")
    assert_untouched(model, before)
    assert result.steps == 4 and all(math.isfinite(loss) for _, loss in result.losses)
    for key, m in mergers.items():  # every merger of a LoRA moved; one of an absent LoRA has no gradient
        name, _, which = key.rpartition(".")
        present = name in (content if which == "merger_content" else style)
        assert torch.equal(m, torch.ones_like(m)) != present, key
    # The LoRA factors themselves did not move: with the learned mergers folded back out, up is [Uc, Us].
    for name, (up, _) in factors.items():
        parts = [f[name][0] for f in (content, style) if name in f]
        assert torch.equal(up, torch.cat(parts, dim=1))

    half = ZipLoRAConfig(merge=merge_train_config(steps=2, checkpoint_every=2, check_every=1))
    ziplora_merge(model, content, style, content_sets, style_sets, half, tmp_path / "b")
    _, resumed, result = ziplora_merge(
        model, content, style, content_sets, style_sets, config, tmp_path / "b", resume=True
    )
    assert result.steps == 2
    assert all(torch.equal(resumed[k], mergers[k]) for k in mergers)
    assert (tmp_path / "b" / "checkpoints" / "step-000004" / "objective.safetensors").exists()


def test_ziplora_config_checks():
    with pytest.raises(B4MError, match="similarity must be one of"):
        ZipLoRAConfig(similarity="l1")
    with pytest.raises(B4MError, match="precondition must be false"):
        ZipLoRAConfig(merge=merge_train_config(precondition=True))
    with pytest.raises(B4MError, match="needs routing none"):
        model = ToyModel()
        content_sets, style_sets = toy_sets(model)
        content, style = zip_pair(model.denoiser)
        bad = ZipLoRAConfig(merge=merge_train_config(routing="mixed", owned="up"))
        ziplora_merge(model, content, style, content_sets, style_sets, bad, "unused")


# --------------------------------------------------------------------------------------------------------------------
# B-LoRA


def test_blora_block_rule_on_sdxl_sd1_the_world_and_tiny_unets():
    from b4m.world.model import default_unet_config

    assert blora_blocks(unet_skeleton(json.loads(SDXL_CONFIG.read_text()))) == (
        "up_blocks.0.attentions.0",
        "up_blocks.0.attentions.1",
    )
    with torch.device("meta"):
        sd15 = UNet2DConditionModel()  # the default config is SD 1.x's layout
        world = UNet2DConditionModel(**default_unet_config(32, 64))
    assert sd15.config.up_block_types[0] == "UpBlock2D"
    assert blora_blocks(sd15) == ("up_blocks.1.attentions.0", "up_blocks.1.attentions.1")
    assert blora_blocks(world) == ("up_blocks.0.attentions.0", "up_blocks.0.attentions.1")
    assert blora_blocks(make_unet(TINY_SD_UNET))[0] == "up_blocks.1.attentions.0"
    assert blora_blocks(make_unet(TINY_SDXL_UNET))[1] == "up_blocks.0.attentions.1"
    with pytest.raises(B4MError, match="no decoder block"):
        blora_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_blora_touches_only_the_chosen_blocks(tmp_path):
    model = ToyModel()
    before = state(model.denoiser)
    content_sets, style_sets = toy_sets(model)
    result = run_method("blora", content_sets, style_sets, model, {"lora": LORA, "train": FAST}, out=tmp_path)
    assert_untouched(model, before)
    content_block, style_block = result.info["blocks"]
    assert (content_block, style_block) == ("up_blocks.1.attentions.0", "up_blocks.1.attentions.1")
    in_content = [n for n in result.factors if n.startswith(content_block + ".")]
    in_style = [n for n in result.factors if n.startswith(style_block + ".")]
    assert len(in_content) == len(in_style) == 8  # 1 transformer layer × 2 attentions × q, k, v, out
    assert sorted(in_content + in_style) == result.modules
    c_run, s_run = result.parts["content"].factors(), result.parts["style"].factors()
    assert len(c_run) == len(s_run) == 16  # each run trains both blocks
    for name in in_content:
        assert all(torch.equal(a, b) for a, b in zip(result.factors[name], c_run[name], strict=True))
    for name in in_style:
        assert all(torch.equal(a, b) for a, b in zip(result.factors[name], s_run[name], strict=True))

    base = make_unet(TINY_SD_UNET)
    reference = state(base)
    with applied(base, result.factors):
        changed = {k for k, v in base.state_dict().items() if not torch.equal(v, reference[k])}
        adapted = outputs(base)
    assert changed == {f"{n}.weight" for n in result.factors}  # every other tensor is bit-identical
    assert all(torch.equal(v, reference[k]) for k, v in base.state_dict().items())  # and restored after

    path = result.save(tmp_path / "blora.safetensors")
    torch.testing.assert_close(outputs(load_with_diffusers(path)), adapted, **TOL)
    in_memory = make_unet(TINY_SD_UNET)
    apply_adapter(in_memory, result.adapter)
    torch.testing.assert_close(outputs(in_memory), adapted, **TOL)


# --------------------------------------------------------------------------------------------------------------------
# JTtrain (eq. 2)


def test_jttrain_trains_one_lora_on_both_sets(tmp_path, monkeypatch):
    """One SGD step from B = 0 moves B by -lr · ∂(L_content + L_style)/∂B, and both terms are non-zero."""
    seen = []
    real_train = runs_module.train

    def spy(model, plp, sets, config, out, **kw):
        seen.append(([(s.name, s.weight, s.main) for s in sets], config))
        return real_train(model, plp, sets, config, out, **kw)

    monkeypatch.setattr(runs_module, "train", spy)
    step = {"steps": 1, "grad_accum": 1, "optimizer": "sgd", "lr": 0.5, "weight_decay": 0.0, "max_grad_norm": None}
    model = ToyModel()
    before = state(model.denoiser)
    content_sets, style_sets = toy_sets(model)
    result = run_method("jttrain", content_sets, style_sets, model, {"lora": LORA, "train": step}, out=tmp_path)
    assert_untouched(model, before)
    (names, config), *_ = seen
    assert names == [("content:dog", 1.0, True), ("style:yarn", 1.0, True)]  # eq. 2; the auxiliary sets are not used
    assert config.routing == "none"

    # The same draw by hand: the joint gradient is the sum of a content-only and a style-only gradient.
    reference = ToyModel()
    lora = plain_lora(4, base_model="toy")
    add_plp(reference.denoiser, lora)
    ups = [layer.up_learned for layer in plp_layers(reference.denoiser).values()]
    sets = joint_sets(content_sets, style_sets)

    def grads(weights: tuple[float, float]) -> list[torch.Tensor]:
        weighted = [TrainSet(s.name, s.latents, s.cond, w, True) for s, w in zip(sets, weights, strict=True)]
        loss = micro_step_loss(reference, weighted, config, torch.Generator().manual_seed(config.seed))
        return list(torch.autograd.grad(loss, ups))

    joint, content_only, style_only = grads((1.0, 1.0)), grads((1.0, 0.0)), grads((0.0, 1.0))
    per_layer = zip(joint, content_only, style_only, strict=True)
    for name, (j, c, s) in zip(plp_layers(reference.denoiser), per_layer, strict=True):
        torch.testing.assert_close(j, c + s, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(result.adapter.tensors[name]["up_learned"], -0.5 * j, rtol=1e-5, atol=1e-9)
    assert sum(c.abs().sum() for c in content_only) > 0 and sum(s.abs().sum() for s in style_only) > 0


def test_jttrain_export_loads_in_diffusers_like_the_in_memory_adapter(tmp_path):
    model = ToyModel()
    content_sets, style_sets = toy_sets(model)
    result = run_method("jttrain", content_sets, style_sets, model, {"lora": LORA, "train": FAST}, out=tmp_path)
    assert result.adapter.config.ratio == 0.0 and set(result.ranks().values()) == {4}
    in_memory = make_unet(TINY_SD_UNET)
    apply_adapter(in_memory, result.adapter)
    expected = outputs(in_memory)
    for fmt in ("diffusers", "kohya"):
        path = result.save(tmp_path / f"jt_{fmt}.safetensors", format=fmt)
        torch.testing.assert_close(outputs(load_with_diffusers(path)), expected, **TOL)
    assert not torch.allclose(expected, outputs(make_unet(TINY_SD_UNET)), **TOL)


# --------------------------------------------------------------------------------------------------------------------
# The uniform interface


def test_every_method_runs_the_same_way_and_exports(tmp_path):
    model = ToyModel()
    before = state(model.denoiser)
    content_sets, style_sets = toy_sets(model)
    cache: dict = {}
    configs = {
        "jttrain": {"lora": LORA, "train": FAST},
        "direct_merge": {"lora": LORA, "train": FAST},
        "ziplora": {"lora": LORA, "train": FAST, "merge": {"steps": 2}},
        "blora": {"lora": LORA, "train": FAST},
        "b4m": {"adapter": {"rank": 4}, "train": FAST, "make": {"steps": 1, "grad_accum": 1}},
        "klora": {"lora": LORA, "train": FAST},
    }
    assert sorted(configs) == sorted(METHODS)
    results = {}
    for name, config in configs.items():
        results[name] = run_method(name, content_sets, style_sets, model, config, out=tmp_path / name, cache=cache)
        assert_untouched(model, before)
        if name == "klora":  # no single plain LoRA: its two LoRAs and settings (tests/test_klora.py)
            continue
        path = results[name].save(tmp_path / f"{name}.safetensors")
        loaded = load_with_diffusers(path)
        reference = make_unet(TINY_SD_UNET)
        apply_factors(reference, results[name].factors)
        torch.testing.assert_close(outputs(loaded), outputs(reference), **TOL)
        assert results[name].method == name and results[name].info["seconds"] >= 0

    # Stage 1 is shared: ZipLoRA and K-LoRA reused direct merge's two LoRAs; B-LoRA and B4M trained their own.
    for name in ("ziplora", "klora"):
        assert results[name].info["content"]["reused"] and results[name].info["style"]["reused"]
        for role in ("content", "style"):
            assert results[name].parts[role] is results["direct_merge"].parts[role]
    assert sorted(k.split("/")[0] for k in cache) == ["b4m", "b4m", "blora", "blora", "lora", "lora"]

    # B4M's result is its made adapter; its exported file is that adapter.
    b4m_result = results["b4m"]
    assert b4m_result.adapter.role == "fused" and b4m_result.adapter.config.ratio == 0.5
    in_memory = make_unet(TINY_SD_UNET)
    apply_adapter(in_memory, b4m_result.adapter)
    torch.testing.assert_close(outputs(load_with_diffusers(tmp_path / "b4m.safetensors")), outputs(in_memory), **TOL)


def test_b4m_frozen_ratio_zero_ablation_runs_through_the_interface(tmp_path):
    model = ToyModel()
    content_sets, style_sets = toy_sets(model)
    config = method_config(
        "b4m",
        {"adapter": {"rank": 4, "ratio": 0.0, "learned_init": "kaiming"}, "train": FAST, "make": {"steps": 0}},
    )
    result = run_method("b4m", content_sets, style_sets, model, config, out=tmp_path)
    assert result.info["make"]["steps"] == 0  # instant composition: B from the content run, D from the style run
    for name, (up, down) in result.factors.items():
        assert torch.equal(up, result.parts["content"].tensors[name]["up_learned"])
        assert torch.equal(down, result.parts["style"].tensors[name]["down_learned"])


def test_interface_errors(tmp_path):
    model = ToyModel()
    content_sets, style_sets = toy_sets(model)
    with pytest.raises(B4MError, match="unknown method 'dreambooth'"):
        run_method("dreambooth", content_sets, style_sets, model, out=tmp_path)
    with pytest.raises(B4MError, match="unknown key\\(s\\) for ZipLoRAConfig: lambda"):
        method_config("ziplora", {"lambda": 0.1})
    with pytest.raises(B4MError, match="unknown key\\(s\\) in \\[train\\]: step"):
        method_config("jttrain", {"train": {"step": 3}})
    with pytest.raises(B4MError, match="ziplora takes a ZipLoRAConfig"):
        run_method("ziplora", content_sets, style_sets, model, method_config("jttrain"), out=tmp_path)
    aux_only = [s for s in content_sets if not s.main]
    with pytest.raises(B4MError, match="no main training set"):
        run_method("jttrain", aux_only, style_sets, model, {"train": FAST}, out=tmp_path)
    assert method_config("ziplora").merge.lr == 1e-2
    assert method_config("ziplora", {"merge": {"steps": 5}}).merge.steps == 5
    assert isinstance(method_config("b4m").make, TrainConfig) and method_config("b4m").make.precondition
    assert PLPConfig(**method_config("jttrain").lora.to_dict()).learned_init == "gaussian"


def test_make_sets_route_each_concept_to_its_half():
    model = ToyModel()
    content_sets, style_sets = toy_sets(model)
    main_c, main_s = content_sets[:1], style_sets[:1]
    plain, cfg = make_sets(main_c, main_s, MakeConfig(routing="none", style_weight=0.5), PLPConfig())
    assert [(s.name, s.main, s.weight) for s in plain] == [("dog", True, 1.0), ("yarn", True, 0.5)]
    assert cfg.owned is None and type(cfg) is TrainConfig  # the loop's settings, without make's style weight
    routed, cfg = make_sets(main_c, main_s, MakeConfig(routing="clean", style_weight=1.0), PLPConfig())
    assert [(s.name, s.main) for s in routed] == [("dog", True), ("yarn", False)] and cfg.owned == "up"
    _, cfg = make_sets(main_c, main_s, MakeConfig(routing="clean"), PLPConfig(assignment="official"))
    assert cfg.owned == "down"
    with pytest.raises(B4MError, match="routing none .* or clean"):
        MakeConfig(routing="mixed", owned="up")


@pytest.mark.parametrize("routing", ["none", "clean"])
def test_routed_make_keeps_the_style_half_out_of_the_content_loss(tmp_path, routing):
    """With the style references weighted 0, only the content loss is left: routed, it cannot move the style half
    D (no weight decay, so a zero gradient is no update); unrouted it moves both halves."""
    model = ToyModel()
    content_sets, style_sets = toy_sets(model)
    make = {"steps": 2, "grad_accum": 1, "lr": 1e-2, "weight_decay": 0.0, "routing": routing}
    config = method_config("b4m", {"adapter": {"rank": 4}, "train": FAST, "make": {**make, "style_weight": 0.0}})
    result = run_method("b4m", content_sets, style_sets, model, config, out=tmp_path)
    fused = result.parts["fused"].tensors
    made = result.adapter.tensors
    d_moved = [not torch.equal(made[n]["down_learned"], fused[n]["down_learned"]) for n in made]
    b_moved = [not torch.equal(made[n]["up_learned"], fused[n]["up_learned"]) for n in made]
    assert all(b_moved)
    assert not any(d_moved) if routing == "clean" else all(d_moved)


def test_a_role_setting_changes_only_that_run(tmp_path):
    """B4MConfig.content_run: the content run gets its own settings (here a timestep bias), the style run is the
    one trained without them, bit for bit."""
    model = ToyModel()
    content_sets, style_sets = toy_sets(model)
    base = {"adapter": {"rank": 4}, "train": FAST, "make": {"steps": 0}}
    plain = run_method("b4m", content_sets, style_sets, model, base, out=tmp_path / "plain")
    biased_cfg = method_config("b4m", {**base, "content_run": {"timestep_bias": "high-noise"}})
    assert biased_cfg.break_train("content").timestep_bias == "high-noise"
    assert biased_cfg.break_train("style") == biased_cfg.train
    biased = run_method("b4m", content_sets, style_sets, model, biased_cfg, out=tmp_path / "biased")
    for name, tensors in plain.parts["style"].tensors.items():
        for key, value in tensors.items():
            assert torch.equal(value, biased.parts["style"].tensors[name][key]), (name, key)
    assert any(
        not torch.equal(value, biased.parts["content"].tensors[name][key])
        for name, tensors in plain.parts["content"].tensors.items()
        for key, value in tensors.items()
    )
    with pytest.raises(B4MError, match=r"unknown key\(s\) in \[style_run\]: timestep"):
        method_config("b4m", {"style_run": {"timestep": "low-noise"}})
    with pytest.raises(B4MError, match="timestep_bias must be one of none, high-noise, low-noise, got 'early'"):
        method_config("b4m", {"content_run": {"timestep_bias": "early"}})
