"""What a file holds, for ``b4m inspect``: b4m adapter files and plain LoRAs alike, and FLUX transformer files (the
``--transformer`` of the FLUX families, read from their header only)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .files import load_safetensors


def describe(path: str | Path) -> dict:
    """A flat summary of a b4m adapter file, a plain LoRA file or a FLUX transformer file (keys in display order)."""
    path = Path(path)
    transformer = _describe_transformer(path)
    if transformer is not None:
        return transformer
    _, metadata = load_safetensors(path, check_finite=False)  # a missing or bad file fails here, before torch loads
    from .adapter.file import is_adapter_file

    if is_adapter_file(metadata):
        return _describe_adapter(path)
    return _describe_lora(path)


def _describe_adapter(path: Path) -> dict:
    from .adapter.file import load_adapter

    adapter = load_adapter(path)
    c = adapter.config
    learned, frozen = adapter.num_parameters()
    info = {
        "file": str(path),
        "kind": "b4m adapter (" + adapter.role + (" run)" if adapter.role != "fused" else ")"),
        "base model": c.base_model or "(not recorded)",
        "targets": f"{len(adapter.modules)} modules ({_target_summary(adapter.modules)})",
        "rank": c.rank,
        "ratio": c.ratio,
        "frozen init": c.init,
        "seed": c.seed,
        "assignment": f"{c.assignment} (content = {c.half_of('content')}, style = {c.half_of('style')})",
        "parameters": f"{learned:,} learned, {frozen:,} frozen",
        "fingerprint": adapter.fingerprint(),
    }
    for key, value in adapter.metadata.items():
        info[key] = _shown(key, value)
    info["modules"] = adapter.modules
    return info


def _describe_transformer(path: Path) -> dict | None:
    """A FLUX.1 or FLUX.2 transformer file from its header (no tensor read: such files are 12-24 GB); None for any
    other file."""
    from .errors import B4MError
    from .models.flux_file import read_transformer_file

    try:
        file = read_transformer_file(path)
    except B4MError:
        return None
    return {
        "file": str(path),
        "kind": file.describe(),
        **file.geometry(),
        "use": f"--transformer {path} --model FOLDER (a diffusers FLUX folder or Hub id: text encoders, VAE)",
        "modules": [],
    }


def _describe_lora(path: Path) -> dict:
    """From the raw keys, so a kohya SDXL file needs no model config to be inspected."""
    from .lora_files import detect_format

    tensors, metadata = load_safetensors(path)
    fmt = detect_format(tensors, path)
    downs = {
        k.rsplit(".", 2)[0]: t
        for k, t in tensors.items()
        if k.endswith((".lora_A.weight", ".lora_down.weight", ".lora.down.weight", "_lora.down.weight"))
    }
    ranks = sorted({t.shape[0] for t in downs.values()})
    n_params = sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha"))
    info = {
        "file": str(path),
        "kind": f"plain LoRA ({fmt} format)",
        "targets": f"{len(downs)} modules ({_target_summary(sorted(downs))})",
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "dtype": str(next(iter(downs.values())).dtype).removeprefix("torch."),
        "parameters": f"{n_params:,}",
    }
    for key in ("b4m_role", "b4m_fingerprint", "trigger_words"):
        if key in metadata:
            info[key.removeprefix("b4m_")] = _shown(key, metadata[key])
    info["modules"] = sorted(downs)
    return info


def _shown(key: str, value: str) -> str:
    """A metadata value as inspect prints it: trigger words (a JSON list, as b4m writes them) comma-separated."""
    if key == "trigger_words":
        try:
            words = json.loads(value)
        except ValueError:  # another tool's plain string
            return value
        if isinstance(words, list):
            return ", ".join(map(str, words))
    return value


def _target_summary(modules: list[str]) -> str:
    """Which projection types are adapted, e.g. 'to_k, to_out.0, to_q, to_v'."""
    kinds = sorted({m.rsplit(".", 2)[-2] + ".0" if m.endswith(".0") else m.rsplit(".", 1)[-1] for m in modules})
    # kohya names flatten the path with '_': what follows the last block index ("…_blocks_0_attn1_to_out_0")
    kinds = sorted({re.sub(r"^.*_\d+_(?=[a-z])", "", k) if k.startswith("lora_") else k for k in kinds})
    return ", ".join(kinds)
