"""Plain LoRA files for FLUX.2 [klein] transformers (b4m.lora_files with family="flux2"; issue 17): the diffusers/peft
and kohya/BFL formats written, read back and checked against diffusers' own FLUX.2 loaders on a tiny
``Flux2Transformer2DModel`` built in code, and against ComfyUI's key mapping (no hub access)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from safetensors.torch import save_file

import b4m
from b4m.lora_files import applied, load_lora, save_lora
from b4m.lora_files.flux import FLUX2, layer_modules
from b4m.lora_files.write import _diffusers_payload
from test_lora_flux import (
    assert_factors_equal,
    file_metadata,
    file_tensors,
    lora_layers,
    random_factors,
    scalings,
)
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


# --------------------------------------------------------------------------------------------------------------------
# 2. The kohya/BFL format (what kohya sd-scripts names FLUX layers; ComfyUI reads it): klein's double blocks fuse
#    q, k, v into img_attn_qkv / txt_attn_qkv (block-diagonal factors), the single blocks' linear1 / linear2 are
#    to_qkv_mlp_proj / to_out themselves.

BLOCK_LAYERS = ("attn.", "ff.", "ff_context.")


def block_names(model) -> list[str]:
    return [n for n in linear_names(model) if "blocks." in n and n.split(".", 2)[2].startswith(BLOCK_LAYERS)]


def test_kohya_format_loads_in_diffusers_and_reads_back(tmp_path):
    """Every block layer and the top layers diffusers' FLUX.2 kohya converter maps, mixed ranks, one zero part in a
    fused qkv: Flux2KleinPipeline.load_lora_weights gives b4m's merge; b4m reads back the factors it wrote."""
    model = make_klein()
    names = [*block_names(model), "x_embedder", "context_embedder", "proj_out"]
    names += ["time_guidance_embed.timestep_embedder.linear_1", "time_guidance_embed.timestep_embedder.linear_2"]
    names.remove("transformer_blocks.1.attn.add_k_proj")  # a zero block in txt_attn_qkv
    factors = random_factors(model, names, ranks=(2, 3, 3))
    path = tmp_path / "klein_kohya.safetensors"
    assert save_lora(factors, path, format="kohya", family="flux2") == "bfl"
    keys = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in file_tensors(path)}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in keys and "lora_unet_single_blocks_1_linear1" in keys
    assert "lora_unet_single_blocks_1_linear2" in keys and "lora_unet_double_blocks_1_txt_mlp_0" in keys
    assert file_metadata(path)["b4m_family"] == "flux2"

    assert_factors_equal(load_lora(path)[0], factors)  # rank preserving: the metadata's blocks, zero part dropped
    with applied(model, factors):
        ours = outputs(model)
    theirs_model = make_klein()
    klein_pipeline(theirs_model).load_lora_weights(str(path))
    assert set(lora_layers(theirs_model)) == set(factors) | {"transformer_blocks.1.attn.add_k_proj"}
    torch.testing.assert_close(outputs(theirs_model), ours, **TOL)

    # A kohya file without b4m's metadata (another tool's): klein told from FLUX.1 by its layers' widths.
    bare = tmp_path / "bare.safetensors"
    save_file(file_tensors(path), str(bare))
    read = load_lora(bare)[0]
    assert set(read) == set(factors) | {"transformer_blocks.1.attn.add_k_proj"}
    with applied(model, read):
        torch.testing.assert_close(outputs(model), ours, **TOL)


def test_layers_diffusers_kohya_loader_drops_are_refused(tmp_path):
    model = make_klein()
    for name in (
        "single_stream_modulation.linear",
        "norm_out.linear",
        "time_guidance_embed.guidance_embedder.linear_1",
    ):
        path = tmp_path / f"refused_{name}.safetensors"
        with pytest.raises(b4m.B4MError, match=r"FLUX.2 \[klein\] kohya loader does not load it.*format='diffusers'"):
            save_lora(random_factors(model, [name]), path, format="kohya", family="flux2")
        assert not path.exists()
        save_lora(random_factors(model, [name]), tmp_path / "d.safetensors", format="diffusers", family="flux2")


# --------------------------------------------------------------------------------------------------------------------
# 3. ComfyUI (Comfy-Org/ComfyUI; facts read, not its code): model_base.Flux2 subclasses model_base.Flux
#    (comfy/model_base.py @ 094c74c1), so comfy/lora.py's model_lora_keys_unet (@ 17358c8f) maps for klein
#    - "lora_unet_<BFL weight name, . → _>" for every weight of the BFL checkpoint (kohya keys), and
#    - "transformer.<diffusers name>" for every diffusers weight comfy/utils.py's flux_to_diffusers (@ 09708eae) knows:
#      double blocks attn.to_q/k/v and add_q/k/v_proj → rows 0, h, 2h (h rows each) of img_attn.qkv / txt_attn.qkv,
#      attn.to_out.0 / to_add_out → img_attn.proj / txt_attn.proj, ff(_context).linear_in / linear_out →
#      img(txt)_mlp.0 / .2; single blocks attn.to_qkv_mlp_proj → linear1, attn.to_out → linear2 ("# Flux 2");
#      x_embedder → img_in, context_embedder → txt_in, proj_out → final_layer.linear. Klein's
#      time_guidance_embed.*, *_stream_modulation.* are not in it (FLUX.1's time_text_embed.* are).
#    comfy/weight_adapter/lora.py (@ 6f98b150) pairs x.lora_up/x.lora_down or x.lora_B/x.lora_A and scales by
#    x.alpha / rank (1 without alpha).

QKV = {"to_q": ("img_attn.qkv", 0), "to_k": ("img_attn.qkv", 1), "to_v": ("img_attn.qkv", 2)}
QKV |= {f"add_{x}_proj": ("txt_attn.qkv", i) for i, x in enumerate("qkv")}
COMFY_BLOCK = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0"}
COMFY_BLOCK |= {
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
COMFY_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
COMFY_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear"}


def comfyui_target(name: str, h: int) -> tuple[str, int | None]:
    """The BFL weight (and its first row, for a q/k/v slice) ComfyUI patches for the diffusers module ``name``."""
    if name in COMFY_TOP:
        return COMFY_TOP[name], None
    kind, i, inner = name.split(".", 2)
    if kind == "single_transformer_blocks":
        return f"single_blocks.{i}.{COMFY_SINGLE[inner]}", None
    if inner.removeprefix("attn.") in QKV:
        layer, part = QKV[inner.removeprefix("attn.")]
        return f"double_blocks.{i}.{layer}", part * h
    return f"double_blocks.{i}.{COMFY_BLOCK[inner]}", None


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_comfyui_maps_every_key_and_computes_the_same_delta(fmt, tmp_path):
    model = make_klein()
    names = block_names(model) + list(COMFY_TOP)
    names.remove("transformer_blocks.0.attn.to_v")  # a zero block in img_attn_qkv (kohya)
    factors = random_factors(model, names, ranks=(2, 3))
    path = tmp_path / f"comfy_{fmt}.safetensors"
    save_lora(factors, path, format=fmt, family="flux2")
    tensors, h = file_tensors(path), model.inner_dim
    up_s, down_s = ("lora_up.weight", "lora_down.weight") if fmt == "kohya" else ("lora_B.weight", "lora_A.weight")
    keys = {k.removesuffix(f".{up_s}") for k in tensors if k.endswith(up_s)}
    assert {f"{k}.{s}" for k in keys for s in (up_s, down_s, "alpha")} >= set(tensors)  # every tensor consumed
    deltas: dict[str, torch.Tensor] = {}  # ΔW per (BFL weight, first row) as ComfyUI adds it
    for key in keys:
        up, down = tensors[f"{key}.{up_s}"].float(), tensors[f"{key}.{down_s}"].float()
        alpha = tensors[f"{key}.alpha"].item() / down.shape[0] if f"{key}.alpha" in tensors else 1.0
        if fmt == "kohya":  # lora_unet_<BFL name>: the whole BFL weight
            modules = layer_modules(key, path, FLUX2)
            for i, name in enumerate(modules):
                rows = slice(i * h, (i + 1) * h) if len(modules) > 1 else slice(None)
                deltas[name] = (alpha * up @ down)[rows]
        else:
            name = key.removeprefix("transformer.")
            comfyui_target(name, h)  # ComfyUI has a target for it (KeyError if not)
            deltas[name] = alpha * up @ down
    for name in names:
        torch.testing.assert_close(deltas.pop(name), factors[name][0] @ factors[name][1], rtol=1e-5, atol=1e-7)
    assert all(not d.any() for d in deltas.values())  # only the zero part is left
    for name in names:  # and ComfyUI's slice of the BFL weight is the module's own weight
        _, row = comfyui_target(name, h)
        assert model.get_submodule(name).weight.shape[0] == (
            h if row is not None else model.get_submodule(name).out_features
        )
