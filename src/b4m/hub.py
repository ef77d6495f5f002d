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


def check_hub_reachable(repo_id: str, timeout: float = 5.0) -> None:
    """Nothing when ``repo_id`` has a config file in the local Hugging Face cache, or when the Hub answers one quick
    request; else a one-line :class:`~b4m.errors.B4MError` at once (the Hub client would retry for about 40 s and
    print each retry before failing with a multi-line message)."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    from .errors import B4MError, first_line

    if any(cached_hub_file(repo_id, f) for f in ("model_index.json", "config.json", "unet/config.json")):
        return
    fetch = f"download it first (hf download {repo_id}) or pass a local folder"
    if constants.HF_HUB_OFFLINE:
        raise B4MError(f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {fetch}")
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:  # the Hub answered: reachable
        return
    except (OSError, ValueError) as e:  # URLError, timeouts, a malformed endpoint
        raise B4MError(
            f"{repo_id}: not in the local Hugging Face cache and {constants.ENDPOINT} cannot be reached "
            f"({first_line(e)}); {fetch}"
        ) from e
