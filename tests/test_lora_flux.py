"""Plain LoRA files for FLUX.1 transformers (b4m.lora_files with family="flux"): the diffusers/peft format and the
kohya/BFL format with fused qkv / linear1 layers, checked against diffusers' own loaders on tiny
``FluxTransformer2DModel``s built in code and against ComfyUI's key mapping (no hub access)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file

import b4m
from b4m.lora_files import applied, load_lora, save_lora
from b4m.lora_files.flux import layer_modules

# Hidden size 16 (2 heads of 8), MLP 64, so proj_mlp (16 → 64) and proj_out (80 → 16) are not square.
TINY_FLUX = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    pooled_projection_dim=10,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)
# One single block at FLUX.1's width (hidden 3072, MLP 12288): diffusers' kohya converter splits linear1 only there.
FLUX1_WIDE_SINGLE = dict(
    patch_size=1,
    in_channels=4,
    num_layers=0,
    num_single_layers=1,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=8,
    pooled_projection_dim=8,
    axes_dims_rope=(16, 56, 56),
)
TOL = dict(rtol=1e-4, atol=1e-5)
LINEAR1_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def make_flux(config: dict = TINY_FLUX, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**config).eval()


def flux_inputs(model: FluxTransformer2DModel, batch: int = 2) -> dict:
    """Random inputs: 2×3 image tokens, 3 text tokens, two timesteps (and a guidance scale if the model takes one)."""
    cfg, g = model.config, torch.Generator().manual_seed(1)
    grid = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij"), -1).reshape(-1, 2).float()
    return dict(
        hidden_states=torch.randn(batch, 6, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, 3, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.3, 0.8][:batch]),
        img_ids=torch.cat([torch.zeros(6, 1), grid], 1),
        txt_ids=torch.zeros(3, 3),
        guidance=torch.full((batch,), 3.5) if cfg.guidance_embeds else None,
    )


@torch.no_grad()
def outputs(model) -> torch.Tensor:
    return model(**flux_inputs(model)).sample


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def random_factors(model, names, ranks=(3,), seed: int = 3, scale: float = 0.1):
    g, factors = torch.Generator().manual_seed(seed), {}
    for i, name in enumerate(names):
        module, r = model.get_submodule(name), ranks[i % len(ranks)]
        factors[name] = (
            torch.randn(module.out_features, r, generator=g) * scale,
            torch.randn(r, module.in_features, generator=g) * scale,
        )
    return factors


@torch.no_grad()
def expected_outputs(model, factors) -> torch.Tensor:
    """The model's output with ``up @ down`` added to its weights by b4m (then the weights are restored)."""
    with applied(model, factors):
        return outputs(model)


def pipeline_with(transformer) -> FluxPipeline:
    """A FLUX pipeline around ``transformer`` only (no VAE or text encoders: only the transformer takes the LoRA)."""
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def lora_layers(model) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def scalings(model) -> set[float]:
    return {s for m in lora_layers(model).values() for s in m.scaling.values()}


def file_keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def file_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def file_metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def assert_factors_equal(a, b) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for name in a:
        assert torch.equal(a[name][0], b[name][0]), name
        assert torch.equal(a[name][1], b[name][1]), name


def kohya_tensors(entries: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> dict[str, torch.Tensor]:
    """A hand-written kohya file: ``{key base: (up, down, alpha)}``."""
    out = {}
    for base, (up, down, alpha) in entries.items():
        out |= {f"{base}.lora_up.weight": up, f"{base}.lora_down.weight": down, f"{base}.alpha": torch.tensor(alpha)}
    return out


# --------------------------------------------------------------------------------------------------------------------
# 1. Both formats load in diffusers and reproduce b4m's merge


@pytest.mark.parametrize("loader", ["pipeline", "load_lora_adapter"])
def test_diffusers_format_every_linear_layer_loads_with_scale_one(loader, tmp_path):
    """Every nn.Linear of the transformer (blocks, embedders, norm_out, proj_out), mixed ranks."""
    model = make_flux()
    factors = random_factors(model, linear_names(model), ranks=(2, 4, 4, 3))
    expected = expected_outputs(model, factors)
    assert not torch.allclose(expected, outputs(model), **TOL)  # the LoRA does change the output
    path = tmp_path / "flux_diffusers.safetensors"
    assert save_lora(factors, path, format="diffusers", family="flux") is None

    if loader == "pipeline":
        pipe = pipeline_with(model)
        pipe.load_lora_weights(str(path))
    else:
        model.load_lora_adapter(str(path), prefix="transformer")
    layers = lora_layers(model)
    assert set(layers) == set(factors)
    assert scalings(model) == {1.0}
    assert all(layers[n].r["default_0"] == factors[n][1].shape[0] for n in factors)
    torch.testing.assert_close(outputs(model), expected, **TOL)

    meta = json.loads(file_metadata(path)["lora_adapter_metadata"])
    assert meta["transformer.r"] == meta["transformer.lora_alpha"] == 4
    name = "single_transformer_blocks.1.proj_mlp"
    tensors = file_tensors(path)
    assert torch.equal(tensors[f"transformer.{name}.lora_A.weight"], factors[name][1])
    assert torch.equal(tensors[f"transformer.{name}.lora_B.weight"], factors[name][0])


def test_kohya_bfl_format_loads_in_diffusers_with_fused_layers_split_back(tmp_path):
    """Double blocks (fused qkv of both streams, partly present) and the single blocks' linear2 / modulation, through
    ``FluxPipeline.load_lora_weights`` (lora_state_dict → diffusers' kohya FLUX converter → load_lora_adapter)."""
    model = make_flux()
    names = [n for n in linear_names(model) if n.startswith("transformer_blocks.0.")]
    names += [
        "transformer_blocks.1.attn.to_q",
        "transformer_blocks.1.attn.add_v_proj",
        "transformer_blocks.1.ff.net.2",
    ]
    names += [f"single_transformer_blocks.{i}.{m}" for i in (0, 1) for m in ("proj_out", "norm.linear")]
    factors = random_factors(model, names)
    expected = expected_outputs(model, factors)
    path = tmp_path / "flux_kohya.safetensors"
    assert save_lora(factors, path, format="kohya", family="flux") == "bfl"

    keys = file_keys(path)
    bases = ["double_blocks_0_img_attn_qkv", "double_blocks_0_txt_attn_qkv", "double_blocks_0_img_attn_proj"]
    bases += ["double_blocks_0_txt_mlp_2", "double_blocks_0_img_mod_lin", "double_blocks_1_img_attn_qkv"]
    bases += ["single_blocks_1_linear2", "single_blocks_0_modulation_lin"]
    for base in bases:
        assert {f"lora_unet_{base}.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha")} <= keys
    tensors = file_tensors(path)
    qkv = "lora_unet_double_blocks_1_img_attn_qkv"  # only to_q has a LoRA: to_k, to_v are zero blocks
    up, down = tensors[f"{qkv}.lora_up.weight"], tensors[f"{qkv}.lora_down.weight"]
    assert up.shape == (48, 9) and down.shape == (9, 16) and tensors[f"{qkv}.alpha"].item() == 9.0
    assert torch.equal(up[:16, :3], factors["transformer_blocks.1.attn.to_q"][0]) and not up[16:].any()
    assert not down[3:].any() and not up[:16, 3:].any()
    fused = json.loads(file_metadata(path)["b4m_fused"])
    assert fused["layers"][qkv] == {"ranks": [3, 3, 3], "zero": [1, 2]} and "block" in fused["about"]

    pipe = pipeline_with(model)
    pipe.load_lora_weights(str(path))
    layers = lora_layers(model)
    zero_parts = {f"transformer_blocks.1.attn.{m}" for m in ("to_k", "to_v", "add_q_proj", "add_k_proj")}
    assert set(layers) == set(factors) | zero_parts  # diffusers also wraps the zero parts (ΔW = 0)
    assert all(layer.r["default_0"] == 3 for layer in layers.values())  # equal blocks: split back to rank r
    assert scalings(model) == {1.0}
    for name in zero_parts:
        assert not layers[name].lora_B["default_0"].weight.any()
    torch.testing.assert_close(outputs(model), expected, **TOL)


def test_kohya_linear1_at_flux1_width_loads_in_diffusers(tmp_path):
    """Single-block linear1 (q, k, v, proj_mlp fused; 3072 → 21504) and linear2 (15360 → 3072) at FLUX.1's width,
    the only width at which diffusers' kohya converter splits linear1 (see the next test)."""
    model = make_flux(FLUX1_WIDE_SINGLE)
    factors = random_factors(model, [f"single_transformer_blocks.0.{m}" for m in (*LINEAR1_PARTS, "proj_out")], (2,))
    base_output = outputs(model)
    expected = expected_outputs(model, factors)
    assert not torch.allclose(expected, base_output, **TOL)
    path = tmp_path / "flux1_linear1.safetensors"
    save_lora(factors, path, format="kohya", family="flux")
    with safe_open(str(path), framework="pt") as f:
        assert f.get_slice("lora_unet_single_blocks_0_linear1.lora_up.weight").get_shape() == [21504, 8]
        assert f.get_tensor("lora_unet_single_blocks_0_linear1.alpha").item() == 8.0

    pipe = pipeline_with(model)
    pipe.load_lora_weights(str(path))
    assert set(lora_layers(model)) == set(factors) and scalings(model) == {1.0}
    torch.testing.assert_close(outputs(model), expected, **TOL)


def test_diffusers_splits_linear1_only_at_flux1_width():
    """Why the test above needs FLUX.1's width: diffusers (0.42) hard-codes linear1's split. If this fails, diffusers
    lifted the limit: update the note in b4m/lora_files/flux.py."""
    key = "lora_unet_single_blocks_0_linear1"
    tiny = kohya_tensors({key: (torch.zeros(112, 8), torch.zeros(8, 16), 8.0)})
    with pytest.raises(AssertionError):
        _convert_kohya_flux_lora_to_diffusers(tiny)


def test_modules_outside_the_blocks_are_refused_in_kohya(tmp_path):
    """diffusers' FLUX kohya converter has rules for img_in, final_layer …, but puts them outside ``transformer.``,
    so ``load_lora_weights`` drops them: b4m refuses them in the kohya format and names the diffusers format."""
    model = make_flux()
    factors = random_factors(model, ["x_embedder", "transformer_blocks.0.attn.to_q"])
    path = tmp_path / "top.safetensors"
    with pytest.raises(b4m.B4MError, match=r"top\.safetensors: module x_embedder: .*format='diffusers'") as info:
        save_lora(factors, path, format="kohya", family="flux")
    assert "\n" not in str(info.value) and not path.exists()

    # What diffusers does with such a file: it loads the block layer and drops img_in.
    up, down = factors["x_embedder"]
    q_up, q_down = factors["transformer_blocks.0.attn.to_q"]
    z = torch.zeros
    qkv = (torch.block_diag(q_up, z(16, 3), z(16, 3)), torch.cat([q_down, z(6, 16)]), 9.0)
    handmade = {"lora_unet_img_in": (up, down, 3.0), "lora_unet_double_blocks_0_img_attn_qkv": qkv}
    save_file(kohya_tensors(handmade), str(path))
    pipe = pipeline_with(model)
    pipe.load_lora_weights(str(path))
    assert "x_embedder" not in lora_layers(model) and "transformer_blocks.0.attn.to_q" in lora_layers(model)
    assert_factors_equal({k: v for k, v in load_lora(path)[0].items() if k in factors}, factors)  # b4m reads both


# --------------------------------------------------------------------------------------------------------------------
# 2. Round trips through load_lora


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_round_trip_is_exact_and_rank_preserving(fmt, tmp_path):
    """Mixed ranks inside one fused layer, partly present fused layers, non-square proj_mlp / proj_out."""
    model = make_flux()
    names = [n for n in linear_names(model) if "blocks." in n]
    names.remove("transformer_blocks.1.attn.to_k")  # its qkv gets a zero block
    names.remove("single_transformer_blocks.1.attn.to_v")
    names.remove("single_transformer_blocks.0.proj_mlp")  # linear1 without its MLP part
    factors = random_factors(model, names, ranks=(2, 4, 3, 5))
    path = tmp_path / f"rt_{fmt}.safetensors"
    save_lora(factors, path, format=fmt, family="flux", metadata={"b4m_trigger_words": "sks"})
    loaded, meta = load_lora(path)
    assert_factors_equal(loaded, factors)
    assert meta["b4m_trigger_words"] == "sks" and "format" not in meta
    assert ("b4m_fused" in meta) == (fmt == "kohya")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip_half_precision_keeps_the_blocks(dtype, tmp_path):
    model = make_flux()
    factors = random_factors(model, [n for n in linear_names(model) if "single_transformer_blocks.0." in n], (4,))
    path = tmp_path / "half.safetensors"
    save_lora(factors, path, format="kohya", family="flux", dtype=dtype)
    assert {t.dtype for t in file_tensors(path).values()} == {dtype}
    loaded, _ = load_lora(path)
    assert set(loaded) == set(factors)
    for name, (up, down) in factors.items():
        assert torch.equal(loaded[name][0], up.to(dtype).float()) and torch.equal(
            loaded[name][1], down.to(dtype).float()
        )


def test_reexport_of_a_kohya_file_drops_the_fused_metadata(tmp_path):
    model = make_flux()
    factors = random_factors(model, ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"])
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_lora(factors, first, format="kohya", family="flux")
    loaded, meta = load_lora(first)
    save_lora(loaded, second, format="diffusers", family="flux", metadata=meta)
    assert "b4m_fused" not in file_metadata(second) and "ss_network_module" not in file_metadata(second)
    assert_factors_equal(load_lora(second)[0], factors)


# --------------------------------------------------------------------------------------------------------------------
# 3. Files from other tools: dense fused layers, equal blocks without b4m's metadata, alpha, the swapped final norm


def test_dense_fused_lora_reads_exactly_and_matches_diffusers(tmp_path):
    """A LoRA trained on the fused layer (rank 5, not block-diagonal, alpha 10): every part gets the whole down and
    its rows of up, scaled by alpha/rank; applied by b4m it equals what diffusers loads (its own split)."""
    model = make_flux()
    g = torch.Generator().manual_seed(7)
    up, down = torch.randn(48, 5, generator=g) * 0.1, torch.randn(5, 16, generator=g) * 0.1
    path = tmp_path / "dense.safetensors"
    save_file(kohya_tensors({"lora_unet_double_blocks_1_txt_attn_qkv": (up, down, 10.0)}), str(path))
    factors, _ = load_lora(path)
    parts = [f"transformer_blocks.1.attn.{m}" for m in ("add_q_proj", "add_k_proj", "add_v_proj")]
    assert list(factors) == parts
    for i, name in enumerate(parts):
        torch.testing.assert_close(factors[name][0] @ factors[name][1], 2.0 * up[16 * i : 16 * (i + 1)] @ down)
    expected = expected_outputs(model, factors)
    pipe = pipeline_with(model)
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(outputs(model), expected, **TOL)


def test_equal_blocks_without_metadata_split_like_diffusers(tmp_path):
    """A block-diagonal fused layer of equal ranks from another tool (no b4m_fused entry) splits into rank-r parts,
    as diffusers' converter splits it; modules outside the blocks read as the converter names them (norm_out's BFL
    shift/scale halves swapped). alpha = rank: the converter ignores final_layer alphas."""
    model = make_flux()
    factors = random_factors(model, [f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")], (2,))
    path = tmp_path / "b4m.safetensors"
    save_lora(factors, path, format="kohya", family="flux")
    tensors = file_tensors(path)
    g = torch.Generator().manual_seed(5)
    for base, module in (("final_layer_adaLN_modulation_1", "norm_out"), ("img_in", "x_embedder")):
        m = model.get_submodule(f"{module}.linear" if module == "norm_out" else module)
        up, down = torch.randn(m.out_features, 2, generator=g), torch.randn(2, m.in_features, generator=g)
        tensors |= kohya_tensors({f"lora_unet_{base}": (up, down, 2.0)})
    save_file(tensors, str(path))  # no metadata now
    loaded, meta = load_lora(path)
    assert "b4m_fused" not in meta
    converted = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    theirs = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in converted if ".lora_A." in k}
    assert set(loaded) == theirs == set(factors) | {"norm_out.linear", "x_embedder"}
    for name, (up, down) in loaded.items():  # same rank (equal blocks split back) and same ΔW
        prefix = "transformer." if "blocks." in name else ""
        a, b = converted[f"{prefix}{name}.lora_A.weight"], converted[f"{prefix}{name}.lora_B.weight"]
        assert down.shape == a.shape and up.shape == b.shape
        torch.testing.assert_close(up @ down, b @ a, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------------
# 4. ComfyUI accepts every key (none would be reported "lora key not loaded")
#
# Facts read (not copied) from ComfyUI, github.com/comfyanonymous/ComfyUI (now Comfy-Org/ComfyUI), commit
# a125cd84b054a57729b5eecab930ca9408719832: comfy/lora.py (model_lora_keys_unet, load_lora), comfy/utils.py
# (flux_to_diffusers), comfy/weight_adapter/lora.py (LoRAAdapter.load) and comfy/ldm/flux/{model,layers}.py:
# - its Flux model holds the BFL layout; every weight "diffusion_model.<P>.weight" is reachable as the LoRA key
#   "lora_unet_" + P with "." → "_" (kohya) and as "diffusion_model.<P>";
# - for Flux, each weight of flux_to_diffusers' diffusers names (every linear of FluxTransformer2DModel and the q/k
#   norms) is reachable as "transformer.<name>", "lycoris_<name _>" and "lora_transformer_<name _>"; q/k/v and
#   proj_mlp map to row slices of qkv / linear1 at offsets 0, h, 2h (3h for proj_mlp, 4h rows);
# - "diffusion_model.single_blocks.<i>.linear1_qkv" maps to linear1's first 3h rows;
# - per key x, load_lora consumes x.alpha and one pair: x.lora_up.weight + x.lora_down.weight (+ x.lora_mid.weight),
#   or x.lora_B.weight + x.lora_A.weight (and a few other spellings); alpha None means scale 1, else alpha / rank.


def comfyui_flux_lora_keys(depth: int, depth_single: int, guidance: bool) -> set[str]:
    """The module keys ComfyUI maps for a Flux model with these block counts (written from the facts above)."""
    bfl = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer"]
    bfl += ["guidance_in.in_layer", "guidance_in.out_layer"] if guidance else []
    bfl += ["final_layer.linear", "final_layer.adaLN_modulation.1"]
    double = ["img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2"]
    double += ["txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2"]
    bfl += [f"double_blocks.{i}.{p}" for i in range(depth) for p in double]
    bfl += [f"single_blocks.{i}.{p}" for i in range(depth_single) for p in ("linear1", "linear2", "modulation.lin")]
    diffusers = ["x_embedder", "context_embedder", "proj_out", "norm_out.linear", "controlnet_x_embedder"]
    diffusers += [f"time_text_embed.{e}_embedder.linear_{j}" for e in ("timestep", "text", "guidance") for j in (1, 2)]
    block = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
    block += ["attn.to_out.0", "attn.to_add_out", "norm1.linear", "norm1_context.linear", "ff.net.0.proj", "ff.net.2"]
    block += ["ff_context.net.0.proj", "ff_context.net.2", "attn.norm_q", "attn.norm_k"]
    block += ["attn.norm_added_q", "attn.norm_added_k"]
    single = [
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "proj_mlp",
        "norm.linear",
        "proj_out",
        "attn.norm_q",
        "attn.norm_k",
    ]
    diffusers += [f"transformer_blocks.{i}.{p}" for i in range(depth) for p in block]
    diffusers += [f"single_transformer_blocks.{i}.{p}" for i in range(depth_single) for p in single]
    keys = {"lora_unet_" + p.replace(".", "_") for p in bfl} | {"diffusion_model." + p for p in bfl}
    for name in diffusers:
        keys |= {
            f"transformer.{name}",
            "lycoris_" + name.replace(".", "_"),
            "lora_transformer_" + name.replace(".", "_"),
        }
    return keys | {f"diffusion_model.single_blocks.{i}.linear1_qkv" for i in range(depth_single)}


COMFYUI_PAIRS = {"kohya": ("lora_up.weight", "lora_down.weight"), "diffusers": ("lora_B.weight", "lora_A.weight")}


def comfyui_reading(path, fmt: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """``{module key: (up, down, alpha)}`` as ComfyUI's load_lora pairs the file's tensors; fails on a key it would
    report as "lora key not loaded"."""
    tensors = file_tensors(path)
    accepted = comfyui_flux_lora_keys(TINY_FLUX["num_layers"], TINY_FLUX["num_single_layers"], guidance=True)
    up_suffix, down_suffix = COMFYUI_PAIRS[fmt]
    modules = {k.removesuffix(f".{up_suffix}") for k in tensors if k.endswith(f".{up_suffix}")}
    assert modules <= accepted, sorted(modules - accepted)
    loaded = {f"{m}.{s}" for m in modules for s in (up_suffix, down_suffix, "alpha")}
    assert set(tensors) <= loaded, sorted(set(tensors) - loaded)  # nothing left over: "lora key not loaded"
    alpha = {m: tensors[f"{m}.alpha"].item() if f"{m}.alpha" in tensors else None for m in modules}
    return {m: (tensors[f"{m}.{up_suffix}"].float(), tensors[f"{m}.{down_suffix}"].float(), alpha[m]) for m in modules}


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_comfyui_maps_every_key_and_computes_the_same_delta(fmt, tmp_path):
    """Every module key is one ComfyUI maps, every tensor is consumed, and ΔW as ComfyUI computes it (alpha/rank ·
    up @ down, on the fused weight at the parts' row offsets for qkv / linear1) is each module's up @ down."""
    model = make_flux()
    names = [n for n in linear_names(model) if "blocks." in n] if fmt == "kohya" else linear_names(model)
    names.remove("transformer_blocks.1.attn.add_q_proj")  # a zero block in txt_attn_qkv
    names.remove("single_transformer_blocks.1.proj_mlp")  # and one in linear1, 4·hidden rows
    factors = random_factors(model, names, ranks=(2, 3))
    path = tmp_path / f"comfy_{fmt}.safetensors"
    save_lora(factors, path, format=fmt, family="flux")
    h = model.inner_dim
    offsets = {
        "to_q": 0,
        "to_k": h,
        "to_v": 2 * h,
        "add_q_proj": 0,
        "add_k_proj": h,
        "add_v_proj": 2 * h,
        "proj_mlp": 3 * h,
    }
    for key, (up, down, alpha) in comfyui_reading(path, fmt).items():
        delta = (1.0 if alpha is None else alpha / down.shape[0]) * up @ down
        parts = layer_modules(key, path) if fmt == "kohya" else [key.removeprefix("transformer.")]
        rows = 0
        for name in parts:
            m = model.get_submodule(name)
            part = delta[offsets.get(name.rsplit(".", 1)[-1], 0) :][: m.out_features] if len(parts) > 1 else delta
            ref = (
                factors[name][0] @ factors[name][1] if name in factors else torch.zeros(m.out_features, m.in_features)
            )
            torch.testing.assert_close(part, ref, rtol=1e-5, atol=1e-7)
            rows += m.out_features
        assert delta.shape == (rows, model.get_submodule(parts[0]).in_features)  # the BFL weight's shape


# --------------------------------------------------------------------------------------------------------------------
# 5. Bad input: one-line B4MError naming the file


def _raises(call, path, match: str) -> None:
    with pytest.raises(b4m.B4MError, match=match) as info:
        call()
    assert path.name in str(info.value) and "\n" not in str(info.value)


def test_bad_module_names_and_arguments(tmp_path):
    model = make_flux()
    factors = random_factors(model, ["transformer_blocks.0.attn.to_q"])
    path = tmp_path / "bad.safetensors"
    unet_name = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": factors["transformer_blocks.0.attn.to_q"]
    }
    for fmt in ("diffusers", "kohya"):
        _raises(
            lambda f=fmt: save_lora(unet_name, path, format=f, family="flux"), path, "not a linear layer of a FLUX"
        )
    typo = {"transformer_blocks.0.attn.to_qq": factors["transformer_blocks.0.attn.to_q"]}
    _raises(lambda: save_lora(typo, path, family="flux"), path, r"module transformer_blocks\.0\.attn\.to_qq is not")
    _raises(lambda: save_lora(factors, path, format="kohya", family="flux", kohya_naming="sgm"), path, "BFL names")
    _raises(lambda: save_lora(factors, path, family="sd3"), path, "family must be")
    assert not path.exists()


def test_fused_parts_that_do_not_fit(tmp_path):
    model = make_flux()
    factors = random_factors(model, ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"])
    path = tmp_path / "shapes.safetensors"
    up, down = factors["transformer_blocks.0.attn.to_k"]
    bad = {**factors, "transformer_blocks.0.attn.to_k": (up, down[:, :8])}
    _raises(lambda: save_lora(bad, path, format="kohya", family="flux"), path, "img_attn_qkv: fused modules .* differ")
    bad = {**factors, "transformer_blocks.0.attn.to_k": (up[:8], down)}
    _raises(lambda: save_lora(bad, path, format="kohya", family="flux"), path, r"to_k: LoRA up \(8, 3\)")
    assert not path.exists()


def test_unreadable_flux_kohya_files(tmp_path):
    path = tmp_path / "foreign.safetensors"
    z = torch.zeros
    save_file(kohya_tensors({"lora_unet_double_blocks_0_img_attn_qkvx": (z(48, 3), z(3, 16), 3.0)}), str(path))
    _raises(lambda: load_lora(path), path, "lora_unet_double_blocks_0_img_attn_qkvx is not a FLUX.1 layer")
    save_file(kohya_tensors({"lora_unet_double_blocks_0_img_attn_qkv": (z(40, 3), z(3, 16), 3.0)}), str(path))
    _raises(lambda: load_lora(path), path, r"img_attn_qkv: LoRA up \(40, 3\) / down \(3, 16\) do not split")
    mixed = {"lora_unet_double_blocks_0_img_attn_proj": (z(16, 3), z(3, 16), 3.0)}
    mixed["lora_unet_down_blocks_0_attentions_0_proj_in"] = (z(16, 3), z(3, 16), 3.0)
    save_file(kohya_tensors(mixed), str(path))
    _raises(lambda: load_lora(path), path, "down_blocks_0_attentions_0_proj_in is not a FLUX.1 layer")
    key = "transformer.transformer_blocks.0.attn.to_qq"
    save_file({f"{key}.lora_A.weight": z(3, 16), f"{key}.lora_B.weight": z(16, 3)}, str(path))
    _raises(lambda: load_lora(path), path, r"to_qq is not a linear layer of a FLUX.1 or FLUX.2 \[klein\] transformer")
