"""A UNet's module structure without its weights, for dry runs and key mapping (built on the meta device)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import B4MError, first_line
from .hub import check_hub_reachable, looks_like_hub_id

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


def read_unet_config(model: str | Path) -> dict:
    """The UNet config of ``model``: a diffusers pipeline folder, a UNet folder, a ``config.json`` or a Hub id.

    Only the small JSON config is read, never the weights.
    """
    path = Path(model)
    candidates = [path] if path.suffix == ".json" else [path / "unet" / "config.json", path / "config.json"]
    for candidate in candidates:
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except json.JSONDecodeError as e:
                raise B4MError(f"{candidate}: not valid JSON ({e})") from e
            if "block_out_channels" not in config:
                raise B4MError(f"{candidate}: not a UNet2DConditionModel config (no block_out_channels)")
            return config
    if path.exists():
        raise B4MError(f"{path}: no unet/config.json or config.json here; is it a diffusers model folder?")
    if not looks_like_hub_id(str(model)):
        raise B4MError(f"{model}: no such file or folder")
    check_hub_reachable(str(model))
    from diffusers import UNet2DConditionModel  # here, not at the top: importing diffusers takes seconds

    try:  # a Hub id: users with network access get the config (a few KB) from the Hub cache or the Hub
        return dict(UNet2DConditionModel.load_config(str(model), subfolder="unet"))
    except Exception as e:  # the Hub client raises many types
        reason = first_line(e)
        raise B4MError(f"{model}: not a local diffusers model and could not be read as a Hub id ({reason})") from e


def unet_skeleton(model: str | Path | dict) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` with the model's structure on the meta device (no memory for weights)."""
    config = model if isinstance(model, dict) else read_unet_config(model)  # a bad folder fails before the imports
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)
