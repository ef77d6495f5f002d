"""Config and flow files in TOML: reading one (a missing or malformed file is one line naming it), its relative
paths taken from the file's folder, and values written back as TOML text."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from ..errors import B4MError

#: Settings that name files or folders: relative ones in a config file are relative to the file's folder.
PATH_KEYS = ("images", "aux", "output", "content", "style", "transformer")


def read_toml(path: Path, kind: str) -> dict[str, Any]:
    """A TOML file's contents; a missing or malformed file is one line naming it (``kind``: what the file is)."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise B4MError(f"{path}: no such {kind}") from None
    except tomllib.TOMLDecodeError as e:
        raise B4MError(f"{path}: not valid TOML ({e})") from e


def paths_beside(data: dict[str, Any], folder: Path) -> None:
    """Make the relative paths of a config file's :data:`PATH_KEYS` relative to ``folder`` (the file's), as a user
    reading the file expects; ``model`` too when it names a folder or file found there (else it is a name or a Hub
    id). Flags keep the working directory's meaning."""
    for key in PATH_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            data[key] = str(folder / value)
    model = data.get("model")
    if isinstance(model, str) and model and not Path(model).is_absolute() and (folder / model).exists():
        data["model"] = str(folder / model)


def toml_value(v: Any) -> str:
    """A setting's value as TOML text (bools, numbers, strings, lists of them)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise B4MError(f"cannot write {v!r} as TOML")
