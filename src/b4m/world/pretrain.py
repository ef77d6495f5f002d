"""``b4m world pretrain``: train the world's base model on renders of known contents × known styles.

Novel contents and styles are never rendered, and a fixed fraction of the known content × style combinations is held
out (never shown together), so the quality bar can be measured on combinations the model composes itself. The
renders are made once (deterministic, in parallel) and kept on the device as uint8; every step draws a batch, noise
and timesteps from one seeded generator whose state is checkpointed, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import B4MError
from ..train import resolve_precision
from .captions import caption
from .catalog import Catalog, default_catalog
from .model import WorldModel, WorldModelConfig
from .render import random_scene, render_array


@dataclass
class PretrainConfig:
    resolution: int = 32
    steps: int = 20_000
    batch_size: int = 256
    lr: float = 3e-4
    warmup: int = 500
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


def _lr(step: int, config: PretrainConfig) -> float:
    return config.lr * min(1.0, step / max(config.warmup, 1))


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
    t0 = time.perf_counter()
    images, captions = render_dataset(config.dataset_size, config.resolution, config.seed, holdout, config.workers)
    t_render = time.perf_counter() - t0

    torch.manual_seed(config.seed)
    model = WorldModel(model_config or WorldModelConfig(resolution=config.resolution)).to(device)
    ids = model.tokens(captions).to(device)
    empty = model.tokens([""]).to(device)
    data = torch.from_numpy(images).to(device)  # uint8 (N, H, W, 3), on the device once
    params = [*model.denoiser.parameters(), *model.text_encoder.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, fused=device == "cuda")
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
            for p, e, sp, se in zip(params, ema, state["params"], state["ema"], strict=True):
                p.copy_(sp)
                e.copy_(se)
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        start = state["step"]

    precision = resolve_precision(config.mixed_precision, torch.device(device))
    amp = dict(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    denoiser = torch.compile(model.denoiser) if config.compile else model.denoiser
    model.denoiser.train()
    model.text_encoder.train()
    log = []
    running = torch.zeros((), device=device)
    t_train = time.perf_counter()
    for step in range(start + 1, config.steps + 1):
        idx = torch.randint(0, len(data), (config.batch_size,), generator=g)
        drop = torch.rand(config.batch_size, generator=g) < config.caption_dropout
        t = torch.randint(0, model.num_train_timesteps, (config.batch_size,), generator=g)
        noise = torch.randn(config.batch_size, 3, config.resolution, config.resolution, generator=g)
        idx, drop, t, noise = idx.to(device), drop.to(device), t.to(device), noise.to(device)
        x0 = data[idx].permute(0, 3, 1, 2).float() / 127.5 - 1
        tok = torch.where(drop[:, None], empty, ids[idx])
        for group in opt.param_groups:
            group["lr"] = _lr(step, config)
        with torch.autocast(**amp):
            ctx = model.text_encoder(tok)
            pred = denoiser(model.add_noise(x0, noise, t), t, encoder_hidden_states=ctx).sample
            loss = F.mse_loss(pred.float(), model.target(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            # EMA with warm-up: a fixed 0.999 would keep 0.999^N of the random init (16% after 1,800 steps).
            decay = min(config.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, params, 1 - decay)
        running += loss.detach()
        if step % config.log_every == 0 or step == config.steps:
            value = running.item() / (config.log_every if step % config.log_every == 0 else step % config.log_every)
            if not math.isfinite(value):
                raise B4MError(f"pretraining loss became NaN/Inf before step {step}; the last checkpoint is {ckpt}")
            running.zero_()
            log.append((step, value, round(time.perf_counter() - t_train, 1)))
            if progress:
                progress(step, config.steps, value)
        if step % config.checkpoint_every == 0 or step == config.steps:
            _save_checkpoint(ckpt, params, ema, opt, g, step, config)

    steps_per_s = (config.steps - start) / max(time.perf_counter() - t_train, 1e-9)
    with torch.no_grad():  # the shipped weights are the EMA
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    model.denoiser.eval()
    model.text_encoder.eval()
    model.save(out / "model")
    record = {
        "config": asdict(config),
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "render_seconds": round(t_render, 1),
        "steps_per_second": round(steps_per_s, 2),
        "log": log,
        "holdout": sorted(holdout),
    }
    (out / "pretrain.json").write_text(json.dumps(record, indent=1))
    return model


def _resume_key(config: PretrainConfig) -> str:
    """The settings a resumed run must share (step counts, logging and worker counts may change)."""
    keep = {k: v for k, v in asdict(config).items() if k not in ("steps", "checkpoint_every", "log_every", "workers")}
    return json.dumps(keep, sort_keys=True)


def _save_checkpoint(path: Path, params, ema, opt, g, step: int, config: PretrainConfig) -> None:
    tmp = path.with_suffix(".tmp")
    state = {
        "params": [p.detach() for p in params],
        "ema": ema,
        "optimizer": opt.state_dict(),
        "generator": g.get_state(),
        "step": step,
        "config": _resume_key(config),
    }
    try:
        torch.save(state, tmp)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise B4MError(f"{path}: could not write the checkpoint ({e.strerror or e}); the previous one is kept") from e
    shutil.move(tmp, path)
