"""What a results file records of the machine and software that made it."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .version import __version__


def device_name(device: torch.device | str) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H200)``."""
    device = torch.device(device)
    return str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")


def versions() -> dict[str, Any]:
    """b4m's version and those of the libraries that decide its numbers."""
    import diffusers
    import peft
    import transformers

    return {
        "b4m": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def git_commit(source: str | os.PathLike = __file__) -> tuple[str | None, bool | None]:
    """The commit of the code that runs (``source``: a file of it, by default this one), and whether it has
    uncommitted changes.

    ``B4M_COMMIT`` wins (a code snapshot copied without its history, e.g. onto a GPU machine: ``dirty`` is then
    unknown). Otherwise git, but only when ``source`` is tracked where it lies: a snapshot inside another checkout
    (an ignored folder) would otherwise report that checkout's commit."""
    if os.environ.get("B4M_COMMIT"):
        return os.environ["B4M_COMMIT"], None
    here = Path(source).resolve()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=here.parent, capture_output=True, text=True, timeout=10, check=True
        ).stdout

    try:
        git("ls-files", "--error-unmatch", here.name)  # fails when this file is untracked or ignored
        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def record(device: torch.device | str) -> dict[str, Any]:
    """Device, date (UTC), commit, the command line, versions and CPU threads: what a measurement records."""
    commit, dirty = git_commit()
    return {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "command": " ".join(sys.argv),
        "versions": versions(),
        "cpu_threads": torch.get_num_threads(),
    }
