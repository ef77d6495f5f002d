import json

import pytest
import torch
from safetensors.torch import save_file

from b4m import B4MError, PLPConfig, add_plp, plp_layers
from b4m.adapter.file import adapter_from_model, apply_adapter, fuse, load_adapter, save_adapter
from conftest import TINY_SD_UNET, TINY_SDXL_UNET, make_unet, unet_inputs
from test_adapter_layer import randomize_learned


def trained_run(role: str, seed: int, config: PLPConfig | None = None, unet_config=TINY_SD_UNET):
    """A 'run' made on its own model (as on another machine): fresh UNet, fresh adapter, random learned halves."""
    unet = make_unet(unet_config)
    config = config or PLPConfig(rank=4, base_model="tiny-sd")
    add_plp(unet, config)
    randomize_learned(unet, seed=seed)
    return unet, adapter_from_model(unet, config, role, {"trigger_words": json.dumps([f"<{role}>"])})


def test_round_trip_keeps_tensors_config_role_and_outputs(tmp_path):
    unet, adapter = trained_run("content", seed=1)
    path = save_adapter(adapter, tmp_path / "dog.b4m.safetensors")
    loaded = load_adapter(path)
    assert loaded.role == "content" and loaded.config == adapter.config
    assert loaded.fingerprint() == adapter.fingerprint()
    assert loaded.metadata == {"trigger_words": '["<content>"]'}
    for name in adapter.modules:
        for part, t in adapter.tensors[name].items():
            assert torch.equal(loaded.tensors[name][part], t)
    fresh = make_unet(TINY_SD_UNET)
    apply_adapter(fresh, loaded)
    inputs = unet_inputs(unet)
    assert torch.equal(fresh(**inputs).sample, unet(**inputs).sample)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_fuse_takes_content_half_from_content_and_style_half_from_style(tmp_path):
    _, content = trained_run("content", seed=1)
    _, style = trained_run("style", seed=2)
    assert content.fingerprint() == style.fingerprint()  # independent runs share the frozen parts
    save_adapter(content, tmp_path / "c.b4m.safetensors")
    save_adapter(style, tmp_path / "s.b4m.safetensors")
    fused = fuse(load_adapter(tmp_path / "c.b4m.safetensors"), load_adapter(tmp_path / "s.b4m.safetensors"))
    assert fused.role == "fused"
    assert json.loads(fused.metadata["trigger_words"]) == ["<content>", "<style>"]
    for name in content.modules:
        f, c, s = fused.tensors[name], content.tensors[name], style.tensors[name]
        assert torch.equal(f["up_learned"], c["up_learned"])  # paper: content = B (up)
        assert torch.equal(f["down_learned"], s["down_learned"])  # style = D (down)
        assert torch.equal(f["up_frozen"], c["up_frozen"]) and torch.equal(f["down_frozen"], s["down_frozen"])


def test_fuse_with_official_assignment_swaps_halves():
    config = PLPConfig(rank=4, assignment="official")
    _, content = trained_run("content", 1, config)
    _, style = trained_run("style", 2, config)
    fused = fuse(content, style)
    name = content.modules[0]
    assert torch.equal(fused.tensors[name]["down_learned"], content.tensors[name]["down_learned"])
    assert torch.equal(fused.tensors[name]["up_learned"], style.tensors[name]["up_learned"])


@pytest.mark.parametrize(
    ("style_config", "message"),
    [
        (PLPConfig(rank=8, base_model="tiny-sd"), "rank differs \\(4 vs 8\\)"),
        (PLPConfig(rank=4, seed=1, base_model="tiny-sd"), "seed differs"),
        (PLPConfig(rank=4, base_model="other"), "base_model differs \\('tiny-sd' vs 'other'\\)"),
        (PLPConfig(rank=4, init="exact", base_model="tiny-sd"), "init differs"),
        (PLPConfig(rank=4, targets=["to_q"], base_model="tiny-sd"), "adapted modules differ"),
    ],
)
def test_fuse_refuses_mismatches_and_names_them(style_config, message):
    _, content = trained_run("content", 1)
    _, style = trained_run("style", 2, style_config)
    with pytest.raises(B4MError, match=f"cannot fuse .*{message}"):
        fuse(content, style)


def test_fuse_refuses_swapped_roles():
    _, content = trained_run("content", 1)
    _, style = trained_run("style", 2)
    with pytest.raises(B4MError, match="is a style run, but it was given as the content run"):
        fuse(style, content)


def test_fuse_tolerates_last_bit_differences_but_not_more():
    _, content = trained_run("content", 1)
    _, style = trained_run("style", 2)
    name = style.modules[0]
    style.tensors[name]["up_frozen"] = style.tensors[name]["up_frozen"] + 1e-8
    with pytest.warns(UserWarning, match="last-bit"):
        fuse(content, style)
    style.tensors[name]["up_frozen"] = style.tensors[name]["up_frozen"] + 1e-3
    with pytest.raises(B4MError, match=f"frozen part up_frozen of {name} differs"):
        fuse(content, style)


def test_load_rejects_bad_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(B4MError, match="plain.safetensors: not a b4m adapter file"):
        load_adapter(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(B4MError, match="junk.safetensors: not a readable safetensors file"):
        load_adapter(junk)
    (tmp_path / "model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(B4MError, match="model.bin: pickle-based files are not loaded"):
        load_adapter(tmp_path / "model.bin")
    with pytest.raises(B4MError, match="missing.safetensors: no such file"):
        load_adapter(tmp_path / "missing.safetensors")

    _, adapter = trained_run("content", 1)
    name = adapter.modules[0]
    adapter.tensors[name]["up_learned"][0, 0] = float("nan")
    with pytest.raises(B4MError, match="holds NaN or Inf"):
        load_adapter(save_adapter(adapter, tmp_path / "nan.b4m.safetensors"))

    _, adapter = trained_run("content", 1)
    path = save_adapter(adapter, tmp_path / "ok.b4m.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors[f"{name}.down_frozen"] = tensors[f"{name}.down_frozen"] + 1.0  # the fingerprint covers A and C
    save_file(tensors, str(tmp_path / "tampered.safetensors"), metadata=meta)
    with pytest.raises(B4MError, match="does not match the tensors"):
        load_adapter(tmp_path / "tampered.safetensors")
    del tensors[f"{name}.down_learned"]
    save_file(tensors, str(tmp_path / "partial.safetensors"), metadata=meta)
    with pytest.raises(B4MError, match=f"module {name} lacks down_learned"):
        load_adapter(tmp_path / "partial.safetensors")


def test_apply_refuses_a_file_made_for_another_model(tmp_path):
    _, adapter = trained_run("content", 1, PLPConfig(rank=4), unet_config=TINY_SDXL_UNET)
    path = save_adapter(adapter, tmp_path / "xl.b4m.safetensors")
    with pytest.raises(B4MError, match="xl.b4m.safetensors: module .* does not exist in the model|is .* in the file"):
        apply_adapter(make_unet(TINY_SD_UNET), load_adapter(path))


def test_factors_reproduce_the_adapted_model():
    unet, adapter = trained_run("fused", 1)
    w_before = {n: layer.base_layer.weight.clone() for n, layer in plp_layers(unet).items()}
    for name, (up, down) in adapter.factors(content_scale=0.5, style_scale=2.0, scale=0.7).items():
        layer = plp_layers(unet)[name]
        layer.up_scale, layer.down_scale, layer.scale = 0.5, 2.0, 0.7
        torch.testing.assert_close(up @ down, layer.delta_weight())
        assert torch.equal(layer.base_layer.weight, w_before[name])
