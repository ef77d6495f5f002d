"""FLUX.1 schnell's defaults (issue 17) on a tiny FLUX.1-schnell-like pipeline (no guidance embedding, schnell's
scheduler config, T5's 512-token limit): 4 sampling steps, guidance 0 and 256 T5 tokens unless set, as diffusers'
FluxPipeline documentation runs schnell; the same images as that pipeline call; the commands say so once and record
what they used. The tiny FLUX.1-dev-like pipeline keeps 25 steps, guidance 3.5 and no note."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from b4m.errors import B4MError
from b4m.loading import load_model
from b4m.models.base import SampleRequest
from b4m.models.flux import SCHNELL_DEFAULTS, TRAIN_GUIDANCE, FluxModel
from conftest import cli_ok
from tiny_pipelines import dog_and_yarn, save_tiny_flux

PROMPT = "a sks dog"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(save_tiny_flux(tmp_path_factory.mktemp("schnell") / "tiny-schnell", schnell=True))


@pytest.fixture(scope="module")
def model(folder):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_model(folder, resolution=32)


def transformer_calls(model: FluxModel, request: SampleRequest) -> tuple[list[Image.Image], int]:
    """The images of ``request`` and how many times the transformer ran for them (one image: once a step)."""
    calls = []
    hook = model.denoiser.register_forward_hook(lambda *_: calls.append(1))
    try:
        return model.sample(request), len(calls)
    finally:
        hook.remove()


def test_a_flux1_transformer_without_guidance_embedding_gets_schnells_defaults(model, tmp_path):
    assert isinstance(model, FluxModel) and model.is_schnell and not model.denoiser.config.guidance_embeds
    assert SCHNELL_DEFAULTS == {"steps": 4, "guidance": 0.0, "max_sequence_length": 256}
    request = SampleRequest([PROMPT], [0])
    assert (model.sample_steps(request), model.guidance(request), model.max_sequence_length) == (4, 0.0, 256)
    assert model.encode_prompts([PROMPT]).hidden.shape == (1, 256, 24)  # T5's 512-token tokenizer, cut to 256
    note = model.defaults_note()
    assert "\n" not in note and all(s in note for s in ("schnell", "4 sampling steps", "guidance 0", "256 T5 tokens"))
    # What the user sets wins.
    assert model.sample_steps(SampleRequest([PROMPT], [0], steps=2, guidance_scale=1.5)) == 2
    assert model.guidance(SampleRequest([PROMPT], [0], guidance_scale=1.5)) == 1.5
    model.max_sequence_length = 300
    try:
        assert model.encode_prompts([PROMPT]).hidden.shape == (1, 300, 24)
        with pytest.raises(B4MError, match="max_sequence_length must be at least 1"):
            model.max_sequence_length = 0
    finally:
        model._text_tokens = None
    # The tiny FLUX.1-dev keeps FluxPipeline's usual defaults (its T5 tokenizer's own limit is 16 tokens).
    dev = load_model(str(save_tiny_flux(tmp_path / "tiny-dev")), resolution=32)
    assert not dev.is_schnell and dev.defaults_note() == ""
    assert (dev.sample_steps(request), dev.guidance(request), dev.max_sequence_length) == (25, TRAIN_GUIDANCE, 16)


def test_sampling_takes_4_steps_and_gives_what_flux_pipeline_gives_for_schnell(model, folder):
    (ours,), steps = transformer_calls(model, SampleRequest([PROMPT], [0]))
    assert steps == 4
    assert transformer_calls(model, SampleRequest([PROMPT], [0], steps=2))[1] == 2
    # The call diffusers' FluxPipeline documentation makes for schnell, on the same folder.
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        PROMPT,
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=0.0,
        max_sequence_length=256,
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    difference = np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16))
    assert difference.max() <= 1  # the same image, up to rounding


def test_the_commands_use_schnells_defaults_and_say_so_once(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("B4M_CACHE", str(tmp_path / "cache"))
    refs = dog_and_yarn(tmp_path)
    args = ["--images", refs["dog"], "--prompt", "a photo of sks dog", "--placeholder", "sks", "--aux", refs["aux"]]
    args += ["--model", folder]
    out = cli_ok("content", *args, "-o", tmp_path / "c", "--steps", "1", "--rank", "4", "--resolution", "32").output
    assert out.count("no guidance embedding (FLUX.1 schnell)") == 1, out
    assert (tmp_path / "c" / "samples").is_dir()  # validation images at schnell's defaults

    result = cli_ok("generate", tmp_path / "c", PROMPT, "-n", "1", "-o", tmp_path / "g", "--resolution", "32")
    assert result.output.count("4 sampling steps, guidance 0 (not used) and 256 T5 tokens unless set") == 1
    meta = json.loads(Image.open(tmp_path / "g" / "00_seed0.png").info["b4m"])
    assert (meta["steps"], meta["guidance_scale"]) == (4, 0.0), meta

    cli_ok("generate", tmp_path / "c", PROMPT, "-n", "1", "-o", tmp_path / "g2", "--resolution", "32", "--steps", "2")
    assert json.loads(Image.open(tmp_path / "g2" / "00_seed0.png").info["b4m"])["steps"] == 2
