"""The plain LoRA file formats and export dtypes by the names the CLI and config files use (no torch needed to check
a setting before any work)."""

from __future__ import annotations

from ..errors import B4MError

#: ``diffusers``: peft keys for ``load_lora_weights``; ``kohya``: ComfyUI, A1111 and Forge.
FORMATS = ("diffusers", "kohya")
#: Export dtypes by name.
EXPORT_DTYPES = ("fp32", "bf16", "fp16")


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise B4MError(f"export format must be one of {', '.join(FORMATS)}, got {name!r}")
    return name


def check_dtype_name(name: str) -> str:
    if name not in EXPORT_DTYPES:
        raise B4MError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {name!r}")
    return name
