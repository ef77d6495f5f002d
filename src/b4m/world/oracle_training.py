"""Training a world oracle: augmentations that mimic what generators get wrong, an endless stream of fresh renders of
every content and style (rendered in background processes), the training loop, and the accuracy on fresh renders
(:mod:`b4m.world.oracle` holds the oracle itself)."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import B4MError
from .catalog import Catalog
from .oracle import ATTRIBUTES, Oracle, OracleConfig, check_classes, class_names, evaluate, scene_labels
from .render import random_scene, render_batch

# ----------------------------------------------------------------------------------------------------------------
# Augmentation


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (pixels) per image; sigma 0 leaves an image unchanged."""
    b, c, h, w = x.shape
    r = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (b*c, 2r+1)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def _jpeg_like(x: torch.Tensor, factor: float) -> torch.Tensor:
    """JPEG-ish loss of detail: chroma at half resolution, luma down- and up-sampled by ``factor``."""
    h, w = x.shape[-2:]
    m = torch.tensor([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]], device=x.device)
    ycc = torch.einsum("ij,bjhw->bihw", m.to(x.dtype), x)
    small = (max(1, round(h * factor)), max(1, round(w * factor)))
    y = F.interpolate(ycc[:, :1], size=small, mode="bilinear", antialias=True, align_corners=False)
    cc = F.avg_pool2d(ycc[:, 1:], 2, ceil_mode=True)
    ycc = torch.cat(
        [
            F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False),
            F.interpolate(cc, size=(h, w), mode="bilinear", align_corners=False),
        ],
        dim=1,
    )
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(m).to(x.dtype), ycc)


def augment(x: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Perturb a batch (N, 3, H, W) in [0, 1] the ways generators go wrong; returns a new batch in [0, 1].

    Per image, each with its own chance: a small shift (up to 4% of the side) and rescale (±6%), Gaussian blur,
    JPEG-like smoothing, colour jitter (brightness, contrast, saturation, per-channel gain and offset) and Gaussian
    noise. ``strength`` scales every amplitude. The same generator state gives the same result; the generator must
    live on ``x``'s device.
    """
    if strength <= 0:
        return x.clone()
    b, _, h, _ = x.shape
    s = float(strength)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=generator, device=x.device, dtype=x.dtype)

    def chance(p: float) -> torch.Tensor:
        return torch.rand(b, generator=generator, device=x.device) < p

    # Geometry: grid units span 2 per side, so a shift of 0.08 moves the picture by 4% of the side.
    moved = chance(0.5)[:, None]
    shift = torch.where(moved, uniform(-0.08 * s, 0.08 * s, b, 2), 0.0)
    scale = torch.where(moved[:, 0], 1 + uniform(-0.06 * s, 0.06 * s, b), 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # Blur (sigma in pixels of a 64 px image) and JPEG-like smoothing (one factor per batch).
    sigma = torch.where(chance(0.3), uniform(0.3, 1.0 * s, b), 0.0) * (h / 64)
    x = _blur(x, sigma)
    factor = float(uniform(1 - 0.45 * s, 1 - 0.15 * s, 1).clamp(0.25, 1))
    x = torch.where(chance(0.2)[:, None, None, None], _jpeg_like(x, factor), x)

    # Colour: saturation, contrast around the image mean, brightness, per-channel gain and offset.
    on = chance(0.8)[:, None, None, None].to(x.dtype)
    gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)[:, None, None]).sum(1, True)
    sat = 1 + on * uniform(-0.2 * s, 0.2 * s, b, 1, 1, 1)
    x = gray + (x - gray) * sat
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1 + on * uniform(-0.15 * s, 0.15 * s, b, 1, 1, 1)
    x = mean + (x - mean) * contrast
    gain = 1 + on * uniform(-0.06 * s, 0.06 * s, b, 3, 1, 1)
    offset = on * (uniform(-0.06 * s, 0.06 * s, b, 1, 1, 1) + uniform(-0.03 * s, 0.03 * s, b, 3, 1, 1))
    x = x * gain + offset

    # Gaussian noise.
    std = torch.where(chance(0.5), uniform(0.0, 0.04 * s, b), 0.0)[:, None, None, None]
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + std * noise).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# Training data: chunks of fresh renders, made ahead of time


_WORKER_CATALOG: Catalog | None = None


def _init_worker(catalog: Catalog) -> None:
    global _WORKER_CATALOG
    _WORKER_CATALOG = catalog
    torch.set_num_threads(1)


def _render_chunk(seed: int, n: int, resolution: int, catalog: Catalog | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` renders of random scenes over the whole catalog and their (n, 5) labels; deterministic in ``seed``."""
    catalog = catalog or _WORKER_CATALOG
    assert catalog is not None
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, catalog) for _ in range(n)]
    return render_batch(scenes, catalog, resolution), scene_labels(scenes, class_names(catalog))


def render_stream(catalog: Catalog, config: OracleConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless chunks of (uint8 images (n, R, R, 3), labels (n, 5)); chunk i is seeded by (seed, i).

    Chunks are rendered ahead in worker processes (or one background thread with ``workers=1``) while the caller
    trains; the sequence does not depend on the number of workers.
    """
    workers = config.workers or max(1, (os.cpu_count() or 2) - 1)
    executor: Executor
    if workers == 1:
        executor, extra = ThreadPoolExecutor(1), (catalog,)
    else:
        spawn = mp.get_context("spawn")
        executor, extra = ProcessPoolExecutor(workers, spawn, _init_worker, (catalog,)), ()

    def job(seed: int) -> Future:
        return executor.submit(_render_chunk, seed, config.chunk_size, config.resolution, *extra)

    seeds = (int(np.random.SeedSequence([config.seed, i]).generate_state(1)[0]) for i in range(2**62))
    pending: deque[Future] = deque(job(next(seeds)) for _ in range(workers + 1))
    try:
        while True:
            chunk = pending.popleft().result()
            pending.append(job(next(seeds)))
            yield chunk
    finally:
        for f in pending:
            f.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


def _lr(step: int, config: OracleConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, config.warmup))
    return config.lr * warm * 0.5 * (1 + math.cos(math.pi * step / config.steps))


def train_oracle(
    catalog: Catalog,
    config: OracleConfig | None = None,
    device: str | torch.device | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> Oracle:
    """Train an oracle on fresh renders of every content and style of ``catalog``; returns it in eval mode.

    ``progress(step, steps, mean loss)`` is called every ``config.log_every`` steps and at the end. The loss is the
    sum of the five heads' cross-entropies. Runs on the CPU in tests (tiny settings) and on a GPU for real (bf16).
    """
    config = config or OracleConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Oracle(config, class_names(catalog))
    model.to(device).train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.99),
    )
    g_cpu = torch.Generator().manual_seed(config.seed)  # batch order
    g_aug = torch.Generator(device=device).manual_seed(config.seed + 1)  # augmentations, on the device
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def batches(chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in chunks:
            images, labels = torch.from_numpy(images), torch.from_numpy(labels)
            for _ in range(config.reuse):
                order = torch.randperm(len(images), generator=g_cpu)
                for i in range(0, len(order) - config.batch_size + 1, config.batch_size):
                    idx = order[i : i + config.batch_size]
                    yield images[idx], labels[idx]

    running, count = torch.zeros((), device=device), 0
    chunks = render_stream(catalog, config)
    stream = batches(chunks)
    try:
        for step in range(config.steps):
            images, labels = next(stream)
            x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255
            x = augment(x, g_aug, config.augment)
            labels = labels.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = _lr(step, config)
            with torch.autocast(**amp):
                out = model(x)
            loss = sum(F.cross_entropy(out[a].float(), labels[:, j]) for j, a in enumerate(ATTRIBUTES))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            running += loss.detach()
            count += 1
            if progress and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
                value = running.item() / count
                if not math.isfinite(value):
                    raise B4MError(f"oracle training loss became NaN/Inf before step {step + 1}")
                progress(step + 1, config.steps, value)
                running.zero_()
                count = 0
    finally:
        chunks.close()  # stops the render workers
    return model.eval()


def fresh_render_accuracy(
    oracle: Oracle, catalog: Catalog, n: int = 2000, seed: int = 12345, batch_size: int = 256
) -> dict[str, float]:
    """Accuracy on ``n`` new random scenes over the whole catalog, rendered at the oracle's resolution."""
    check_classes(oracle.classes, catalog, "fresh_render_accuracy")
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, catalog) for _ in range(n)]
    return evaluate(oracle, render_batch(scenes, catalog, oracle.config.resolution), scenes, batch_size)


def save_record(path: str | Path, config: OracleConfig, train_seconds: float, accuracy: dict[str, float]) -> Path:
    """Beside the oracle file ``path``, the same name with ``.json``: its config, training time and fresh accuracy."""
    record = {"config": asdict(config), "train_seconds": round(train_seconds, 1), "fresh_render_accuracy": accuracy}
    out = Path(path).with_suffix(".json")
    out.write_text(json.dumps(record, indent=1))
    return out
