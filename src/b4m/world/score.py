"""Scoring any folder of world images against ground truth (``b4m world score``; ``b4m generate`` on the world).

An image is scored against the scene its prompt asks for. The scene comes from the image's PNG metadata (``b4m``):
the ``scene`` that ``b4m generate`` records when it can parse the prompt, else the ``prompt`` parsed here, else a
same-name ``.txt`` caption. Captions of the world have a fixed grammar (:data:`b4m.world.captions.TEMPLATES`), so
a prompt parses when it is one of the templates with catalog words or placeholders in it; a placeholder in the
content slot stands for the content being scored (``--content``), one in the style slot for the style. A template
that leaves out the size, position or background does not control it, and the image is not scored on it. Images
whose prompt does not parse are listed as not scored, never guessed.

The scores are those of :func:`b4m.world.tasks.score_images` (the demo's and the benchmark's): content and style
accuracy, prompt accuracy (the mean over the layout attributes the prompt names), leakage, and the cosines of the
oracle's embeddings with the references.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import B4MError
from ..metrics.evaluate import read_image_folder
from ..report import summarize
from .captions import TEMPLATES
from .catalog import PLACEHOLDERS, Catalog
from .oracle import Oracle, predict, similarity
from .vocab import tokenize

ATTRIBUTES: tuple[str, ...] = ("content", "style", "position", "size", "background")
LAYOUT: tuple[str, ...] = ("position", "size", "background")
METRICS: tuple[str, ...] = ("content", "style", "prompt", "content_leak", "style_leak", "content_cos", "style_cos")
BINARY = frozenset({"content", "style", "position", "size", "background", "content_leak", "style_leak"})
PLAIN = "plain"


# ----------------------------------------------------------------------------------------------------------------
# Prompts -> scenes


def _patterns(catalog: Catalog) -> list[re.Pattern[str]]:
    """One full-match pattern per caption template, over the prompt's words (as the world's text encoder reads them:
    lowercase, punctuation dropped; "a" and "an" alike)."""
    phrases = {
        "size": {" ".join(tokenize(s.phrase)): s.name for s in catalog.sizes},
        "position": {" ".join(tokenize(p.phrase)): p.name for p in catalog.positions},
        "background": {b.name: b.name for b in catalog.backgrounds},
    }
    out = []
    for template in TEMPLATES:
        parts = []
        for literal, name, _, _ in string.Formatter().parse(template):
            parts += ["an?" if w in ("a", "an") else re.escape(w) for w in tokenize(literal)]
            if name in ("content", "style"):
                parts.append(f"(?P<{name}>[a-z0-9]+)")
            elif name:
                alternatives = "|".join(re.escape(p) for p in sorted(phrases[name], key=len, reverse=True))
                parts.append(f"(?P<{name}>{alternatives})")
        out.append(re.compile(" ".join(parts)))
    return out


def parse_prompt(prompt: str, catalog: Catalog) -> dict[str, str] | None:
    """The scene a world prompt asks for: ``{"content", "style"}`` (catalog names or placeholders) and those of
    size, position and background that it names (catalog names); None when it is no caption of the world."""
    words = " ".join(tokenize(prompt))
    contents = {c.name for c in catalog.contents}
    styles = {s.name for s in catalog.styles}
    for pattern in _patterns(catalog):
        m = pattern.fullmatch(words)
        if m is None:
            continue
        found = {k: v for k, v in m.groupdict().items() if v is not None}
        if found["content"] not in contents | set(PLACEHOLDERS) or found["style"] not in styles | set(PLACEHOLDERS):
            continue
        for key in ("size", "position"):
            if key in found:
                found[key] = {" ".join(tokenize(x.phrase)): x.name for x in getattr(catalog, f"{key}s")}[found[key]]
        return found
    return None


def resolve(scene: dict, content: str | None, style: str | None, catalog: Catalog) -> tuple[dict | None, str]:
    """``scene`` (parsed or recorded) with its placeholders replaced by ``content`` / ``style``; ``(None, why)``
    when it cannot be scored."""
    out = {k: scene[k] for k in ATTRIBUTES if k in scene}
    for key, given, names in (
        ("content", content, {c.name for c in catalog.contents}),
        ("style", style, {s.name for s in catalog.styles}),
    ):
        word = out.get(key)
        if word in names:
            continue
        if word in PLACEHOLDERS and given:
            out[key] = given
        elif word in PLACEHOLDERS:
            return None, f"the placeholder {word!r} stands for the {key}, and no {key} was given"
        else:
            return None, f"{word!r} is not a {key} of the catalog"
    return out, ""


# ----------------------------------------------------------------------------------------------------------------
# References and scores


@dataclass
class References:
    """What the cosines and leakage compare with: the content and style references (uint8 (N, H, W, 3)) and the
    contents the style references show."""

    content: np.ndarray
    style: np.ndarray
    style_contents: list[str]
    source: str = ""

    @classmethod
    def of_task(cls, task) -> References:
        """The references of a :class:`b4m.world.tasks.Task` (what the demo and the benchmark train on)."""
        arrays = [np.stack([np.asarray(im) for im in s.images]) for s in (task.content_refs, task.style_refs)]
        source = f"rendered (seed {task.config.seed}, {task.config.refs} each)"
        return cls(*arrays, list(task.style_ref_contents), source)

    @classmethod
    def from_folders(cls, content: str | Path, style: str | Path, catalog: Catalog) -> References:
        """References read from two folders (e.g. written by ``b4m world render``); the style references' contents
        from their metadata or captions (those that name no catalog content count for none)."""
        arrays, shown = [], []
        for folder, what in ((content, "content references"), (style, "style references")):
            files, images, infos = read_image_folder(folder, what)
            arrays.append(np.stack([np.asarray(im.convert("RGB")) for im in images]))
            scenes = [_scene_of(path, info, catalog) for path, info in zip(files, infos, strict=True)]
            shown = [s["content"] for s in scenes if s and s["content"] in {c.name for c in catalog.contents}]
        return cls(arrays[0], arrays[1], list(dict.fromkeys(shown)), f"{content}, {style}")


def score_scenes(oracle: Oracle, images: np.ndarray, scenes: Sequence[dict], refs: References) -> dict[str, list]:
    """Per-image scores of uint8 ``images`` (N, H, W, 3), image i asked to show ``scenes[i]`` (catalog names; the
    layout attributes it lacks are not scored: None). The keys and values of
    :func:`b4m.world.tasks.score_images`, which this equals on full scenes, plus the layout attributes."""
    if len(images) != len(scenes):
        raise B4MError(f"score_scenes: {len(images)} images but {len(scenes)} scenes")
    names = predict(oracle, images)
    out: dict[str, list] = {}
    for attr in ATTRIBUTES:
        out[attr] = [float(p == s[attr]) if attr in s else None for p, s in zip(names[attr], scenes, strict=True)]
    layout = [[out[a][i] for a in LAYOUT if out[a][i] is not None] for i in range(len(scenes))]
    out["prompt"] = [float(np.mean(v)) if v else None for v in layout]
    out["content_leak"] = [float(p in refs.style_contents) for p in names["content"]]
    out["style_leak"] = [float(p == PLAIN) for p in names["style"]]
    out["content_cos"] = similarity(oracle, images, refs.content, "content").mean(dim=1).tolist()
    out["style_cos"] = similarity(oracle, images, refs.style, "style").mean(dim=1).tolist()
    return out


def summary(per_image: dict[str, list], metrics: Sequence[str] = METRICS) -> dict[str, dict[str, float]]:
    """Per metric, the mean with a 95% interval over the images it applies to (a metric none applies to is left
    out); ``n`` is that number of images."""
    out = {}
    for k in metrics:
        values = [v for v in per_image.get(k, []) if v is not None]
        if values:
            out[k] = {**summarize({k: values}, [k], BINARY)[k], "n": len(values)}
    return out


@dataclass
class FolderScores:
    """The scores of a folder: the scored files with their scenes and per-image scores, and the files not scored
    with the reason."""

    files: list[Path] = field(default_factory=list)
    scenes: list[dict] = field(default_factory=list)
    per_image: dict[str, list] = field(default_factory=dict)
    not_scored: list[tuple[Path, str]] = field(default_factory=list)
    references: str = ""

    def summary(self) -> dict[str, dict[str, float]]:
        return summary(self.per_image)

    def to_dict(self) -> dict:
        return {
            "references": self.references,
            "summary": self.summary(),
            "images": [
                {"file": str(f), "scene": s, **{k: v[i] for k, v in self.per_image.items()}}
                for i, (f, s) in enumerate(zip(self.files, self.scenes, strict=True))
            ],
            "not_scored": [{"file": str(f), "why": why} for f, why in self.not_scored],
        }


def _scene_of(path: Path, info: dict | None, catalog: Catalog) -> dict | None:
    """The scene recorded in the metadata, else the one its prompt (metadata or ``.txt``) asks for."""
    info = info if isinstance(info, dict) else {}
    if isinstance(info.get("scene"), dict):
        return info["scene"]
    prompt = info.get("prompt")
    caption = path.with_suffix(".txt")
    if not isinstance(prompt, str) and caption.is_file():
        prompt = caption.read_text(encoding="utf-8", errors="replace")
    return parse_prompt(prompt, catalog) if isinstance(prompt, str) else None


def world_images(
    folder: str | Path, content: str | None, style: str | None, catalog: Catalog
) -> tuple[list[Path], list[np.ndarray], list[dict], list[tuple[Path, str]]]:
    """The images of ``folder`` that can be scored (files, uint8 arrays at the size they were generated, resolved
    scenes) and those that cannot, with the reason. Grids that ``b4m generate`` writes are passed over."""
    files, images, infos = read_image_folder(folder, "images", skip_grids=True)
    kept: tuple[list, list, list] = ([], [], [])
    skipped = []
    for path, image, info in zip(files, images, infos, strict=True):
        scene = _scene_of(path, info, catalog)
        if scene is None:
            skipped.append((path, "no world prompt (in its metadata or a .txt beside it) that parses into a scene"))
            continue
        resolved, why = resolve(scene, content, style, catalog)
        if resolved is None:
            skipped.append((path, why))
            continue
        array = np.asarray(image.convert("RGB"))
        k = int((info or {}).get("upscale", 1) or 1)
        for out, value in zip(kept, (path, array[::k, ::k] if k > 1 else array, resolved), strict=True):
            out.append(value)
    return *kept, skipped


def score_folder(
    folder: str | Path, content: str | None, style: str | None, oracle: Oracle, refs: References, catalog: Catalog
) -> FolderScores:
    """Score every world image in ``folder`` (see the module docstring)."""
    files, arrays, scenes, skipped = world_images(folder, content, style, catalog)
    result = FolderScores(files, scenes, {}, skipped, refs.source)
    if files:
        sizes = {a.shape for a in arrays}
        if len(sizes) > 1:
            raise B4MError(f"{folder}: images of several sizes ({', '.join(map(str, sorted(sizes)))})")
        result.per_image = score_scenes(oracle, np.stack(arrays), scenes, refs)
    return result
