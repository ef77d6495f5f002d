"""The app end to end through its API (gradio_client, as any script would drive it), on the built-in world with tiny
step counts: train a content and a style from world concepts (one caption edited), make, generate, download the
LoRA files and load them back with b4m's reader and diffusers'. The runs are the CLI's own folders: the CLI makes
the app's two runs too, and the app lists a run the CLI trains into its workspace. Errors come back as one line."""

from __future__ import annotations

import copy
import json
import re
import socket
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from b4m.adapter.file import load_adapter
from b4m.cli import app as cli
from b4m.data import load_image_set
from b4m.lora_files import apply_factors, load_lora
from b4m.ui.app import build_app, local_theme

EDITED = "a diamond in zwx style"  # the first style reference's caption, edited in the page


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def client(tmp_path):
    from gradio_client import Client

    page = build_app(tmp_path / "ws")
    page.launch(
        server_name="127.0.0.1", server_port=_port(), prevent_thread_lock=True, quiet=True, theme=local_theme()
    )
    try:
        yield Client(page.local_url, verbose=False, download_files=str(tmp_path / "downloads"))
    finally:
        page.close()


def _wait(client, *titles: str, timeout: float = 240.0) -> str:
    """Poll the app's run list (its /status endpoint) until every run in ``titles`` is done."""
    deadline = time.monotonic() + timeout
    while True:
        runs = client.predict(api_name="/status")
        if any(f"{t}: failed" in runs or f"{t}: cancelled" in runs for t in titles):
            raise AssertionError(runs)
        if all(f"{t}: done" in runs for t in titles):
            return runs
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s: {runs}"
        time.sleep(0.5)


def _error(call) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        call()
    return str(e.value).strip('"')


def test_train_make_generate_download_through_the_api(tmp_path, client):
    from diffusers import StableDiffusionPipeline

    from b4m import load_model

    ws = tmp_path / "ws"
    rows = client.predict("style", [], "brick", api_name="/captions")
    assert [r[0] for r in rows["data"]] == ["00.png", "01.png", "02.png", "03.png"]
    assert all("zwx" in r[1] for r in rows["data"])  # the world's own captions, with the placeholder
    rows["data"][0][1] = EDITED
    empty = {"headers": ["image", "caption"], "data": []}

    def train(role, name, captions, concept=None):
        return client.predict(role, name, [], concept or name, "", "", captions, 2, api_name="/train")

    assert train("content", "teapot", empty) == "queued: content teapot"
    assert train("style", "brick", rows) == "queued: style brick"
    assert "style brick: queued" in client.predict(api_name="/status")  # one run at a time
    _wait(client, "content teapot", "style brick")
    # bad input: one line, nothing lost
    assert _error(lambda: train("content", "teapot", empty)) == (
        "a content named 'teapot' exists already: resume it, or choose another name"
    )
    assert _error(lambda: train("style", "glass", {**rows, "data": rows["data"][:2]}, "brick")) == (
        "2 captions for 4 images: one per image (an empty one takes the caption)"
    )

    # the edited caption reached the run: beside its image, where the style run read it
    run = json.loads((ws / "style" / "brick" / "run.json").read_text())
    assert run["stage"] == "style" and run["config"]["placeholder"] == "zwx" and run["config"]["train"]["steps"] == 2
    refs = Path(run["config"]["images"])
    assert (refs / "00.txt").read_text() == EDITED + "\n"
    assert load_image_set(refs, None, 32).captions[0] == EDITED

    table = client.predict(api_name="/library")[0]
    assert [r[:3] for r in table["data"]] == [["content", "teapot", "trained"], ["style", "brick", "trained"]]
    assert client.predict("teapot", "brick", 1, api_name="/make") == "queued: make teapot × brick"
    _wait(client, "make teapot × brick")

    client.predict(api_name="/library")  # the made pair in the Generate tab's list
    assert _error(lambda: client.predict("teapot+brick", " ", 2, 0, 1, 1, api_name="/generate")) == "no prompt given"
    images, loras = client.predict("teapot+brick", "a sks in zwx style", 2, 0, 1, 1, api_name="/generate")
    assert len(images) == 2 and Image.open(images[0]["image"]).size == (128, 128)
    loras = {re.sub(r"^.*/", "", p): Path(p) for p in loras}
    assert set(loras) == {"fused_lora_diffusers.safetensors", "fused_lora_comfyui.safetensors"}

    # the downloaded LoRAs load back: b4m's reader gives the made adapter's ΔW in both formats ...
    made = load_adapter(ws / "pairs" / "teapot+brick" / "fused.b4m.safetensors").factors()
    for path in loras.values():
        factors, meta = load_lora(path)
        assert meta["b4m_role"] == "fused" and set(factors) == set(made)
        for name, (up, down) in made.items():
            torch.testing.assert_close(factors[name][0] @ factors[name][1], up @ down)
    # ... and diffusers' loader (pipe.load_lora_weights' UNet part) puts the same ΔW into the world's UNet
    unet = load_model("world").denoiser
    merged = copy.deepcopy(unet)
    apply_factors(merged, made)
    sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(
        str(loras["fused_lora_diffusers.safetensors"]), return_lora_metadata=True
    )
    StableDiffusionPipeline.load_lora_into_unet(sd, network_alphas=alphas, unet=unet, metadata=meta)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 32, 32, generator=gen)
    text = torch.randn(1, 4, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 10, text).sample, merged(x, 10, text).sample, atol=1e-4, rtol=1e-4)

    # the CLI reads the app's runs: make the same two into another folder
    result = CliRunner().invoke(
        cli, ["make", "--content", str(ws / "content" / "teapot"), "--style", str(ws / "style" / "brick"),
              "-o", str(tmp_path / "cli"), "--steps", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # ... and the app lists what the CLI trains into its workspace (a content run on the app's teapot references)
    teapot = json.loads((ws / "content" / "teapot" / "run.json").read_text())["config"]
    args = ["content", "--images", teapot["images"], "--prompt", teapot["prompt"], "--steps", "1"]
    args += ["--aux", teapot["aux"]] if teapot.get("aux") else []
    result = CliRunner().invoke(cli, [*args, "-o", str(ws / "content" / "kettle")])
    assert result.exit_code == 0, result.output
    table = client.predict(api_name="/library")[0]
    assert ["content", "kettle", "trained"] in [r[:3] for r in table["data"]]
