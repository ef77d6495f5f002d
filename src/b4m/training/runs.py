"""One adapter run as a function (attach, train, snapshot, take off), and a memo of finished runs.

:func:`train_adapter` is what every PLP run calls: B4M's content and style runs and make, and every baseline's LoRA.
It leaves the model as it was given. :func:`run_key` and :func:`memoized` keep finished runs in a dict keyed by their
data and settings, so a benchmark trains each concept's stage-1 run once however many pairs and methods use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapter.config import PLPConfig
from ..adapter.file import AdapterFile, adapter_from_model, apply_adapter
from ..adapter.walker import add_plp, remove_plp, resolve_targets
from ..models.base import DiffusionModel
from .config import TrainConfig
from .loop import TrainResult, train
from .sets import TrainSet


@dataclass
class RunRecord:
    """A finished adapter run: its adapter, the loop's result (None for 0 steps) and its wall time."""

    adapter: AdapterFile
    result: TrainResult | None
    seconds: float


def train_adapter(
    model: DiffusionModel,
    sets: Sequence[TrainSet],
    config: TrainConfig,
    out: str | Path,
    role: str,
    *,
    plp: PLPConfig | None = None,
    start: AdapterFile | None = None,
    resume: bool = False,
    validate: Callable[[int], None] | None = None,
    progress: Callable[[int, int, float | None], None] | None = None,
) -> RunRecord:
    """Attach a PLP adapter to ``model.denoiser`` (a new one from ``plp``, or ``start`` loaded), train it with
    :func:`b4m.training.loop.train`, snapshot it and take it off again: the model is left as it was given.

    ``role`` is the adapter's role ("content", "style" or "fused"). With ``config.steps == 0`` nothing trains.
    ``resume``, ``validate`` and ``progress`` go to the loop.
    """
    t0 = time.perf_counter()
    if start is not None:
        apply_adapter(model.denoiser, start)
        plp = start.config
    else:
        # no targets given: the model's own (FLUX.1's, klein's, the UNets'), recorded as such in the adapter file
        plp = resolve_targets(model.denoiser, dataclasses.replace(plp, base_model=plp.base_model or model.identity))
        add_plp(model.denoiser, plp)
    try:
        result = None
        if config.steps > 0:
            result = train(
                model,
                plp,
                list(sets),
                config,
                Path(out),
                role=role,
                resume=resume,
                validate=validate,
                progress=progress,
            )
        adapter = adapter_from_model(model.denoiser, plp, role)
    finally:
        remove_plp(model.denoiser)
    return RunRecord(adapter, result, time.perf_counter() - t0)


def _digest(sets: Sequence[TrainSet]) -> list:
    out = []
    for s in sets:
        h = hashlib.sha256()
        for t in (s.latents, s.cond.hidden, *(s.cond.extra[k] for k in sorted(s.cond.extra))):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        out.append([s.name, len(s.latents), s.weight, s.main, h.hexdigest()[:16]])
    return out


def run_key(kind: str, role: str, sets: Sequence[TrainSet], *configs: Any) -> str:
    """The key of a run in a memo: its kind, role, data (hashed) and settings (the base model's identity among them).
    Two methods whose stage 1 is the same run (direct merge and ZipLoRA train the same plain LoRAs) get the same
    key."""
    settings = [dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c for c in configs]
    blob = json.dumps([kind, role, _digest(sets), settings], sort_keys=True, default=str)
    return f"{kind}/{role}/" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def memoized(memo: dict | None, key: str, run: Callable[[], RunRecord]) -> tuple[RunRecord, bool]:
    """``memo[key]`` if present (``True``: reused), else ``run()`` stored under ``key``."""
    if memo is not None and key in memo:
        return memo[key], True
    done = run()
    if memo is not None:
        memo[key] = done
    return done, False


def run_info(record: RunRecord | None, reused: bool = False) -> dict[str, Any] | None:
    """What a result records of one run: ``seconds`` spent in this call (0 when reused), the run's own
    ``run_seconds``, steps and the loss curve."""
    if record is None:
        return None
    r = record.result
    return {
        "seconds": 0.0 if reused else round(record.seconds, 3),
        "run_seconds": round(record.seconds, 3),
        "reused": reused,
        "steps": r.steps if r else 0,
        "images": r.images if r else 0,
        "final_loss": r.final_loss if r else None,
        "losses": r.losses if r else [],
    }


def pair_info(
    config: Any, started: float, content: tuple[RunRecord, bool], style: tuple[RunRecord, bool], **more: Any
) -> dict[str, Any]:
    """What a method's result records of one pair: its settings, the seconds since ``started``, each concept's run
    (``(record, reused)``, see :func:`run_info`) and ``more``."""
    return {
        "config": dataclasses.asdict(config),
        "seconds": round(time.perf_counter() - started, 3),
        "content": run_info(*content),
        "style": run_info(*style),
        **more,
    }
