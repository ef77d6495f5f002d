"""B4M's stages (paper section 4), on a loaded model and cached training sets: the one implementation that the
commands (``b4m content``, ``style``, ``make``, ``generate``), the demo, the benchmark and every ablation call.

- :func:`break_run`: a content run or a style run (4.2). A new PLP adapter; the owned half learns the concept's
  images, the other half the auxiliary sets (multi-correspondence, eq. 12, with clean gradient routing).
- :func:`fuse` (from :mod:`b4m.adapter.file`): LoRA_f, the content run's content half with the style run's style half.
- :func:`make`: a few dozen steps on both concepts' images with the Riemannian preconditioner (4.3).
- :func:`generate`: images with an adapter on the model (merged or not, content and style scaled apart).
- :func:`run`: break, break, fuse, make, as one call (the benchmark's B4M).

Every setting and its default lives in :class:`~b4m.method.config.B4MConfig`: the adapter
(:class:`~b4m.adapter.config.PLPConfig`), the two break runs (:class:`~b4m.training.config.TrainConfig`) and make
(:class:`~b4m.method.config.MakeConfig`). Each ablation of the paper is one setting:

- frozen ratio d: ``adapter.ratio`` (``0`` needs ``adapter.learned_init = "kaiming"`` or ``"gaussian"``);
- frozen init: ``adapter.init`` (``approx``, ``exact``, ``random`` = w/o Orth);
- half assignment: ``adapter.assignment``; gradient mixing: ``train.routing = "mixed"``;
- without multi-correspondence: the other concept's sets as the auxiliary sets, or none with
  ``train.routing = "none"``;
- without the Riemannian preconditioner: ``make.precondition = False``; instant composition: ``make.steps = 0``;
- make's data: ``make.routing = "clean"`` (each concept's loss trains only its own half), ``make.style_weight``
  (1 = the paper's equal weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..adapter.config import PLPConfig
from ..adapter.file import AdapterFile, attached, fuse
from ..adapter.walker import set_scales
from ..errors import B4MError
from ..lora_files.factors import applied
from ..models.base import DiffusionModel, SampleRequest
from ..models.quantize import is_quantized
from ..training.config import TrainConfig
from ..training.runs import RunRecord, memoized, pair_info, run_info, run_key, train_adapter
from ..training.sets import TrainSet
from .config import B4MConfig, MakeConfig

__all__ = [
    "B4MResult",
    "applied_adapter",
    "break_run",
    "break_train_config",
    "fuse",
    "generate",
    "make",
    "make_sets",
    "run",
]

Progress = Callable[[int, int, float | None], None]


def break_run(
    role: str,
    sets: Sequence[TrainSet],
    model: DiffusionModel,
    adapter: PLPConfig,
    train: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    validate: Callable[[int], None] | None = None,
    progress: Progress | None = None,
) -> RunRecord:
    """A content run (``role="content"``) or a style run (``role="style"``): paper section 4.2.

    ``sets`` are the concept's images (``main=True``) and the auxiliary sets (``main=False``). The half that holds
    ``role`` (:meth:`PLPConfig.half_of`) learns the main sets; under ``train.routing = "clean"`` (the default) the
    other half learns only the auxiliary sets, in one forward and backward. Checkpoints go to ``out``; the model is
    left as it was given.
    """
    config = break_train_config(role, adapter, train)
    return train_adapter(
        model, sets, config, out, role, plp=adapter, resume=resume, validate=validate, progress=progress
    )


def break_train_config(role: str, adapter: PLPConfig, train: TrainConfig) -> TrainConfig:
    """A break run's loop settings: ``train`` with the half that holds ``role`` as the one the main sets train."""
    if role not in ("content", "style"):
        raise B4MError(f"role must be content or style, got {role!r}")
    return dataclasses.replace(train, owned=adapter.half_of(role))


def make_sets(
    content: Sequence[TrainSet], style: Sequence[TrainSet], config: MakeConfig, plp: PLPConfig
) -> tuple[list[TrainSet], TrainConfig]:
    """Make's training sets and loop settings from the two concepts' main sets.

    The style sets' weights are multiplied by ``config.style_weight``. Routing ``none`` (the paper's): both halves
    learn from both losses. Routing ``clean``: the content loss trains only the content half and the style loss only
    the style half (the style sets become the "auxiliary" side of :func:`b4m.adapter.walker.routing`), so the style
    references' own contents cannot be learned into the content half.
    """
    clean = config.routing == "clean"
    sets = [TrainSet(s.name, s.latents, s.cond, s.weight, True) for s in content]
    sets += [TrainSet(s.name, s.latents, s.cond, s.weight * config.style_weight, not clean) for s in style]
    loop = config.loop_config()
    if clean:
        loop = dataclasses.replace(loop, owned=plp.half_of("content"))
    return sets, loop


def make(
    fused: AdapterFile,
    content: Sequence[TrainSet],
    style: Sequence[TrainSet],
    model: DiffusionModel,
    config: MakeConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: Progress | None = None,
) -> RunRecord:
    """Make (paper 4.3): fine-tune the fused adapter on the content's and the style's main sets (:func:`make_sets`)
    with ``config`` (the Riemannian preconditioner by default). ``config.steps = 0`` returns the fused adapter as it
    is (instant composition). The model is left as it was given."""
    if fused.role != "fused":
        raise B4MError(
            f"make starts from a fused adapter (fuse a content run and a style run), not a {fused.role} run"
        )
    sets, loop = make_sets(content, style, config, fused.config)
    return train_adapter(model, sets, loop, out, "fused", start=fused, resume=resume, progress=progress)


@dataclass
class B4MResult:
    """What :func:`run` made: the two break runs (and whether each was reused from the memo), LoRA_f, the made
    adapter, and a record of settings, seconds and losses."""

    content: RunRecord
    style: RunRecord
    fused: AdapterFile
    made: RunRecord
    info: dict[str, Any]


def run(
    content_sets: Sequence[TrainSet],
    style_sets: Sequence[TrainSet],
    model: DiffusionModel,
    config: B4MConfig,
    out: str | Path,
    memo: dict | None = None,
) -> B4MResult:
    """The whole method for one pair: a content run, a style run, fuse, make. Checkpoints go under ``out``
    (``b4m-content``, ``b4m-style``, ``b4m-make``).

    ``content_sets`` / ``style_sets``: each concept's images (``main=True``) and auxiliary sets (``main=False``);
    make trains on the main ones. ``memo`` keeps the break runs by data and settings
    (:func:`~b4m.training.runs.memoized`): pass one dict to every call of a benchmark and each concept's run is
    trained once.
    """
    t0 = time.perf_counter()
    records = {}
    for role, sets in (("content", content_sets), ("style", style_sets)):
        role_train = config.break_train(role)
        key = run_key(
            "b4m", role, sets, model.identity, config.adapter, break_train_config(role, config.adapter, role_train)
        )
        folder = Path(out) / f"b4m-{role}"
        records[role] = memoized(
            memo,
            key,
            lambda role=role, sets=sets, folder=folder, train=role_train: break_run(
                role, sets, model, config.adapter, train, folder
            ),
        )
    content, style = records["content"][0], records["style"][0]
    fused = fuse(content.adapter, style.adapter)
    made = make(
        fused,
        [s for s in content_sets if s.main],
        [s for s in style_sets if s.main],
        model,
        config.make,
        Path(out) / "b4m-make",
    )
    info = pair_info(config, t0, records["content"], records["style"], make=run_info(made))
    return B4MResult(content, style, fused, made, info)


@contextlib.contextmanager
def applied_adapter(
    model: DiffusionModel,
    adapter: AdapterFile,
    *,
    scale: float = 1.0,
    content_scale: float = 1.0,
    style_scale: float = 1.0,
    merge: bool = False,
) -> Iterator[DiffusionModel]:
    """``model`` with ``adapter`` on it inside the block, the whole ΔW times ``scale``, the content half times
    ``content_scale`` and the style half times ``style_scale``; taken off after (the weights restored exactly).

    ``merge=True`` folds ΔW into the base weights (sampling costs what the base model costs; the benchmark samples
    this way); otherwise PLP layers are attached (no copy of ΔW, a little slower). On 8-bit base weights
    (``base_weights``) ΔW is never merged, which would round it to 8 bits: the adapter runs unmerged, with a
    warning."""
    if merge and is_quantized(model.denoiser):
        warnings.warn("8-bit base weights: sampling with the adapter unmerged (merging rounds ΔW)", stacklevel=3)
        merge = False
    if merge:
        factors = adapter.factors(scale=scale, content_scale=content_scale, style_scale=style_scale)
        with applied(model.denoiser, factors):
            yield model
        return
    with attached(model.denoiser, adapter):
        set_scales(model.denoiser, adapter.config, scale=scale, content_scale=content_scale, style_scale=style_scale)
        yield model


def generate(
    model: DiffusionModel,
    adapter: AdapterFile,
    request: SampleRequest,
    *,
    scale: float = 1.0,
    content_scale: float = 1.0,
    style_scale: float = 1.0,
    merge: bool = False,
) -> list[Image.Image]:
    """One image per (prompt, seed) of ``request``, prompt-major, with ``adapter`` on ``model``
    (:func:`applied_adapter`); the model is left as it was given."""
    with applied_adapter(
        model, adapter, scale=scale, content_scale=content_scale, style_scale=style_scale, merge=merge
    ):
        return model.sample(request)
