"""``setting()``: a dataclass field with its help text and, for the settings a command takes as a flag, the flag
beside it: one declaration per setting (the CLI's options are generated from these, :mod:`b4m.cli.options`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    flag: str | None = None,
    short: str | None = None,
    commands: Sequence[str] = (),
    unset: str | dict[str, str] | None = None,
    notes: dict[str, str] | None = None,
) -> Any:
    """A dataclass field whose metadata holds ``help`` and, where the setting is a command-line flag, ``flag`` (e.g.
    ``"--steps"``), ``short`` (``"-m"``), the ``commands`` that take it, ``unset`` (what an empty default means, per
    command or for all) and ``notes`` (extra help per command)."""
    metadata: dict[str, Any] = {"help": help}
    if flag is not None:
        metadata.update(flag=flag, commands=tuple(commands))
    for key, value in (("short", short), ("unset", unset), ("notes", notes)):
        if value is not None:
            metadata[key] = value
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
