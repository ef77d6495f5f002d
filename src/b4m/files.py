"""Safe file I/O shared by every writer and reader: safetensors only, atomic writes, one-line errors."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open  # safetensors' own module: no torch

from .errors import B4MError, first_line

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on failure removed.

    A crash or a full disk therefore never leaves a half-written file under the final name, and an older file of
    that name survives until the new one is complete. ``durable``: the file is fsynced before the rename and its
    folder after it, so a power cut cannot leave the new name pointing at unwritten blocks. A failure to write
    (``OSError``: a full disk, a file-size limit, a read-only folder) is a one-line :class:`B4MError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise B4MError(f"{path}: could not write ({e.strerror or e})") from e
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        # mkstemp makes 0600, and writers that recreate the file (safetensors' save_file) keep that: the final
        # file gets the usual permissions, set once the writer is done.
        os.chmod(tmp_path, 0o666 & ~umask)
        if durable:
            fsync_path(tmp_path)
        os.replace(tmp_path, path)
        if durable:
            fsync_path(path.parent)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise B4MError(f"{path}: could not write ({e.strerror or e})") from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data and metadata to the disk (a folder: the names it holds). A file system that
    cannot flush (some network and FUSE ones refuse it for folders) is left as it is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def check_output(output: str | os.PathLike, *inputs: str | os.PathLike, folder: bool = False) -> None:
    """Refuse, before any work, an output that is one of the ``inputs`` (it would be overwritten by what is made
    from it) or, for a ``folder`` output, an existing file."""
    out = Path(output)
    for source in inputs:
        if Path(source).exists() and out.exists() and out.resolve() == Path(source).resolve():
            raise B4MError(f"{out}: the output is also an input; write to another path")
    if folder and out.exists() and not out.is_dir():
        raise B4MError(f"{out}: is a file, not a folder; choose another output folder")


def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' writer, imported when a file is written (it imports torch, seconds on a CPU; a command that
    fails on bad input before writing never does)."""
    from safetensors.torch import save_file as write

    write(tensors, filename, metadata=metadata)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write ``tensors`` atomically; metadata values that are not strings are stored as JSON."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta.setdefault("format", "pt")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    except SafetensorError as e:  # safetensors' own error for a failed write (a full disk, a file-size limit)
        raise B4MError(f"{path}: could not write ({first_line(e)})") from e


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
        import torch

        for k, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise B4MError(f"{path}: tensor {k} holds NaN or Inf values")
    return tensors, metadata
