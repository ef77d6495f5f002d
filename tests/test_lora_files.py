"""Plain LoRA export/import (b4m.lora_io), checked against diffusers' own loaders on tiny UNets (no hub access)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file

import b4m
from b4m.adapter.file import model_factors
from b4m.lora_files import apply_factors, check_factors_fit, load_lora, save_lora
from conftest import TINY_SD_UNET, TINY_SDXL_UNET, make_unet, unet_inputs

MODELS = {
    "sd": (TINY_SD_UNET, StableDiffusionPipeline),
    "sdxl": (TINY_SDXL_UNET, StableDiffusionXLPipeline),
}
ALL_LINEAR = r".*\.(to_[qkv]|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|time_emb_proj|linear_[12])"
TOL = dict(rtol=1e-4, atol=1e-5)


def plp_unet(config: dict, targets: list[str] | str | None = None, rank: int = 4, seed: int = 0):
    """A tiny UNet with a PLP adapter whose learned halves are random and nonzero."""
    unet = make_unet(config)
    plp_config = b4m.PLPConfig(rank=rank) if targets is None else b4m.PLPConfig(rank=rank, targets=targets)
    b4m.add_plp(unet, plp_config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in b4m.plp_layers(unet).values():
            layer.up_learned.copy_(torch.randn(layer.up_learned.shape, generator=g) * 0.1)
            layer.down_learned.copy_(torch.randn(layer.down_learned.shape, generator=g) * 0.1)
    return unet


@torch.no_grad()
def outputs(unet) -> torch.Tensor:
    return unet(**unet_inputs(unet)).sample


def load_with_diffusers(path, config: dict, pipeline_cls):
    """A fresh base UNet with the file loaded the way ``pipe.load_lora_weights`` does it (UNet part only)."""
    unet = make_unet(config)
    kwargs = {"unet_config": unet.config} if pipeline_cls is StableDiffusionXLPipeline else {}
    state_dict, alphas, metadata = pipeline_cls.lora_state_dict(str(path), return_lora_metadata=True, **kwargs)
    assert all("lora" in k for k in state_dict)  # load_lora_weights' own format check
    pipeline_cls.load_lora_into_unet(state_dict, network_alphas=alphas, unet=unet, metadata=metadata)
    return unet


def peft_scalings(unet) -> list[float]:
    return [s for m in unet.modules() if hasattr(m, "scaling") for s in m.scaling.values()]


def file_metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def file_dtypes(path) -> set[torch.dtype]:
    with safe_open(str(path), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118


def assert_factors_equal(a, b) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name][0], b[name][0]), name
        assert torch.equal(a[name][1], b[name][1]), name


def random_factors(unet, suffixes: tuple[str, ...], ranks: list[int], seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    factors = {}
    names = [(n, m) for n, m in unet.named_modules() if n.endswith(suffixes) and isinstance(m, torch.nn.Linear)]
    for i, (name, module) in enumerate(names):
        r = ranks[i % len(ranks)]
        factors[name] = (
            torch.randn(module.out_features, r, generator=g) * 0.1,
            torch.randn(r, module.in_features, generator=g) * 0.1,
        )
    return factors


# --------------------------------------------------------------------------------------------------------------------
# 1-2. Exported files load in diffusers' own loaders and reproduce the adapter's outputs


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_diffusers_format_loads_in_diffusers_with_same_outputs(kind, tmp_path):
    config, pipeline_cls = MODELS[kind]
    unet = plp_unet(config)
    expected = outputs(unet)
    factors = model_factors(unet)
    path = tmp_path / "b4m.safetensors"
    save_lora(factors, path, format="diffusers")

    loaded = load_with_diffusers(path, config, pipeline_cls)
    torch.testing.assert_close(outputs(loaded), expected, **TOL)
    assert not torch.allclose(outputs(make_unet(config)), expected, **TOL)  # the adapter does change the output
    scalings = peft_scalings(loaded)
    assert len(scalings) == len(factors) and set(scalings) == {1.0}

    adapter_meta = json.loads(file_metadata(path)["lora_adapter_metadata"])
    assert adapter_meta["unet.r"] == adapter_meta["unet.lora_alpha"] == 4
    assert sorted(adapter_meta["unet.target_modules"]) == sorted(factors)
    name = next(iter(factors))
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor(f"unet.{name}.lora_A.weight"), factors[name][1])
        assert torch.equal(f.get_tensor(f"unet.{name}.lora_B.weight"), factors[name][0])


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("sd", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
        ("sdxl", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ],
)
def test_kohya_format_loads_in_diffusers_with_same_outputs(kind, key, tmp_path):
    config, pipeline_cls = MODELS[kind]
    unet = plp_unet(config)
    expected = outputs(unet)
    path = tmp_path / "b4m_kohya.safetensors"
    save_lora(model_factors(unet), path, format="kohya", unet_config=unet.config)

    loaded = load_with_diffusers(path, config, pipeline_cls)
    torch.testing.assert_close(outputs(loaded), expected, **TOL)
    assert set(peft_scalings(loaded)) == {1.0}

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"} <= keys
        alpha = f.get_tensor(f"{key}.alpha")
    assert alpha.ndim == 0 and alpha.item() == 4.0
    if kind == "sdxl":
        assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0.lora_up.weight" in keys
        assert "lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_v.lora_down.weight" in keys
        assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    meta = file_metadata(path)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_module"]) == ("4", "4", "networks.lora")
    assert "lora_adapter_metadata" not in meta  # diffusers refuses network alphas together with adapter metadata


def test_kohya_sgm_names_of_resnet_and_embedding_layers(tmp_path):
    """Every linear layer kind (attention, ff, proj, resnet time_emb_proj, time/added embeddings) in SGM naming."""
    unet = plp_unet(TINY_SDXL_UNET, targets=ALL_LINEAR)
    expected = outputs(unet)
    factors = model_factors(unet)
    path = tmp_path / "all.safetensors"
    save_lora(factors, path, format="kohya", kohya_naming="sgm", unet_config=unet.config)

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    for name in ("input_blocks_1_0_emb_layers_1", "middle_block_2_emb_layers_1", "output_blocks_5_0_emb_layers_1"):
        assert f"lora_unet_{name}.lora_down.weight" in keys
    for name in ("time_embed_0", "time_embed_2", "label_emb_0_0", "label_emb_0_2", "input_blocks_5_1_proj_in"):
        assert f"lora_unet_{name}.lora_up.weight" in keys
    loaded = load_with_diffusers(path, TINY_SDXL_UNET, StableDiffusionXLPipeline)
    torch.testing.assert_close(outputs(loaded), expected, **TOL)
    assert len(peft_scalings(loaded)) == len(factors)
    assert_factors_equal(load_lora(path, unet_config=unet.config)[0], factors)


def pipeline_with(config: dict, pipeline_cls):
    """A pipeline around a fresh base UNet (no VAE or text encoders: only the UNet takes the LoRA)."""
    parts = dict(
        vae=None, text_encoder=None, tokenizer=None, unet=make_unet(config), scheduler=EulerDiscreteScheduler()
    )
    if pipeline_cls is StableDiffusionXLPipeline:
        return pipeline_cls(**parts, text_encoder_2=None, tokenizer_2=None)
    return pipeline_cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def lora_wrapped(unet) -> set[str]:
    return {name for name, module in unet.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize(
    ("kind", "fmt", "naming"),
    [
        ("sdxl", "kohya", "diffusers"),
        ("sdxl", "kohya", "sgm"),
        ("sdxl", "diffusers", None),
        ("sd", "kohya", "diffusers"),
        ("sd", "diffusers", None),
    ],
)
def test_every_linear_layer_loads_through_load_lora_weights(kind, fmt, naming, tmp_path):
    """Every nn.Linear adapted, written, and loaded by ``pipe.load_lora_weights``: no module is dropped (diffusers
    only logs the keys it cannot place) and the pipeline's UNet computes what the adapter computes."""
    config, pipeline_cls = MODELS[kind]
    unet = plp_unet(config, targets=r".*")
    expected = outputs(unet)
    factors = model_factors(unet)
    linear = {n for n, m in make_unet(config).named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(factors) == linear
    path = tmp_path / f"{kind}_{fmt}_{naming}.safetensors"
    used = save_lora(factors, path, format=fmt, kohya_naming=naming or "auto", unet_config=unet.config)

    pipe = pipeline_with(config, pipeline_cls)
    pipe.load_lora_weights(str(path))
    assert lora_wrapped(pipe.unet) == set(factors)
    assert set(peft_scalings(pipe.unet)) == {1.0}
    torch.testing.assert_close(outputs(pipe.unet), expected, **TOL)
    assert_factors_equal(load_lora(path, unet_config=unet.config)[0], factors)
    assert used == naming


def test_kohya_diffusers_naming_spells_added_embedding_as_sgm(tmp_path):
    """SDXL's add_embedding.linear_1/_2 are written as label_emb_0_0/_0_2 (diffusers maps only that spelling back)."""
    unet = plp_unet(TINY_SDXL_UNET, targets=r"(add|time)_embedding\.linear_[12]|.*attn1\.to_q")
    path = tmp_path / "emb.safetensors"
    assert save_lora(model_factors(unet), path, format="kohya", kohya_naming="diffusers") == "diffusers"
    with safe_open(str(path), framework="pt") as f:
        bases = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118
    assert {"lora_unet_label_emb_0_0", "lora_unet_label_emb_0_2"} <= bases
    assert {"lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2"} <= bases
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in bases
    assert not any("add_embedding" in b for b in bases)


def test_old_added_embedding_spelling_still_reads(tmp_path):
    """Files written before the fix (lora_unet_add_embedding_linear_1/_2) still import through b4m's reader."""
    unet = make_unet(TINY_SDXL_UNET)
    factors = random_factors(unet, ("add_embedding.linear_1", "add_embedding.linear_2", "attn2.to_k"), ranks=[4])
    tensors = {}
    for name, (up, down) in factors.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(4.0)}
    path = tmp_path / "old_spelling.safetensors"
    save_file(tensors, str(path))
    assert_factors_equal(load_lora(path)[0], factors)


def test_module_diffusers_cannot_read_as_kohya_is_refused(tmp_path):
    """A class-conditioned UNet's class_embedding has no kohya spelling diffusers maps back (its SGM name label_emb
    comes back as add_embedding): the kohya writer refuses it; the diffusers format carries it."""
    config = {**TINY_SD_UNET, "class_embed_type": "timestep"}
    unet = plp_unet(config, targets=r"class_embedding\.linear_[12]|.*attn1\.to_q")
    factors = model_factors(unet)
    assert "class_embedding.linear_1" in factors
    for naming in ("diffusers", "sgm"):
        path = tmp_path / f"class_{naming}.safetensors"
        with pytest.raises(b4m.B4MError, match=r"class_embedding\.linear_1.*format='diffusers'") as info:
            save_lora(factors, path, format="kohya", kohya_naming=naming, unet_config=unet.config)
        assert path.name in str(info.value) and "\n" not in str(info.value)
        assert not path.exists()
    path = tmp_path / "class.safetensors"
    assert save_lora(factors, path, unet_config=unet.config) is None
    pipe = pipeline_with(config, StableDiffusionPipeline)
    pipe.load_lora_weights(str(path))
    assert lora_wrapped(pipe.unet) == set(factors)


def test_save_lora_returns_the_kohya_naming(tmp_path):
    """What the CLI reports: SGM for an SDXL config, diffusers naming for SD or when no config is given."""
    factors = model_factors(plp_unet(TINY_SDXL_UNET))
    path = tmp_path / "x.safetensors"
    assert save_lora(factors, path, format="kohya", unet_config=make_unet(TINY_SDXL_UNET).config) == "sgm"
    assert save_lora(factors, path, format="kohya") == "diffusers"
    assert save_lora(factors, path, format="kohya", unet_config=TINY_SD_UNET) == "diffusers"
    assert save_lora(factors, path, format="kohya", kohya_naming="sgm", unet_config=TINY_SDXL_UNET) == "sgm"
    assert save_lora(factors, path, format="diffusers", unet_config=TINY_SDXL_UNET) is None


# --------------------------------------------------------------------------------------------------------------------
# 3. Round trips and alpha folding


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_round_trip_fp32_is_exact(kind, fmt, tmp_path):
    config, _ = MODELS[kind]
    unet = plp_unet(config)
    factors = model_factors(unet)
    path = tmp_path / "rt.safetensors"
    save_lora(factors, path, format=fmt, unet_config=unet.config)
    assert file_dtypes(path) == {torch.float32}
    loaded, _ = load_lora(path, unet_config=unet.config)
    assert_factors_equal(loaded, factors)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip_half_precision(fmt, dtype, tmp_path):
    unet = plp_unet(TINY_SDXL_UNET)
    factors = model_factors(unet)
    path = tmp_path / "half.safetensors"
    save_lora(factors, path, format=fmt, dtype=dtype, unet_config=unet.config)
    assert file_dtypes(path) == {dtype}
    loaded, _ = load_lora(path, unet_config=unet.config)
    assert set(loaded) == set(factors)
    for name, (up, down) in factors.items():
        assert loaded[name][0].dtype == torch.float32
        torch.testing.assert_close(loaded[name][0], up, rtol=1e-2, atol=1e-3)
        assert torch.equal(loaded[name][1], down.to(dtype).float())


def test_factors_fold_all_scales_and_apply_matches_adapter():
    unet = plp_unet(TINY_SD_UNET)
    config = b4m.PLPConfig(rank=4)
    b4m.set_scales(unet, config, scale=0.7, content_scale=1.5, style_scale=0.5)
    factors = model_factors(unet)
    for name, layer in b4m.plp_layers(unet).items():
        up, down = factors[name]
        assert up.dtype == down.dtype == torch.float32
        torch.testing.assert_close(up @ down, layer.delta_weight().detach(), rtol=1e-5, atol=1e-7)
    merged = make_unet(TINY_SD_UNET)
    apply_factors(merged, factors)
    torch.testing.assert_close(outputs(merged), outputs(unet), **TOL)


def test_mixed_ranks_load_correctly_in_diffusers(tmp_path):
    unet = make_unet(TINY_SDXL_UNET)
    factors = random_factors(unet, ("to_q", "to_k", "ff.net.2"), ranks=[2, 4, 4, 3])
    reference = make_unet(TINY_SDXL_UNET)
    apply_factors(reference, factors)
    expected = outputs(reference)
    for fmt in ("diffusers", "kohya"):
        path = tmp_path / f"mixed_{fmt}.safetensors"
        save_lora(factors, path, format=fmt, unet_config=unet.config)
        loaded = load_with_diffusers(path, TINY_SDXL_UNET, StableDiffusionXLPipeline)
        torch.testing.assert_close(outputs(loaded), expected, **TOL)
        ours, _ = load_lora(path, unet_config=unet.config)
        for name, (up, down) in factors.items():
            torch.testing.assert_close(ours[name][0] @ ours[name][1], up @ down, rtol=1e-5, atol=1e-7)
    assert file_metadata(tmp_path / "mixed_kohya.safetensors")["ss_network_dim"] == "Dynamic"


def test_kohya_alpha_is_folded_like_diffusers_does(tmp_path):
    unet = make_unet(TINY_SD_UNET)
    factors = random_factors(unet, ("attn1.to_q", "attn2.to_out.0"), ranks=[4])
    tensors = {}
    for name, (up, down) in factors.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
    path = tmp_path / "alpha2.safetensors"
    save_file(tensors, str(path))

    loaded, _ = load_lora(path)
    for name, (up, down) in factors.items():
        assert torch.equal(loaded[name][0], up * 0.5)
        assert torch.equal(loaded[name][1], down)
    ours = make_unet(TINY_SD_UNET)
    apply_factors(ours, loaded)
    theirs = load_with_diffusers(path, TINY_SD_UNET, StableDiffusionPipeline)
    assert set(peft_scalings(theirs)) == {0.5}
    torch.testing.assert_close(outputs(ours), outputs(theirs), **TOL)


def test_peft_lora_alpha_from_adapter_metadata_is_folded(tmp_path):
    unet = make_unet(TINY_SD_UNET)
    factors = random_factors(unet, ("attn2.to_k", "attn2.to_v"), ranks=[4])
    tensors = {}
    for name, (up, down) in factors.items():
        tensors |= {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up}
    lora_kwargs = {"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": sorted(factors)}
    path = tmp_path / "peft_alpha8.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(lora_kwargs)})

    loaded, _ = load_lora(path)
    for name, (up, _) in factors.items():
        assert torch.equal(loaded[name][0], up * 2.0)
    ours = make_unet(TINY_SD_UNET)
    apply_factors(ours, loaded)
    theirs = load_with_diffusers(path, TINY_SD_UNET, StableDiffusionPipeline)
    assert set(peft_scalings(theirs)) == {2.0}
    torch.testing.assert_close(outputs(ours), outputs(theirs), **TOL)


# --------------------------------------------------------------------------------------------------------------------
# 4. Old diffusers layouts, including the official B4M repository's keys


def test_import_official_b4m_layout(tmp_path):
    unet = make_unet(TINY_SD_UNET)
    factors = random_factors(unet, ("to_q", "to_out.0"), ranks=[4])
    tensors = {}
    for name, (up, down) in factors.items():
        tensors |= {f"unet.unet.{name}.lora.down.weight": down, f"unet.unet.{name}.lora.up.weight": up}
    path = tmp_path / "b4m_official.safetensors"
    save_file(tensors, str(path))

    loaded, _ = load_lora(path)
    assert_factors_equal(loaded, factors)
    check_factors_fit(loaded, unet, path)


def test_import_old_attention_processor_layout(tmp_path):
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    up_q, down_q, up_o, down_o = torch.randn(16, 2), torch.randn(2, 16), torch.randn(16, 2), torch.randn(2, 16)
    tensors = {
        f"{name}.processor.to_q_lora.down.weight": down_q,
        f"{name}.processor.to_q_lora.up.weight": up_q,
        f"{name}.processor.to_out_lora.down.weight": down_o,
        f"{name}.processor.to_out_lora.up.weight": up_o,
    }
    path = tmp_path / "attn_procs.safetensors"
    save_file(tensors, str(path))
    loaded, _ = load_lora(path)
    assert_factors_equal(loaded, {f"{name}.to_q": (up_q, down_q), f"{name}.to_out.0": (up_o, down_o)})
    check_factors_fit(loaded, make_unet(TINY_SD_UNET), path)


# --------------------------------------------------------------------------------------------------------------------
# 5. Bad input: one-line B4MError naming the file


def _raises(path, match: str, **kwargs) -> None:
    with pytest.raises(b4m.B4MError, match=match) as info:
        load_lora(path, **kwargs)
    message = str(info.value)
    assert path.name in message and "\n" not in message


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    _raises(path, "not a readable safetensors file")


def test_unrelated_keys_are_not_a_lora(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4), "conv_in.bias": torch.zeros(4)}, str(path))
    _raises(path, "not a LoRA file")


def test_text_encoder_only_is_not_a_unet_lora(tmp_path):
    path = tmp_path / "te.safetensors"
    save_file({"lora_te_text_model_x.lora_down.weight": torch.zeros(2, 4)}, str(path))
    with pytest.warns(UserWarning, match="text-encoder"):
        _raises(path, "not a LoRA file")


def test_nan_tensor(tmp_path):
    path = tmp_path / "nan.safetensors"
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {f"{key}.lora_down.weight": torch.full((4, 16), float("nan")), f"{key}.lora_up.weight": torch.zeros(16, 4)},
        str(path),
    )
    _raises(path, "NaN or Inf")


def test_up_without_down_and_rank_mismatch(tmp_path):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "lonely_up.safetensors"
    save_file({f"{key}.lora_up.weight": torch.zeros(16, 4), f"{key}.alpha": torch.tensor(4.0)}, str(path))
    _raises(path, "no down weight")

    path = tmp_path / "ranks.safetensors"
    save_file(
        {f"unet.{key}.lora_A.weight": torch.zeros(3, 16), f"unet.{key}.lora_B.weight": torch.zeros(16, 4)}, str(path)
    )
    _raises(path, "inconsistent rank")


def test_sgm_names_need_unet_config(tmp_path):
    unet = plp_unet(TINY_SDXL_UNET)
    path = tmp_path / "sgm.safetensors"
    save_lora(model_factors(unet), path, format="kohya", unet_config=unet.config)
    _raises(path, "unet_config")


def test_shape_mismatch_against_model(tmp_path):
    path = tmp_path / "sd_lora.safetensors"
    save_lora(model_factors(plp_unet(TINY_SD_UNET)), path)
    factors, _ = load_lora(path)
    sdxl = make_unet(TINY_SDXL_UNET)
    with pytest.raises(b4m.B4MError, match=r"sd_lora\.safetensors: module down_blocks\.0") as info:
        check_factors_fit(factors, sdxl, path)
    assert "\n" not in str(info.value)

    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    up, down = factors[name]
    with pytest.raises(b4m.B4MError, match=r"sd_lora.safetensors: module .*to_q: LoRA up \(16, 4\) / down \(4, 8\)"):
        check_factors_fit({name: (up, down[:, :8])}, make_unet(TINY_SD_UNET), path)


# --------------------------------------------------------------------------------------------------------------------
# 6. Metadata


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_metadata_survives(fmt, tmp_path):
    unet = plp_unet(TINY_SDXL_UNET)
    extra = {"b4m_trigger_words": "sks dog, <wct> style", "b4m_steps": 500}
    path = tmp_path / "meta.safetensors"
    save_lora(model_factors(unet), path, format=fmt, metadata=extra, unet_config=unet.config)
    meta = file_metadata(path)
    assert meta["b4m_trigger_words"] == "sks dog, <wct> style" and meta["b4m_steps"] == "500"
    _, loaded = load_lora(path, unet_config=unet.config)
    assert loaded["b4m_trigger_words"] == "sks dog, <wct> style"
    assert "format" not in loaded


def test_reexport_to_kohya_drops_diffusers_adapter_metadata(tmp_path):
    unet = plp_unet(TINY_SDXL_UNET)
    expected = outputs(unet)
    first = tmp_path / "first.safetensors"
    save_lora(model_factors(unet), first, metadata={"trigger": "sks"})
    factors, meta = load_lora(first)
    assert "lora_adapter_metadata" in meta
    second = tmp_path / "second.safetensors"
    save_lora(factors, second, format="kohya", metadata=meta, unet_config=unet.config)
    assert "lora_adapter_metadata" not in file_metadata(second) and file_metadata(second)["trigger"] == "sks"
    loaded = load_with_diffusers(second, TINY_SDXL_UNET, StableDiffusionXLPipeline)
    torch.testing.assert_close(outputs(loaded), expected, **TOL)


def test_bad_save_arguments(tmp_path):
    factors = model_factors(plp_unet(TINY_SD_UNET))
    with pytest.raises(b4m.B4MError, match="format must be"):
        save_lora(factors, tmp_path / "x.safetensors", format="webui")
    with pytest.raises(b4m.B4MError, match="dtype must be"):
        save_lora(factors, tmp_path / "x.safetensors", dtype=torch.float64)
    with pytest.raises(b4m.B4MError, match="needs unet_config"):
        save_lora(factors, tmp_path / "x.safetensors", format="kohya", kohya_naming="sgm")
    assert not list(tmp_path.iterdir())


def test_inspect_shows_trigger_words_alike_in_every_format(tmp_path):
    """b4m writes them as a JSON list; inspect prints them comma-separated, a plain string as it is."""
    from b4m.describe import describe

    unet = plp_unet(TINY_SDXL_UNET)
    for fmt, words, shown in (("kohya", '["sks", "zwx"]', "sks, zwx"), ("diffusers", "sks dog", "sks dog")):
        path = tmp_path / f"{fmt}.safetensors"
        save_lora(model_factors(unet), path, format=fmt, metadata={"trigger_words": words}, unet_config=unet.config)
        assert describe(path)["trigger_words"] == shown
