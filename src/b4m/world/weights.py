"""Where the shipped world weights live (``b4m/world/weights``): the base model and the two oracles."""

from __future__ import annotations

from pathlib import Path

from ..errors import B4MError

FOLDER = Path(__file__).resolve().parent / "weights"

#: The shipped oracles: "a" scores (cnn_a, seed 0), "b" checks it (cnn_b, seed 1: another architecture and seed).
ORACLES = {"a": "oracle_a.safetensors", "b": "oracle_b.safetensors"}


def model_folder() -> Path:
    """The shipped world model's folder; a clear error when this install has none."""
    if not (FOLDER / "world_model.json").is_file():
        raise B4MError(
            f"{FOLDER}: the built-in world model is not in this install; "
            "train one with `b4m world pretrain` and pass its folder as --model"
        )
    return FOLDER


def oracle_file(which: str = "a") -> Path:
    """The shipped oracle ``which`` ("a" or "b")."""
    if which not in ORACLES:
        raise B4MError(f"shipped oracle {which!r} unknown (known: {', '.join(ORACLES)})")
    path = FOLDER / ORACLES[which]
    if not path.is_file():
        raise B4MError(f"{path}: the shipped oracle is not in this install; train one with `b4m world oracle`")
    return path


def load_shipped_oracle(which: str = "a", device="cpu"):
    """The shipped oracle ``which``, loaded (its classes checked against the built-in catalog)."""
    from .catalog import default_catalog
    from .oracle import load_oracle

    return load_oracle(oracle_file(which), default_catalog(), device=device)
