"""Checkpoints of a training run: ``checkpoints/step-N`` folders written atomically, found, pruned and restored
exactly (adapter or objective state, optimizer state, the CPU generator, the run's fingerprint)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..adapter.config import PLPConfig
from ..adapter.file import AdapterFile, adapter_from_model, load_adapter, save_adapter
from ..adapter.walker import plp_layers
from ..errors import B4MError
from ..files import load_safetensors, save_safetensors
from ..models.base import DiffusionModel
from .config import TrainConfig
from .objective import Objective
from .sets import TrainSet


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


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
    """Write ``checkpoints/step-N`` atomically (a temp folder, then rename); the previous checkpoint survives."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if objective is not None:
            save_safetensors(objective.state_dict(), tmp / "objective.safetensors", {"objective": objective.name})
        else:
            save_adapter(adapter_from_model(model.denoiser, plp, role), tmp / "adapter.b4m.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), **state}, tmp / "state.pt")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise B4MError(f"{final}: could not write the checkpoint ({e.strerror or e}); the previous one is kept") from e
    except B4MError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


def prune(out: Path, keep: int) -> None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# Settings that may change between sessions of one run (e.g. resume with the low-memory preset on a smaller GPU).
SESSION_KEYS = (
    "steps",
    "checkpoint_every",
    "keep_checkpoints",
    "check_every",
    "validate_every",
    "tensorboard",
    "gradient_checkpointing",
    "fused_optimizer",
    "cuda_graphs",
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


def restore(
    ckpt: Path,
    model: DiffusionModel,
    optimizer,
    g: torch.Generator,
    fingerprint: dict,
    objective: Objective | None = None,
) -> int:
    state_file = ckpt / "state.pt"
    if not state_file.exists():
        raise B4MError(f"{ckpt}: not a b4m checkpoint (no state.pt)")
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    saved = {k: v for k, v in json.loads(state["fingerprint"]).items() if k not in SESSION_KEYS}
    now = json.loads(json.dumps(fingerprint, sort_keys=True))
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise B4MError(f"{ckpt}: checkpoint of another configuration ({', '.join(diff)} differ); not resumed")
    if objective is not None:
        objective.load_state_dict(load_safetensors(ckpt / "objective.safetensors")[0])
    else:
        adapter: AdapterFile = load_adapter(ckpt / "adapter.b4m.safetensors")
        layers = plp_layers(model.denoiser)
        if sorted(layers) != adapter.modules:
            raise B4MError(f"{ckpt}: the checkpoint adapts other modules than the model; not resumed")
        with torch.no_grad():
            for name, layer in layers.items():
                for part, tensor in adapter.tensors[name].items():
                    getattr(layer, part).copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    g.set_state(state["generator"])
    return int(state["step"])
