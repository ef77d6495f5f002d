"""Score a folder of generated images against folders of content and style references (the API behind ``b4m eval``).

Images are the PNG, JPEG, WebP and BMP files directly inside each folder, in sorted name order; other files (``.txt``
captions, ``run.json``, hidden files) are passed over, and a file with an image suffix that cannot be read is an
error that names it. The grids that ``b4m generate`` writes beside its images (PNG metadata with a ``prompts`` list)
are not scored.

Each image's prompt comes from, in order: the ``prompts`` argument (a list, or a text file with one prompt per line;
one prompt for all images, or one per image in sorted file order), else the ``prompt`` that ``b4m generate`` wrote in
the PNG's ``b4m`` metadata, else a same-name ``.txt`` file beside it. When no image has a prompt, prompt alignment is
left out; when only some have one, the first without is named in the error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import B4MError
from .real import DEFAULT_BATCH_SIZE, DEFAULT_CLIP, DEFAULT_DINO, ClipEncoder, DinoEncoder, Placeholders, score_images
from .stats import bootstrap_mean

__all__ = [
    "IMAGE_SUFFIXES",
    "evaluate_folder",
    "mean_intervals",
    "read_image_folder",
    "read_prompt_file",
    "stored_prompt",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError)


def _metadata(image: Image.Image) -> dict | None:
    """The JSON that `b4m.images.save_png` wrote in a PNG's ``b4m`` text chunk, if any."""
    text = getattr(image, "text", {}).get("b4m") if image.format == "PNG" else None
    if not text:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return None
    return info if isinstance(info, dict) else None


def stored_prompt(path: str | os.PathLike) -> str | None:
    """The prompt that ``b4m generate`` stored in a PNG's metadata, or None."""
    with Image.open(path) as im:
        prompt = (_metadata(im) or {}).get("prompt")
    return prompt if isinstance(prompt, str) else None


def _open(path: Path) -> tuple[Image.Image, dict | None]:
    """The decoded, upright image and its b4m metadata; a B4MError naming the file if it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            info = _metadata(im)
            try:
                upright = ImageOps.exif_transpose(im)
            except (*_DECODE_ERRORS, KeyError, AttributeError):
                upright = im.copy()
    except UnidentifiedImageError:
        raise B4MError(f"{path}: not an image Pillow can read") from None
    except _DECODE_ERRORS as e:
        raise B4MError(f"{path}: damaged or truncated image ({e})") from None
    return upright, info


def _image_files(folder: str | os.PathLike, what: str) -> list[Path]:
    path = Path(folder).expanduser()
    if not path.exists():
        raise B4MError(f"{path}: no such folder ({what})")
    if not path.is_dir():
        raise B4MError(f"{path}: is a file, expected a folder of {what}")
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and _is_image_name(p))


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_image_folder(
    folder: str | os.PathLike, what: str = "images", *, skip_grids: bool = False
) -> tuple[list[Path], list[Image.Image], list[dict | None]]:
    """The images directly inside ``folder`` in sorted order, with their files and b4m PNG metadata.

    Args:
        folder: The folder.
        what: What the folder holds, for messages (``"content references"``).
        skip_grids: Leave out the grids that ``b4m generate`` writes.

    Raises:
        B4MError: The folder is missing or a file, holds no images, or an image file cannot be read.
    """
    files, images, infos = [], [], []
    for path in _image_files(folder, what):
        image, info = _open(path)
        if skip_grids and info is not None and "prompts" in info and "prompt" not in info:
            continue
        files.append(path)
        images.append(image)
        infos.append(info)
    if not images:
        raise B4MError(f"{Path(folder).expanduser()}: no {what} (PNG, JPEG, WebP or BMP files) in the folder")
    return files, images, infos


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The prompts in a UTF-8 text file, one per non-empty line (whitespace collapsed)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise B4MError(f"{p}: no such prompts file")
    if not p.is_file():
        raise B4MError(f"{p}: is a folder, expected a prompts file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise B4MError(f"{p}: is not UTF-8 text") from None
    prompts = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise B4MError(f"{p}: no prompts in the file")
    return prompts


def _caption(path: Path) -> str | None:
    caption_file = path.with_suffix(".txt")
    if not caption_file.is_file():
        return None
    try:
        text = " ".join(caption_file.read_text(encoding="utf-8-sig").split())
    except UnicodeDecodeError:
        raise B4MError(f"{caption_file}: is not UTF-8 text") from None
    return text or None


def _resolve_prompts(
    prompts: Sequence[str] | str | os.PathLike | None, files: list[Path], infos: list[dict | None]
) -> tuple[list[str] | None, str | None]:
    """One prompt per image and where they came from (``given``, ``file``, ``stored``), or ``(None, None)``."""
    n = len(files)
    if prompts is not None:
        if isinstance(prompts, (str, os.PathLike)):
            given, source, where = read_prompt_file(prompts), "file", f"{Path(prompts).expanduser()}"
        else:
            given, source, where = [str(p) for p in prompts], "given", "prompts"
        if len(given) not in (1, n):
            raise B4MError(f"{where}: {len(given)} prompts for {n} images; give one per image (or one for all)")
        return (given * n if len(given) == 1 else given), source
    found = []
    for path, info in zip(files, infos, strict=True):
        prompt = (info or {}).get("prompt")
        found.append(prompt if isinstance(prompt, str) and prompt.strip() else _caption(path))
    if all(p is None for p in found):
        return None, None
    missing = [path for path, prompt in zip(files, found, strict=True) if prompt is None]
    if missing:
        path = missing[0]
        raise B4MError(
            f"{path}: no prompt (no b4m metadata and no {path.with_suffix('.txt').name} beside it) while other "
            "images have one; pass the prompts"
        )
    return found, "stored"


def evaluate_folder(
    images_dir: str | os.PathLike,
    content_refs_dir: str | os.PathLike | None = None,
    style_refs_dir: str | os.PathLike | None = None,
    prompts: Sequence[str] | str | os.PathLike | None = None,
    *,
    clip: str | os.PathLike | ClipEncoder | None = DEFAULT_CLIP,
    dino: str | os.PathLike | DinoEncoder | None = DEFAULT_DINO,
    placeholders: Placeholders = (),
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict:
    """Content, style and prompt alignment of the images in ``images_dir`` (see `b4m.metrics.real`).

    Args:
        images_dir: The generated images.
        content_refs_dir: The content reference images; None leaves content alignment out.
        style_refs_dir: The style reference images; None leaves style alignment out.
        prompts: A list of prompts, or a text file of them (one per line); one for all images or one per image in
            sorted file order. None reads them from the images (see the module notes).
        clip, dino, placeholders, device, dtype, batch_size: As in `score_images`.

    Returns:
        `score_images`' result, plus ``files`` (the scored images, in the order of the per-image scores),
        ``prompts`` (as given or stored, before placeholders are removed) and ``prompt_source`` (``given``,
        ``file``, ``stored`` or None).

    Raises:
        B4MError: A folder is missing or holds no images, a file cannot be read, the prompts do not match the
            images, or a model cannot be loaded; each as one line naming the file.
    """
    files, images, infos = read_image_folder(images_dir, "images", skip_grids=True)
    content = read_image_folder(content_refs_dir, "content references")[1] if content_refs_dir is not None else None
    style = read_image_folder(style_refs_dir, "style references")[1] if style_refs_dir is not None else None
    prompt_list, source = _resolve_prompts(prompts, files, infos)
    result = score_images(
        images,
        content,
        style,
        prompt_list,
        clip=clip,
        dino=dino,
        placeholders=placeholders,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )
    result["files"] = [str(p) for p in files]
    result["prompts"] = prompt_list
    result["prompt_source"] = source
    return result


def mean_intervals(per_image: dict[str, Sequence[float]], seed: int = 0) -> dict[str, dict[str, float]]:
    """Per metric of ``evaluate_folder``'s ``per_image``: the mean and its 95% percentile-bootstrap interval, as
    ``{"mean", "low", "high"}``."""
    intervals = {}
    for metric, scores in per_image.items():
        interval = bootstrap_mean(scores, seed=seed)
        intervals[metric] = {"mean": interval.estimate, "low": interval.low, "high": interval.high}
    return intervals
