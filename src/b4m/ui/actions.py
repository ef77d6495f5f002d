"""What the app's buttons do, as plain functions of a :class:`~b4m.ui.workspace.Workspace` and a
:class:`~b4m.ui.jobs.JobQueue` (the page in :mod:`b4m.ui.app` only lays them out). Each checks its input first and
raises a one-line :class:`~b4m.errors.B4MError` the page shows; long work becomes a ``b4m`` command in the queue,
writing the same folders the CLI does."""

from __future__ import annotations

from pathlib import Path

from ..errors import B4MError
from ..runs.folder import EXPORT_FILES
from .jobs import Job, JobQueue
from .workspace import ROLES, Workspace, check_name

#: The captions a run gets when the user writes none: the placeholder in a neutral sentence.
DEFAULT_PROMPTS = {"content": "a photo of {p}", "style": "an image in {p} style"}
PLACEHOLDERS = {"content": "sks", "style": "zwx"}


def render_world_references(ws: Workspace, role: str, name: str, concept: str, n: int = 4) -> Path:
    """References of a catalog concept of the built-in world, rendered as a user would bring them (with captions
    naming the placeholder), into the workspace."""
    from ..world import default_catalog
    from ..world.references import render_sets
    from ..world.tasks import TaskConfig

    catalog = default_catalog()
    names = {c.name for c in (catalog.contents if role == "content" else catalog.styles)}
    if concept not in names:
        raise B4MError(f"{concept!r} is not a {role} of the world's catalog")
    dest = ws.references(role, name)
    words = {"content_word": PLACEHOLDERS["content"], "style_word": PLACEHOLDERS["style"]}
    args = (concept, None) if role == "content" else (None, concept)
    render_sets(catalog, *args, 32, TaskConfig(refs=n, seed=0, **words), dest, (role,))
    return dest


def start_run(
    ws: Workspace,
    queue: JobQueue,
    role: str,
    name: str,
    *,
    files: list[str] | None = None,
    world_concept: str | None = None,
    prompt: str = "",
    placeholder: str = "",
    steps: int | None = None,
    model: str = "world",
    resume: bool = False,
) -> Job:
    """Queue a content or style run named ``name`` on uploaded ``files`` (or, on the world, a rendered catalog
    concept); ``resume`` continues a stopped one. The run's folder is ``b4m content``'s (``WS/content/NAME``)."""
    if role not in ROLES:
        raise B4MError(f"role must be content or style, got {role!r}")
    name = check_name(name)
    refs = ws.references(role, name)
    if not resume:
        if ws.run(role, name).exists():
            raise B4MError(f"a {role} named {name!r} exists already: resume it, or choose another name")
        if world_concept:
            refs = render_world_references(ws, role, name, world_concept)
        else:
            refs = ws.save_uploads(files or [], role, name)
    elif not ws.run(role, name).exists():
        raise B4MError(f"no {role} run named {name!r} to resume")
    placeholder = (placeholder or PLACEHOLDERS[role]).strip()
    prompt = (prompt or DEFAULT_PROMPTS[role].format(p=placeholder)).strip()
    if placeholder not in prompt.split():
        raise B4MError(f"the prompt {prompt!r} does not name the placeholder {placeholder!r}")
    args = [role, "--images", refs, "--prompt", prompt, "--placeholder", placeholder, "-o", ws.run(role, name)]
    args += ["--model", model] + (["--steps", str(steps)] if steps else []) + (["--resume"] if resume else [])
    return queue.submit(f"{role} {name}", [str(a) for a in args])


def start_make(
    ws: Workspace, queue: JobQueue, content: str, style: str, *, steps: int | None = None, resume: bool = False
) -> Job:
    """Queue make of a trained content and a trained style into ``WS/pairs/CONTENT+STYLE``."""
    for role, name in (("content", content), ("style", style)):
        if check_name(name) not in {e.name for e in ws.entries(role) if e.finished}:
            raise B4MError(f"no trained {role} named {name!r} in the library")
    out = ws.pair(content, style)
    if out.exists() and not resume:
        raise B4MError(f"{content} × {style} is made already ({out}); generate with it, or resume a stopped make")
    args = ["make", "--content", ws.run("content", content), "--style", ws.run("style", style), "-o", out]
    args += (["--steps", str(steps)] if steps is not None else []) + (["--resume"] if resume else [])
    return queue.submit(f"make {content} × {style}", [str(a) for a in args])


def start_generate(
    ws: Workspace,
    queue: JobQueue,
    pair: str,
    prompt: str,
    *,
    n: int = 4,
    seed: int = 0,
    content_scale: float = 1.0,
    style_scale: float = 1.0,
    upscale: int = 1,
) -> Job:
    """Queue images of a made pair (``b4m generate``); they replace the pair's earlier images."""
    folder = ws.root / "pairs" / pair
    if not pair or not (folder / "fused.b4m.safetensors").is_file():
        raise B4MError(f"no made pair {pair!r}: make a content and a style first")
    if not prompt.strip():
        raise B4MError("no prompt given")
    args = ["generate", folder, prompt, "-n", n, "--seed", seed, "--content-scale", content_scale]
    args += ["--style-scale", style_scale, "--upscale", upscale, "-o", ws.images(pair), "--overwrite"]
    return queue.submit(f"images of {pair}", [str(a) for a in args])


def images_of(ws: Workspace, pair: str) -> list[Path]:
    """The pair's latest images (not the grid)."""
    folder = ws.images(pair)
    return sorted(p for p in folder.glob("*.png") if p.name != "grid.png") if folder.is_dir() else []


def lora_files(ws: Workspace, pair: str) -> list[Path]:
    """The made pair's plain LoRA files, for download: diffusers/peft and kohya (ComfyUI, A1111)."""
    folder = ws.root / "pairs" / pair
    return [
        folder / p.format(name="fused")
        for p, _ in EXPORT_FILES.values()
        if (folder / p.format(name="fused")).is_file()
    ]
