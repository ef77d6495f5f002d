"""What the app's buttons do, as plain functions of a :class:`~b4m.ui.workspace.Workspace` and a
:class:`~b4m.ui.jobs.JobQueue` (the page in :mod:`b4m.ui.app` only lays them out). Each checks its input first and
raises a one-line :class:`~b4m.errors.B4MError` the page shows; long work becomes a ``b4m`` command in the queue,
writing the same folders the CLI does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import B4MError
from ..runs.folder import EXPORT_FILES
from .jobs import Job, JobQueue
from .workspace import ROLES, Workspace, check_name, write_captions

#: The captions a run gets when the user writes none: the placeholder in a neutral sentence.
DEFAULT_PROMPTS = {"content": "a photo of {p}", "style": "an image in {p} style"}
PLACEHOLDERS = {"content": "sks", "style": "zwx"}
#: How many references a world concept renders.
WORLD_REFERENCES = 4


@dataclass(frozen=True)
class AppBase:
    """The base model the app's commands run on and how it loads (``b4m ui``'s options): ``model`` and a FLUX
    ``transformer`` file replacing its own, a training ``preset``, 8-bit ``base_weights``."""

    model: str = "world"
    transformer: str | None = None
    preset: str | None = None
    base_weights: str | None = None

    @property
    def world(self) -> bool:
        return self.model == "world"

    def args(self, command: str) -> list[str]:
        """The options of ``b4m COMMAND`` that carry these: the model and its transformer file to the content and
        style runs (make and generate read both from the runs' run.json), the preset to the three training stages,
        the base weights to all four commands (make and generate load the base model again)."""
        out = ["--model", self.model] + (["--transformer", self.transformer] if self.transformer else [])
        out = out if command in ROLES else []
        if self.preset and command != "generate":
            out += ["--preset", self.preset]
        return out + (["--base-weights", self.base_weights] if self.base_weights else [])


def _world_task(role: str, concept: str, n: int):
    """The world's task whose ``role`` set shows the catalog concept ``concept`` (``b4m world render``'s, seed 0)."""
    from ..world import default_catalog
    from ..world.references import partner
    from ..world.tasks import TaskConfig, make_task

    catalog = default_catalog()
    names = {c.name for c in (catalog.contents if role == "content" else catalog.styles)}
    if concept not in names:
        raise B4MError(f"{concept!r} is not a {role} of the world's catalog")
    pair = partner(catalog, *((concept, None) if role == "content" else (None, concept)))
    words = {"content_word": PLACEHOLDERS["content"], "style_word": PLACEHOLDERS["style"]}
    return make_task(catalog, *pair, 32, TaskConfig(refs=n, seed=0, **words))


def world_captions(role: str, concept: str, n: int = WORLD_REFERENCES) -> list[str]:
    """The captions the references of a world concept get (the page shows them, editable, before a run)."""
    task = _world_task(role, concept, n)
    return list((task.content_refs if role == "content" else task.style_refs).captions)


def render_world_references(
    ws: Workspace, role: str, name: str, concept: str, n: int = WORLD_REFERENCES, captions: list[str] | None = None
) -> Path:
    """References of a catalog concept of the built-in world, rendered as a user would bring them (with captions
    naming the placeholder; ``captions``, where given, replace them), into the workspace."""
    from ..world.references import write_set

    dest = ws.references(role, name)
    images = write_set(_world_task(role, concept, n), role, dest)
    if captions is not None:
        write_captions(images, captions)
    return dest


def check_captions(captions: list[str] | None, n: int, placeholder: str) -> list[str] | None:
    """The captions of ``n`` images, one each (an empty one: the run's prompt), whitespace collapsed; one line if
    their number is not ``n`` or one lacks the placeholder."""
    if captions is None or n == 0:
        return captions
    captions = [" ".join(str(c or "").split()) for c in captions]
    if len(captions) != n:
        raise B4MError(f"{len(captions)} captions for {n} images: one per image (an empty one takes the caption)")
    for i, caption in enumerate(captions):
        if caption and placeholder not in caption.split():
            raise B4MError(f"caption {i + 1} ({caption!r}) does not name the placeholder {placeholder!r}")
    return captions


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
    captions: list[str] | None = None,
    steps: int | None = None,
    base: AppBase = AppBase(),
    resume: bool = False,
) -> Job:
    """Queue a content or style run named ``name`` on uploaded ``files`` (or, on the world, a rendered catalog
    concept); ``resume`` continues a stopped one. The run's folder is ``b4m content``'s (``WS/content/NAME``).
    ``captions``, one per image, are written beside the references as the CLI reads them (``NN.txt``); an empty one
    (or none given) leaves the image to ``prompt``, ``b4m content --prompt``."""
    if role not in ROLES:
        raise B4MError(f"role must be content or style, got {role!r}")
    name = check_name(name)
    refs = ws.references(role, name)
    placeholder = (placeholder or PLACEHOLDERS[role]).strip()
    prompt = (prompt or DEFAULT_PROMPTS[role].format(p=placeholder)).strip()
    if placeholder not in prompt.split():
        raise B4MError(f"the prompt {prompt!r} does not name the placeholder {placeholder!r}")
    if not resume:
        if ws.run(role, name).exists():
            raise B4MError(f"a {role} named {name!r} exists already: resume it, or choose another name")
        if world_concept:
            captions = check_captions(captions, WORLD_REFERENCES, placeholder)
            refs = render_world_references(ws, role, name, world_concept, captions=captions)
        else:
            captions = check_captions(captions, len(files or []), placeholder)
            refs = ws.save_uploads(files or [], role, name, captions=captions)
    elif not ws.run(role, name).exists():
        raise B4MError(f"no {role} run named {name!r} to resume")
    args = [role, "--images", refs, "--prompt", prompt, "--placeholder", placeholder, "-o", ws.run(role, name)]
    args += base.args(role) + (["--steps", str(steps)] if steps else []) + (["--resume"] if resume else [])
    return queue.submit(f"{role} {name}", [str(a) for a in args])


def start_make(
    ws: Workspace,
    queue: JobQueue,
    content: str,
    style: str,
    *,
    steps: int | None = None,
    base: AppBase = AppBase(),
    resume: bool = False,
) -> Job:
    """Queue make of a trained content and a trained style into ``WS/pairs/CONTENT+STYLE``."""
    for role, name in (("content", content), ("style", style)):
        if check_name(name) not in {e.name for e in ws.entries(role) if e.finished}:
            raise B4MError(f"no trained {role} named {name!r} in the library")
    out = ws.pair(content, style)
    if out.exists() and not resume:
        raise B4MError(f"{content} × {style} is made already ({out}); generate with it, or resume a stopped make")
    args = ["make", "--content", ws.run("content", content), "--style", ws.run("style", style), "-o", out]
    args += base.args("make") + (["--steps", str(steps)] if steps is not None else [])
    args += ["--resume"] if resume else []
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
    base: AppBase = AppBase(),
) -> Job:
    """Queue images of a made pair (``b4m generate``); they replace the pair's earlier images."""
    folder = ws.root / "pairs" / pair
    if not pair or not (folder / "fused.b4m.safetensors").is_file():
        raise B4MError(f"no made pair {pair!r}: make a content and a style first")
    if not prompt.strip():
        raise B4MError("no prompt given")
    args = ["generate", folder, prompt, "-n", n, "--seed", seed, "--content-scale", content_scale]
    args += ["--style-scale", style_scale, "--upscale", upscale, "-o", ws.images(pair), "--overwrite"]
    args += base.args("generate")
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
