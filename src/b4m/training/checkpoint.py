"""Checkpoints of a training run: ``checkpoints/step-N`` folders written atomically and durably, found, pruned and
restored exactly (adapter or objective state, optimizer state, the CPU generator, the run's fingerprint), and when
the loop writes one besides every N steps (:class:`Stopper`: every N minutes, and on SIGINT or SIGTERM).

A checkpoint is written into ``step-N.tmp``, each file fsynced, the folder fsynced, then renamed to ``step-N`` and
the ``checkpoints`` folder fsynced: a kill, a power cut or a full disk never leaves a half-written checkpoint under
its final name. ``state.pt`` holds the sha256 of the adapter (or objective) file beside it, so a damaged file is
found on resume, which then falls back to the newest good checkpoint (:func:`resume_from`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from ..adapter.config import PLPConfig
from ..adapter.file import adapter_from_model, load_adapter, save_adapter
from ..adapter.walker import plp_layers
from ..errors import B4MError, Interrupted, first_line
from ..files import atomic_path, fsync_path, load_safetensors, save_safetensors
from ..models.base import DiffusionModel
from . import distributed
from .config import TrainConfig
from .objective import Objective
from .sets import TrainSet

_DONE = re.compile(r"step-\d+")  # a complete checkpoint; step-N.tmp (being written) and step-N.old (replaced) are not


class DamagedCheckpoint(B4MError):
    """A checkpoint folder whose files cannot be read back as written (truncated, empty, altered)."""


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first."""
    folder = Path(out) / "checkpoints"
    return sorted(p for p in folder.glob("step-*") if _DONE.fullmatch(p.name) and p.is_dir())


def latest_checkpoint(out: Path) -> Path | None:
    done = checkpoints(out)
    return done[-1] if done else None


def prune(out: Path, keep: int) -> None:
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def clean_leftovers(out: Path) -> None:
    """Remove what a killed checkpoint write leaves (``step-N.tmp``, ``step-N.old``): never read, never counted."""
    for p in (Path(out) / "checkpoints").glob("step-*"):
        if not _DONE.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_state(state: dict, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except RuntimeError as e:  # torch.save's error for a short write says only where it stopped
        raise B4MError(f"{path}: could not write ({first_line(e)}; is the disk full?)") from e


def _publish(tmp: Path, final: Path) -> None:
    """Rename the written ``tmp`` folder to ``final`` (an older ``final``, e.g. a damaged one resumed past, is moved
    aside first and removed after) and fsync the folder that holds them."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    out: Path,
    step: int,
    model: DiffusionModel,
    plp: PLPConfig | None,
    role: str,
    optimizer,
    state: dict,
    objective: Objective | None = None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically (a temp folder, then rename); the previous checkpoint survives.

    Raises:
        B4MError: The checkpoint could not be written (a full disk, a file-size limit): one line naming the folder
            and the checkpoint that is kept. Nothing of the failed one is left.
    """
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if objective is not None:
            written = tmp / "objective.safetensors"
            save_safetensors(objective.state_dict(), written, {"objective": objective.name})
        else:
            written = tmp / "adapter.b4m.safetensors"
            save_adapter(adapter_from_model(model.denoiser, plp, role), written)
        files = {written.name: _sha256(written)}
        _write_state({"optimizer": optimizer.state_dict(), **state, "files": files}, tmp / "state.pt")
        fsync_path(tmp)
        _publish(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception) or isinstance(e, Interrupted):
            raise
        if isinstance(e, OSError):
            reason = e.strerror or str(e)
        else:  # a B4MError of one of the files (named without the temporary folder), or another library's
            reason = str(e).replace(f"{tmp}{os.sep}", "") if isinstance(e, B4MError) else first_line(e)
        kept = latest_checkpoint(out)
        keeps = f"the previous one is kept ({kept})" if kept else "no earlier checkpoint exists (--resume starts over)"
        raise B4MError(f"{final.parent}: could not write the checkpoint of step {step} ({reason}); {keeps}") from e
    return final


# Settings that may change between sessions of one run (e.g. resume with the low-memory preset on a smaller GPU).
SESSION_KEYS = (
    "steps",
    "checkpoint_every",
    "checkpoint_minutes",
    "keep_checkpoints",
    "check_every",
    "validate_every",
    "tensorboard",
    "gradient_checkpointing",
    "fused_optimizer",
    "cuda_graphs",
    "fold_accumulation",
    "rows_per_forward",
    "speed",
)


def fingerprint(config: TrainConfig, sets: list[TrainSet], objective: Objective | None = None) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    c = asdict(config)
    for k in SESSION_KEYS:
        c.pop(k)
    c["sets"] = [(s.name, len(s.latents), s.weight, s.main) for s in sets]
    if objective is not None:
        c["objective"] = objective.name
    return c


def read_checkpoint(ckpt: Path, objective: Objective | None = None) -> tuple[dict, dict]:
    """``(state, tensors)`` of a checkpoint, every file read and checked (``tensors``: the objective's state, or the
    adapter's ``{module: {part: tensor}}``); nothing is applied.

    Raises:
        DamagedCheckpoint: a file is missing, unreadable or not what ``state.pt`` says was written.
    """
    state_file = ckpt / "state.pt"
    if not state_file.is_file():
        raise DamagedCheckpoint(f"{ckpt}: not a b4m checkpoint (no state.pt)")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        saved = json.loads(state["fingerprint"])
        step, _, _ = int(state["step"]), state["optimizer"], state["generator"]
        if not isinstance(saved, dict) or step < 0:
            raise ValueError("not a b4m checkpoint state")
    except Exception as e:  # torch.load: RuntimeError, EOFError, UnpicklingError…; a state without its keys
        raise DamagedCheckpoint(f"{state_file}: unreadable ({first_line(e)})") from None
    name = "objective.safetensors" if objective is not None else "adapter.b4m.safetensors"
    file = ckpt / name
    digest = state.get("files", {}).get(name)
    if digest is not None and (not file.is_file() or _sha256(file) != digest):
        raise DamagedCheckpoint(
            f"{file}: {'missing' if not file.is_file() else 'not the file state.pt was saved with'}"
        )
    try:
        tensors = load_safetensors(file)[0] if objective is not None else load_adapter(file).tensors
    except B4MError as e:
        raise DamagedCheckpoint(str(e)) from None
    return state, tensors


def restore(
    ckpt: Path,
    model: DiffusionModel,
    optimizer,
    g: torch.Generator,
    fingerprint: dict,
    objective: Objective | None = None,
) -> int:
    """Load checkpoint ``ckpt`` into the model (or objective), the optimizer and the generator; returns its step.

    Raises:
        DamagedCheckpoint: ``ckpt`` cannot be read back (see :func:`read_checkpoint`).
        B4MError: ``ckpt`` is of another configuration, or adapts other modules.
    """
    state, tensors = read_checkpoint(ckpt, objective)
    saved = {k: v for k, v in json.loads(state["fingerprint"]).items() if k not in SESSION_KEYS}
    now = json.loads(json.dumps(fingerprint, sort_keys=True))
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise B4MError(f"{ckpt}: checkpoint of another configuration ({', '.join(diff)} differ); not resumed")
    if objective is None:
        layers = plp_layers(model.denoiser)
        if sorted(layers) != sorted(tensors):
            raise B4MError(f"{ckpt}: the checkpoint adapts other modules than the model; not resumed")
    try:
        if objective is not None:
            objective.load_state_dict(tensors)
        else:
            with torch.no_grad():
                for name, layer in layers.items():
                    for part, tensor in tensors[name].items():
                        getattr(layer, part).copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # state.pt readable but not of this run's shapes
        raise DamagedCheckpoint(f"{ckpt / 'state.pt'}: does not fit the run ({first_line(e)})") from None
    return int(state["step"])


def resume_from(
    out: Path,
    resume: bool | Path,
    model: DiffusionModel,
    optimizer,
    g: torch.Generator,
    fingerprint: dict,
    objective: Objective | None = None,
) -> int:
    """Restore the newest good checkpoint of ``out`` (or the checkpoint ``resume`` names); returns its step.

    A damaged newest checkpoint is passed over for the newest good one, with one warning naming both; with no
    complete checkpoint at all (a run stopped before its first one) the run starts from step 0, with one warning.

    Raises:
        B4MError: checkpoints exist but none is good, or the checkpoint named is damaged or of other settings.
    """
    if resume is not True:
        return restore(Path(resume), model, optimizer, g, fingerprint, objective)
    candidates = checkpoints(out)[::-1]
    main = distributed.current().is_main
    if not candidates:
        if main:
            warnings.warn(f"{out}: --resume found no complete checkpoint; starting from step 0", stacklevel=3)
        return 0
    damaged = []
    for ckpt in candidates:
        try:
            step = restore(ckpt, model, optimizer, g, fingerprint, objective)
        except DamagedCheckpoint as e:
            damaged.append(f"{ckpt.name}: {str(e).removeprefix(str(ckpt)).lstrip('/: ')}")
            continue
        if damaged and main:
            warnings.warn(
                f"{out / 'checkpoints'}: damaged ({'; '.join(damaged)}); resuming from {ckpt.name}", stacklevel=3
            )
        return step
    raise B4MError(
        f"{out / 'checkpoints'}: no good checkpoint to resume from ({'; '.join(damaged)}); --overwrite starts again"
    )


class Stopper:
    """When the loop writes a checkpoint besides every ``checkpoint_every`` steps, and when it stops early.

    - every ``minutes`` of training (0: never), so a long run loses little to a crash whatever its step time;
    - at the end of the step in which SIGINT (Ctrl-C) or SIGTERM (a batch scheduler's notice) arrived: the loop
      writes a checkpoint and raises :class:`~b4m.errors.Interrupted`. A second signal stops at once
      (the checkpoint being written, if any, is dropped whole: writes are atomic).

    Handlers are installed only while training (``with Stopper(...)``), only in the main thread, and the previous
    ones come back after. With several processes the ranks agree at the loss reads (one small all-reduce), so every
    rank stops, or writes a timed checkpoint, at the same step; rank 0's clock decides the timed ones.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, minutes: float, describe_last=lambda: None):
        self.seconds = minutes * 60
        self.last = time.monotonic()
        self.signum: int | None = None
        self.step = 0
        self._last_good = describe_last  # the newest complete checkpoint (for the message of a forced stop)
        self._previous: dict = {}

    def __enter__(self) -> Stopper:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:  # the second one: stop now
            last = self._last_good()
            where = f"the last checkpoint is {last}" if last else "no checkpoint was written"
            raise Interrupted(f"stopped at once by a second {name} after step {self.step}; {where}", signum)
        self.signum = signum
        if distributed.current().is_main:
            msg = f"\n{name}: stopping at the end of this step, with a checkpoint ({name} again: stop now)\n"
            with contextlib.suppress(OSError):
                os.write(2, msg.encode())  # not print: no re-entrant call into a stream being written

    def poll(self, step: int, read: bool, device: torch.device) -> tuple[bool, bool]:
        """``(stop, timed)`` after ``step``: a signal arrived; ``minutes`` have passed since the last checkpoint. With
        several processes, only at loss reads (``read``), agreed over the ranks."""
        self.step = step
        timed = self.seconds > 0 and time.monotonic() - self.last >= self.seconds
        dist = distributed.current()
        if not dist.enabled:
            return self.signum is not None, timed
        if not read:
            return False, False
        flags = [float(self.signum == s) for s in self.SIGNALS] + [float(timed and dist.is_main)]
        agreed = torch.tensor(flags, device=device)
        dist.all_reduce_sum([agreed])
        got = agreed.tolist()
        if self.signum is None and any(got[:-1]):  # another rank's signal: stop with it
            self.signum = int(next(s for s, n in zip(self.SIGNALS, got, strict=False) if n))
        return any(got[:-1]), got[-1] > 0

    def checkpointed(self) -> None:
        self.last = time.monotonic()
