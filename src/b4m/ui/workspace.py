"""The app's workspace: one folder holding every content and style trained once, every made pair and the images,
as the commands write them (``b4m content -o WS/content/NAME`` …), so the CLI and the app read each other's runs::

    WS/references/content/NAME/   the images a content run trains on (uploaded, or rendered on the world)
    WS/content/NAME/              b4m content's run folder          WS/style/NAME/   b4m style's
    WS/pairs/CONTENT+STYLE/       b4m make's                        WS/images/PAIR/  b4m generate's
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import B4MError
from ..files import atomic_path
from ..runs.folder import ADAPTER_NAMES

ROLES = ("content", "style")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


@dataclass(frozen=True)
class Entry:
    """One run of the workspace: its name, stage (content, style or make), folder and state."""

    name: str
    stage: str
    folder: Path
    finished: bool
    prompt: str
    thumbnail: Path | None  # its latest validation grid

    @property
    def state(self) -> str:
        if self.finished:
            return "trained"
        return "stopped (resume it)" if (self.folder / "checkpoints").is_dir() else "not trained"


def check_name(name: str) -> str:
    """A concept's or pair's name as a folder name: lower-case letters, digits, - and _ (one line if not)."""
    name = (name or "").strip().lower()
    if not _NAME.fullmatch(name):
        raise B4MError(f"name {name!r}: use 1-64 lower-case letters, digits, - or _, starting with a letter or digit")
    return name


class Workspace:
    """The folders of :mod:`b4m.ui.workspace` under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def references(self, role: str, name: str) -> Path:
        return self.root / "references" / role / check_name(name)

    def run(self, role: str, name: str) -> Path:
        return self.root / role / check_name(name)

    def pair(self, content: str, style: str) -> Path:
        return self.root / "pairs" / f"{check_name(content)}+{check_name(style)}"

    def images(self, pair: str) -> Path:
        return self.root / "images" / pair

    def entries(self, stage: str) -> list[Entry]:
        """The runs of ``stage`` (content, style or make), by name."""
        parent = self.root / ("pairs" if stage == "make" else stage)
        out = []
        for folder in sorted(p for p in parent.glob("*") if p.is_dir()) if parent.is_dir() else []:
            record = _run_json(folder)
            role = "fused" if stage == "make" else stage
            finished = record.get("stage") == stage and (folder / ADAPTER_NAMES[role]).is_file()
            prompt = str(record.get("config", {}).get("prompt") or "")
            grids = sorted((folder / "samples").glob("step-*.png"))
            out.append(Entry(folder.name, stage, folder, finished, prompt, grids[-1] if grids else None))
        return out

    def save_uploads(self, files: list[str | Path], role: str, name: str, captions: list[str] | None = None) -> Path:
        """Copy uploaded image files into the concept's reference folder (a new one), each checked to be an image
        first: a file that is not names itself in one line and nothing is copied. ``captions``: one per file
        (:func:`write_captions`)."""
        if not files:
            raise B4MError(f"no {role} images given: upload a few images of the {role}")
        for f in files:
            try:
                with Image.open(f) as im:
                    im.verify()
            except (UnidentifiedImageError, OSError) as e:
                raise B4MError(f"{Path(f).name}: not an image ({type(e).__name__})") from None
        dest = self.references(role, name)
        if dest.exists() and any(dest.iterdir()):
            raise B4MError(f"{dest}: the {role} {name!r} has references already; choose another name")
        dest.mkdir(parents=True, exist_ok=True)
        images = [dest / f"{i:02d}{Path(f).suffix.lower() or '.png'}" for i, f in enumerate(files)]
        for f, image in zip(files, images, strict=True):
            shutil.copyfile(f, image)
        if captions is not None:
            write_captions(images, captions)
        return dest


def write_captions(images: list[Path], captions: list[str]) -> None:
    """Each image's caption in a same-name ``.txt`` file beside it, the CLI's convention (:mod:`b4m.data`); an empty
    caption removes the file, so the image takes the run's ``--prompt``."""
    for image, caption in zip(images, captions, strict=True):
        path = image.with_suffix(".txt")
        if caption.strip():
            with atomic_path(path) as tmp:
                tmp.write_text(caption.strip() + "\n")
        else:
            path.unlink(missing_ok=True)


def _run_json(folder: Path) -> dict:
    try:
        data = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
