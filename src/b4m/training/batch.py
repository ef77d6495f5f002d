"""One micro-step's inputs: which images of every set, their noise and timesteps, drawn from a CPU generator whose
state the checkpoints keep (so a resumed run draws what the uninterrupted one would have), and the target the
prediction is fitted to; copied to the device without stopping the host (:data:`~b4m.device.async_copies`).
The loop (:mod:`b4m.training.loop`) turns a :class:`Batch` into a loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..device import async_copies, to_device_async
from ..models.base import Conditioning, DiffusionModel
from . import distributed
from .config import TrainConfig
from .objective import Objective
from .sets import TrainSet


@dataclass
class Batch:
    """One micro-step's inputs on the device: noisy latents, timesteps, conditioning, the target, per-row loss
    weights, and how many leading rows come from main sets (routing)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditioning
    target: torch.Tensor
    weights: torch.Tensor
    n_main: int
    routed: bool = False  # clean routing applies: main and auxiliary rows both in the micro-step


def split_batch(batch: Batch, rows: int) -> list[Batch]:
    """``batch`` as consecutive batches of at most ``rows`` rows (0: the batch itself), each with its own count of
    main rows and the whole batch's routing: their weighted losses add up to the batch's, their gradients too."""
    n = len(batch.noisy)
    if not rows or rows >= n:
        return [batch]
    parts = []
    for a in range(0, n, rows):
        b = min(a + rows, n)
        main = min(max(batch.n_main - a, 0), b - a)
        tensors = (batch.noisy[a:b], batch.timesteps[a:b], batch.cond[a:b], batch.target[a:b], batch.weights[a:b])
        parts.append(Batch(*tensors, main, batch.routed))
    return parts


def draw_timesteps(n: int, num_train_timesteps: int, config: TrainConfig, g: torch.Generator) -> torch.Tensor:
    """``n`` training timesteps (noise levels 0 … T-1, higher is noisier) from ``g``: uniform, or biased toward
    high or low noise by ``config.timestep_bias`` (a uniform u mapped to ``(1 - u^k)·T`` or ``u^k·T``)."""
    if config.timestep_bias == "none":
        return torch.randint(0, num_train_timesteps, (n,), generator=g)
    u = torch.rand(n, generator=g, dtype=torch.float64) ** config.timestep_bias_exponent
    if config.timestep_bias == "high-noise":
        u = 1.0 - u
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def _draw_rows(
    ordered: list[TrainSet], n: int, num_train_timesteps: int, config: TrainConfig, g: torch.Generator
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One micro-step's draws from ``g``, in this order: ``n`` picks per set, the noise of every row, the timesteps."""
    picks = [torch.randint(0, len(s.latents), (n,), generator=g) for s in ordered]
    shape = (n * len(ordered), *ordered[0].latents.shape[1:])
    noise = torch.randn(shape, generator=g)
    return picks, noise, draw_timesteps(shape[0], num_train_timesteps, config, g)


def _gather(
    ordered: list[TrainSet], picks: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, Conditioning]:
    """The picked rows of every set's latents and conditioning, set after set, on ``device``.

    With :data:`~b4m.device.async_copies` on (the default) each tensor is indexed where it lives (the loop keeps
    the sets on the model's device), with the picks copied there once per device by
    :func:`~b4m.device.to_device_async`: indexing a GPU tensor with CPU indices copies them with a blocking copy,
    which waits for the GPU. Sets kept on the CPU are indexed there, then copied. With it off, as before 2026-12-07:
    CPU picks index every tensor, then a plain ``.to(device)``. The same values either way."""
    if not async_copies:
        latents = torch.cat([s.latents[i] for s, i in zip(ordered, picks, strict=True)]).to(device)
        return latents, Conditioning.cat([s.cond[i] for s, i in zip(ordered, picks, strict=True)]).to(device)
    sizes = [len(i) for i in picks]
    on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def take(t: torch.Tensor, j: int) -> torch.Tensor:
        if t.device not in on:
            on[t.device] = to_device_async(torch.cat(picks), t.device).split(sizes)
        return t[on[t.device][j]]

    latents = torch.cat([take(s.latents, j) for j, s in enumerate(ordered)])
    cond = Conditioning.cat([s.cond.apply(lambda t, j=j: take(t, j)) for j, s in enumerate(ordered)])
    return to_device_async(latents, device), cond.apply(lambda t: to_device_async(t, device))


def draw_batch(
    model: DiffusionModel,
    sets: list[TrainSet],
    config: TrainConfig,
    g: torch.Generator,
    objective: Objective | None = None,
    draws: int = 1,
) -> Batch:
    """Draw one micro-step: ``batch_size`` images of every set, main sets first, their noise and timesteps (all from
    ``g``), and the target (the diffusion target, or the ``objective``'s).

    ``draws > 1`` (a folded step, ``fold_accumulation``): what ``draws`` micro-steps of ``batch_size // draws``
    images per set draw from ``g``, in their order, as one batch (each set's rows together; each row weighing
    ``1 / draws`` of a micro-step's): folding changes how a step runs, not what it trains on.

    With several processes (:mod:`b4m.training.distributed`) every rank draws the whole batch and keeps its share of
    the rows of every set, weighted as in the whole batch: the ranks' losses add up to the one-process loss."""
    ordered = [s for s in sets if s.main] + [s for s in sets if not s.main]
    n = config.batch_size // draws
    drawn = [_draw_rows(ordered, n, model.num_train_timesteps, config, g) for _ in range(draws)]
    picks = [torch.cat([d[0][j] for d in drawn]) for j in range(len(ordered))]  # each set's picks, draw after draw

    def by_set(per_draw: list[torch.Tensor]) -> torch.Tensor:  # rows of each draw (set after set) -> set after set
        return torch.cat([x[j * n : (j + 1) * n] for j in range(len(ordered)) for x in per_draw])

    device = model.device
    latents, cond = _gather(ordered, picks, device)
    noise = to_device_async(by_set([d[1] for d in drawn]), device, latents.dtype)
    timesteps = to_device_async(by_set([d[2] for d in drawn]), device)
    weights = torch.cat([torch.full((config.batch_size,), s.weight / config.batch_size) for s in ordered])
    weights = to_device_async(weights, device)
    n_main = config.batch_size * sum(s.main for s in sets)
    order = [i for i, s in enumerate(sets) if s.main] + [i for i, s in enumerate(sets) if not s.main]
    sources = [i for i in order for _ in range(config.batch_size)]
    dist = distributed.current()
    rows = dist.shard_rows(len(ordered), config.batch_size)
    if rows is not None:  # this rank's share of every set's rows: main rows still first
        rows_here = to_device_async(rows, device)
        latents, cond, weights, noise, timesteps = (x[rows_here] for x in (latents, cond, weights, noise, timesteps))
        sources = [sources[i] for i in rows.tolist()]
        n_main //= dist.world_size
    noisy = model.add_noise(latents, noise, timesteps)
    if objective is None:
        target = model.target(latents, noise, timesteps)
    else:
        with torch.no_grad():
            target = objective.target(model, noisy, timesteps, cond, sources)
    return Batch(noisy, timesteps, cond, target, weights, n_main, 0 < n_main < len(noisy))
