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
    from ..ui.app import build_app, local_theme

    if host != "127.0.0.1":
        console.print(f"warning: serving on {host}: anyone who can reach this machine can use the app", style="yellow")
    workspace.mkdir(parents=True, exist_ok=True)
    page = build_app(workspace, model)
    page.launch(server_name=host, server_port=port, share=False, inbrowser=False, theme=local_theme())
