"""8-bit frozen base weights (issue 17: ``base_weights``, the low-memory-8bit preset) on a tiny FLUX.1 pipeline: the
denoiser's linear weights stored by torchao, the PLP adapter trained in float32 on top, and everything around
training (checkpoints, exact resume, the LoRA export, sampling unmerged) as on full-width weights; and
``b4m generate --base-weights``, which loads the base the same way.

Tolerances: int8 weight-only stores each weight row as round(w / s) with s = max|w_row| / 127, an error of at most
s / 2 per weight (about 0.4 % of the row's largest weight); the tiny transformer's outputs move by well under 1 %
through its two blocks, so losses and gradients are compared at rtol 2 % (float8, e4m3 with 3 mantissa bits: 10 %).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from b4m.adapter.config import PLPConfig
from b4m.adapter.file import load_adapter, save_adapter
from b4m.adapter.walker import add_plp, plp_layers, remove_plp
from b4m.cli import app
from b4m.errors import B4MError
from b4m.files import load_safetensors
from b4m.loading import load_model
from b4m.lora_files import save_lora
from b4m.method.stages import applied_adapter
from b4m.models.quantize import CONFIGS, is_quantized, linear_weight_bytes, quantize_weights
from b4m.runs.config import BASE_WEIGHTS, StageConfig, load_config, preset_settings
from b4m.training.checkpoint import checkpoints
from b4m.training.config import TrainConfig
from b4m.training.loop import micro_step_loss
from b4m.training.runs import train_adapter
from b4m.training.sets import TrainSet
from conftest import cli_ok, watch_encoders
from test_flux import EXPECTED, _transformer_inputs
from tiny_pipelines import save_square_images, save_tiny_flux

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {"int8": 2e-2, "float8": 1e-1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux"))


@pytest.fixture(scope="module")
def models(folder):
    """The tiny FLUX.1 pipeline at full width (fp32 on the CPU) and with int8 and float8 base weights."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return {bw: load_model(folder, resolution=32, base_weights=bw) for bw in ("auto", "int8", "float8")}


def sets_of(model) -> list[TrainSet]:
    g = torch.Generator().manual_seed(5)
    main = TrainSet("main", torch.randn(2, 16, 16, 16, generator=g), model.encode_prompts(["a sks dog"] * 2))
    aux = TrainSet("aux0", torch.randn(2, 16, 16, 16, generator=g), model.encode_prompts(["a cat"] * 2), 0.5, False)
    return [main, aux]


def with_learned_values(denoiser: nn.Module) -> list[nn.Parameter]:
    """Non-zero learned halves (the same on every model), so that every gradient path is exercised."""
    g = torch.Generator().manual_seed(1)
    learned = []
    with torch.no_grad():
        for name in sorted(plp_layers(denoiser)):
            layer = plp_layers(denoiser)[name]
            for p in (layer.up_learned, layer.down_learned):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
                learned.append(p)
    return learned


# -- storage ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base_weights", ["int8", "float8"])
@pytest.mark.parametrize(("dtype", "ratio"), [(torch.bfloat16, 0.5), (torch.float32, 0.25)])
def test_a_flux_wide_linear_weight_takes_8_bits(base_weights, dtype, ratio):
    """A FLUX.1-dev-wide layer (3072 × 3072): ½ of its bf16 bytes, ¼ of its fp32 bytes (plus one scale a row)."""
    layer = nn.Linear(3072, 3072).to(dtype)
    full = linear_weight_bytes(layer)
    assert quantize_weights(layer, base_weights) == 1
    assert is_quantized(layer) and layer.weight.dtype == dtype  # computes in the dtype it had
    assert ratio <= linear_weight_bytes(layer) / full < ratio * 1.01


@pytest.mark.parametrize("part", ["denoiser", "clip", "t5"])
def test_every_linear_of_the_denoiser_and_the_text_encoders_is_stored_in_8_bits(models, part):
    """The denoiser and both text encoders (FLUX.1's T5-XXL is 9.5 GB in bf16: beside an 8-bit transformer it would
    not leave a 24 GB card room to encode and sample), not the VAE; nothing on the full-width model."""
    pick = {"denoiser": lambda m: m.denoiser, "clip": lambda m: m.text_encoder, "t5": lambda m: m.text_encoder_2}[part]
    full, int8 = pick(models["auto"]), pick(models["int8"])
    linears = [m for m in int8.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == sum(isinstance(m, nn.Linear) for m in full.modules()) > 5
    assert all(type(m.weight).__name__ == "Int8Tensor" and not m.weight.requires_grad for m in linears)
    # fp32 on the CPU: a quarter of the bytes, plus a 4-byte scale per row (1/16 of a row 16 wide: the tiny model)
    assert linear_weight_bytes(int8) / linear_weight_bytes(full) < 0.32
    assert not is_quantized(full)
    assert not is_quantized(models["int8"].vae)


@pytest.mark.parametrize("base_weights", ["int8", "float8"])
def test_prompts_encoded_by_8bit_text_encoders_stay_close(models, base_weights):
    prompts = ["a sks dog", "a cat in zwx style on a blue background"]
    full, ours = (models[bw].encode_prompts(prompts) for bw in ("auto", base_weights))
    for a, b in ((full.hidden, ours.hidden), (full.extra["pooled"], ours.extra["pooled"])):
        assert a.shape == b.shape and not torch.equal(a, b)
        assert (b - a).norm() <= TOLERANCE[base_weights] * a.norm()


# -- training ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base_weights", ["int8", "float8"])
def test_only_the_adapter_trains_and_the_loss_stays_close(models, base_weights):
    config = TrainConfig(routing="none", batch_size=2, grad_accum=1)
    plp = PLPConfig(rank=4, base_model="tiny")
    losses, grads = {}, {}
    for bw in ("auto", base_weights):
        model = models[bw]
        sets = sets_of(models["auto"])  # the same conditioning for both
        add_plp(model.denoiser, plp)
        try:
            learned = with_learned_values(model.denoiser)
            loss = micro_step_loss(model, sets, config, torch.Generator().manual_seed(3))
            loss.backward()
            with_grad = {id(p) for p in model.denoiser.parameters() if p.grad is not None}
            assert with_grad == {id(p) for p in learned}  # adapter-only gradients
            assert all(not p.requires_grad for n, p in model.denoiser.named_parameters() if "learned" not in n)
            losses[bw], grads[bw] = loss.item(), torch.cat([p.grad.flatten() for p in learned])
        finally:
            remove_plp(model.denoiser)
    tol = TOLERANCE[base_weights]
    assert losses[base_weights] == pytest.approx(losses["auto"], rel=tol)
    assert (grads[base_weights] - grads["auto"]).norm() <= tol * grads["auto"].norm()
    assert is_quantized(models[base_weights].denoiser)  # the base layers put back as they were


def run(model, out: Path, steps: int, resume: bool = False):
    config = TrainConfig(
        steps=steps, lr=1e-2, owned="up", grad_accum=1, checkpoint_every=1, gradient_checkpointing=True
    )
    config.speed = "fixed"  # the preset's: checkpointing as given
    return train_adapter(
        model, sets_of(model), config, out, "content", plp=PLPConfig(rank=4, base_model="tiny"), resume=resume
    )


def test_checkpoints_resume_and_the_exported_lora_on_an_8bit_base(models, tmp_path):
    int8 = models["int8"]
    record = run(int8, tmp_path / "straight", 3)
    straight = record.adapter
    run(int8, tmp_path / "resumed", 2)
    ckpt = checkpoints(tmp_path / "resumed")[-1]
    # A checkpoint holds the adapter and the optimizer's state only, plain tensors (weights_only loads it).
    assert sorted(load_adapter(ckpt / "adapter.b4m.safetensors").modules) == EXPECTED
    torch.load(ckpt / "state.pt", weights_only=True)
    resumed = run(int8, tmp_path / "resumed", 3, resume=True).adapter
    for name in EXPECTED:  # exact resume, as on full-width weights
        for key, t in straight.tensors[name].items():
            assert torch.equal(t, resumed.tensors[name][key]), (name, key)
    assert not plp_layers(int8.denoiser) and is_quantized(int8.denoiser)  # the model left as it was given

    full_record = run(models["auto"], tmp_path / "full", 3)
    full = full_record.adapter
    # The same losses step by step (the adapters themselves are not compared: AdamW's first steps move each entry by
    # about lr whatever the gradient's size, so a gradient entry near zero may flip the direction of its step).
    losses = [loss for _, loss in record.result.losses]
    assert losses == pytest.approx([loss for _, loss in full_record.result.losses], rel=TOLERANCE["int8"])
    assert all(full.tensors[name]["up_learned"].abs().sum() > 0 for name in EXPECTED)
    # The plain LoRA comes from the adapter's factors: the same keys and shapes as without quantization.
    for fmt in ("diffusers", "kohya"):
        files = {}
        for what, adapter in (("int8", straight), ("full", full)):
            files[what] = tmp_path / f"{what}-{fmt}.safetensors"
            save_lora(adapter.factors(), files[what], format=fmt, family="flux")
        ours, theirs = (load_safetensors(files[w])[0] for w in ("int8", "full"))
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_sampling_runs_the_adapter_unmerged_on_an_8bit_base(models, tmp_path):
    int8, full = models["int8"], models["auto"]
    adapter = run(int8, tmp_path / "run", 1).adapter
    inputs = _transformer_inputs(int8.denoiser)
    weights = {n: m.weight.qdata.clone() for n, m in int8.denoiser.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        with pytest.warns(UserWarning, match="unmerged"), applied_adapter(int8, adapter, merge=True):
            assert len(plp_layers(int8.denoiser)) == len(EXPECTED)  # attached, not merged
            merged_asked = int8.denoiser(**inputs, return_dict=False)[0]
            layers = plp_layers(int8.denoiser).values()
            with pytest.raises(B4MError, match="8-bit"):
                next(iter(layers)).merge()
        with applied_adapter(int8, adapter):
            unmerged = int8.denoiser(**inputs, return_dict=False)[0]
            with torch.enable_grad():  # the training path gives what sampling gives
                trained = int8.denoiser(**inputs, return_dict=False)[0]
        with applied_adapter(full, adapter, merge=True):
            reference = full.denoiser(**inputs, return_dict=False)[0]
    assert torch.equal(merged_asked, unmerged)
    torch.testing.assert_close(trained, unmerged, rtol=1e-5, atol=1e-5)
    assert (unmerged - reference).norm() <= TOLERANCE["int8"] * reference.norm()
    for n, m in int8.denoiser.named_modules():  # the 8-bit weights untouched
        if isinstance(m, nn.Linear):
            assert torch.equal(m.weight.qdata, weights[n])


# -- b4m generate --base-weights --------------------------------------------------------------------------------------


def test_generate_with_int8_base_weights_runs_the_adapter_unmerged(models, folder, tmp_path, monkeypatch):
    import b4m.runs.generation

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = save_adapter(run(models["int8"], tmp_path / "run", 1).adapter, tmp_path / "a.b4m.safetensors")
    loaded = []
    load = b4m.runs.generation.load_model
    monkeypatch.setattr(b4m.runs.generation, "load_model", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    args = ["generate", adapter, "a sks dog", "-n", "2", "--steps", "2", "--resolution", "32", "--model", folder]
    with pytest.warns(UserWarning, match="unmerged") as warned:
        cli_ok(*args, "-o", tmp_path / "g", "--base-weights", "int8", "--merge")
    assert sum("unmerged" in str(w.message) for w in warned) == 1  # once, though --merge asked for it
    assert is_quantized(loaded[-1].denoiser) and not plp_layers(loaded[-1].denoiser)  # 8-bit, the adapter taken off
    images = [np.asarray(Image.open(tmp_path / "g" / f"00_seed{s}.png")) for s in (0, 1)]
    assert images[0].shape == (32, 32, 3) and not np.array_equal(*images)
    meta = json.loads(Image.open(tmp_path / "g" / "00_seed0.png").info["b4m"])
    assert meta["base_weights"] == "int8" and meta["merged"] is False
    # Full width: the same images up to the 8-bit rounding of the base weights.
    cli_ok(*args, "-o", tmp_path / "full")
    full = np.asarray(Image.open(tmp_path / "full" / "00_seed0.png"), np.int16)
    assert not is_quantized(loaded[-1].denoiser) and "base_weights" not in json.loads(
        Image.open(tmp_path / "full" / "00_seed0.png").info["b4m"]
    )
    assert np.abs(images[0].astype(np.int16) - full).mean() < 8


def test_generate_refuses_a_bad_base_weights_in_one_line_before_anything_loads(folder, tmp_path, monkeypatch):
    import b4m.adapter.file  # generate imports its load_adapter when it reads the file
    import b4m.runs.generation

    monkeypatch.setattr(b4m.runs.generation, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr(b4m.adapter.file, "load_adapter", lambda *a, **k: pytest.fail("the adapter loaded"))
    args = ["generate", tmp_path / "run", "a sks dog", "--model", folder, "-o", tmp_path / "g"]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--base-weights", "int4"]])
    message = str(result.exception)
    assert isinstance(result.exception, B4MError) and "\n" not in message
    assert message == "base_weights must be auto, full, int8 or float8, got 'int4'"
    loras = ["--content-lora", tmp_path / "c.safetensors", "--style-lora", tmp_path / "s.safetensors"]
    result = CliRunner().invoke(
        app, [str(a) for a in ["generate", *args[2:], *loras, "--combine", "sum", "--base-weights", "int8"]]
    )
    assert "--combine sum merges the LoRAs" in str(result.exception) and "\n" not in str(result.exception)


# -- settings and the missing dependency ------------------------------------------------------------------------------


def test_the_low_memory_8bit_preset_and_the_setting():
    assert preset_settings("low-memory-8bit") == {
        "base_weights": "int8",
        "train": {"speed": "fixed", "gradient_checkpointing": True, "rows_per_forward": 1},
    }
    cfg = load_config(None, {"preset": "low-memory-8bit"})
    assert cfg.base_weights == "int8" and cfg.train.gradient_checkpointing and cfg.train.rows_per_forward == 1
    assert load_config(None, {"preset": "low-memory"}).base_weights == "auto"  # SDXL's preset keeps full width
    assert load_config(None, {"preset": "low-memory-8bit", "base_weights": "float8"}).base_weights == "float8"
    with pytest.raises(B4MError, match="base_weights must be one of auto, full, int8, float8"):
        StageConfig(base_weights="int4")
    assert set(BASE_WEIGHTS) == {"auto", "full", *CONFIGS}


def test_a_missing_torchao_is_one_line_before_anything_loads(folder, tmp_path, monkeypatch):
    import b4m.adapter.file
    import b4m.models.loading
    import b4m.runs.generation

    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    monkeypatch.setattr(b4m.models.loading, "load_diffusers_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(B4MError) as error:
        load_model(folder, base_weights="int8")
    message = str(error.value)
    assert "\n" not in message and "needs torchao" in message and "pip install 'b4m[lowmem]'" in message
    load_model("world", base_weights="auto")  # full width needs no torchao

    dog = save_square_images(tmp_path / "dog", 2, (120, 60, 20))
    args = ["content", "--images", dog, "--prompt", "a photo of sks dog", "-o", tmp_path / "c", "--model", folder]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--rank", "4", "--preset", "low-memory-8bit"]])
    assert result.exit_code != 0 and "pip install 'b4m[lowmem]'" in str(result.exception)
    # b4m generate: the same line, before the adapter file is read.
    monkeypatch.setattr(b4m.adapter.file, "load_adapter", lambda *a, **k: pytest.fail("the adapter loaded"))
    args = [
        "generate",
        tmp_path / "run",
        "a sks dog",
        "--model",
        folder,
        "-o",
        tmp_path / "g",
        "--base-weights",
        "int8",
    ]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code != 0 and str(result.exception) == message


# -- the GPU measurement script ---------------------------------------------------------------------------------------


def test_the_flux_memory_bench_runs_tiny_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("flux_memory", ROOT / "bench" / "flux_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse([])
    assert (args.resolution, args.text_tokens, args.rank, args.base_weights) == (1024, 512, 64, bench.BASE_WEIGHTS)
    assert bench.FLUX_DEV["num_layers"] == 19 and bench.FLUX_DEV["num_single_layers"] == 38
    result = bench.main(["--tiny", "--base-weights", "bf16", "int8", "--json", str(tmp_path / "m.json")])
    bf16, int8 = result["rows"]
    assert int8["linears_quantized"] > 20 and bf16["linears_quantized"] == 0
    assert int8["linear_weight_bytes"] < 0.6 * bf16["linear_weight_bytes"]
    assert all(r["step_s_median"] > 0 and r["trainable_params"] > 0 for r in (bf16, int8))
    assert (tmp_path / "m.json").is_file()


def test_a_weight_tied_to_an_embedding_stays_whole(tmp_path, monkeypatch):
    """klein's Qwen3 ties its lm_head to its token embedding: quantizing lm_head would add an 8-bit copy beside the
    full-width embedding instead of saving memory, so a tied weight is left as it is (and stays tied); the other
    linear layers of the encoder are stored in 8 bits."""
    from tiny_pipelines import save_tiny_flux2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = str(save_tiny_flux2(tmp_path / "klein"))
    full, int8 = (load_model(folder, resolution=32, base_weights=bw).text_encoders()[0] for bw in ("auto", "int8"))
    assert full.lm_head.weight is full.model.embed_tokens.weight
    assert int8.lm_head.weight is int8.model.embed_tokens.weight and not is_quantized(int8.lm_head)
    others = [m for n, m in int8.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert others and all(is_quantized(m) for m in others)
    assert linear_weight_bytes(int8) < linear_weight_bytes(full)


def test_make_and_generate_follow_the_content_runs_8bit_base(folder, tmp_path, monkeypatch):
    """A content run trained on an 8-bit base (low-memory-8bit: a 24 GB card) is made and sampled on one too:
    base_weights auto takes the run's setting; --base-weights full asks for full width. FLUX's encoders are off the
    device for every training step, on it for every set of images."""
    import b4m.runs.generation
    from b4m.models.flux import FluxModel
    from tiny_pipelines import dog_and_yarn

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = watch_encoders(monkeypatch, FluxModel)
    data = dog_and_yarn(tmp_path / "data")
    common = ["--model", folder, "--rank", "4", "--resolution", "32", "--steps", "1"]
    cli_ok("content", "--images", data["dog"], "--prompt", "a photo of sks dog", "--aux", data["aux"], "-o",
           tmp_path / "dog", "--base-weights", "int8", *common)  # fmt: skip
    cli_ok("style", "--images", data["yarn"], "--prompt", "a cat in zwx style", "--aux", data["content_aux"], "-o",
           tmp_path / "yarn", *common)  # fmt: skip
    cli_ok("make", "--content", tmp_path / "dog", "--style", tmp_path / "yarn", "-o", tmp_path / "made", "--steps",
           "1")  # fmt: skip
    assert json.loads((tmp_path / "made" / "run.json").read_text())["config"]["base_weights"] == "int8"
    assert state["samples"] and all(state["samples"]) and state["steps"] and not any(state["steps"])
    loaded = []
    load = b4m.runs.generation.load_model
    monkeypatch.setattr(b4m.runs.generation, "load_model", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    args = ["generate", tmp_path / "made", "a sks dog in zwx style", "-n", "1", "--steps", "2", "--resolution", "32"]
    cli_ok(*args, "-o", tmp_path / "g")
    meta = json.loads(Image.open(tmp_path / "g" / "00_seed0.png").info["b4m"])
    assert is_quantized(loaded[-1].denoiser) and meta["base_weights"] == "int8"
    cli_ok(*args, "-o", tmp_path / "full", "--base-weights", "full")
    meta = json.loads(Image.open(tmp_path / "full" / "00_seed0.png").info["b4m"])
    assert not is_quantized(loaded[-1].denoiser) and "base_weights" not in meta
