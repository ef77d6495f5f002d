"""Telling a Hugging Face Hub repository id (``owner/name``) from a local path or a name, and finding a Hub
repository's files in the local Hugging Face cache without the network."""

from __future__ import annotations

import re
from pathlib import Path

#: A Hub repository id, ``owner/name``.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def looks_like_hub_id(text: str) -> bool:
    """``owner/name``, without a checkpoint's suffix (a missing local ``a/b.safetensors`` is not a Hub id)."""
    return HUB_ID.fullmatch(text) is not None and not text.endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin"))


def cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of Hub model repository ``repo_id`` (its ``main`` revision) in the local Hugging Face cache
    (``HF_HUB_CACHE``, as ``hf download`` fills it), never the network; None where it is not there (or the cache
    records that the repository has no such file, or ``repo_id`` is no valid id)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # HFValidationError: an id the Hub would refuse
        return None
    return Path(found) if isinstance(found, str) else None  # the other answers: None, or the cached "no such file"
