"""B4M's settings, each default in one place: :class:`B4MConfig` (the adapter, the two break runs, make) and
:class:`MakeConfig` (make's loop settings and the style references' weight). Light on purpose: the command line
reads these defaults without loading torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..adapter.config import PLPConfig
from ..errors import B4MError
from ..training.config import TrainConfig


@dataclass
class MakeConfig(TrainConfig):
    """Make's settings: the training loop's, with make's defaults ("a few dozen steps", paper 4.3; both halves learn
    from the whole loss; the Riemannian preconditioner on), and the style references' weight in the loss."""

    steps: int = 50
    routing: str = "none"
    precondition: bool = True
    checkpoint_every: int = 50
    # The style references' weight in make's loss (the content's is 1). 0.5, not the paper's equal weights: +0.016
    # and +0.03 average on the world benchmark at seeds 0 and 1, from content (docs/benchmarks.md, "Make's data").
    style_weight: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.style_weight >= 0:
            raise B4MError(f"style_weight must be at least 0, got {self.style_weight}")
        if self.routing == "mixed":
            raise B4MError("make takes routing none (both halves learn from both losses) or clean, not mixed")

    def loop_config(self) -> TrainConfig:
        """The training loop's settings (every field but ``style_weight``)."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Make's loop settings that differ from a break run's (TOML layout of ``[train]``)."""
        mine, theirs = cls(), TrainConfig()
        names = [f.name for f in dataclasses.fields(TrainConfig)]
        return {k: getattr(mine, k) for k in names if getattr(mine, k) != getattr(theirs, k)}


@dataclass
class B4MConfig:
    """B4M's settings: the PLP adapter, the content and style runs (``train``) and make (``make``)."""

    adapter: PLPConfig = field(default_factory=PLPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    make: MakeConfig = field(default_factory=MakeConfig)
    # Settings of the content run (style run) that differ from ``train``, e.g. {"timestep_bias": "high-noise"}
    # (TOML: a [content_run] table). The commands need none: b4m content and b4m style each take their own settings.
    content_run: dict[str, Any] = field(default_factory=dict)
    style_run: dict[str, Any] = field(default_factory=dict)
    content_scale: float = 1.0  # generation-time multipliers of the content and style halves
    style_scale: float = 1.0

    def __post_init__(self) -> None:
        for role in ("content", "style"):
            self.break_train(role)  # unknown keys or bad values: one line now, not after the first run

    def break_train(self, role: str) -> TrainConfig:
        """The loop settings of the content or style run: ``train`` with that run's own settings over it."""
        overrides = {"content": self.content_run, "style": self.style_run}[role]
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise B4MError(f"unknown key(s) in [{role}_run]: {', '.join(unknown)}")
        return dataclasses.replace(self.train, **overrides)
