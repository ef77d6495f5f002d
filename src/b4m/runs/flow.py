"""``b4m run``: the whole flow in one process: a content run, a style run, make, and a few images, the base model
loaded once (:func:`b4m.loading.shared_models`).

The output folder holds one run folder per stage, each exactly what the stage's own command writes, so ``b4m make``
can pair ``OUT/content`` with another style run later::

    OUT/content/   b4m content's run folder          OUT/made/     b4m make's
    OUT/style/     b4m style's                       OUT/images/   b4m generate's
    OUT/flow.json  the flow's settings and each stage's wall time

A flow file (TOML) can replace every flag: top-level ``model``, ``transformer``, ``preset``, ``resolution``,
``device``, ``output`` and the ``[adapter]`` and ``[export]`` tables apply to every stage; ``[content]``, ``[style]``
and ``[make]`` hold each stage's own settings, as that stage's config file would (``images``, ``prompt``,
``[content.train]``, …);
``[generate]`` the images' (``prompts``, ``n``, ``seed``, ``steps``, ``upscale``). Paths are relative to the file.
``--resume`` skips the stages that finished and continues the one that was interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import B4MError
from ..files import atomic_path
from ..loading import shared_models
from ..nested import flatten
from ..progress import say
from .config import StageConfig, ValidationConfig, stage_config, to_toml
from .folder import ADAPTER_NAMES, check_run_folder
from .generation import generate
from .image_folder import earlier_images, holds_all
from .stages import run_break, run_make
from .toml_files import paths_beside, read_toml, toml_value

#: Each stage's folder under the flow's output.
FOLDERS = {"content": "content", "style": "style", "make": "made", "generate": "images"}
#: Top-level keys of a flow file that every stage gets.
SHARED_KEYS = ("model", "transformer", "preset", "resolution", "device")
SHARED_TABLES = ("adapter", "export")
#: The placeholders when none is given: a content and a style run must not share one.
PLACEHOLDERS = {"content": "sks", "style": "zwx"}


@dataclass
class FlowImages:
    """The images at the end: ``n`` per prompt, seeds ``seed`` … ``seed + n - 1``."""

    prompts: list[str] = field(default_factory=list)  # empty: "a <content placeholder> in <style placeholder> style"
    n: int = 4
    seed: int = 0
    steps: int | None = None  # None: the base model's default (25; FLUX.1 schnell: 4)
    upscale: int = 1


@dataclass
class Flow:
    """What ``b4m run`` does: the three stages' configs (as their commands build them) and the images."""

    output: Path
    stages: dict[str, StageConfig]  # content, style, make
    images: FlowImages

    @property
    def prompts(self) -> list[str]:
        if self.images.prompts:
            return self.images.prompts
        return [pair_text(self.stages["content"].placeholder, self.stages["style"].placeholder)]


def flow_config(path: str | Path | None, flags: dict[str, Any], image_flags: dict[str, Any]) -> Flow:
    """A :class:`Flow` from a flow file (or none) and the flags: ``flags`` maps ``stage.dotted.key``
    (``content.images``, ``make.train.steps``) or a shared dotted key (``model``, ``adapter.rank``) to a value;
    ``image_flags`` sets :class:`FlowImages` fields. Each stage's settings merge like its command's
    (:func:`stage_config`): the stage's defaults, the base model's, the preset, the file, the flags."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        data = read_toml(path, "flow file")
        paths_beside(data, path.parent)
        for table in ("content", "style", "make"):
            if isinstance(data.get(table), dict):
                paths_beside(data[table], path.parent)
    known = {*SHARED_KEYS, *SHARED_TABLES, "output", "content", "style", "make", "generate"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise B4MError(
            f"{path}: unknown key(s) {', '.join(unknown)} (a stage's settings go in [content], [style] or [make])"
        )
    output = flags.get("output") or data.get("output")
    if not output:
        raise B4MError("no --output folder given")
    output = Path(output)
    shared = {k: data[k] for k in (*SHARED_KEYS, *SHARED_TABLES) if k in data}
    stages = {}
    for stage in ("content", "style", "make"):
        table = data.get(stage, {})
        if not isinstance(table, dict):
            raise B4MError(f"{path}: [{stage}] must be a table")
        given = flatten({**shared, **table})
        flagged = {k: v for k, v in flags.items() if v is not None and k != "output"}
        given.update({k: v for k, v in flagged.items() if "." not in k or k.split(".")[0] in SHARED_TABLES})
        given.update({k.split(".", 1)[1]: v for k, v in flagged.items() if k.split(".")[0] == stage})
        given.pop("output", None)
        given["output"] = str(output / FOLDERS[stage])
        if stage == "make":
            given["content"] = str(output / FOLDERS["content"])
            given["style"] = str(output / FOLDERS["style"])
        if stage in PLACEHOLDERS:
            given.setdefault("placeholder", PLACEHOLDERS[stage])
        stages[stage] = stage_config(stage, None, given)
    for stage in ("content", "style"):
        if not stages[stage].images:
            raise B4MError(f"no {stage} images given (--{stage}-images, or images in [{stage}])")
        if not stages[stage].prompt:
            raise B4MError(
                f"no {stage} prompt given (--{stage}-prompt, or prompt in [{stage}]), e.g. 'a photo of sks dog'"
            )
    image_table = data.get("generate", {})
    fields = {f.name for f in dataclasses.fields(FlowImages)}
    bad = sorted(set(image_table) - fields)
    if bad:
        raise B4MError(f"{path}: unknown key(s) in [generate]: {', '.join(bad)}")
    images = FlowImages(**{**image_table, **{k: v for k, v in image_flags.items() if v is not None}})
    return Flow(output, stages, images)


def flow_to_toml(flow: Flow) -> str:
    """The flow as a flow file (``b4m run --print-config``): each stage's merged settings in its table, as
    :func:`~b4m.runs.config.to_toml` writes a stage's, and ``[generate]``; :func:`flow_config` reads it back as the
    same flow (the stages' folders always follow ``output``)."""
    lines = [f"output = {toml_value(os.path.abspath(flow.output))}"]
    for stage, cfg in flow.stages.items():
        lines += ["", f"[{stage}]"]
        for line in to_toml(cfg).splitlines():
            lines.append(f"[{stage}.{line[1:]}" if line.startswith("[") else line)
    images = {k: v for k, v in dataclasses.asdict(flow.images).items() if v is not None}
    lines += ["", "[generate]", *(f"{k} = {toml_value(v)}" for k, v in images.items())]
    return "\n".join(lines) + "\n"


def finished(folder: Path, stage: str) -> bool:
    """``folder`` holds a finished run of ``stage`` (its run.json and its adapter file)."""
    try:
        recorded = json.loads((folder / "run.json").read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return False
    role = "fused" if stage == "make" else stage
    return recorded == stage and (folder / ADAPTER_NAMES[role]).is_file()


def run_flow(flow: Flow, *, resume: bool = False, overwrite: bool = False, console=None) -> dict:
    """Run the flow (see the module docstring). Every folder is checked before the model loads: one that holds
    another run is refused unless ``resume`` (continue: finished stages are skipped) or ``overwrite``."""
    out = flow.output
    images_dir = out / FOLDERS["generate"]
    for stage, cfg in flow.stages.items():
        folder = Path(cfg.output)
        if not (resume and finished(folder, stage)):
            check_run_folder(folder, stage, resume=resume, overwrite=overwrite)
    earlier_images(images_dir, resume=resume, overwrite=overwrite)  # refused before anything loads
    seeds = range(flow.images.seed, flow.images.seed + flow.images.n)
    drawn = holds_all(images_dir, len(flow.prompts), seeds)
    times: dict[str, float] = {}
    summaries: dict[str, Any] = {}
    with shared_models():
        for stage, cfg in flow.stages.items():
            folder = Path(cfg.output)
            if resume and finished(folder, stage):
                say(console, f"{stage}: finished in {folder}, reused")
                continue
            t0 = time.perf_counter()
            again = resume and has_checkpoints(folder)  # an interrupted stage continues from its checkpoint
            if stage == "make":
                cfg = without_own_samples(cfg)
                summaries[stage] = run_make(cfg, resume=again, overwrite=overwrite, console=console)
            else:
                summaries[stage] = run_break(stage, cfg, resume=again, overwrite=overwrite, console=console)
            times[stage] = round(time.perf_counter() - t0, 2)
        if drawn and resume and not overwrite:
            say(console, f"images: all {len(flow.prompts) * len(seeds)} already in {images_dir}, kept")
        else:
            t0 = time.perf_counter()
            written = generate(
                str(out / FOLDERS["make"]),
                flow.prompts,
                output=str(images_dir),
                n=flow.images.n,
                seed=flow.images.seed,
                steps=flow.images.steps,
                upscale=flow.images.upscale,
                device=flow.stages["make"].device,
                resume=resume,  # the images an interrupted flow drew are kept, the missing ones drawn
                overwrite=overwrite,
                console=console,
            )
            times["generate"] = round(time.perf_counter() - t0, 2)
            summaries["generate"] = [str(p) for p in written]
    record = {
        "stages": {s: str(Path(c.output)) for s, c in flow.stages.items()} | {"generate": str(images_dir)},
        "prompts": flow.prompts,
        "images": dataclasses.asdict(flow.images),
        "seconds": times,
    }
    with atomic_path(out / "flow.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    say(console, f"wrote {out / 'flow.json'}; the made pair: {out / FOLDERS['make']}, images: {images_dir}")
    return {**record, "summaries": summaries}


def without_own_samples(cfg: StageConfig) -> StageConfig:
    """Make's config when images of the pair follow in the same process: make's own sample grid (the content's and
    the style's prompts at two seeds: as long to draw as four of the images) is left out, unless the config's
    ``[validation]`` asks for it (prompts, or seeds other than the default)."""
    if cfg.validation.prompts or cfg.validation.seeds != ValidationConfig().seeds:
        return cfg
    return dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation, seeds=[]))


def pair_prompt(cfg: StageConfig) -> str:
    """``a <content placeholder> in <style placeholder> style`` from the runs make pairs: their run.json, else the
    adapter file's trigger words (a bare ``.b4m.safetensors``; its header only).

    Raises:
        B4MError: A run names no placeholder (then the prompts must be given).
    """
    from ..adapter.file import adapter_metadata
    from .folder import run_source

    words = []
    for role in ("content", "style"):
        file, run = run_source(getattr(cfg, role), role)
        word = (run.get("config") or {}).get("placeholder")
        if not word:
            triggers = json.loads(adapter_metadata(file).get("trigger_words", "[]"))
            word = triggers[0] if triggers else None
        if not word:
            raise B4MError(f"{getattr(cfg, role)}: the {role} run names no placeholder; give --generate-prompt")
        words.append(word)
    return pair_text(*words)


def pair_text(content: str | None, style: str | None) -> str:
    """The default prompt of a pair's images: ``a <content placeholder> in <style placeholder> style``."""
    return f"a {content} in {style} style"


def has_checkpoints(folder: Path) -> bool:
    """Whether ``folder`` holds a complete checkpoint to resume from."""
    from ..training.checkpoint import checkpoints  # torch: only once a run is to be resumed

    return bool(checkpoints(folder))


def make_and_generate(
    cfg: StageConfig, prompts: list[str], n: int, *, resume: bool = False, overwrite: bool = False, console=None
) -> dict:
    """``b4m make --generate N``: make, then ``n`` images of each prompt (default: :func:`pair_prompt`) into the
    made run's ``images/`` folder, as ``b4m generate`` writes them, with the base model loaded once. As in ``b4m
    run``: ``resume`` keeps a finished make and the images already there (drawing the missing ones), ``overwrite``
    replaces them; images of an earlier call are refused otherwise, before anything loads."""
    if n < 1:
        raise B4MError(f"--generate must be at least 1 image per prompt, got {n}")
    if not cfg.content or not cfg.style:
        raise B4MError("make needs --content and --style (run folders or .b4m.safetensors files)")
    if not cfg.output:
        raise B4MError("no --output folder given")
    out = Path(cfg.output)
    prompts = prompts or [pair_prompt(cfg)]  # before the model loads: a missing placeholder is bad input
    images = out / FOLDERS["generate"]
    earlier = earlier_images(images, resume=resume, overwrite=overwrite)
    done = resume and not overwrite and finished(out, "make")
    if done and holds_all(images, len(prompts), range(n)):
        say(console, f"make: finished in {out}, images in {images}: kept")
        return {"generated": [str(p) for p in earlier]}
    with shared_models():
        if done:
            say(console, f"make: finished in {out}, reused")
            summary = {}
        else:
            make_cfg = without_own_samples(cfg)
            summary = run_make(make_cfg, resume=resume and has_checkpoints(out), overwrite=overwrite, console=console)
        written = generate(
            str(out),
            prompts,
            output=str(images),
            n=n,
            device=cfg.device,
            resume=resume,
            overwrite=overwrite,
            console=console,
        )
    return {**summary, "generated": [str(p) for p in written]}
