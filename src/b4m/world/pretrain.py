"""``b4m world pretrain``: train the world's base model on renders of known contents × known styles.

Novel contents and styles are never rendered, and a fixed fraction of the known content × style combinations is held
out (never shown together), so the quality bar can be measured on combinations the model composes itself. The
renders are made once (deterministic, in parallel) and kept on the device as uint8; every step draws a batch, noise
and timesteps from one seeded generator whose state is checkpointed, so ``--resume`` continues exactly.

The training pieces are diffusers': the lr schedule (``get_cosine_schedule_with_warmup``), the EMA of the weights
(``EMAModel``) and the min-SNR-γ loss weights (``compute_snr``, weighted as diffusers' ``train_text_to_image.py``
does). Their states go into the checkpoint with the optimizer's.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from torch.optim.lr_scheduler import LambdaLR

from ..errors import B4MError, first_line
from ..files import atomic_path
from ..training.config import resolve_precision
from .captions import caption
from .catalog import Catalog, default_catalog
from .model import WorldModel, WorldModelConfig
from .render import random_scene, render_array


@dataclass
class PretrainConfig:
    resolution: int = 32
    steps: int = 20_000
    batch_size: int = 256
    lr: float = 5e-4
    warmup: int = 500  # linear warm-up, then a cosine decay to 0 at ``steps``
    snr_gamma: float = 5.0  # min-SNR-γ loss weighting (Hang et al. 2023); 0 turns it off
    ema: float = 0.999
    caption_dropout: float = 0.1  # share of captions replaced by "" (teaches the unconditional model for CFG)
    dataset_size: int = 200_000
    holdout_fraction: float = 0.15  # of known content × style combinations, never rendered together
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 100
    mixed_precision: str = "auto"
    compile: bool = False
    workers: int = 0  # 0: all CPU cores
    max_seconds: float = 0.0  # stop (checkpointed, resumable) after this much training time; 0: no limit
    stop_at: int = 0  # stop (checkpointed, resumable) after this step, schedule unchanged; 0: run to ``steps``


def holdout_combinations(catalog: Catalog, fraction: float, seed: int) -> set[tuple[str, str]]:
    """The known (content, style) pairs pretraining never shows together (a deterministic choice)."""
    pairs = [(c.name, s.name) for c in catalog.known_contents for s in catalog.known_styles]
    rng = np.random.default_rng([seed, 7])
    picked = rng.choice(len(pairs), size=round(fraction * len(pairs)), replace=False)
    return {pairs[i] for i in sorted(picked)}


def _render_chunk(args: tuple) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    seed, n, resolution, holdout = args
    catalog = default_catalog()
    rng = np.random.default_rng(seed)
    known_c = [c.name for c in catalog.known_contents]
    known_s = [s.name for s in catalog.known_styles]
    images = np.empty((n, resolution, resolution, 3), np.uint8)
    captions, pairs = [], []
    for i in range(n):
        while True:
            scene = random_scene(rng, catalog, known_c, known_s)
            if (scene.content, scene.style) not in holdout:
                break
        images[i] = render_array(scene, catalog, resolution)
        captions.append(caption(scene, rng))
        pairs.append((scene.content, scene.style))
    return images, captions, pairs


def render_dataset(
    n: int, resolution: int, seed: int, holdout: set[tuple[str, str]], workers: int = 0
) -> tuple[np.ndarray, list[str]]:
    """``n`` renders and their captions, made in parallel chunks (the result does not depend on ``workers``)."""
    chunk = 2048
    jobs = [
        (seed * 1_000_003 + i, min(chunk, n - i * chunk), resolution, holdout) for i in range(math.ceil(n / chunk))
    ]
    workers = workers or mp.cpu_count()
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(j) for j in jobs]
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


def lr_schedule(optimizer: torch.optim.Optimizer, config: PretrainConfig) -> LambdaLR:
    """Linear warm-up over ``config.warmup`` steps, then a cosine decay to 0 at ``config.steps`` (diffusers').

    Stepped after each optimizer step, as diffusers' training scripts do: optimizer step k (from 1) uses the factor
    of k - 1, so the first step has lr 0 when there is a warm-up.
    """
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=config.warmup, num_training_steps=config.steps)


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample min-SNR-γ loss weights (Hang et al. 2023) exactly as diffusers' ``train_text_to_image.py`` computes
    them: min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v-prediction; all ones when γ is 0."""
    if gamma <= 0:
        return torch.ones(len(timesteps), device=timesteps.device)
    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "epsilon":
        weights = weights / snr
    elif scheduler.config.prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    return weights


def cached_dataset(
    config: PretrainConfig, holdout: set[tuple[str, str]], folder: Path
) -> tuple[np.ndarray, list[str], float]:
    """The renders and captions, made once and kept in ``folder`` (a resumed run loads them: no second render)."""
    key = f"{config.dataset_size}-{config.resolution}-{config.seed}-{config.holdout_fraction}"
    images_file, captions_file = folder / f"data-{key}.npy", folder / f"data-{key}.json"
    t0 = time.perf_counter()
    if images_file.exists() and captions_file.exists():
        return np.load(images_file), json.loads(captions_file.read_text()), time.perf_counter() - t0
    images, captions = render_dataset(config.dataset_size, config.resolution, config.seed, holdout, config.workers)
    with atomic_path(captions_file) as tmp:
        tmp.write_text(json.dumps(captions))
    with atomic_path(images_file) as tmp, open(tmp, "wb") as f:
        np.save(f, images)
    return images, captions, time.perf_counter() - t0


def pretrain(
    config: PretrainConfig,
    out: str | Path,
    *,
    device: str | None = None,
    resume: bool = False,
    model_config: WorldModelConfig | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> WorldModel:
    """Train the world model; writes ``out/model`` (EMA weights), ``out/pretrain.json`` and checkpoints."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    catalog = default_catalog()
    holdout = holdout_combinations(catalog, config.holdout_fraction, config.seed)
    images, captions, t_render = cached_dataset(config, holdout, out)

    torch.manual_seed(config.seed)
    model = WorldModel(model_config or WorldModelConfig(resolution=config.resolution)).to(device)
    ids = model.tokens(captions).to(device)
    empty = model.tokens([""]).to(device)
    data = torch.from_numpy(images).to(device)  # uint8 (N, H, W, 3), on the device once
    params = [*model.denoiser.parameters(), *model.text_encoder.parameters()]
    # EMA with warm-up (a fixed 0.999 would keep 0.999^N of the random init: 16% after 1,800 steps). diffusers' decay
    # min(ema, (1 + k)/(10 + k)) counts optimizer steps from k = 0 (the first step copies the weights): one step
    # later than the hand-written min(ema, (1 + step)/(10 + step)), step from 1, that it replaces. The shipped
    # weights (b4m/world/weights) were trained with that older formula (and a linear lr decay, not the cosine).
    ema = EMAModel(params, decay=config.ema, foreach=True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, fused=device == "cuda")
    schedule = lr_schedule(opt, config)
    g = torch.Generator().manual_seed(config.seed)
    start = 0
    ckpt = out / "checkpoint.pt"
    if resume:
        if not ckpt.exists():
            raise B4MError(f"{out}: --resume given but there is no checkpoint.pt")
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if state["config"] != _resume_key(config):
            raise B4MError(f"{ckpt}: written with other pretraining settings; not resumed")
        with torch.no_grad():
            for p, sp in zip(params, state["params"], strict=True):
                p.copy_(sp)
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["lr_schedule"])  # its step count; the curve is rebuilt from --steps
        g.set_state(state["generator"].cpu())  # map_location moved it to the device
        start = state["step"]

    precision = resolve_precision(config.mixed_precision, torch.device(device))
    amp = dict(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    denoiser = torch.compile(model.denoiser) if config.compile else model.denoiser
    compiled = config.compile
    model.denoiser.train()
    model.text_encoder.train()
    log = _previous_log(out) if start else []
    running, counted = torch.zeros((), device=device), 0
    t_train = time.perf_counter()
    step = start
    for step in range(start + 1, config.steps + 1):
        idx = torch.randint(0, len(data), (config.batch_size,), generator=g)
        drop = torch.rand(config.batch_size, generator=g) < config.caption_dropout
        t = torch.randint(0, model.num_train_timesteps, (config.batch_size,), generator=g)
        noise = torch.randn(config.batch_size, 3, config.resolution, config.resolution, generator=g)
        idx, drop, t, noise = idx.to(device), drop.to(device), t.to(device), noise.to(device)
        x0 = data[idx].permute(0, 3, 1, 2).float() / 127.5 - 1
        tok = torch.where(drop[:, None], empty, ids[idx])
        with torch.autocast(**amp):
            ctx = model.text_encoder(tok)
            noisy = model.add_noise(x0, noise, t)
            try:
                pred = denoiser(noisy, t, encoder_hidden_states=ctx).sample
            except Exception as e:  # a compile failure shows on the first call: fall back to eager, once
                if not compiled or step != start + 1:
                    raise
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); training uncompiled", stacklevel=1)
                denoiser, compiled = model.denoiser, False
                pred = denoiser(noisy, t, encoder_hidden_states=ctx).sample
            per_sample = (pred.float() - model.target(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
            weights = min_snr_weights(model.train_scheduler, t, config.snr_gamma)
            loss = (per_sample * weights).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        ema.step(params)
        running += loss.detach()
        counted += 1
        if step % config.log_every == 0 or step == config.steps:
            value = running.item() / counted  # a resumed run's first line averages fewer steps
            if not math.isfinite(value):
                raise B4MError(f"pretraining loss became NaN/Inf before step {step}; the last checkpoint is {ckpt}")
            running.zero_()
            counted = 0
            log.append((step, value, round(time.perf_counter() - t_train, 1)))
            if progress:
                progress(step, config.steps, value)
        out_of_time = (config.max_seconds > 0 and time.perf_counter() - t_train > config.max_seconds) or (
            step == config.stop_at
        )
        if step % config.checkpoint_every == 0 or step == config.steps or out_of_time:
            _save_checkpoint(ckpt, params, ema, opt, schedule, g, step, config)
        if out_of_time:
            break

    seconds = time.perf_counter() - t_train
    steps_per_s = (step - start) / max(seconds, 1e-9)
    ema.copy_to(params)  # the shipped weights are the EMA
    model.denoiser.eval()
    model.text_encoder.eval()
    model.save(out / "model")
    with atomic_path(out / "model" / "holdout.json") as tmp:  # the quality bar is measured on these
        tmp.write_text(json.dumps({"seed": config.seed, "held_out": sorted(holdout)}, indent=1))
    sessions = _previous(out, "sessions") if start else []
    sessions.append(
        {
            "device": torch.cuda.get_device_name() if device == "cuda" else str(device),
            "from_step": start,
            "to_step": step,
            "data_seconds": round(t_render, 1),
            "train_seconds": round(seconds, 1),
            "steps_per_second": round(steps_per_s, 2),
            "compiled": compiled,
        }
    )
    record = {
        "config": asdict(config),
        "step": step,
        "finished": step >= config.steps,
        "train_seconds_total": round(sum(s["train_seconds"] for s in sessions), 1),
        "sessions": sessions,
        "log": log,
        "holdout": sorted(holdout),
    }
    with atomic_path(out / "pretrain.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return model


def _previous(out: Path, key: str) -> list:
    """A list from an earlier ``pretrain.json`` of this run (resumed runs keep their history)."""
    try:
        return list(json.loads((out / "pretrain.json").read_text()).get(key, []))
    except (OSError, ValueError):
        return []


def _previous_log(out: Path) -> list:
    return [tuple(row) for row in _previous(out, "log")]


_MAY_CHANGE = ("steps", "checkpoint_every", "log_every", "workers", "max_seconds", "stop_at", "compile")


def _resume_key(config: PretrainConfig) -> str:
    """The settings a resumed run must share (step counts, logging and worker counts may change)."""
    keep = {k: v for k, v in asdict(config).items() if k not in _MAY_CHANGE}
    return json.dumps(keep, sort_keys=True)


def _save_checkpoint(
    path: Path, params, ema: EMAModel, opt, schedule: LambdaLR, g, step: int, config: PretrainConfig
) -> None:
    state = {
        "params": [p.detach() for p in params],
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_schedule": schedule.state_dict(),
        "generator": g.get_state(),
        "step": step,
        "config": _resume_key(config),
    }
    try:  # atomic_path: a temporary name, fsynced, renamed; an OSError is already one line naming the file
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except RuntimeError as e:  # torch.save's short write (a full disk) says only where it stopped
        raise B4MError(f"{path}: could not write the checkpoint ({first_line(e)}); the previous one is kept") from e
