"""Reference folders of the built-in world (``b4m world render``): the sets :func:`b4m.world.tasks.make_task` renders
for a content × style pair, written as the folders ``b4m content`` and ``b4m style`` read.

- ``content``: the content in the plain look, captioned with the content placeholder (``sks``);
- ``style``: known contents in the style, captioned with the style placeholder (``zwx``);
- ``content-aux`` / ``style-aux``: the runs' auxiliary sets, a folder of folders (``00-aux-style-zebra``, …; the
  number keeps make_task's order, which is the order ``--aux`` reads them in).

Every image is ``NN.png`` with its caption in ``NN.txt``; its PNG metadata (``b4m``) holds the caption, the scene it
shows and the task it comes from (``world``: the set, the content and style, the seed and the counts), so later
commands can tell which concept a folder holds (``b4m generate`` scores a made run's images with it).

A set depends only on the seed, the counts and the concepts it shows: the content references only on the content
(they are drawn first), and for a novel content and a novel style every set is the same whichever novel partner it is
rendered with, which is why ``--content`` alone renders with a default partner (:func:`partner`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..errors import B4MError
from ..images import save_image_set
from . import defaults
from .catalog import Catalog
from .render import Scene
from .tasks import PLAIN, Task, TaskConfig, make_task

#: The sets of a task, by the name ``world render`` and the demo give their folders.
SETS: tuple[str, ...] = ("content", "content-aux", "style", "style-aux")

#: Partners when only one concept is rendered: the demo's pair (both novel).
DEFAULT_CONTENT, DEFAULT_STYLE = defaults.DEMO_CONTENT, defaults.DEMO_STYLE


def partner(catalog: Catalog, content: str | None, style: str | None) -> tuple[str, str]:
    """The (content, style) pair to render: the given ones, the missing one a novel concept (the demo's by default).

    With a novel partner the content's sets (or the style's) are the same for every novel partner."""
    if content is None and style is None:
        raise B4MError("name a --content or a --style (or both)")
    if content is None:
        novel = [c.name for c in catalog.novel_contents]
        content = DEFAULT_CONTENT if DEFAULT_CONTENT in novel else novel[0]
    if style is None:
        novel = [s.name for s in catalog.novel_styles if s.name != PLAIN]
        style = DEFAULT_STYLE if DEFAULT_STYLE in novel else novel[0]
    return content, style


def scene_dict(scene: Scene) -> dict[str, str]:
    """The attributes a scene shows (what ``b4m world score`` compares the oracle's reading with)."""
    return {k: getattr(scene, k) for k in ("content", "style", "position", "size", "background")}


def set_folder_names(task: Task, which: str) -> list[str]:
    """The subfolder of every auxiliary set of ``which`` (``content-aux`` or ``style-aux``), in make_task's order."""
    sets = task.content_aux if which == "content-aux" else task.style_aux
    return [f"{i:02d}-{s.name}" for i, s in enumerate(sets)]


def check_empty(folder: Path) -> None:
    """Refuse a folder that exists and is not empty: files left from another render would be read as the set's."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise B4MError(f"{folder}: exists and is not an empty folder; choose another -o (or delete it)")


def write_set(task: Task, which: str, folder: str | Path) -> list[Path]:
    """Write one of the task's :data:`SETS` into ``folder`` (images, captions, metadata); returns the image files.
    ``folder`` must be new or empty (:func:`check_empty`)."""
    if which not in SETS:
        raise B4MError(f"unknown set {which!r}; one of {', '.join(SETS)}")
    folder = Path(folder)
    check_empty(folder)
    origin = {"set": which, "content": task.content, "style": task.style, "task": asdict(task.config)}
    if which in ("content", "style"):
        image_sets = [(folder, task.content_refs if which == "content" else task.style_refs, task.set_scenes[which])]
    else:
        sets = task.content_aux if which == "content-aux" else task.style_aux
        names = set_folder_names(task, which)
        image_sets = [
            (folder / name, s, scenes) for name, s, scenes in zip(names, sets, task.set_scenes[which], strict=True)
        ]
    paths = []
    for target, image_set, scenes in image_sets:
        infos = [
            {"prompt": text, "scene": scene_dict(scene), "world": origin}
            for text, scene in zip(image_set.captions, scenes, strict=True)
        ]
        paths += save_image_set(image_set.images, image_set.captions, target, infos)
    return paths


def render_sets(
    catalog: Catalog,
    content: str | None,
    style: str | None,
    resolution: int,
    config: TaskConfig,
    out: str | Path,
    sets: tuple[str, ...] | None = None,
) -> tuple[Task, dict[str, Path]]:
    """Render the task of ``content`` × ``style`` (a missing one: :func:`partner`) and write ``sets`` of it (default:
    the content's when only ``content`` is named, the style's when only ``style``, all four when both) into
    ``out/<set>``, or straight into ``out`` when only one set is written. Returns the task and the folders."""
    pair = partner(catalog, content, style)
    if sets is None:
        sets = SETS if content and style else (("content",) if content else ("style",))
    task = make_task(catalog, *pair, resolution, config)
    folders = {s: Path(out) if len(sets) == 1 else Path(out) / s for s in sets}
    for folder in folders.values():
        check_empty(folder)  # all of them before anything is written
    for s, folder in folders.items():
        write_set(task, s, folder)
    return task, folders


def origin_of(info: dict | None) -> dict | None:
    """The ``world`` record of a rendered reference image's metadata (None for any other image)."""
    origin = (info or {}).get("world")
    return origin if isinstance(origin, dict) and origin.get("set") in SETS else None
