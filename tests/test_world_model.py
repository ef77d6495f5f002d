"""The world's base model: pretraining (tiny), exact resume, loading through load_model, and a B4M stage on it."""

import json

import numpy as np
import pytest
import torch

from b4m import B4MError
from b4m.models import load_model
from b4m.models.base import SampleRequest
from b4m.world import default_catalog, tokenize
from b4m.world.model import TextEncoderConfig, WorldModelConfig, load_world_model
from b4m.world.pretrain import PretrainConfig, _lr, holdout_combinations, pretrain, render_dataset, snr_weights

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
FAST = dict(resolution=16, batch_size=8, dataset_size=200, checkpoint_every=3, log_every=3, workers=1)


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


def test_pretrain_resume_is_exact(tmp_path, world_model):
    pretrain(PretrainConfig(steps=6, stop_at=3, **FAST), tmp_path, model_config=TINY, device="cpu")
    first = json.loads((tmp_path / "pretrain.json").read_text())
    assert first["step"] == 3 and not first["finished"] and (tmp_path / "model" / "unet.safetensors").exists()
    resumed = pretrain(PretrainConfig(steps=6, **{**FAST}), tmp_path, model_config=TINY, device="cpu", resume=True)
    straight = load_world_model(world_model / "model")
    for a, b in zip(straight.denoiser.parameters(), resumed.denoiser.parameters(), strict=True):
        torch.testing.assert_close(a, b.half().float())  # the folder holds fp16 weights
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


def test_lr_schedule_and_min_snr_weights():
    config = PretrainConfig(steps=1000, warmup=100, lr=1.0, decay_fraction=0.2)
    assert [_lr(s, config) for s in (50, 100, 800, 900, 1000)] == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1])
    ac = torch.tensor([0.99, 0.5, 0.01])
    t = torch.tensor([0, 1, 2])
    snr = ac / (1 - ac)  # 99, 1, 1/99
    torch.testing.assert_close(
        snr_weights(ac, t, 5.0, "epsilon"), torch.stack([5 / snr[0], snr[1] / snr[1], snr[2] / snr[2]])
    )
    torch.testing.assert_close(
        snr_weights(ac, t, 5.0, "v_prediction"),
        torch.stack([5 / (snr[0] + 1), snr[1] / (snr[1] + 1), snr[2] / (snr[2] + 1)]),
    )
    assert torch.equal(snr_weights(ac, t, 0.0, "epsilon"), torch.ones(3))


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

    from b4m.config import load_config
    from b4m.stages import STAGE_DEFAULTS, run_break
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
    from b4m.models import load_model
    from b4m.stages import encode_set
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


def test_weights_are_sharded_below_the_file_limit(tmp_path):
    from b4m.io_utils import load_sharded, save_sharded

    tensors = {f"w{i}": torch.full((256,), float(i)) for i in range(10)}  # 1 KiB each: two per shard
    paths = save_sharded(tensors, tmp_path, "unet", {}, max_bytes=3000)
    assert [p.name for p in paths] == [f"unet-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert all(p.stat().st_size < 3000 + 1024 for p in paths)
    loaded = load_sharded(tmp_path, "unet")
    assert list(loaded) == list(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    save_sharded(tensors, tmp_path, "unet", {}, max_bytes=10**6)  # one file now: the old shards go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.safetensors"]
    save_sharded(tensors, tmp_path, "unet", {}, max_bytes=3000)
    paths[1].unlink()
    with pytest.raises(B4MError, match="4 of 5 unet shards"):
        load_sharded(tmp_path, "unet")


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    from b4m.io_utils import atomic_path

    with atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    # safetensors' writer recreates the temporary file with mode 0600: adapter files got it before the fix
    from b4m.io_utils import save_safetensors

    save_safetensors({"a": torch.zeros(2)}, tmp_path / "a.safetensors", {})
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_world_names_its_unknown_words_and_generates_aux_sets_in_its_own_words(tmp_path):
    """The world's vocabulary is closed: a placeholder outside it is refused (every unknown word is one token, so
    a content and a style run would learn the same one), captions' unknown words are warned about, and the
    auxiliary sets b4m generates for it use words it was trained on (SD's everyday prompts are mostly unknown)."""
    from PIL import Image

    from b4m.data import ImageSet
    from b4m.stages import AUX_CONTENT_PROMPTS, AUX_STYLE_PROMPTS, check_words

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
