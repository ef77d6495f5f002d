"""A FLUX transformer from one .safetensors file, the rest from a diffusers folder (``--transformer FILE --model
FOLDER``): it loads with no network, gives the file's transformer, reaches every command and the run's record, and a
wrong file is refused in one line before the big parts load. Tiny models, CPU."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
from diffusers import FluxTransformer2DModel
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import b4m.models.loading as diffusers_loading
from b4m.adapter.file import load_adapter
from b4m.cli import app
from b4m.describe import describe
from b4m.errors import B4MError
from b4m.loading import load_model
from b4m.models import flux_file
from test_flux import _transformer_inputs
from tiny_pipelines import FLUX_TRANSFORMER, dog_and_yarn, save_tiny_flux

runner = CliRunner()


def _save(tensors: dict[str, torch.Tensor], path) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny FLUX.1-dev-like folder; ``own``: its own transformer as one file; ``other``: another transformer of the
    same shape (other weights) as one file, and that transformer."""
    root = tmp_path_factory.mktemp("single")
    folder = save_tiny_flux(root / "tiny-flux")
    own = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict()
    torch.manual_seed(9)
    other = FluxTransformer2DModel(**FLUX_TRANSFORMER).eval()
    return {
        "folder": str(folder),
        "own": _save(own, root / "own.safetensors"),
        "other": _save(other.state_dict(), root / "tiny-dev.safetensors"),
        "other_model": other,
        "root": root,
    }


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (and is recorded)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use in a test that must run offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def _output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**_transformer_inputs(model), return_dict=False)[0]


def test_the_files_transformer_loads_offline_with_the_folders_rest(files, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = load_model(files["folder"])
    own = load_model(files["folder"], transformer=files["own"])
    assert own.identity == "flux:own.safetensors" and base.identity == "flux:tiny-flux"
    torch.testing.assert_close(_output(own.denoiser), _output(base.denoiser), rtol=0, atol=0)
    # the folder needs no transformer weights of its own: its transformer/config.json is enough
    rest = shutil.copytree(files["folder"], files["root"] / "rest-only", dirs_exist_ok=True)
    for weights in (rest / "transformer").glob("*.safetensors"):
        weights.unlink()
    other = load_model(str(rest), transformer=files["other"])
    torch.testing.assert_close(_output(other.denoiser), _output(files["other_model"]), rtol=0, atol=0)
    assert not torch.allclose(_output(other.denoiser), _output(base.denoiser))
    assert no_network == []


def test_fp8_files_and_whole_comfyui_checkpoints_load(files, tmp_path):
    state = files["other_model"].state_dict()
    fp8 = _save({k: v.to(torch.float8_e4m3fn) for k, v in state.items()}, tmp_path / "fp8.safetensors")
    comfy = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    comfy["vae.decoder.conv_in.weight"] = torch.zeros(2)  # a whole checkpoint holds the VAE and text encoders too
    comfy = _save(comfy, tmp_path / "comfy.safetensors")
    read = flux_file.read_transformer_file(fp8)
    assert (read.family, read.layout, read.dtypes) == ("flux", "diffusers", ("F8_E4M3",))
    loaded = flux_file.load_transformer(read, files["folder"], torch.float32, local=True)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for name, value in loaded.state_dict().items():  # e4m3 keeps 3 mantissa bits: within 1/16 of each value
        torch.testing.assert_close(value, state[name], rtol=1 / 16, atol=1e-2)
    read = flux_file.read_transformer_file(comfy)
    assert read.prefix == "model.diffusion_model."
    loaded = flux_file.load_transformer(read, files["folder"], torch.float32, local=True)
    torch.testing.assert_close(_output(loaded), _output(files["other_model"]), rtol=0, atol=0)


def _bfl_flux1(width: int, double: int = 1, single: int = 1, guidance: bool = True) -> dict[str, torch.Tensor]:
    """Tensors named as Black Forest Labs' FLUX.1 files name them (flux1-dev.safetensors), tiny zeros."""
    w, mlp = width, 4 * width
    shapes = {
        "img_in": (w, 64),
        "txt_in": (w, 24),
        "final_layer.linear": (64, w),
        "final_layer.adaLN_modulation.1": (2 * w, w),
    }
    for name in ("time_in", "vector_in", *(("guidance_in",) if guidance else ())):
        shapes |= {f"{name}.in_layer": (w, 16), f"{name}.out_layer": (w, w)}
    for i in range(double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}"
            shapes |= {f"{p}_mod.lin": (6 * w, w), f"{p}_attn.qkv": (3 * w, w), f"{p}_attn.proj": (w, w)}
            shapes |= {f"{p}_mlp.0": (mlp, w), f"{p}_mlp.2": (w, mlp)}
    for i in range(single):
        p = f"single_blocks.{i}"
        shapes |= {f"{p}.linear1": (3 * w + mlp, w), f"{p}.linear2": (w, w + mlp), f"{p}.modulation.lin": (3 * w, w)}
    tensors = {f"{k}.weight": torch.zeros(s) for k, s in shapes.items()}
    tensors |= {f"{k}.bias": torch.zeros(s[0]) for k, s in shapes.items()}
    return tensors


def test_bfl_files_are_recognised_and_go_through_diffusers_converter(files, tmp_path, monkeypatch):
    path = _save(_bfl_flux1(16), tmp_path / "bfl.safetensors")
    read = flux_file.read_transformer_file(path)
    assert (read.family, read.layout, read.prefix) == ("flux", "bfl", "")
    assert read.geometry() == {
        "double blocks": 1,
        "single blocks": 1,
        "width": 16,
        "latent channels": 64,
        "text width": 24,
        "guidance embedding": True,
    }
    # diffusers' BFL converter is FLUX.1's full width only (inner_dim 3072): a narrower BFL file is refused in one line
    with pytest.raises(B4MError, match="diffusers' converter takes FLUX.1's 3072 only"):
        load_model(files["folder"], transformer=path)
    # ... and a BFL file goes through diffusers' own converter (here a stand-in that records what it is given)
    import diffusers.loaders.single_file_model as single_file

    seen = []

    def converter(checkpoint, **kwargs):
        seen.append(sorted(checkpoint))
        return dict(files["other_model"].state_dict())

    entry = single_file.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    monkeypatch.setitem(entry, "checkpoint_mapping_fn", converter)
    loaded = flux_file.load_transformer(read, files["folder"], torch.float32, local=True)
    assert seen == [sorted(_bfl_flux1(16))]
    torch.testing.assert_close(_output(loaded), _output(files["other_model"]), rtol=0, atol=0)


def test_commands_take_the_transformer_and_the_run_records_it(files, tmp_path, no_network):
    refs = dog_and_yarn(tmp_path)
    shutil.copy(files["other"], tmp_path / "tiny-dev.safetensors")
    flow = tmp_path / "flow.toml"  # the config key, a path relative to the file; no validation images (speed)
    flow.write_text(
        'transformer = "tiny-dev.safetensors"\n'
        + "".join(f"[{stage}.validation]\nseeds = []\n" for stage in ("content", "style", "make"))
        + "[generate]\nsteps = 2\n"
    )
    out = tmp_path / "flow"
    args = [
        *("run", "-c", flow, "-m", files["folder"], "-o", out, "--resolution", "32"),
        *("--rank", "4", "--steps", "1", "--make-steps", "1", "-n", "1", "--prompt", "a sks dog in zwx style"),
        *("--content-images", refs["dog"], "--content-prompt", "a photo of sks dog", "--content-aux", refs["aux"]),
        *("--style-images", refs["yarn"], "--style-prompt", "a cat in zwx style", "--style-aux", refs["content_aux"]),
    ]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    for folder in ("content", "style", "made"):
        run = json.loads((out / folder / "run.json").read_text())
        assert (
            run["config"]["transformer"] == str(tmp_path / "tiny-dev.safetensors")
            and run["base_model"] == "flux:tiny-dev.safetensors"
        )
    assert load_adapter(out / "made" / "fused.b4m.safetensors").config.base_model == "flux:tiny-dev.safetensors"
    # generate on the made run, in a new process' way (nothing shared): the run's transformer, from its run.json
    again = tmp_path / "again"
    result = runner.invoke(
        app, ["generate", str(out / "made"), "a sks dog", "-n", "1", "--steps", "1", "-o", str(again)]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    settings = json.loads(Image.open(again / "00_seed0.png").text["b4m"])
    assert settings["transformer"] == str(tmp_path / "tiny-dev.safetensors")
    alone = tmp_path / "alone" / "fused.b4m.safetensors"  # without its run.json: the error names both flags
    alone.parent.mkdir()
    shutil.copy(out / "made" / "fused.b4m.safetensors", alone)
    message = _one_line_error("generate", alone, "a sks dog", "-o", tmp_path / "g2")
    assert message.endswith(
        "pass --transformer (the file tiny-dev.safetensors) and --model (the FLUX folder or Hub id of the rest)"
    )
    assert no_network == []


# diffusers' names of a klein transformer → Black Forest Labs' (the inverse of diffusers' FLUX.2 converter)
KLEIN_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}
KLEIN_DOUBLE = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.to_out.0.weight": "img_attn.proj.weight",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_add_out.weight": "txt_attn.proj.weight",
    "ff.linear_in.weight": "img_mlp.0.weight",
    "ff.linear_out.weight": "img_mlp.2.weight",
    "ff_context.linear_in.weight": "txt_mlp.0.weight",
    "ff_context.linear_out.weight": "txt_mlp.2.weight",
}
KLEIN_SINGLE = {
    "attn.to_qkv_mlp_proj.weight": "linear1.weight",
    "attn.to_out.weight": "linear2.weight",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}


def _bfl_klein(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A klein transformer's tensors under BFL's names (flux-2-klein-*.safetensors): fused q, k, v; the final
    modulation as (shift, scale)."""
    out = {}
    for name, value in state.items():
        block, _, rest = name.partition(".0.")
        if block == "transformer_blocks":
            if rest in KLEIN_DOUBLE:
                out[f"double_blocks.0.{KLEIN_DOUBLE[rest]}"] = value
        elif block == "single_transformer_blocks":
            out[f"single_blocks.0.{KLEIN_SINGLE[rest]}"] = value
        elif name == "norm_out.linear.weight":
            scale, shift = value.chunk(2)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
        else:
            module, param = name.rsplit(".", 1)
            out[f"{KLEIN_TOP[module]}.{param}"] = value
    for side, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
        qkv = [state[f"transformer_blocks.0.attn.{n}.weight"] for n in names]
        out[f"double_blocks.0.{side}_attn.qkv.weight"] = torch.cat(qkv)
    return out


def test_klein_transformers_load_from_bfl_and_diffusers_files(tmp_path, no_network):
    from diffusers import Flux2Transformer2DModel

    from tiny_pipelines import KLEIN_TRANSFORMER, save_tiny_flux2

    folder = save_tiny_flux2(tmp_path / "tiny-klein")
    torch.manual_seed(5)
    other = Flux2Transformer2DModel(**KLEIN_TRANSFORMER).eval()
    diffusers_file = _save(other.state_dict(), tmp_path / "klein-diffusers.safetensors")
    bfl_file = _save(_bfl_klein(other.state_dict()), tmp_path / "klein-bfl.safetensors")
    assert flux_file.read_transformer_file(bfl_file).layout == "bfl"
    for path in (diffusers_file, bfl_file):  # the BFL names through diffusers' FLUX.2 converter
        loaded = load_model(str(folder), transformer=path)
        assert loaded.family == "flux2" and loaded.identity.startswith("flux2:klein-")
        for name, value in loaded.denoiser.state_dict().items():
            torch.testing.assert_close(value, other.state_dict()[name], rtol=0, atol=0, msg=name)
    assert no_network == []


def _one_line_error(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0 and isinstance(result.exception, B4MError), result.output + repr(result.exception)
    message = str(result.exception)
    assert "\n" not in message
    return message


def test_wrong_files_and_models_are_refused_in_one_line_before_loading(files, tmp_path, monkeypatch):
    monkeypatch.setattr(diffusers_loading, "load_transformer", lambda *a, **k: pytest.fail("the transformer loaded"))
    monkeypatch.setattr(diffusers_loading, "_from_pretrained", lambda *a, **k: pytest.fail("the pipeline loaded"))
    folder, root = files["folder"], tmp_path
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    (root / "pickle.ckpt").write_bytes(b"\x80\x04")
    _save({"conditioner.embedders.1.model.w": torch.zeros(2)}, root / "sdxl.safetensors")
    _save({**_bfl_flux1(16), "double_blocks.0.img_attn.qkv.scale_weight": torch.ones(1)}, root / "scaled.safetensors")
    bigger = FluxTransformer2DModel(**{**FLUX_TRANSFORMER, "num_layers": 2, "guidance_embeds": False})
    _save(bigger.state_dict(), root / "bigger.safetensors")
    klein = root / "klein"  # a FLUX.2 [klein] folder, as far as its model_index.json says
    klein.mkdir()
    (klein / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    sd = root / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))

    refs = dog_and_yarn(root / "refs")
    content = [
        "content",
        "--images",
        refs["dog"],
        "--prompt",
        "a photo of sks dog",
        "--aux",
        refs["aux"],
        "--rank",
        "4",
    ]
    cases = {
        root / "missing.safetensors": (folder, "missing.safetensors: no such transformer file"),
        root / "pickle.ckpt": (folder, "pickle.ckpt: not a .safetensors file"),
        root / "garbage.safetensors": (folder, "garbage.safetensors: not a readable .safetensors file"),
        root / "sdxl.safetensors": (folder, "sdxl.safetensors: not a FLUX.1 or FLUX.2 transformer checkpoint"),
        root / "scaled.safetensors": (folder, "scaled.safetensors: a ComfyUI scaled-fp8 checkpoint"),
        root / "bigger.safetensors": (folder, "double blocks 2 vs 1, guidance embedding no vs yes"),
        files["own"]: (str(klein), "own.safetensors: a FLUX.1 transformer (diffusers names, F32, 1 double and 1"),
    }
    for i, (path, (model, expected)) in enumerate(cases.items()):
        message = _one_line_error(*content, "-o", root / f"c{i}", "--model", model, "--transformer", path)
        assert expected in message, message
    message = _one_line_error(*content, "-o", root / "sd-run", "--model", sd, "--transformer", files["own"])
    assert message.endswith(
        f"--transformer replaces the transformer of a FLUX.1 or FLUX.2 [klein] diffusers model, and {sd} is none"
    )
    message = _one_line_error(*content, "-o", root / "w", "--transformer", files["own"])  # the built-in world
    assert "the world model has none" in message
    message = _one_line_error(*content, "-o", root / "f", "--model", files["own"], "--transformer", files["own"])
    assert "with --transformer, --model is the diffusers folder or Hub id of the rest" in message
    # a FLUX transformer file as the whole model: the fix named, from its header, by the stages and by dry-run
    bfl = _save(_bfl_flux1(16), root / "flux1-dev.safetensors")
    for args in ([*content, "-o", root / "alone", "--model", bfl], ["dry-run", "--model", bfl]):
        message = _one_line_error(*args)
        assert message.startswith(f"{bfl}: a FLUX.1 transformer (BFL/ComfyUI names, F32, 1 double and 1 single")
        assert f"not a whole model; load it with --transformer {bfl} --model FOLDER" in message
    assert not any((root / f"c{i}").exists() for i in range(len(cases)))


def test_dry_run_checks_the_file_against_the_folder_and_inspect_reads_its_header(files, tmp_path):
    result = runner.invoke(
        app, ["dry-run", "--model", files["folder"], "--transformer", files["other"], "--rank", "4"]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "a FLUX.1 transformer (diffusers names, F32, 1 double and 1 single blocks, width 16)" in result.output
    bfl = _save(_bfl_flux1(16), tmp_path / "flux1-dev.safetensors")
    result = runner.invoke(app, ["inspect", bfl])
    assert result.exit_code == 0 and "a FLUX.1 transformer" in result.output, result.output + repr(result.exception)
    info = describe(bfl)  # from the header alone
    assert info["kind"].startswith("a FLUX.1 transformer (BFL/ComfyUI names, F32, 1 double and 1 single blocks")
    assert info["width"] == 16 and info["use"].startswith(f"--transformer {bfl} --model FOLDER")


def test_a_cached_hub_id_takes_the_file_too_offline(files, tmp_path, no_network, monkeypatch):
    """--model a Hub id in the local Hugging Face cache (as hf download leaves it) works as a folder does."""
    import huggingface_hub.constants

    repo, revision = "black-forest-labs/FLUX.1-dev", "0123456789abcdef0123456789abcdef01234567"
    cached = tmp_path / "hf-cache" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files["folder"], cached / "snapshots" / revision)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder of the Hub id's name
    loaded = load_model(repo, transformer=files["other"])
    assert loaded.identity == "flux:tiny-dev.safetensors"
    torch.testing.assert_close(_output(loaded.denoiser), _output(files["other_model"]), rtol=0, atol=0)
    bigger = _save(
        FluxTransformer2DModel(**{**FLUX_TRANSFORMER, "num_layers": 2}).state_dict(), tmp_path / "b.safetensors"
    )
    with pytest.raises(B4MError, match=f"does not fit {repo}'s transformer config \\(double blocks 2 vs 1\\)"):
        load_model(repo, transformer=bigger)  # its config read from the cache, before anything loads
    assert no_network == []
