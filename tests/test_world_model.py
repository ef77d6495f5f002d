"""The world's base model: pretraining (tiny), exact resume, loading through load_model, and a B4M stage on it."""

import json

import numpy as np
import pytest
import torch

from b4m import B4MError
from b4m.loading import load_model
from b4m.models.base import SampleRequest
from b4m.world import default_catalog, tokenize
from b4m.world.model import TextEncoderConfig, WorldModel, WorldModelConfig, load_world_model
from b4m.world.pretrain import (
    PretrainConfig,
    holdout_combinations,
    lr_schedule,
    min_snr_weights,
    pretrain,
    render_dataset,
)

TINY = WorldModelConfig(
    resolution=16,
    text=TextEncoderConfig(width=32, layers=1, heads=2),
    unet=dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
)
FAST = dict(resolution=16, batch_size=8, dataset_size=200, warmup=2, checkpoint_every=3, log_every=3, workers=1)


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    pretrain(PretrainConfig(steps=6, **FAST), out, model_config=TINY, device="cpu")
    return out


def test_dataset_never_shows_novel_or_held_out_combinations():
    catalog = default_catalog()
    holdout = holdout_combinations(catalog, 0.15, seed=0)
    known = len(catalog.known_contents) * len(catalog.known_styles)
    assert len(holdout) == round(0.15 * known)
    assert holdout == holdout_combinations(catalog, 0.15, seed=0)  # deterministic
    images, captions = render_dataset(300, 16, 0, holdout, workers=1)
    assert images.shape == (300, 16, 16, 3) and images.dtype == np.uint8
    novel = {c.name for c in catalog.novel_contents} | {s.name for s in catalog.novel_styles}
    for text in captions:
        words = set(tokenize(text))
        assert not words & novel
        content = next(c.name for c in catalog.known_contents if c.name in words)
        style = next(s.name for s in catalog.known_styles if f"{s.name} style" in text)
        assert (content, style) not in holdout
    again, _ = render_dataset(300, 16, 0, holdout, workers=2)
    assert np.array_equal(images, again)  # the same renders whatever the number of workers


def _assert_identical(a, b, where="checkpoint"):
    """``a`` and ``b`` (nested dicts, lists, tensors, numbers) hold the same keys and bit-identical values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_pretrain_resume_is_exact(tmp_path, world_model):
    pretrain(PretrainConfig(steps=6, stop_at=3, **FAST), tmp_path, model_config=TINY, device="cpu")
    first = json.loads((tmp_path / "pretrain.json").read_text())
    assert first["step"] == 3 and not first["finished"] and (tmp_path / "model" / "unet.safetensors").exists()
    resumed = pretrain(PretrainConfig(steps=6, **{**FAST}), tmp_path, model_config=TINY, device="cpu", resume=True)
    straight = load_world_model(world_model / "model")
    for a, b in zip(straight.denoiser.parameters(), resumed.denoiser.parameters(), strict=True):
        assert torch.equal(a, b.half().float())  # the folder holds fp16 weights
    # bit-identical to the uninterrupted run: weights, EMA (diffusers' EMAModel state), AdamW, lr schedule, generator
    a = torch.load(world_model / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and a["ema"]["optimization_step"] == 6 and a["lr_schedule"]["last_epoch"] == 6
    _assert_identical(a, b)
    assert not torch.equal(a["ema"]["shadow_params"][0], a["params"][0])  # the EMA lags the weights
    record = json.loads((tmp_path / "pretrain.json").read_text())
    assert record["finished"] and [(s["from_step"], s["to_step"]) for s in record["sessions"]] == [(0, 3), (3, 6)]
    assert [row[0] for row in record["log"]] == [3, 6]  # the history survives the resume
    assert len(list(tmp_path.glob("data-*.npy"))) == 1  # rendered once, reloaded on resume
    with pytest.raises(B4MError, match="other pretraining settings"):
        pretrain(PretrainConfig(steps=9, lr=1.0, **FAST), tmp_path, model_config=TINY, device="cpu", resume=True)


def test_time_limit_stops_with_a_checkpoint(tmp_path):
    pretrain(PretrainConfig(steps=50, max_seconds=1e-9, **FAST), tmp_path, model_config=TINY, device="cpu")
    record = json.loads((tmp_path / "pretrain.json").read_text())
    assert record["step"] == 1 and not record["finished"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1


def test_lr_schedule_is_diffusers_cosine_with_the_old_warm_up_one_step_later():
    config = PretrainConfig(steps=1000, warmup=100, lr=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    schedule = lr_schedule(opt, config)
    used = []  # the lr of optimizer steps 1..1000, stepped after each as pretrain() does
    for _ in range(config.steps):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    old_warm_up = [min(1.0, step / config.warmup) for step in range(1, config.steps + 1)]  # the replaced _lr's
    assert used[1:101] == pytest.approx(old_warm_up[:100])  # the same linear ramp, one step later
    assert used[0] == 0.0 and used[100] == 1.0  # peak after the warm-up, then a cosine decay
    assert used[550] == pytest.approx(0.5) and used[-1] == pytest.approx(0.0, abs=1e-5)
    assert used[100:] == sorted(used[100:], reverse=True)
    assert opt.param_groups[0]["lr"] == 0.0  # 0 at ``steps``


def test_min_snr_weights_match_the_closed_form():
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    ac = torch.tensor([0.99, 0.5, 0.01])
    t = torch.tensor([0, 1, 2])
    snr = ac / (1 - ac)  # 99, 1, 1/99

    def weights(prediction_type, gamma=5.0):
        scheduler = SimpleNamespace(alphas_cumprod=ac, config=SimpleNamespace(prediction_type=prediction_type))
        return min_snr_weights(scheduler, t, gamma)

    torch.testing.assert_close(weights("epsilon"), torch.stack([5 / snr[0], snr[1] / snr[1], snr[2] / snr[2]]))
    torch.testing.assert_close(
        weights("v_prediction"), torch.stack([5 / (snr[0] + 1), snr[1] / (snr[1] + 1), snr[2] / (snr[2] + 1)])
    )
    assert torch.equal(weights("epsilon", gamma=0.0), torch.ones(3))
    for prediction_type in ("epsilon", "v_prediction"):  # every timestep of the world model's schedule
        scheduler = DDPMScheduler(1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
        t = torch.arange(1000)
        ac = scheduler.alphas_cumprod.double()
        snr = ac / (1 - ac)
        expected = snr.clamp(max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
        torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0).double(), expected, rtol=1e-5, atol=0)


def test_ema_warm_up_is_the_old_formula_one_step_later():
    """diffusers' EMAModel counts steps from 0: its decay at optimizer step k + 1 is the replaced formula's at k."""
    from diffusers.training_utils import EMAModel

    param = torch.nn.Parameter(torch.zeros(4))
    ema = EMAModel([param], decay=0.999, foreach=True)
    assert ema.get_decay(1) == 0.0  # the first step copies the weights
    assert all(ema.get_decay(k + 1) == min(0.999, (1 + k) / (10 + k)) for k in range(1, 5000))
    g = torch.Generator().manual_seed(0)
    expected = param.detach().clone()
    for k in range(1, 40):
        with torch.no_grad():
            param.copy_(torch.randn(4, generator=g))
        ema.step([param])
        decay = min(0.999, k / (9 + k)) if k > 1 else 0.0  # the old (1 + step)/(10 + step) at step k - 1
        expected = torch.lerp(expected, param.detach(), 1 - decay)
    torch.testing.assert_close(ema.shadow_params[0], expected)


def test_load_and_sample_deterministically(world_model):
    model = load_model(str(world_model / "model"))
    assert model.identity == "world:model" and model.resolution == 16
    request = SampleRequest(["a cat in zebra style", "a large fish in polka style"], [0, 1], steps=3)
    a = model.sample_arrays(request)
    assert a.shape == (4, 16, 16, 3)
    assert np.array_equal(a, model.sample_arrays(request))
    assert not np.array_equal(a[0], a[1])
    record = json.loads((world_model / "pretrain.json").read_text())
    assert record["log"][-1][0] == 6 and len(record["holdout"]) > 0


def test_content_run_on_the_world_model(world_model, tmp_path):
    from PIL import Image

    from b4m.runs.config import STAGE_DEFAULTS, load_config
    from b4m.runs.stages import run_break
    from b4m.world import Scene, render

    catalog = default_catalog()
    dog = tmp_path / "dog"
    dog.mkdir()
    for i in range(3):
        render(Scene("dog", "plain", seed=i), catalog, 16).save(dog / f"{i}.png")
    aux = tmp_path / "aux"
    for style in ("zebra", "polka"):
        (aux / style).mkdir(parents=True)
        render(Scene("cat", style), catalog, 16).save(aux / style / "0.png")
        (aux / style / "prompt.txt").write_text(f"a cat in {style} style")
    cfg = load_config(
        None,
        {
            "model": str(world_model / "model"),
            "images": str(dog),
            "prompt": "a sks",
            "aux": str(aux),
            "output": str(tmp_path / "run"),
            "train.steps": 2,
            "train.grad_accum": 1,
            "adapter.rank": 4,
            "validation.steps": 2,
        },
        STAGE_DEFAULTS["content"],
    )
    summary = run_break("content", cfg)
    assert summary["train"]["steps"] == 2
    grid = Image.open(tmp_path / "run" / "samples" / "step-000002.png")
    assert grid.size == (32, 16)  # one prompt × two validation seeds


def test_cached_captions_carry_no_autograd_graph(world_model):
    """A make run backpropagates through cached sets many times: their conditioning must hold no graph (it did once,
    and make failed with "backward through the graph a second time")."""
    from pathlib import Path

    from b4m.data import ImageSet
    from b4m.loading import load_model
    from b4m.training.sets import encode_set
    from b4m.world import Scene, render

    model = load_model(str(world_model / "model"), device="cpu")
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    model.text_encoder.requires_grad_(True)  # even a trainable encoder must not leak a graph into the cache
    images = [render(Scene("dog", "plain", seed=0), default_catalog(), 16)]
    cached = encode_set(model, ImageSet("refs", None, images, ["a sks"], [Path("0.png")]), 1.0, True)
    assert cached.cond.hidden.grad_fn is None and not cached.cond.hidden.requires_grad


def test_the_shipped_world_model_and_oracles_load(monkeypatch, tmp_path):
    from b4m.world import weights

    model = load_model("world")
    assert model.identity == "world" and model.resolution == 32
    assert model.default_guidance == 2.0 and model.config.scheduler == "ddim"
    assert set(model.held_out) == holdout_combinations(default_catalog(), 0.15, seed=0)  # for the quality bar
    assert sum(p.numel() for p in model.denoiser.parameters()) > 10_000_000
    files = list(weights.FOLDER.glob("*.safetensors"))
    assert all(f.stat().st_size < 16 * 2**20 for f in files)  # every shipped file under 16 MiB
    base = [f for f in files if not f.name.startswith("oracle")]
    assert sum(f.stat().st_size for f in base) < 40e6  # the base model within its 40 MB
    for which in ("a", "b"):
        oracle = weights.load_shipped_oracle(which)
        assert oracle.classes["content"] == [c.name for c in default_catalog().contents]
    monkeypatch.setattr(weights, "FOLDER", tmp_path)
    with pytest.raises(B4MError, match="built-in world model is not in this install"):
        load_model("world")
    with pytest.raises(B4MError, match="shipped oracle is not in this install"):
        weights.oracle_file("a")


class _PerfectDenoiser(torch.nn.Module):
    """Predicts the exact noise that leads to a known image ``x0``: a correct sampler must then return ``x0``."""

    def __init__(self, x0: torch.Tensor, alphas: torch.Tensor) -> None:
        super().__init__()
        self.x0, self.alphas = x0, alphas
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device
        self.training = False

    def forward(self, x, t, encoder_hidden_states):
        a = self.alphas[int(t)]
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return type("Out", (), {"sample": eps})()


@pytest.mark.parametrize("scheduler", ["dpm++", "ddim", "euler"])
def test_the_sampler_reaches_the_image_a_perfect_denoiser_points_to(world_model, scheduler):
    model = load_world_model(world_model / "model")
    x0 = torch.rand(1, 3, 16, 16) * 2 - 1
    model.denoiser = _PerfectDenoiser(x0, model.train_scheduler.alphas_cumprod)
    out = model.sample_arrays(
        SampleRequest(["a cat in zebra style"], [0, 1], steps=20, guidance_scale=4.0, scheduler=scheduler)
    )
    expected = ((x0[0].permute(1, 2, 0) + 1) * 127.5).round().numpy()
    assert np.abs(out.astype(float) - expected).max() <= 2


def test_the_shipped_weights_load_bit_identical_and_save_sharded_below_the_file_limit(tmp_path):
    """The shipped shards (written before huggingface_hub did the sharding) load through its index unchanged, and a
    model saved through ``save_torch_state_dict`` gets the same split, files under the limit, and loads back equal."""
    from safetensors.torch import load_file

    from b4m.world.model import MAX_FILE_BYTES
    from b4m.world.weights import model_folder

    folder = model_folder()
    model = load_world_model(folder)
    shards = {
        "unet": sorted(folder.glob("unet-*-of-*.safetensors")),
        "text_encoder": [folder / "text_encoder.safetensors"],
    }
    assert len(shards["unet"]) == 2
    for name, module in (("unet", model.denoiser), ("text_encoder", model.text_encoder)):
        stored = {k: v for f in shards[name] for k, v in load_file(f).items()}
        loaded = module.state_dict()
        assert loaded.keys() == stored.keys()
        assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], stored[k].float()) for k in stored)

    model.save(tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert [f.name for f in files] == [
        "text_encoder.safetensors",
        "unet-00001-of-00002.safetensors",
        "unet-00002-of-00002.safetensors",
    ]
    assert all(f.stat().st_size < MAX_FILE_BYTES for f in files)
    shipped = json.loads((folder / "unet.safetensors.index.json").read_text())
    written = json.loads((tmp_path / "unet.safetensors.index.json").read_text())
    assert written["weight_map"] == shipped["weight_map"]  # the shipped index is what the library writes
    assert written["metadata"]["total_size"] == shipped["metadata"]["total_size"]
    again = load_world_model(tmp_path)
    for a, b in ((model.denoiser, again.denoiser), (model.text_encoder, again.text_encoder)):
        _assert_identical(a.state_dict(), b.state_dict(), "state_dict")


def test_weight_files_switch_layouts_and_name_what_is_wrong(tmp_path, monkeypatch):
    from b4m.world import model as world_model_module

    model = WorldModel(TINY)
    monkeypatch.setattr(world_model_module, "MAX_FILE_BYTES", 100_000)  # the tiny UNet (~0.4 MB fp16) gets shards
    model.save(tmp_path)
    unet_files = sorted(p.name for p in tmp_path.glob("unet*"))
    assert unet_files[-1] == "unet.safetensors.index.json" and len(unet_files) > 3
    assert all(p.stat().st_size < 100_000 + 4096 for p in tmp_path.glob("unet-*"))  # data under the limit + header
    loaded = load_world_model(tmp_path)
    _assert_identical(
        loaded.denoiser.state_dict(), {k: v.half().float() for k, v in model.denoiser.state_dict().items()}
    )
    monkeypatch.setattr(world_model_module, "MAX_FILE_BYTES", 10**8)
    model.save(tmp_path)  # one file now: the library removes the shards and their index
    assert sorted(p.name for p in tmp_path.glob("unet*")) == ["unet.safetensors"]
    load_world_model(tmp_path)

    monkeypatch.setattr(world_model_module, "MAX_FILE_BYTES", 100_000)
    model.save(tmp_path)
    sorted(tmp_path.glob("unet-*"))[1].unlink()
    n = len(unet_files) - 1
    with pytest.raises(B4MError, match=f"{n - 1} of {n} unet shards present"):
        load_world_model(tmp_path)
    for f in tmp_path.glob("unet*"):
        f.unlink()
    with pytest.raises(B4MError, match="no unet.safetensors"):
        load_world_model(tmp_path)
    model.save(tmp_path)
    config = json.loads((tmp_path / "world_model.json").read_text())
    config["text"]["layers"] = 2
    (tmp_path / "world_model.json").write_text(json.dumps(config))
    with pytest.raises(B4MError, match=r"text_encoder\*.safetensors: does not fit the config \(\d+ missing, 0 unexp"):
        load_world_model(tmp_path)


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    from b4m.files import atomic_path

    with atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    # safetensors' writer recreates the temporary file with mode 0600: adapter files got it before the fix
    from b4m.files import save_safetensors

    save_safetensors({"a": torch.zeros(2)}, tmp_path / "a.safetensors", {})
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_world_names_its_unknown_words_and_generates_aux_sets_in_its_own_words(tmp_path):
    """The world's vocabulary is closed: a placeholder outside it is refused (every unknown word is one token, so
    a content and a style run would learn the same one), captions' unknown words are warned about, and the
    auxiliary sets b4m generates for it use words it was trained on (SD's everyday prompts are mostly unknown)."""
    from PIL import Image

    from b4m.data import ImageSet
    from b4m.runs.aux import AUX_CONTENT_PROMPTS, AUX_STYLE_PROMPTS
    from b4m.runs.stages import check_words

    model = load_model("world")
    assert model.unknown_words("a photo of sks dog in ohwx yarn style photo") == ["photo", "ohwx", "yarn"]
    for role in ("content", "style"):
        prompts = model.aux_prompts(role)
        assert len(prompts) >= 3 and not any(model.unknown_words(p) for p in prompts)
    assert model.aux_prompts("content")[0] == "a large house in zebra style"
    assert all(model.unknown_words(p) for p in AUX_STYLE_PROMPTS + AUX_CONTENT_PROMPTS[:2])  # why the override

    image_set = ImageSet(
        name="dog",
        folder=None,
        images=[Image.new("RGB", (32, 32))],
        captions=["a photo of sks dog"],
        files=[tmp_path / "0.png"],
    )
    seen = []
    with pytest.raises(B4MError, match="placeholder 'ohwx': not a word of world's vocabulary; its placeholders: sks"):
        check_words(model, "ohwx", [image_set], seen.append)
    check_words(model, "sks", [image_set], seen.append)
    assert seen == ["dog: the captions use words world does not know, all read as one unknown token: photo"]
    seen.clear()
    check_words(model, "dog", [], seen.append)  # a catalog word: allowed, said
    assert len(seen) == 1 and seen[0].startswith("placeholder 'dog': a word world already knows")
