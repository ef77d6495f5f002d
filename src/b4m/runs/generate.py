"""``b4m generate``: images with a run's adapter (or any ``.b4m.safetensors`` file), written as PNGs whose metadata
holds the prompt, the seed and every setting, plus a grid."""

from __future__ import annotations

from pathlib import Path

from ..adapter.file import load_adapter
from ..device import default_device
from ..errors import B4MError
from ..files import check_output
from ..images import save_grid, save_png
from ..loading import load_model
from ..method.stages import generate as generate_images
from ..models.base import SampleRequest
from ..progress import say
from .folder import ADAPTER_NAMES, run_source


def generate(
    adapter_path: str,
    prompts: list[str],
    *,
    output: str,
    model: str | None = None,
    n: int = 4,
    seed: int = 0,
    negative_prompt: str = "",
    steps: int = 25,
    guidance_scale: float | None = None,
    scheduler: str | None = None,
    scale: float = 1.0,
    content_scale: float = 1.0,
    style_scale: float = 1.0,
    merge: bool = False,
    resolution: int | None = None,
    device: str | None = None,
    console=None,
) -> list[Path]:
    """Sample ``n`` images per prompt (seeds ``seed … seed+n-1``) with a b4m adapter
    (:func:`b4m.method.stages.generate`); writes PNGs and a grid to ``output``."""
    if n < 1:
        raise B4MError(f"n (images per prompt) must be at least 1, got {n}")
    if steps < 1:
        raise B4MError(f"steps must be at least 1, got {steps}")
    if not prompts:
        raise B4MError("no prompt given")
    check_output(output, folder=True)
    p = Path(adapter_path)
    role = "fused"
    if p.is_dir():
        role = next((r for r in ("fused", "content", "style") if (p / ADAPTER_NAMES[r]).exists()), "fused")
    file, run = run_source(adapter_path, role)
    adapter = load_adapter(file)
    model_name = model or run.get("config", {}).get("model")
    if not model_name:
        raise B4MError(f"{file}: no run.json beside it says which base model to use; pass --model")
    out = Path(output)
    base = load_model(model_name, device=device or default_device(), resolution=resolution)
    seeds = list(range(seed, seed + n))
    request = SampleRequest(
        prompts,
        seeds,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        height=resolution,
        width=resolution,
    )
    images = generate_images(
        base, adapter, request, scale=scale, content_scale=content_scale, style_scale=style_scale, merge=merge
    )
    settings = {
        "adapter": str(file),
        "model": model_name,
        "negative_prompt": negative_prompt,
        "steps": steps,
        "guidance_scale": base.guidance(request),
        "scheduler": scheduler or "default",
        "scale": scale,
        "content_scale": content_scale,
        "style_scale": style_scale,
        "merged": merge,
    }
    paths = [
        save_png(
            image,
            out / f"{i // n:02d}_seed{seeds[i % n]}.png",
            {"prompt": prompts[i // n], "seed": seeds[i % n], **settings},
        )
        for i, image in enumerate(images)
    ]
    grid = save_grid(images, n, out / "grid.png", {"prompts": prompts, "seeds": seeds, **settings})
    say(console, f"wrote {len(paths)} images and {grid}")
    return [*paths, grid]
