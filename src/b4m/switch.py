"""An on/off setting of the whole process, turned on or off for a block (``with switch():``) and read as a bool.

For code paths that exist beside the default until a measurement decides them (docs/benchmarks.md), or beside
a default that a measurement changed: a bench row turns the other path on (or off) for its timing. A plain
attribute, not a context variable: the autograd engine runs CUDA backward passes, and with them gradient
checkpointing's recomputed forward, on threads of its own, which must see what the step's thread set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class Switch:
    """``bool(switch)`` is its state (``default`` outside any block); ``with switch(enabled):`` sets it for the
    block and restores it after, also on an exception."""

    def __init__(self, name: str, default: bool = False) -> None:
        self.name = name
        self._on = default

    def __bool__(self) -> bool:
        return self._on

    @contextmanager
    def __call__(self, enabled: bool = True) -> Iterator[None]:
        before, self._on = self._on, bool(enabled)
        try:
            yield
        finally:
            self._on = before

    def __repr__(self) -> str:
        return f"Switch({self.name!r}, {'on' if self._on else 'off'})"
