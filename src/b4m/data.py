"""Training images: load a folder of user images as RGB squares with captions, and the auxiliary sets beside them.

A set is one folder of images. Each image may have a caption in a same-name ``.txt`` file beside it (``dog1.jpg`` ->
``dog1.txt``); images without one use the set's prompt. Files Pillow cannot read, or that are damaged, are skipped
with a warning; hidden files and ``.txt`` files are ignored. Every image is converted to 8-bit RGB (transparency
composited on white, 16-bit scaled, EXIF orientation applied), its short side resized to the resolution and the
centre cropped to a square. Files are read in sorted order, so the result is deterministic.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import B4MError

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_PIXELS", "ImageSet", "load_aux_sets", "load_image_set", "to_tensor"]

MAX_PIXELS = 300_000_000
"""Images that would decode to more pixels than this are skipped (300 Mpx is above today's 200 MP phone cameras).

JPEGs are decoded at a reduced scale when they are much larger than the resolution, so this bounds the memory that
one PNG, TIFF or similar file can take rather than the size of a JPEG.
"""

SET_PROMPT_FILE = "prompt.txt"
"""The file in an auxiliary set's folder that holds the set's prompt."""

_REDUCING_GAP = 2.0  # decode/reduce cheaply down to twice the target size, then resample with LANCZOS (as thumbnail)
_WHITE = 255
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)  # what damaged files raise
_PIL_LIMIT_LOCK = threading.Lock()

Warn = Callable[[str], object]


@dataclass
class ImageSet:
    """One set of training images, ready to use.

    Attributes:
        name: The set's name (its folder's name unless given), used in messages.
        folder: The folder the images came from, or None for a set built in code.
        images: RGB images, each resolution x resolution.
        captions: One caption per image.
        files: The file each image came from.
        own_captions: How many captions came from the images' own ``.txt`` files (the rest are the prompt).
    """

    name: str
    folder: Path | None
    images: list[Image.Image]
    captions: list[str]
    files: list[Path]
    own_captions: int = 0

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.captions) == len(self.files):
            raise ValueError(
                f"ImageSet {self.name!r}: {len(self.images)} images, {len(self.captions)} captions, "
                f"{len(self.files)} files; they must match"
            )

    def __len__(self) -> int:
        return len(self.images)


def load_image_set(
    folder: str | os.PathLike,
    prompt: str | None,
    resolution: int,
    *,
    name: str | None = None,
    placeholder: str | None = None,
    warn: Warn = warnings.warn,
) -> ImageSet:
    """Load every readable image directly inside ``folder`` as a square RGB image with its caption.

    Args:
        folder: The folder of images (subfolders are not searched).
        prompt: The caption for images that have no same-name ``.txt`` file beside them; None if every image must
            have one.
        resolution: The side of the square every image is resized and centre-cropped to.
        name: The set's name in messages; the folder's name by default.
        placeholder: A token such as ``"sks"`` that every caption should contain as a whole word; if some caption
            lacks it, one warning is given for the set.
        warn: Called with a one-line message for each skipped file and other notices.

    Returns:
        The loaded set, in sorted file order.

    Raises:
        B4MError: The folder is missing, not a folder, holds no images or none that can be read, or an image has no
            caption and no prompt was given.
    """
    return _load_set(
        folder, prompt, resolution, name=name, placeholder=placeholder, warn=warn, prompt_hint="or pass a prompt"
    )


def load_aux_sets(
    folder: str | os.PathLike | Sequence[str | os.PathLike],
    resolution: int,
    *,
    placeholder: str | None = None,
    warn: Warn = warnings.warn,
) -> list[ImageSet]:
    """Load the auxiliary image sets: one set per immediate subfolder of ``folder`` (in sorted order).

    A set's prompt is the text of ``prompt.txt`` in its folder; an image's own ``.txt`` still wins. Every image needs
    one or the other.

    Args:
        folder: A folder of folders, one per set; or a list of set folders, each of them one set.
        resolution: The side of the square every image is resized and centre-cropped to.
        placeholder: As in `load_image_set`.
        warn: As in `load_image_set`.

    Returns:
        One `ImageSet` per set, named after its folder.

    Raises:
        B4MError: ``folder`` is missing, not a folder or holds no subfolders; a set fails as in `load_image_set`; or
            two sets have the same name.
    """
    set_folders = _aux_set_folders(folder, warn) if isinstance(folder, (str, os.PathLike)) else _given(folder)
    sets = []
    for set_folder in set_folders:
        prompt = _read_text(set_folder / SET_PROMPT_FILE) if (set_folder / SET_PROMPT_FILE).is_file() else None
        hint = f"or write the set's prompt in {set_folder / SET_PROMPT_FILE}"
        sets.append(
            _load_set(set_folder, prompt, resolution, name=None, placeholder=placeholder, warn=warn, prompt_hint=hint)
        )
    _check_unique_names(sets)
    return sets


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Stack RGB images of one size into a float32 tensor of shape (B, 3, H, W) with values in [-1, 1].

    Args:
        images: RGB images, all the same size.

    Returns:
        The batch; pixel value v becomes v / 127.5 - 1.

    Raises:
        ValueError: No images, an image that is not RGB, or images of different sizes.
    """
    if not images:
        raise ValueError("to_tensor needs at least one image")
    if any(im.mode != "RGB" for im in images):
        raise ValueError(f"to_tensor needs RGB images, got modes {sorted({im.mode for im in images})}")
    if len({im.size for im in images}) > 1:
        raise ValueError(f"to_tensor needs images of one size, got {sorted({im.size for im in images})}")
    import torch  # here, not at the top: a command stopped by bad images never loads torch

    batch = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
    return (batch.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Sets and captions


def _load_set(
    folder: str | os.PathLike,
    prompt: str | None,
    resolution: int,
    *,
    name: str | None,
    placeholder: str | None,
    warn: Warn,
    prompt_hint: str,
) -> ImageSet:
    """`load_image_set`, with the advice that the missing-caption error gives (which differs for auxiliary sets)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise B4MError(f"the resolution must be a positive whole number of pixels, got {resolution!r}")
    folder = _existing_folder(folder)
    prompt = _clean(prompt) if prompt is not None else None
    candidates = _candidate_files(folder)
    images, captions, files, own = [], [], [], 0
    for path in candidates:
        image = _load_image(path, resolution, warn)
        if image is None:
            continue
        images.append(image)
        caption, from_file = _caption(path, prompt, prompt_hint)
        captions.append(caption)
        files.append(path)
        own += from_file
    if not images:
        raise B4MError(f"{folder}: no usable images ({len(candidates)} files skipped, see the warnings)")
    name = name or folder.resolve().name or str(folder)
    if placeholder:
        _check_placeholder(name, placeholder, captions, files, warn)
    return ImageSet(name=name, folder=folder, images=images, captions=captions, files=files, own_captions=own)


def _existing_folder(folder: str | os.PathLike) -> Path:
    """``folder`` as a Path, or a B4MError if it is missing or a file."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise B4MError(f"{path}: no such folder")
    if not path.is_dir():
        raise B4MError(f"{path}: is a file, expected a folder of images")
    return path


def _is_ignored(path: Path) -> bool:
    """Hidden files and text files are never images; they are passed over without a warning."""
    return path.name.startswith(".") or path.suffix.lower() == ".txt"


def _candidate_files(folder: Path) -> list[Path]:
    """The files in ``folder`` that may be images, sorted; a B4MError if there are none."""
    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.is_file() and not _is_ignored(p)]
    if not files:
        subfolders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
        where = " (only subfolders; the images must be directly inside it)" if subfolders else ""
        raise B4MError(f"{folder}: no images in the folder{where}")
    return files


def _clean(text: str) -> str:
    """A caption with its whitespace, newlines included, collapsed to single spaces."""
    return " ".join(text.split())


def _read_text(path: Path) -> str | None:
    """The cleaned text of a caption or prompt file; None when it holds only whitespace."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise B4MError(f"{path}: is not UTF-8 text") from None
    except OSError as e:
        raise B4MError(f"{path}: could not read ({e.strerror or e})") from e
    return _clean(text) or None


def _caption(image_path: Path, prompt: str | None, prompt_hint: str) -> tuple[str, bool]:
    """The image's own non-empty ``.txt`` caption (and True), else ``prompt`` (and False); a B4MError naming the
    image if neither exists."""
    caption_file = image_path.with_suffix(".txt")
    caption = _read_text(caption_file) if caption_file.is_file() else None
    if caption is not None:
        return caption, True
    if prompt is None:
        raise B4MError(f"{image_path}: no caption; add {caption_file.name} beside it, {prompt_hint}")
    return prompt, False


def has_placeholder(text: str, placeholder: str) -> bool:
    """Whether ``text`` contains ``placeholder`` as a whole word."""
    return re.search(rf"(?<!\w){re.escape(placeholder)}(?!\w)", text) is not None


def _check_placeholder(name: str, placeholder: str, captions: list[str], files: list[Path], warn: Warn) -> None:
    """Warn once if some caption lacks ``placeholder`` as a whole word."""
    missing = [i for i, caption in enumerate(captions) if not has_placeholder(caption, placeholder)]
    if missing:
        first = missing[0]
        warn(
            f"set {name!r}: {len(missing)} of {len(captions)} captions lack the placeholder {placeholder!r}, "
            f"e.g. {files[first].name}: {captions[first]!r}"
        )


def _aux_set_folders(folder: str | os.PathLike, warn: Warn) -> list[Path]:
    """The set folders inside an ``--aux`` folder of folders, sorted."""
    root = _existing_folder(folder)
    entries = sorted(root.iterdir())
    subfolders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not subfolders:
        raise B4MError(f"{root}: --aux must be a folder of folders (one per auxiliary set)")
    loose = [p for p in entries if p.is_file() and not _is_ignored(p)]
    if loose:
        warn(
            f"{root}: {len(loose)} files directly inside --aux are ignored, e.g. {loose[0].name}; "
            "put each set in its own subfolder"
        )
    return subfolders


def _given(folders: Sequence[str | os.PathLike]) -> list[Path]:
    """A list of set folders, kept in the order given."""
    if not folders:
        raise B4MError("--aux: no auxiliary set folders given")
    return [Path(f).expanduser() for f in folders]


def _check_unique_names(sets: list[ImageSet]) -> None:
    """Set names identify sets in messages and logs, so two sets may not share one."""
    seen: dict[str, Path | None] = {}
    for image_set in sets:
        if image_set.name in seen:
            raise B4MError(
                f"{image_set.folder}: another auxiliary set is also named {image_set.name!r} "
                f"({seen[image_set.name]}); rename one of the folders"
            )
        seen[image_set.name] = image_set.folder


# ---------------------------------------------------------------------------------------------------------------
# Images


@contextlib.contextmanager
def _own_size_limit() -> Iterator[None]:
    """Turn off Pillow's decompression-bomb check for the duration; `_load_image` checks ``MAX_PIXELS`` itself.

    Pillow's check refuses images over 179 Mpx by their stated size, before a JPEG could be decoded at a reduced
    scale. The limit is restored afterwards, and the lock keeps two loads in this process from interleaving.
    """
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _load_image(path: Path, resolution: int, warn: Warn) -> Image.Image | None:
    """The image at ``path`` as an RGB resolution x resolution square, or None (with a warning) if it is unusable."""
    with _own_size_limit():
        try:
            with Image.open(path) as im:
                return _prepare(im, path, resolution, warn)
        except UnidentifiedImageError:
            reason = "not an image Pillow can read"
        except _Skip as e:
            reason = str(e)
        except _DECODE_ERRORS as e:
            reason = f"damaged or truncated ({e})"
    warn(f"{path}: skipped, {reason}")
    return None


class _Skip(Exception):
    """An image that opens but cannot be used; the message is the reason."""


def _prepare(im: Image.Image, path: Path, resolution: int, warn: Warn) -> Image.Image:
    """Decode ``im`` (a JPEG at a reduced scale when it is large), orient, convert and fit it to the square."""
    target = int(resolution * _REDUCING_GAP)
    im.draft(None, (target, target))  # only JPEG acts on it; the short side stays >= target
    width, height = im.size
    if width * height > MAX_PIXELS:
        raise _Skip(f"too large ({width}x{height}; the limit is {MAX_PIXELS // 1_000_000} Mpx)")
    im.load()
    im = _orient(im, path, warn)
    if min(im.size) < resolution:
        warn(f"{path}: {im.width}x{im.height} is smaller than {resolution}x{resolution}; upscaled, which blurs it")
    return _flatten(_fit(_working_mode(im), resolution))


def _orient(im: Image.Image, path: Path, warn: Warn) -> Image.Image:
    """Apply the EXIF orientation, so the image is upright as viewers show it; damaged EXIF is ignored."""
    try:
        return ImageOps.exif_transpose(im)
    except (*_DECODE_ERRORS, KeyError, AttributeError) as e:
        warn(f"{path}: could not read its EXIF orientation ({e}); used as stored")
        return im


def _working_mode(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit L, RGB, LA or RGBA: modes that resize well and keep transparency until it is flattened."""
    mode = im.mode
    if mode in ("L", "RGB", "LA", "RGBA"):
        return im.convert("RGBA") if mode in ("L", "RGB") and im.has_transparency_data else im
    if mode == "1":
        return im.convert("L")
    if mode in ("P", "PA"):
        return im.convert("RGBA" if im.has_transparency_data else "RGB")
    if mode in ("La", "RGBa"):
        return im.convert(mode.upper())
    if mode == "I" or mode.startswith("I;16"):
        return _sixteen_to_eight(im)
    try:
        return im.convert("RGB")  # CMYK, YCbCr, F, ...
    except ValueError:
        raise _Skip(f"unsupported colour mode {mode}") from None


def _sixteen_to_eight(im: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (mode I;16* or I, read as 0..65535) as 8-bit L, scaled (65535 -> 255), not clipped."""
    values = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))


def _fit(im: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to ``resolution`` and crop the centre square, in one resampling step."""
    width, height = im.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    return im.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box, reducing_gap=_REDUCING_GAP)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB by the training images' rules: 16-bit scaled (not clipped), transparency composited on
    white, other modes converted.

    Raises:
        B4MError: A colour mode Pillow cannot convert.
    """
    if image.mode == "RGB":
        return image
    try:
        return _flatten(_working_mode(image))
    except _Skip as e:
        raise B4MError(f"an image could not be converted to RGB: {e}") from None


def _flatten(im: Image.Image) -> Image.Image:
    """``im`` as RGB, with any transparency composited on white."""
    if im.mode in ("LA", "RGBA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (_WHITE, _WHITE, _WHITE, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")
