"""``b4m ui``: the local web app (the optional ``ui`` extra: ``pip install b4m[ui]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import B4MError
from .console import console


def ui(
    workspace: Annotated[
        Path, typer.Option("--workspace", "-w", help="Folder of every concept, pair and image the app trains.")
    ] = Path("b4m-workspace"),
    model: Annotated[
        str, typer.Option("--model", "-m", help="Base model: world (default, a CPU is enough) or a folder.")
    ] = "world",
    transformer: Annotated[
        str | None,
        typer.Option(help="A FLUX.1 or FLUX.2 \\[klein] transformer .safetensors file that replaces --model's own."),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Preset of every training run: fast, low-memory or low-memory-8bit.")
    ] = None,
    base_weights: Annotated[
        str | None,
        typer.Option(help="auto, int8 or float8: the base model's linear weights, for every command the app runs."),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to serve on; anything but 127.0.0.1 lets other machines use the app.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 7860,
) -> None:
    """Open the app: train contents and styles, make any pair, generate, download LoRA files."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise B4MError("the app needs the ui extra: pip install 'b4m[ui]'") from None
    from ..loading import check_transformer
    from ..models.quantize import require_quantization
    from ..runs.config import preset_settings
    from ..ui.actions import AppBase
    from ..ui.app import build_app, local_theme

    if transformer:  # everything the app's commands would refuse, said once before the page opens
        check_transformer(model, transformer)
    if preset:
        preset_settings(preset)
    if base_weights:
        require_quantization(base_weights)

    if host != "127.0.0.1":
        console.print(f"warning: serving on {host}: anyone who can reach this machine can use the app", style="yellow")
    workspace.mkdir(parents=True, exist_ok=True)
    base = AppBase(model, str(Path(transformer).resolve()) if transformer else None, preset, base_weights)
    page = build_app(workspace, base)
    page.launch(server_name=host, server_port=port, share=False, inbrowser=False, theme=local_theme())
