"""Run folders: one run per folder, what a finished run leaves in it (adapter, plain LoRA files, ``run.json``), and
reading a run back (its adapter file and record).

The checks a stage makes of its folder before any work import no torch (nor the modules that do: imported where a
run's tensors or checkpoints are handled), so a command refused on its input stops in well under a second."""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import B4MError
from ..files import atomic_path, check_output
from ..progress import say
from ..training import distributed
from .config import StageConfig

if TYPE_CHECKING:
    from ..adapter.file import AdapterFile
    from ..models.base import DiffusionModel
    from ..training.loop import TrainResult

try:
    import fcntl
except ImportError:  # no flock (Windows): runs are not locked
    fcntl = None

ADAPTER_NAMES = {
    "content": "content.b4m.safetensors",
    "style": "style.b4m.safetensors",
    "fused": "fused.b4m.safetensors",
}

#: The plain LoRA file of each export format, and the tools that load it.
EXPORT_FILES = {
    "diffusers": ("{name}_lora_diffusers.safetensors", "diffusers and peft (pipe.load_lora_weights)"),
    "kohya": ("{name}_lora_comfyui.safetensors", "ComfyUI, A1111 and Forge (kohya format)"),
}


def check_run_folder(out: Path, stage: str, *, resume: bool, overwrite: bool, inputs: tuple = ()) -> None:
    """Refuse, before any work, a run folder that would mix two runs: one that holds another stage's run, or a
    finished or interrupted run of this stage when neither ``resume`` nor ``overwrite`` says what to do with it.
    ``overwrite`` removes the old run's checkpoints (a later ``--resume`` must not find them)."""
    check_output(out, *inputs, folder=True)
    if not out.is_dir():
        return
    info = out / "run.json"
    try:
        previous = json.loads(info.read_text()).get("stage")
    except FileNotFoundError:  # none (or another process of this run deleted it under --overwrite)
        previous = None
    except (OSError, ValueError, AttributeError):
        raise B4MError(f"{info}: unreadable, so the folder's run is unknown; choose another -o") from None
    if previous is not None and previous != stage:
        raise B4MError(f"{out}: holds a {previous} run (run.json); write the {stage} run to another folder")
    checkpoints = out / "checkpoints"
    unfinished = False
    if checkpoints.is_dir():  # (the checkpoint module imports torch: only for a folder that has checkpoints)
        from ..training.checkpoint import checkpoints as complete_checkpoints

        unfinished = bool(complete_checkpoints(out))  # step-N.tmp leftovers of a killed write do not count
    if resume or not (previous or unfinished):
        return
    if not overwrite:
        what = f"a finished {stage} run" if previous else "checkpoints of an unfinished run"
        raise B4MError(f"{out}: holds {what}; --resume continues it, --overwrite starts again, or choose another -o")
    if distributed.current().is_main:  # one process deletes (the others see the folder as rank 0 leaves it)
        shutil.rmtree(checkpoints, ignore_errors=True)
        info.unlink(missing_ok=True)


#: The lock file a run holds in its folder while it runs (:func:`run_folder_lock`).
LOCK_FILE = ".b4m.lock"


@contextlib.contextmanager
def run_folder_lock(output: str | os.PathLike | None) -> Iterator[None]:
    """Hold an OS lock (``flock`` on ``OUTPUT/.b4m.lock``) for a whole run: a second b4m process given the same run
    folder is refused at once with a one-line error naming it, before it loads anything. Taken by rank 0 only (the
    processes of one multi-GPU run share their folder); a crash or a kill releases it (the kernel drops the lock
    with the process). Temporary files a killed write left in the folder are removed once the lock is held. A
    folder made here, and every parent made with it, is removed again when the run leaves nothing in it (a run
    refused on its input)."""
    out = Path(output) if output else None
    if out is None or fcntl is None or not distributed.current().is_main or (out.exists() and not out.is_dir()):
        yield  # nothing to lock (check_run_folder names the problem), or not rank 0
        return
    made = [f for f in (out, *out.parents) if not f.exists()]  # the folders mkdir makes (b4m run: OUT and OUT/content)
    path = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _lock(path, out)
    except OSError:  # a folder that cannot be written (the run's own checks say so) or a file system without locks
        yield
        return
    try:
        for leftover in out.glob(".*.tmp"):  # files a killed atomic write left (b4m.files.atomic_path)
            leftover.unlink(missing_ok=True)
        if (out / "checkpoints").is_dir():  # and checkpoint folders a kill left half-written (checkpoints/step-N.tmp)
            from ..training.checkpoint import clean_leftovers

            clean_leftovers(out)
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock: a process that opened the old file then retries
        os.close(fd)
        for folder in made:  # innermost first; an OSError (not empty) ends it
            try:
                folder.rmdir()
            except OSError:
                break


def locks_run_folder(stage: Callable) -> Callable:
    """Decorate a stage whose ``cfg`` argument names its run folder (``cfg.output``): it runs holding
    :func:`run_folder_lock` on that folder."""
    signature = inspect.signature(stage)

    @functools.wraps(stage)
    def run(*args, **kwargs):
        with run_folder_lock(signature.bind(*args, **kwargs).arguments["cfg"].output):
            return stage(*args, **kwargs)

    return run


def _lock(path: Path, out: Path) -> int:
    """Open and ``flock`` ``path`` (retrying when the holder removed it in between); writes this process's id."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(10):  # the holder writes its id just after taking the lock: give it a moment
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                if holder.isdigit():
                    break
                time.sleep(0.02)
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise B4MError(
                f"{out}: another b4m run ({who}) is using this folder; wait for it to end or choose another -o"
            ) from None
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def write_run_json(out: Path, cfg: StageConfig, stage: str, model: DiffusionModel, timings: dict, extra: dict) -> None:
    """``run.json``: the stage, versions, device, base model, the whole config, timings and the run's summary."""
    import torch

    from ..environment import device_name, versions

    info = {
        "stage": stage,
        "b4m": versions()["b4m"],
        "versions": {k: v for k, v in versions().items() if k != "b4m"},
        "device": device_name(model.device),
        "base_model": model.identity,
        "config": cfg.to_dict(),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        # what the caching allocator held at most: what a card must have, besides the CUDA context
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else None,
        **extra,
    }
    with atomic_path(out / "run.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2, default=str))


def export_loras(
    out: Path, name: str, adapter: AdapterFile, cfg: StageConfig, model: DiffusionModel, console=None
) -> list[Path]:
    """The run's plain LoRA files, one per export format (:data:`EXPORT_FILES`); kohya names follow the model (SGM
    block names for SDXL, as kohya sd-scripts writes them; BFL layer names for FLUX.1 and FLUX.2 [klein])."""
    from ..lora_files import dtype_from_name, save_lora

    dtype = dtype_from_name(cfg.export.dtype)
    family = getattr(model, "family", None)
    paths = []
    meta = {"b4m_role": adapter.role, "b4m_fingerprint": adapter.fingerprint(), **adapter.metadata}
    for fmt in cfg.export.formats:
        pattern, tools = EXPORT_FILES[fmt]
        path = out / pattern.format(name=name)
        if family in ("flux", "flux2"):  # transformer names: peft keys under transformer. or kohya's BFL
            save_lora(adapter.factors(), path, format=fmt, dtype=dtype, metadata=meta, family=family)
        else:
            save_lora(adapter.factors(), path, format=fmt, dtype=dtype, metadata=meta, unet_config=model.denoiser)
        paths.append(path)
        say(console, f"LoRA for {tools}: {path}")
    return paths


def train_stats(result: TrainResult) -> dict:
    steady = (result.seconds - result.first_step_seconds) / max(result.steps - 1, 1)
    return {
        "steps": result.steps,
        "images": result.images,
        "speed": result.speed,
        "seconds": round(result.seconds, 2),
        "first_step_seconds": round(result.first_step_seconds, 2),
        "steady_seconds_per_step": round(steady, 4),
    }


def process_age() -> float | None:
    """Seconds since this process began (interpreter start, imports, argument checks: what a command costs before its
    work), from Linux's ``/proc``; None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()  # after the command's name
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")), 2)  # field 22: start time
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def durations(t: dict[str, float]) -> dict[str, float]:
    """Seconds between consecutive time stamps (keyed by the later one's name) and the total."""
    keys = list(t)
    out = {f"{b}": t[b] - t[a] for a, b in itertools.pairwise(keys)}
    out["total"] = t[keys[-1]] - t[keys[0]]
    return out


def run_source(path_or_dir: str, role: str) -> tuple[Path, dict]:
    """The adapter file of a run folder (or the file itself) and the run's run.json (empty if absent)."""
    p = Path(path_or_dir)
    if p.is_dir():
        run = json.loads((p / "run.json").read_text()) if (p / "run.json").exists() else {}
        file = p / ADAPTER_NAMES[role]
        if not file.exists():
            raise B4MError(f"{p}: no {ADAPTER_NAMES[role]} in this folder; is it a finished {role} run?")
        return file, run
    if not p.exists():
        raise B4MError(f"{p}: no such file or folder")
    run_file = p.parent / "run.json"
    return p, json.loads(run_file.read_text()) if run_file.exists() else {}
