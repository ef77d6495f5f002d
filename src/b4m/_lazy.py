"""Packages whose public names are imported on first use, so that importing a package (or reading a setting's
default from one of its light modules) does not load torch and diffusers."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, modules: dict[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """``(__all__, __getattr__)`` for ``package``: ``modules`` maps each submodule (relative to the package, or
    absolute when it starts with ``b4m.``) to the public names it defines, space-separated."""
    names = {name: module for module, listed in modules.items() for name in listed.split()}

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        where = names[name]
        return getattr(importlib.import_module(where if where.startswith("b4m.") else f"{package}.{where}"), name)

    return sorted(names), __getattr__
