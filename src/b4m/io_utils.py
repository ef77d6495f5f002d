"""Safe file I/O shared by every writer and reader: safetensors only, atomic writes, one-line errors."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import B4MError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on failure removed.

    A crash or a full disk therefore never leaves a half-written file under the final name, and an older file of
    that name survives until the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        # mkstemp makes 0600, and writers that recreate the file (safetensors' save_file) keep that: the final
        # file gets the usual permissions, set once the writer is done.
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def check_output(output: str | os.PathLike, *inputs: str | os.PathLike, folder: bool = False) -> None:
    """Refuse, before any work, an output that is one of the ``inputs`` (it would be overwritten by what is made
    from it) or, for a ``folder`` output, an existing file."""
    out = Path(output)
    for source in inputs:
        if Path(source).exists() and out.exists() and out.resolve() == Path(source).resolve():
            raise B4MError(f"{out}: the output is also an input; write to another path")
    if folder and out.exists() and not out.is_dir():
        raise B4MError(f"{out}: is a file, not a folder; choose another output folder")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write ``tensors`` atomically; metadata values that are not strings are stored as JSON."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta.setdefault("format", "pt")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    except OSError as e:
        raise B4MError(f"{path}: could not write ({e.strerror or e})") from e


def load_safetensors(path: str | os.PathLike, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file (never unpickles). Returns (tensors, metadata). Errors name the file and problem."""
    path = Path(path)
    if not path.exists():
        raise B4MError(f"{path}: no such file")
    if path.is_dir():
        raise B4MError(f"{path}: is a folder, expected a .safetensors file")
    if path.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}:
        raise B4MError(f"{path}: pickle-based files are not loaded (unsafe); convert it to .safetensors first")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise B4MError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from e
    if check_finite:
        for k, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise B4MError(f"{path}: tensor {k} holds NaN or Inf values")
    return tensors, metadata


def shard_names(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most ``max_bytes`` each (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_sharded(
    tensors: dict[str, torch.Tensor], folder: Path, stem: str, metadata: dict[str, str], max_bytes: int
) -> list[Path]:
    """``stem.safetensors``, or ``stem-00001-of-0000N.safetensors`` shards when larger than ``max_bytes``.

    Older files of the same stem are removed after the new ones are written, so a folder never mixes layouts.
    """
    groups = shard_names(tensors, max_bytes)
    if len(groups) == 1:
        paths = [folder / f"{stem}.safetensors"]
    else:
        paths = [folder / f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for names, path in zip(groups, paths, strict=True):
        save_safetensors({k: tensors[k] for k in names}, path, metadata)
    for old in sharded_files(folder, stem):
        if old not in paths:
            old.unlink()
    return paths


def sharded_files(folder: Path, stem: str) -> list[Path]:
    """The files :func:`save_sharded` wrote for ``stem`` (one file or the shards, in order); [] if none."""
    single = folder / f"{stem}.safetensors"
    shards = sorted(folder.glob(f"{stem}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"))
    return ([single] if single.exists() else []) + shards


def load_sharded(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """All tensors of ``stem`` in ``folder`` (single file or shards); errors name what is missing."""
    files = sharded_files(folder, stem)
    if not files:
        raise B4MError(f"{folder}: no {stem}.safetensors (or {stem}-*-of-*.safetensors shards)")
    expected = files[-1].stem.rsplit("-of-", 1)[-1] if files[-1].stem != stem else None
    if expected is not None and len(files) != int(expected):
        raise B4MError(f"{folder}: {len(files)} of {int(expected)} {stem} shards present")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_safetensors(f)[0])
    return tensors
