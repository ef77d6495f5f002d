"""The B4M stages as functions: break (content run, style run), make, generate. The CLI is a thin layer over these.

Every stage checks its inputs (images, captions, files, settings) before the model is loaded, so bad input fails in
seconds with a one-line error, and writes its outputs under temporary names first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__, distributed
from .adapter_file import AdapterFile, adapter_from_model, apply_adapter, fuse, load_adapter, save_adapter
from .baselines.break_make import make_sets
from .config import StageConfig
from .data import ImageSet, load_aux_sets, load_image_set, to_tensor
from .errors import B4MError
from .io_utils import atomic_path, check_output
from .lora_io import dtype_from_name, save_lora
from .models import load_model
from .models.base import DiffusionModel, SampleRequest
from .plp import PLPConfig, add_plp, merge_plp, set_scales
from .train import TrainResult, TrainSet, train

ADAPTER_NAMES = {
    "content": "content.b4m.safetensors",
    "style": "style.b4m.safetensors",
    "fused": "fused.b4m.safetensors",
}

#: Defaults per stage, merged under the user's config file and flags.
STAGE_DEFAULTS = {
    "content": {},
    "style": {},
    # Make: "a few dozen steps" (paper 4.3), both halves from the whole loss, Riemannian preconditioner on.
    "make": {"train": {"steps": 50, "routing": "none", "precondition": True, "checkpoint_every": 50}},
}

# Built-in prompts for auxiliary sets generated with the base model (used when the user gives no --aux).
# A content run needs varied styles; a style run needs varied everyday objects.
AUX_STYLE_PROMPTS = [
    "a house in watercolor painting style",
    "a bicycle in pixel art style",
    "a teapot in origami paper style",
    "a tree in pencil sketch style",
    "a boat in stained glass style",
    "a lighthouse in ukiyo-e woodblock print style",
]
AUX_CONTENT_PROMPTS = [
    "a photo of a teapot",
    "a photo of a vase",
    "a photo of a backpack",
    "a photo of a wooden chair",
    "a photo of a red apple",
    "a photo of a sneaker",
]


#: Training resolution when none is given: the official B4M scripts train SDXL at 512 px.
DEFAULT_TRAIN_RESOLUTION = 512


def train_resolution(model: DiffusionModel) -> int:
    """512 px as in the official code, or the model's own resolution if that is smaller (the built-in world)."""
    return min(model.resolution, DEFAULT_TRAIN_RESOLUTION)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------------------------------
# Data


def _caption_check(cfg: StageConfig) -> None:
    if not cfg.images:
        raise B4MError("no --images folder given")
    if not cfg.prompt:
        raise B4MError("no --prompt given (it names the concept, e.g. 'a photo of sks dog')")
    if not cfg.output:
        raise B4MError("no --output folder given")


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
    for image_set in sets:
        unknown = list(dict.fromkeys(w for c in image_set.captions for w in model.unknown_words(c)))
        if unknown:
            warn(
                f"{image_set.name}: the captions use words {model.identity} does not know, all read as one unknown "
                f"token: {', '.join(unknown[:12])}{' …' if len(unknown) > 12 else ''}"
            )


def cache_dir() -> Path:
    return Path(os.environ.get("B4M_CACHE", Path.home() / ".cache" / "b4m"))


def generated_aux_sets(
    model: DiffusionModel, role: str, cfg: StageConfig, train_res: int, console=None
) -> list[ImageSet]:
    """Auxiliary sets made with the base model from built-in prompts, cached on disk by model and prompt.

    Generated at the model's own resolution (its best quality), loaded at the training resolution. With several
    processes (``accelerate launch``) rank 0 generates the missing sets and the others wait for its files.
    """
    builtin = AUX_STYLE_PROMPTS if role == "content" else AUX_CONTENT_PROMPTS
    prompts = (model.aux_prompts(role) or builtin)[: cfg.auto_aux.sets]
    res = model.resolution
    dist = distributed.current()
    folders = []
    for prompt in prompts:
        key = hashlib.sha256(json.dumps([model.identity, prompt, res, dataclasses.asdict(cfg.auto_aux)]).encode())
        folder = cache_dir() / "aux" / key.hexdigest()[:16]
        folders.append(folder)
        files = [folder / f"{i}.png" for i in range(cfg.auto_aux.images)]
        if dist.is_main and not all(f.exists() for f in files):
            _say(console, f"generating auxiliary set: {prompt!r} ({cfg.auto_aux.images} images, cached in {folder})")
            seeds = list(range(cfg.auto_aux.images))
            request = SampleRequest(
                [prompt],
                seeds,
                steps=cfg.auto_aux.steps,
                guidance_scale=cfg.auto_aux.guidance_scale,
                height=res,
                width=res,
            )
            for f, image in zip(files, model.sample(request), strict=True):
                save_png(image, f)
    dist.barrier()  # the other ranks wait for rank 0's images (a no-op with one process)
    return [
        load_image_set(folder, prompt, train_res, name=prompt) for folder, prompt in zip(folders, prompts, strict=True)
    ]


@torch.no_grad()
def encode_sets(model: DiffusionModel, main_set: ImageSet, aux_sets: list[ImageSet]) -> list[TrainSet]:
    """A run's cached sets: the main set (weight 1) and the auxiliary sets (weight 1/n each: paper eq. 12)."""
    sets = [encode_set(model, main_set, 1.0, True)]
    return sets + [encode_set(model, s, 1.0 / len(aux_sets), False) for s in aux_sets]


@torch.no_grad()
def encode_set(model: DiffusionModel, image_set: ImageSet, weight: float, main: bool, batch: int = 8) -> TrainSet:
    """Cache one set's latents and text conditioning (once per run)."""
    latents = []
    for i in range(0, len(image_set.images), batch):
        pixels = to_tensor(image_set.images[i : i + batch]).to(model.device)
        latents.append(model.encode_images(pixels).float().cpu())
    h, w = image_set.images[0].height, image_set.images[0].width
    cond = model.encode_prompts(image_set.captions, size=(h, w)).to("cpu")
    return TrainSet(image_set.name, torch.cat(latents), cond, weight, main)


# --------------------------------------------------------------------------------------------------------------------
# Runs


def check_run_folder(out: Path, stage: str, *, resume: bool, overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse, before any work, a run folder that would mix two runs: one that holds another stage's run, or a
    finished or interrupted run of this stage when neither ``resume`` nor ``overwrite`` says what to do with it.
    ``overwrite`` removes the old run's checkpoints (a later ``--resume`` must not find them)."""
    check_output(out, *inputs, folder=True)
    if not out.is_dir():
        return
    info = out / "run.json"
    try:
        previous = json.loads(info.read_text()).get("stage")
    except FileNotFoundError:  # none (or another process of this run deleted it under --overwrite)
        previous = None
    except (OSError, ValueError, AttributeError):
        raise B4MError(f"{info}: unreadable, so the folder's run is unknown; choose another -o") from None
    if previous is not None and previous != stage:
        raise B4MError(f"{out}: holds a {previous} run (run.json); write the {stage} run to another folder")
    checkpoints = out / "checkpoints"
    unfinished = checkpoints.is_dir() and any(checkpoints.iterdir())
    if resume or not (previous or unfinished):
        return
    if not overwrite:
        what = f"a finished {stage} run" if previous else "checkpoints of an unfinished run"
        raise B4MError(f"{out}: holds {what}; --resume continues it, --overwrite starts again, or choose another -o")
    if distributed.current().is_main:  # one process deletes (the others see the folder as rank 0 leaves it)
        shutil.rmtree(checkpoints, ignore_errors=True)
        info.unlink(missing_ok=True)


def _run_json(out: Path, cfg: StageConfig, stage: str, model: DiffusionModel, timings: dict, extra: dict) -> None:
    import diffusers
    import peft
    import transformers

    info = {
        "stage": stage,
        "b4m": __version__,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "device": str(model.device) + (f" ({torch.cuda.get_device_name()})" if model.device.type == "cuda" else ""),
        "base_model": model.identity,
        "config": cfg.to_dict(),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        **extra,
    }
    with atomic_path(out / "run.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2, default=str))


def _export(out: Path, name: str, adapter: AdapterFile, cfg: StageConfig, console=None) -> list[Path]:
    dtype = dtype_from_name(cfg.export.dtype)
    paths = []
    meta = {"b4m_role": adapter.role, "b4m_fingerprint": adapter.fingerprint(), **adapter.metadata}
    for fmt in cfg.export.formats:
        path = out / f"{name}_lora{'' if fmt == 'diffusers' else '_' + fmt}.safetensors"
        save_lora(adapter.factors(), path, format=fmt, dtype=dtype, metadata=meta)
        paths.append(path)
    _say(console, "exported " + ", ".join(str(p) for p in paths))
    return paths


def _validator(model: DiffusionModel, cfg: StageConfig, out: Path, console=None) -> Callable[[int], None]:
    prompts = cfg.validation.prompts or [cfg.prompt]

    def validate(step: int) -> None:
        request = SampleRequest(
            prompts, cfg.validation.seeds, steps=cfg.validation.steps, guidance_scale=cfg.validation.guidance_scale
        )
        images = model.sample(request)
        path = out / "samples" / f"step-{step:06d}.png"
        save_grid(images, len(cfg.validation.seeds), path, {"prompts": prompts, "seeds": cfg.validation.seeds})
        _say(console, f"validation images: {path}")

    return validate


#: Seconds between progress lines when output is not a terminal (a log file, a pipe, b4m sweep's job logs).
LOG_EVERY_S = 30.0


def _progress_printer(console, label: str) -> Callable[[int, int, float | None], None]:
    """A rich progress bar with loss, it/s and ETA on a terminal; plain lines (at most one per
    :data:`LOG_EVERY_S` seconds, and the last step) when output goes to a file or pipe, where a bar shows nothing
    until it ends; silent without a console."""
    if console is None:
        return lambda step, total, loss: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]}"),
        console=console,
    )
    live = console.is_terminal
    state = {"task": None, "t0": None, "first": None, "logged": None, "loss": "…"}

    def update(step: int, total: int, loss: float | None) -> None:
        now = time.perf_counter()
        if state["t0"] is None:
            state["t0"], state["first"], state["logged"] = now, step - 1, now
            if step > 1:
                _say(console, f"{label}: resuming after step {step - 1}")
            if live:
                bar.start()
                state["task"] = bar.add_task(label, total=total, completed=step - 1, rate="", loss="…")
        elapsed = now - state["t0"]
        rate = f"{(step - state['first']) / elapsed:.2f} it/s" if elapsed >= 0.5 else ""  # none from one quick step
        if loss is not None:
            state["loss"] = f"{loss:.4f}"
        if live:
            bar.update(state["task"], completed=step, rate=rate, loss=state["loss"])
            if step == total:
                bar.stop()
        elif step == total or (loss is not None and now - state["logged"] >= LOG_EVERY_S):
            state["logged"] = now
            _say(console, " ".join(x for x in (f"{label} step {step}/{total}", rate, f"loss {state['loss']}") if x))

    return update


def run_break(role: str, cfg: StageConfig, *, resume: bool = False, overwrite: bool = False, console=None) -> dict:
    """A content run (``role="content"``) or a style run (``role="style"``): paper section 4.2.

    The owned half learns the main images; the other half learns the auxiliary sets (multi-correspondence).
    Returns a summary dict (also written as ``run.json``).
    """
    if role not in ("content", "style"):
        raise B4MError(f"role must be content or style, got {role!r}")
    t = {"start": time.perf_counter()}
    _caption_check(cfg)
    out = Path(cfg.output)
    check_run_folder(out, role, resume=resume, overwrite=overwrite, inputs=(cfg.images,))
    # Everything that can fail on bad input happens before the model loads (at a small size when the model's
    # default resolution is not known yet; the same warning is never shown twice).
    warn = _warn_once()
    check_res = cfg.resolution or 16
    main_set = load_image_set(cfg.images, cfg.prompt, check_res, name=role, placeholder=cfg.placeholder, warn=warn)
    aux_sets = load_aux_sets(cfg.aux, check_res, warn=warn) if cfg.aux else None

    cfg = dataclasses.replace(cfg, model=cfg.model or "world")  # the built-in world when no model is named
    model_name = cfg.model
    model = load_model(model_name, device=cfg.device or default_device(), resolution=cfg.resolution)
    res = cfg.resolution or train_resolution(model)
    if cfg.resolution is None:  # load again at the model's resolution, now that it is known
        main_set = load_image_set(cfg.images, cfg.prompt, res, name=role, placeholder=cfg.placeholder, warn=warn)
        aux_sets = load_aux_sets(cfg.aux, res, warn=warn) if cfg.aux else None
    check_words(model, cfg.placeholder, [main_set, *(aux_sets or [])], warn)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no empty folder
    t["load"] = time.perf_counter()
    if aux_sets is None:
        aux_sets = generated_aux_sets(model, role, cfg, res, console)
    t["aux"] = time.perf_counter()
    sets = encode_sets(model, main_set, aux_sets)
    if not cfg.validation.seeds or cfg.train.validate_every == 0:
        model.offload_encoders()
    t["cache"] = time.perf_counter()

    plp = PLPConfig.from_dict({**cfg.adapter.to_dict(), "base_model": cfg.adapter.base_model or model.identity})
    add_plp(model.denoiser, plp)
    train_cfg = dataclasses.replace(cfg.train, owned=plp.half_of(role))
    _say(
        console,
        f"{role} run: {len(main_set.images)} images, {len(aux_sets)} auxiliary sets "
        f"({', '.join(s.name for s in aux_sets)}); {train_cfg.steps} steps",
    )
    result: TrainResult = train(
        model,
        plp,
        sets,
        train_cfg,
        out,
        role=role,
        resume=resume,
        validate=_validator(model, cfg, out, console),
        progress=_progress_printer(console, role),
    )
    t["train"] = time.perf_counter()

    trigger = [cfg.placeholder] if cfg.placeholder else []
    meta = {"prompt": cfg.prompt, "trigger_words": json.dumps(trigger)}
    adapter = adapter_from_model(model.denoiser, plp, role, meta)
    path, exports = out / ADAPTER_NAMES[role], []
    dist = distributed.current()
    writer = dist.is_main  # with several processes rank 0 writes (every rank holds the adapter)
    if writer:
        path = save_adapter(adapter, path)
        exports = _export(out, role, adapter, cfg, console)
        if cfg.validation.seeds:
            _validator(model, cfg, out, console)(train_cfg.steps)
    t["end"] = time.perf_counter()
    timings = _durations(t)
    summary = {
        "adapter": str(path),
        "exports": [str(p) for p in exports],
        "final_loss": result.final_loss,
        "train": _train_stats(result),
        "losses": result.losses,
        "images": [str(f) for f in main_set.files],
        "aux_sets": [s.name for s in aux_sets],
    }
    if writer:
        _run_json(out, cfg, role, model, timings, summary)
        _say(console, f"wrote {path}")
    dist.barrier()
    return summary


def _train_stats(result: TrainResult) -> dict:
    steady = (result.seconds - result.first_step_seconds) / max(result.steps - 1, 1)
    return {
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "first_step_seconds": round(result.first_step_seconds, 2),
        "steady_seconds_per_step": round(steady, 4),
    }


def _durations(t: dict[str, float]) -> dict[str, float]:
    keys = list(t)
    out = {f"{b}": t[b] - t[a] for a, b in itertools.pairwise(keys)}
    out["total"] = t[keys[-1]] - t[keys[0]]
    return out


def _run_source(path_or_dir: str, role: str) -> tuple[Path, dict]:
    """The adapter file of a run folder (or the file itself) and the run's run.json (empty if absent)."""
    p = Path(path_or_dir)
    if p.is_dir():
        run = json.loads((p / "run.json").read_text()) if (p / "run.json").exists() else {}
        file = p / ADAPTER_NAMES[role]
        if not file.exists():
            raise B4MError(f"{p}: no {ADAPTER_NAMES[role]} in this folder; is it a finished {role} run?")
        return file, run
    if not p.exists():
        raise B4MError(f"{p}: no such file or folder")
    run_file = p.parent / "run.json"
    return p, json.loads(run_file.read_text()) if run_file.exists() else {}


def run_make(cfg: StageConfig, *, resume: bool = False, overwrite: bool = False, console=None) -> dict:
    """Make (paper 4.3): fuse a content run and a style run, then fine-tune both halves on content and style data
    with the Riemannian preconditioner. ``cfg.train.steps = 0`` fuses only (instant composition)."""
    t = {"start": time.perf_counter()}
    if not cfg.content or not cfg.style:
        raise B4MError("make needs --content and --style (run folders or .b4m.safetensors files)")
    if not cfg.output:
        raise B4MError("no --output folder given")
    if not cfg.style_weight >= 0:
        raise B4MError(f"style_weight must be at least 0, got {cfg.style_weight}")
    if cfg.train.routing == "mixed":
        raise B4MError("make takes routing none (both halves learn from both losses) or clean, not mixed")
    check_run_folder(Path(cfg.output), "make", resume=resume, overwrite=overwrite, inputs=(cfg.content, cfg.style))
    c_file, c_run = _run_source(cfg.content, "content")
    s_file, s_run = _run_source(cfg.style, "style")
    content, style = load_adapter(c_file), load_adapter(s_file)
    fused = fuse(content, style)  # names what differs when the runs don't match
    out = Path(cfg.output)
    model_name = cfg.model or c_run.get("config", {}).get("model") or ""
    if not model_name:
        raise B4MError(f"{c_file}: no run.json beside it says which base model to use; pass --model")
    # The runs' own images, prompts and resolution (from their run.json), checked before the model loads.
    resolution = cfg.resolution or c_run.get("config", {}).get("resolution")
    sets_info = []
    if cfg.train.steps > 0:
        warn = _warn_once()
        for run, file, adapter, role in ((c_run, c_file, content, "content"), (s_run, s_file, style, "style")):
            images = run.get("config", {}).get("images")
            prompt = run.get("config", {}).get("prompt") or adapter.metadata.get("prompt")
            if not images or not prompt:
                raise B4MError(f"{file}: no run.json beside it names the {role} images and prompt")
            load_image_set(images, prompt, resolution or 16, name=role, warn=warn)
            sets_info.append((role, images, prompt))
    out.mkdir(parents=True, exist_ok=True)

    model = load_model(model_name, device=cfg.device or default_device(), resolution=resolution)
    if fused.config.base_model and fused.config.base_model != model.identity:
        raise B4MError(f"{c_file}: made with base model {fused.config.base_model!r}, not {model.identity!r}")
    res = resolution or train_resolution(model)
    t["load"] = time.perf_counter()
    apply_adapter(model.denoiser, fused)
    result = None
    if cfg.train.steps > 0:
        encoded = {}
        for role, images, prompt in sets_info:
            image_set = load_image_set(images, prompt, res, name=role, warn=warn)
            encoded[role] = encode_set(model, image_set, 1.0, True)
        model.offload_encoders()
        t["cache"] = time.perf_counter()
        sets, train_cfg = make_sets(
            [encoded["content"]], [encoded["style"]], cfg.train, fused.config, cfg.style_weight
        )
        result = train(
            model,
            fused.config,
            sets,
            train_cfg,
            out,
            role="fused",
            resume=resume,
            progress=_progress_printer(console, "make"),
        )
    t["train"] = time.perf_counter()
    meta = {**fused.metadata, "prompt": " / ".join(p for _, _, p in sets_info)}
    made = adapter_from_model(model.denoiser, fused.config, "fused", meta)
    path, exports = out / ADAPTER_NAMES["fused"], []
    dist = distributed.current()
    writer = dist.is_main  # with several processes rank 0 writes
    if writer:
        path = save_adapter(made, path)
        exports = _export(out, "fused", made, cfg, console)
    t["end"] = time.perf_counter()
    summary = {
        "adapter": str(path),
        "exports": [str(p) for p in exports],
        "content_run": str(c_file),
        "style_run": str(s_file),
        "final_loss": result.final_loss if result else None,
        "train": _train_stats(result) if result else None,
    }
    cfg = dataclasses.replace(cfg, model=model_name)
    if writer:
        _run_json(out, cfg, "make", model, _durations(t), summary)
        _say(console, f"wrote {path}")
    dist.barrier()
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Generate


def save_png(image: Image.Image, path: Path, info: dict | None = None) -> Path:
    """Write ``image`` atomically, with ``info`` (if any) as JSON in the PNG's ``b4m`` text chunk."""
    meta = PngInfo()
    if info is not None:
        meta.add_text("b4m", json.dumps(info))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=meta)
    return path


def save_grid(images: list[Image.Image], columns: int, path: Path, info: dict) -> Path:
    """A grid of equally sized images, written atomically with ``info`` as PNG text metadata."""
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return save_png(grid, path, info)


def generate(
    adapter_path: str,
    prompts: list[str],
    *,
    output: str,
    model: str | None = None,
    n: int = 4,
    seed: int = 0,
    negative_prompt: str = "",
    steps: int = 25,
    guidance_scale: float | None = None,
    scheduler: str | None = None,
    scale: float = 1.0,
    content_scale: float = 1.0,
    style_scale: float = 1.0,
    merge: bool = False,
    resolution: int | None = None,
    device: str | None = None,
    console=None,
) -> list[Path]:
    """Sample ``n`` images per prompt (seeds ``seed … seed+n-1``) with a b4m adapter; writes PNGs and a grid."""
    if n < 1:
        raise B4MError(f"n (images per prompt) must be at least 1, got {n}")
    if steps < 1:
        raise B4MError(f"steps must be at least 1, got {steps}")
    if not prompts:
        raise B4MError("no prompt given")
    check_output(output, folder=True)
    p = Path(adapter_path)
    role = "fused"
    if p.is_dir():
        role = next((r for r in ("fused", "content", "style") if (p / ADAPTER_NAMES[r]).exists()), "fused")
    file, run = _run_source(adapter_path, role)
    adapter = load_adapter(file)
    model_name = model or run.get("config", {}).get("model")
    if not model_name:
        raise B4MError(f"{file}: no run.json beside it says which base model to use; pass --model")
    out = Path(output)
    base = load_model(model_name, device=device or default_device(), resolution=resolution)
    apply_adapter(base.denoiser, adapter)
    set_scales(base.denoiser, adapter.config, scale=scale, content_scale=content_scale, style_scale=style_scale)
    if merge:
        merge_plp(base.denoiser)
    seeds = list(range(seed, seed + n))
    request = SampleRequest(
        prompts,
        seeds,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        height=resolution,
        width=resolution,
    )
    images = base.sample(request)
    settings = {
        "adapter": str(file),
        "model": model_name,
        "negative_prompt": negative_prompt,
        "steps": steps,
        "guidance_scale": base.guidance(request),
        "scheduler": scheduler or "default",
        "scale": scale,
        "content_scale": content_scale,
        "style_scale": style_scale,
        "merged": merge,
    }
    paths = [
        save_png(
            image,
            out / f"{i // n:02d}_seed{seeds[i % n]}.png",
            {"prompt": prompts[i // n], "seed": seeds[i % n], **settings},
        )
        for i, image in enumerate(images)
    ]
    grid = save_grid(images, n, out / "grid.png", {"prompts": prompts, "seeds": seeds, **settings})
    _say(console, f"wrote {len(paths)} images and {grid}")
    return [*paths, grid]
