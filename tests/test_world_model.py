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
from b4m.world.pretrain import PretrainConfig, holdout_combinations, pretrain, render_dataset

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
    pretrain(PretrainConfig(steps=3, **FAST), tmp_path, model_config=TINY, device="cpu")
    resumed = pretrain(PretrainConfig(steps=6, **{**FAST}), tmp_path, model_config=TINY, device="cpu", resume=True)
    straight = load_world_model(world_model / "model")
    for a, b in zip(straight.denoiser.parameters(), resumed.denoiser.parameters(), strict=True):
        torch.testing.assert_close(a, b.half().float())  # the folder holds fp16 weights
    with pytest.raises(B4MError, match="other pretraining settings"):
        pretrain(PretrainConfig(steps=9, lr=1.0, **FAST), tmp_path, model_config=TINY, device="cpu", resume=True)


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


def test_the_builtin_name_says_what_is_missing():
    with pytest.raises(B4MError, match="built-in world model is not shipped"):
        load_model("world")


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
