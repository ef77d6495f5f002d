"""Telling a Hugging Face Hub repository id (``owner/name``) from a local path or a name."""

from __future__ import annotations

import re

#: A Hub repository id, ``owner/name``.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def looks_like_hub_id(text: str) -> bool:
    """``owner/name``, without a checkpoint's suffix (a missing local ``a/b.safetensors`` is not a Hub id)."""
    return HUB_ID.fullmatch(text) is not None and not text.endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin"))
