"""FLUX's default adapter targets wherever the model comes from (issue 17): a Hub id in the local Hugging Face cache
gets its transformer's targets and checks as a local folder does, read from the cache and never the network; and an
adapter whose config names no targets adapts the model's own, resolved where it is attached (peft's
``target_modules=None``), while targets a user names win and adapter files record the targets used."""

from __future__ import annotations

import json
import re
import socket
import tomllib
from types import SimpleNamespace

import pytest
import torch
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel
from typer.testing import CliRunner

from b4m.adapter.config import DEFAULT_TARGETS, FLUX_TARGETS, KLEIN_TARGETS, PLPConfig
from b4m.adapter.file import adapter_from_model, load_adapter, save_adapter
from b4m.adapter.walker import add_plp, plp_layers, remove_plp, resolve_targets
from b4m.cli import app
from b4m.errors import B4MError
from b4m.loading import denoiser_config, flux_family, model_file, training_defaults
from b4m.runs.config import stage_config
from b4m.runs.stages import check_before_loading
from b4m.training.config import TrainConfig
from b4m.training.runs import train_adapter
from conftest import TINY_SD_UNET, TINY_SDXL_UNET, cli_ok, make_unet
from tiny_pipelines import FLUX_TRANSFORMER, KLEIN_TRANSFORMER

runner = CliRunner()
HUB_FLUX = "black-forest-labs/FLUX.1-dev"
HUB_KLEIN = "black-forest-labs/FLUX.2-klein-base-4B"
HUB_SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
UNCACHED = "black-forest-labs/FLUX.1-schnell"  # not in the cache
REVISION = "0123456789abcdef0123456789abcdef01234567"
# The adapted modules of the tiny transformers (one double, one single block each; tests/test_flux*.py).
DOUBLE = [f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")] + [
    f"transformer_blocks.0.attn.{m}" for m in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
]
FLUX_MODULES = sorted(
    DOUBLE
    + [f"single_transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")]
)
KLEIN_MODULES = sorted(DOUBLE + [f"single_transformer_blocks.0.attn.{m}" for m in ("to_qkv_mlp_proj", "to_out")])


def _cache_repo(cache, repo_id: str, files: dict[str, dict], missing: tuple[str, ...] = ()) -> None:
    """A Hub repository as ``hf download`` leaves it in the cache: refs/main names the snapshot that holds the files;
    ``missing`` are files the Hub said the repository does not have (the cache's .no_exist markers)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        path = repo / "snapshots" / REVISION / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    for name in missing:
        (repo / ".no_exist" / REVISION / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / ".no_exist" / REVISION / name).touch()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, no_network):
    """A Hugging Face cache holding a tiny FLUX.1, a tiny klein and a tiny SDXL: their small config files only."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    transformer = {"_class_name": "FluxTransformer2DModel", **FLUX_TRANSFORMER}
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    _cache_repo(
        cache, HUB_FLUX, {"model_index.json": index, "transformer/config.json": transformer}, ("unet/config.json",)
    )
    klein = {"_class_name": "Flux2Transformer2DModel", **KLEIN_TRANSFORMER}
    index = {"_class_name": "Flux2KleinPipeline", "transformer": ["diffusers", "Flux2Transformer2DModel"]}
    _cache_repo(cache, HUB_KLEIN, {"model_index.json": index, "transformer/config.json": klein})
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    unet = {"_class_name": "UNet2DConditionModel", **TINY_SDXL_UNET}
    _cache_repo(cache, HUB_SDXL, {"model_index.json": index, "unet/config.json": unet})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for anything that reads the environment later
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read once, at import
    monkeypatch.chdir(tmp_path)  # no local folder of a Hub id's name
    return cache


def test_a_cached_hub_id_is_read_from_its_snapshot_and_an_uncached_one_from_nowhere(hub_cache):
    assert flux_family(HUB_FLUX) == "flux" and flux_family(HUB_KLEIN) == "flux2"
    assert flux_family(HUB_SDXL) is None and flux_family(UNCACHED) is None
    assert model_file(HUB_FLUX, "transformer/config.json") == (
        hub_cache / f"models--{HUB_FLUX.replace('/', '--')}" / "snapshots" / REVISION / "transformer" / "config.json"
    )
    assert model_file(HUB_FLUX, "unet/config.json") is None  # the cache says the repository has none
    assert model_file(UNCACHED, "model_index.json") is None and model_file("", "model_index.json") is None
    unet, native = denoiser_config(HUB_SDXL)  # a cached UNet model: its config, so its checks before loading
    assert unet["block_out_channels"] == list(TINY_SDXL_UNET["block_out_channels"]) and native == 8 * 8
    assert denoiser_config(HUB_FLUX) is None and denoiser_config(UNCACHED) is None
    # the targets are not a training default any more: the adapter takes the model's own when attached
    assert training_defaults(HUB_FLUX, "content") == {} == training_defaults(UNCACHED, "content")


@pytest.mark.parametrize(("hub_id", "expected"), [(HUB_FLUX, FLUX_MODULES), (HUB_KLEIN, KLEIN_MODULES)])
def test_dry_run_of_a_cached_hub_id_lists_its_transformers_targets_and_named_targets_win(hub_cache, hub_id, expected):
    pattern = r"(?:single_)?transformer_blocks\.\d+\.[\w.]+"
    output = cli_ok("dry-run", "--model", hub_id, "--rank", "4", "--modules").output
    assert sorted(set(re.findall(pattern, output))) == expected
    named = cli_ok("dry-run", "--model", hub_id, "--rank", "4", "--modules", "--targets", "to_q").output
    assert sorted(set(re.findall(pattern, named))) == [m for m in expected if m.endswith(".to_q")]


def test_the_checks_before_loading_read_a_cached_hub_id_and_skip_an_uncached_one(hub_cache, tmp_path):
    with pytest.raises(B4MError, match="rank 17 is larger than the narrowest adapted layer"):
        check_before_loading(HUB_FLUX, None, tmp_path / "c", PLPConfig(rank=17))
    with pytest.raises(B4MError, match="more than 4× FLUX.2 \\[klein\\]'s native 1024 px"):
        check_before_loading(HUB_KLEIN, 8192, tmp_path / "c", PLPConfig(rank=4))
    with pytest.raises(B4MError, match="rank 100 is larger"):
        check_before_loading(HUB_SDXL, None, tmp_path / "c", PLPConfig(rank=100))
    check_before_loading(UNCACHED, 8192, tmp_path / "c", PLPConfig(rank=100000))  # checked once loaded; no network
    check_before_loading(HUB_FLUX, None, tmp_path / "c", PLPConfig(rank=16))


def test_a_rank_too_large_for_a_cached_hub_id_is_refused_before_the_model_loads(hub_cache, tmp_path, monkeypatch):
    import b4m.runs.stages as stages

    monkeypatch.setattr(stages, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "dog").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 60, 20)).save(tmp_path / "dog" / "0.png")
    args = ["content", "--images", tmp_path / "dog", "--prompt", "a photo of sks dog", "-o", tmp_path / "c"]
    result = runner.invoke(app, [str(a) for a in [*args, "--model", HUB_FLUX, "--rank", "100000"]])
    assert result.exit_code != 0 and "rank 100000 is larger than the narrowest adapted layer" in str(result.exception)


def _flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX_TRANSFORMER)


def _klein():
    torch.manual_seed(0)
    return Flux2Transformer2DModel(**KLEIN_TRANSFORMER)


class SubclassedFlux(FluxTransformer2DModel):
    """A model class built on FLUX.1's transformer: it takes FLUX.1's targets (the class's bases are looked at)."""


@pytest.mark.parametrize(
    ("make", "targets", "expected"),
    [
        (_flux, FLUX_TARGETS, FLUX_MODULES),
        (_klein, KLEIN_TARGETS, KLEIN_MODULES),
        (lambda: SubclassedFlux(**FLUX_TRANSFORMER), FLUX_TARGETS, FLUX_MODULES),
        (lambda: make_unet(TINY_SD_UNET), list(DEFAULT_TARGETS), None),
    ],
)
def test_no_targets_means_the_adapted_models_own_and_named_targets_win(make, targets, expected):
    model = make()
    assert PLPConfig().targets == []  # the default: none named
    assert resolve_targets(model, PLPConfig()).targets == targets
    layers = add_plp(model, PLPConfig(rank=2))
    if expected is not None:
        assert sorted(layers) == expected
    else:  # the UNet: its attention projections
        assert layers and all(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in layers)
    assert adapter_from_model(model, PLPConfig(rank=2), "content").config.targets == targets  # the targets used
    remove_plp(model)
    named = add_plp(model, PLPConfig(rank=2, targets=["to_q"]))
    assert named and all(name.endswith("to_q") for name in named)
    assert adapter_from_model(model, PLPConfig(rank=2, targets=["to_q"]), "content").config.targets == ["to_q"]
    remove_plp(model)
    assert resolve_targets(model, PLPConfig(targets="re")).targets == "re"  # a regex is named targets too


def test_train_adapter_on_flux_with_default_settings_adapts_and_records_its_targets(tmp_path):
    """The Python API: a PLPConfig() on a FLUX model trains FLUX's targets, and the saved file says so."""
    model = SimpleNamespace(denoiser=_flux(), identity="flux:tiny")
    record = train_adapter(model, [], TrainConfig(steps=0), tmp_path, "content", plp=PLPConfig(rank=2))
    assert sorted(record.adapter.modules) == FLUX_MODULES and not plp_layers(model.denoiser)
    assert record.adapter.config.targets == FLUX_TARGETS and record.adapter.config.base_model == "flux:tiny"
    save_adapter(record.adapter, tmp_path / "a.b4m.safetensors")
    assert load_adapter(tmp_path / "a.b4m.safetensors").config.targets == FLUX_TARGETS
    named = train_adapter(
        model, [], TrainConfig(steps=0), tmp_path, "content", plp=PLPConfig(rank=2, targets=["to_q"])
    )
    assert named.adapter.config.targets == ["to_q"] and all(m.endswith(".to_q") for m in named.adapter.modules)


def test_print_config_shows_no_targets_as_the_models_own_and_reads_back(hub_cache, tmp_path):
    printed = cli_ok("content", "--model", HUB_FLUX, "--print-config").output
    assert re.search(r"^targets = \[\] +# default; empty: the model's own", printed, re.M)
    (tmp_path / "c.toml").write_text(printed)
    assert stage_config("content", tmp_path / "c.toml").adapter.targets == []  # TOML has no null: an empty list
    (tmp_path / "n.toml").write_text('model = "black-forest-labs/FLUX.1-dev"\n[adapter]\ntargets = ["to_q"]\n')
    named = cli_ok("content", "--config", tmp_path / "n.toml", "--print-config").output
    assert tomllib.loads(named)["adapter"]["targets"] == ["to_q"]
