"""The B4M stages on run folders: ``b4m content`` / ``b4m style`` (:func:`run_break`) and ``b4m make``
(:func:`run_make`). Each checks its inputs, loads the model, calls :mod:`b4m.method` (the one B4M) and writes the run
folder; nothing here trains or merges by itself.

Every stage checks its inputs (images, captions, files, settings) before the model is loaded, so bad input fails in
seconds with a one-line error, and writes its outputs under temporary names first. The modules that import torch are
imported once the checks that need no model have passed: a missing folder or file is refused in well under a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapter.config import PLPConfig
from ..data import ImageSet, has_placeholder, load_aux_sets, load_image_set
from ..errors import B4MError
from ..images import save_grid
from ..loading import denoiser_config, flux_family, load_model, model_hint, model_of_identity, transformer_skeleton
from ..method.config import MakeConfig
from ..progress import count, progress_printer, say
from ..training import distributed
from ..unet_skeleton import unet_skeleton
from .config import StageConfig, recorded_base_weights, recorded_transformer
from .folder import (
    ADAPTER_NAMES,
    check_run_folder,
    durations,
    export_loras,
    locks_run_folder,
    process_age,
    run_source,
    train_stats,
    write_run_json,
)

if TYPE_CHECKING:
    from ..models.base import DiffusionModel

#: Training resolution when none is given: the official B4M scripts train SDXL at 512 px.
DEFAULT_TRAIN_RESOLUTION = 512


def train_resolution(model: DiffusionModel) -> int:
    """512 px as in the official code, or the model's own resolution if that is smaller (the built-in world)."""
    return min(model.resolution, DEFAULT_TRAIN_RESOLUTION)


_noted: weakref.WeakSet = weakref.WeakSet()


def defaults_note(model: DiffusionModel) -> str:
    """``"; "`` and the defaults ``model`` brings (:meth:`~b4m.models.base.DiffusionModel.defaults_note`: FLUX.1
    schnell's steps, guidance and T5 tokens) the first time a command's log line names them for this loaded model
    (once per process: ``b4m run``'s stages share one model); else ``""``."""
    note = model.defaults_note()
    if not note or model in _noted:
        return ""
    _noted.add(model)
    return f"; {note}"


def _warn_once() -> Callable[[str], None]:
    seen: set[str] = set()

    def warn(message: str, *args, **kwargs) -> None:
        if message not in seen:
            seen.add(message)
            warnings.warn(message, stacklevel=2)

    return warn


def check_words(model: DiffusionModel, placeholder: str | None, sets: list[ImageSet], warn) -> None:
    """Refuse a placeholder the model's text encoder cannot represent (it would share one unknown token with every
    other unknown word: a content and a style run would learn the same token), and warn once about the captions'
    unknown words. Only the built-in world has a closed vocabulary; SD and SDXL know every word."""
    if placeholder and model.unknown_words(placeholder):
        hint = f"; its placeholders: {', '.join(model.placeholders)}" if model.placeholders else ""
        raise B4MError(f"placeholder {placeholder!r}: not a word of {model.identity}'s vocabulary{hint}")
    if placeholder and model.placeholders and placeholder not in model.placeholders:
        warn(
            f"placeholder {placeholder!r}: a word {model.identity} already knows, so the run trains over its meaning; "
            f"its free placeholders: {', '.join(model.placeholders)}"
        )
    for image_set in sets:
        unknown = list(dict.fromkeys(w for c in image_set.captions for w in model.unknown_words(c)))
        if unknown:
            warn(
                f"{image_set.name}: the captions use words {model.identity} does not know, all read as one unknown "
                f"token: {', '.join(unknown[:12])}{' …' if len(unknown) > 12 else ''}"
            )


#: The largest resolution a stage takes, in multiples of the model's native one (SDXL: 4096 px; the world: 128).
MAX_RESOLUTION_FACTOR = 4


def check_before_loading(model: str, resolution: int | None, out: Path, plp: PLPConfig | None = None) -> None:
    """What can be checked of a command's settings against its model from the model's small config files alone (the
    built-in world, world and diffusers folders, Hub ids in the local cache; see :func:`b4m.loading.model_file`),
    before any weights load: the resolution against the model's and the rank against the adapted layers' widths. And
    whether the output folder can be written."""
    where = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not os.access(where, os.W_OK):
        raise B4MError(f"{out}: cannot write there ({where} is read-only); choose another -o")
    family = flux_family(model)  # a local folder or a Hub id in the local cache; an uncached Hub id: None
    if family:  # FLUX.1, FLUX.2 [klein]: the transformer's structure from its config file, on the meta device
        name = "FLUX.2 [klein]" if family == "flux2" else "FLUX.1"
        if resolution is not None and resolution > MAX_RESOLUTION_FACTOR * 1024:
            raise B4MError(f"resolution {resolution} is more than {MAX_RESOLUTION_FACTOR}× {name}'s native 1024 px")
        skeleton = transformer_skeleton(model, family)
        if plp is not None and skeleton is not None:  # no targets given: the transformer's own (the walker's rule)
            from ..adapter.walker import check_rank

            check_rank(skeleton, plp)
        return
    found = denoiser_config(model)
    if found is None:
        return
    unet, native = found
    limit = MAX_RESOLUTION_FACTOR * native
    if resolution is not None and resolution > limit:
        raise B4MError(
            f"resolution {resolution} is more than {MAX_RESOLUTION_FACTOR}× {model}'s native {native} px "
            f"(at most {limit})"
        )
    if plp is not None:
        from ..adapter.walker import check_rank

        check_rank(unet_skeleton(unet), plp)


def _validator(model: DiffusionModel, cfg: StageConfig, out: Path, console=None) -> Callable[[int], None]:
    from ..models.base import SampleRequest

    prompts = cfg.validation.prompts or [cfg.prompt]

    def validate(step: int) -> None:
        request = SampleRequest(
            prompts, cfg.validation.seeds, steps=cfg.validation.steps, guidance_scale=cfg.validation.guidance_scale
        )
        model.restore_encoders()  # on the device for the images' time only: on FLUX, T5-XXL on the CPU takes minutes
        try:
            images = model.sample(request)
        finally:
            model.offload_encoders()  # training does not need them (on FLUX, T5-XXL: 4.9–9.5 GB)
        path = out / "samples" / f"step-{step:06d}.png"
        save_grid(images, len(cfg.validation.seeds), path, {"prompts": prompts, "seeds": cfg.validation.seeds})
        say(console, f"validation images: {path}")

    return validate


@locks_run_folder  # one process per run folder: a second one is refused before anything loads
def run_break(role: str, cfg: StageConfig, *, resume: bool = False, overwrite: bool = False, console=None) -> dict:
    """A content run (``role="content"``) or a style run (``role="style"``) into the folder ``cfg.output``:
    :func:`b4m.method.stages.break_run` on the images of ``cfg.images`` and the auxiliary sets of ``cfg.aux``
    (generated with the base model when not given). Returns a summary dict (also written as ``run.json``)."""
    if role not in ("content", "style"):
        raise B4MError(f"role must be content or style, got {role!r}")
    t, age = {"start": time.perf_counter()}, process_age()  # age: the command's start, before its work
    if not cfg.images:
        raise B4MError("no --images folder given")
    if not cfg.prompt:
        raise B4MError("no --prompt given (it names the concept, e.g. 'a photo of sks dog')")
    if not cfg.output:
        raise B4MError("no --output folder given")
    if cfg.train.steps < 1:  # make takes 0 (the fused adapter as it is); a break run would save an untrained one
        raise B4MError(f"a {role} run needs at least 1 step, got {cfg.train.steps}")
    out = Path(cfg.output)
    check_run_folder(out, role, resume=resume, overwrite=overwrite, inputs=(cfg.images,))
    # Everything that can fail on bad input happens before the model loads (at a small size when the model's
    # default resolution is not known yet; the same warning is never shown twice).
    warn = _warn_once()
    check_res = cfg.resolution or 16
    main_set = load_image_set(cfg.images, cfg.prompt, check_res, name=role, placeholder=cfg.placeholder, warn=warn)
    aux_sets = load_aux_sets(cfg.aux, check_res, warn=warn) if cfg.aux else None
    if main_set.own_captions == len(main_set):  # kohya's rule: a caption file wins over the prompt
        say(
            console,
            f"every {role} image has its own .txt caption: --prompt {cfg.prompt!r} captions none of them; it is the "
            "validation images' prompt and the adapter's recorded prompt",
        )
        if cfg.placeholder and not has_placeholder(cfg.prompt, cfg.placeholder):
            warn(
                f"--prompt {cfg.prompt!r} lacks the placeholder {cfg.placeholder!r}: its validation images will not "
                f"show the {role}"
            )

    cfg = dataclasses.replace(cfg, model=cfg.model or "world")  # the built-in world when no model is named
    check_before_loading(cfg.model, cfg.resolution, out, cfg.adapter)
    from ..adapter.file import attached, save_adapter  # torch, once the input is checked
    from ..device import default_device
    from ..method.stages import break_run
    from ..training.sets import encode_sets
    from .aux import generated_aux_sets

    model = load_model(
        cfg.model,
        device=cfg.device or default_device(),
        resolution=cfg.resolution,
        base_weights=cfg.base_weights,
        transformer=cfg.transformer,
    )
    res = cfg.resolution or train_resolution(model)
    if cfg.resolution is None:  # load again at the model's resolution, now that it is known
        main_set = load_image_set(cfg.images, cfg.prompt, res, name=role, placeholder=cfg.placeholder, warn=warn)
        aux_sets = load_aux_sets(cfg.aux, res, warn=warn) if cfg.aux else None
    check_words(model, cfg.placeholder, [main_set, *(aux_sets or [])], warn)
    if not cfg.placeholder:
        warn(
            f"no --placeholder given: the {role}'s token is not checked in the captions, and make cannot tell "
            "whether a content run and a style run share one (e.g. --placeholder sks)"
        )
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no empty folder
    t["load"] = time.perf_counter()
    if aux_sets is None:
        aux_sets = generated_aux_sets(model, role, cfg, res, console)
    t["aux"] = time.perf_counter()
    sets = encode_sets(model, main_set, aux_sets)
    model.offload_encoders()  # validation images bring them back for their time (_validator)
    t["cache"] = time.perf_counter()

    say(
        console,
        f"{role} run: {count(len(main_set.images), 'image')}, {count(len(aux_sets), 'auxiliary set')} "
        f"({', '.join(s.name for s in aux_sets)}); {count(cfg.train.steps, 'step')}{defaults_note(model)}",
    )
    validate = _validator(model, cfg, out, console)
    record = break_run(
        role,
        sets,
        model,
        cfg.adapter,
        cfg.train,
        out,
        resume=resume,
        validate=validate,
        progress=progress_printer(console, role),
    )
    t["train"] = time.perf_counter()
    if record.result is not None and record.result.speed != "as configured":
        say(console, f"speed: {record.result.speed} (--preset fast or low-memory chooses instead)")

    trigger = [cfg.placeholder] if cfg.placeholder else []
    adapter = dataclasses.replace(
        record.adapter, metadata={"prompt": cfg.prompt, "trigger_words": json.dumps(trigger)}
    )
    path, exports = out / ADAPTER_NAMES[role], []
    writer = distributed.current().is_main  # with several processes rank 0 writes (every rank holds the adapter)
    if writer:
        path = save_adapter(adapter, path)
        exports = export_loras(out, role, adapter, cfg, model, console)
        if cfg.validation.seeds:
            with attached(model.denoiser, adapter):
                validate(cfg.train.steps)
    t["end"] = time.perf_counter()
    summary = {
        "adapter": str(path),
        "exports": [str(p) for p in exports],
        "final_loss": record.result.final_loss if record.result else None,
        "train": train_stats(record.result) if record.result else None,
        "losses": record.result.losses if record.result else [],
        "images": [str(Path(f).resolve()) for f in main_set.files],
        "aux_sets": [s.name for s in aux_sets],
        "process_age_at_start_s": age,  # in b4m run, the earlier stages of its process too
    }
    if writer:  # paths as absolute ones: make, run from another folder, reads the images again
        absolute = {k: str(Path(getattr(cfg, k)).resolve()) for k in ("images", "aux") if getattr(cfg, k)}
        write_run_json(out, dataclasses.replace(cfg, **absolute), role, model, durations(t), summary)
        say(console, f"wrote {path}")
    distributed.current().barrier()
    return summary


@locks_run_folder
def run_make(cfg: StageConfig, *, resume: bool = False, overwrite: bool = False, console=None) -> dict:
    """Make into the folder ``cfg.output``: fuse the content run ``cfg.content`` and the style run ``cfg.style``,
    then :func:`b4m.method.stages.make` on the two runs' own images (named in their run.json). ``cfg.train.steps = 0``
    fuses only (instant composition)."""
    t, age = {"start": time.perf_counter()}, process_age()  # age: the command's start, before its work
    if not cfg.content or not cfg.style:
        raise B4MError("make needs --content and --style (run folders or .b4m.safetensors files)")
    if not cfg.output:
        raise B4MError("no --output folder given")
    make_cfg = MakeConfig(**dataclasses.asdict(cfg.train), style_weight=cfg.style_weight)
    check_run_folder(Path(cfg.output), "make", resume=resume, overwrite=overwrite, inputs=(cfg.content, cfg.style))
    c_file, c_run = run_source(cfg.content, "content")
    s_file, s_run = run_source(cfg.style, "style")
    from ..adapter.file import attached, fuse, load_adapter, save_adapter  # torch, once both runs are found
    from ..device import default_device
    from ..method.stages import make
    from ..training.sets import encode_set

    content, style = load_adapter(c_file), load_adapter(s_file)
    fused = fuse(content, style)  # names what differs when the runs don't match
    shared = sorted(
        set(json.loads(content.metadata.get("trigger_words", "[]")))
        & set(json.loads(style.metadata.get("trigger_words", "[]")))
    )
    if shared:
        warnings.warn(
            f"the content run and the style run both use the placeholder {', '.join(shared)}: a prompt cannot name "
            "one without the other (train one of them again with another --placeholder)",
            stacklevel=2,
        )
    out = Path(cfg.output)
    model_name = cfg.model or c_run.get("config", {}).get("model") or model_of_identity(fused.config.base_model)
    if not model_name:
        raise B4MError(
            f"{c_file}: made with base model {fused.config.base_model!r}, which names no folder or Hub id, and no "
            f"run.json beside it says where it is; {model_hint(fused.config.base_model)}"
        )
    # The runs' own images, prompts and resolution (from their run.json), checked before the model loads.
    resolution = cfg.resolution or c_run.get("config", {}).get("resolution")
    s_resolution = s_run.get("config", {}).get("resolution")
    if cfg.resolution is None and s_resolution != resolution:
        warnings.warn(
            f"the content run trained at {resolution or 'the model'}'s resolution, the style run at "
            f"{s_resolution or 'the model'}'s; make uses the content run's (--resolution sets it)",
            stacklevel=2,
        )
    sets_info = []
    warn = _warn_once()
    if make_cfg.steps > 0:
        for run, file, adapter, role in ((c_run, c_file, content, "content"), (s_run, s_file, style, "style")):
            images = run.get("config", {}).get("images")
            prompt = run.get("config", {}).get("prompt") or adapter.metadata.get("prompt")
            if not images or not prompt:
                unfinished = (file.parent / "checkpoints").is_dir() and not (file.parent / "run.json").exists()
                hint = f" (an unfinished run: its b4m {role} command with --resume finishes it)" if unfinished else ""
                raise B4MError(f"{file}: no run.json beside it names the {role} images and prompt{hint}")
            load_image_set(images, prompt, resolution or 16, name=role, warn=warn)
            sets_info.append((role, images, prompt))
    check_before_loading(model_name, resolution, out)
    out.mkdir(parents=True, exist_ok=True)

    transformer = recorded_transformer(cfg.transformer, cfg.model, c_run)  # the content run's, with its model
    cfg = dataclasses.replace(cfg, base_weights=recorded_base_weights(cfg.base_weights, c_run))  # as recorded
    model = load_model(
        model_name,
        device=cfg.device or default_device(),
        resolution=resolution,
        base_weights=cfg.base_weights,
        transformer=transformer,
    )
    if fused.config.base_model and fused.config.base_model != model.identity:
        raise B4MError(f"{c_file}: made with base model {fused.config.base_model!r}, not {model.identity!r}")
    res = resolution or train_resolution(model)
    t["load"] = time.perf_counter()
    encoded = {}
    for role, images, prompt in sets_info:
        image_set = load_image_set(images, prompt, res, name=role, warn=warn)
        encoded[role] = [encode_set(model, image_set, 1.0, True)]
    model.offload_encoders()
    t["cache"] = time.perf_counter()
    counts = ", ".join(f"{len(sets[0].latents)} {role} images" for role, sets in encoded.items())
    say(
        console,
        f"make: {c_file.parent.name} × {s_file.parent.name}; {count(make_cfg.steps, 'step')}"
        + (f" on {counts}" if counts else " (fuse only)")
        + defaults_note(model),
    )
    record = make(
        fused,
        encoded.get("content", []),
        encoded.get("style", []),
        model,
        make_cfg,
        out,
        resume=resume,
        progress=progress_printer(console, "make"),
    )
    t["train"] = time.perf_counter()
    if record.result is not None and record.result.speed != "as configured":
        say(console, f"speed: {record.result.speed} (--preset fast or low-memory chooses instead)")
    meta = {**fused.metadata, "prompt": " / ".join(p for _, _, p in sets_info)}
    made = dataclasses.replace(record.adapter, metadata=meta)
    path, exports = out / ADAPTER_NAMES["fused"], []
    writer = distributed.current().is_main  # with several processes rank 0 writes
    if writer:
        path = save_adapter(made, path)
        exports = export_loras(out, "fused", made, cfg, model, console)
        if cfg.validation.seeds:  # a sample of the made pair: the content's and the style's own prompts
            prompts = cfg.validation.prompts or [
                p for p in (c_run.get("config", {}).get("prompt"), s_run.get("config", {}).get("prompt")) if p
            ]
            if prompts:
                validation = dataclasses.replace(cfg.validation, prompts=prompts)
                with attached(model.denoiser, made):
                    _validator(model, dataclasses.replace(cfg, validation=validation), out, console)(make_cfg.steps)
    t["end"] = time.perf_counter()
    summary = {
        "adapter": str(path),
        "exports": [str(p) for p in exports],
        "content_run": str(c_file),
        "style_run": str(s_file),
        "final_loss": record.result.final_loss if record.result else None,
        "train": train_stats(record.result) if record.result else None,
        "process_age_at_start_s": age,
    }
    cfg = dataclasses.replace(cfg, model=model_name, transformer=transformer)
    if writer:
        write_run_json(out, cfg, "make", model, durations(t), summary)
        say(console, f"wrote {path}")
    distributed.current().barrier()
    return summary
