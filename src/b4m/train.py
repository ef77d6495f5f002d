"""One training loop for every stage (content, style, make) and every baseline.

A stage hands the loop cached training sets (latents and text conditioning) and says how gradients are routed.
Each micro-step draws ``batch_size`` images from every set, runs them through the denoiser as one batch, and
weights the per-sample diffusion losses so that ``loss = Σ_set weight_set · mean(loss over the set's samples)``.
For a content run that is the paper's eq. 12: ``L_main + mean_i L_aux_i``.

Routing (``TrainConfig.routing``):

- ``clean`` (default): the owned half learns only from the main sets, the other half only from the auxiliary sets,
  in one forward and one backward (see :func:`b4m.plp.routing`).
- ``mixed``: the official code's behaviour: both halves learn from the whole loss, the other half at ``other_lr``
  (the official 10× lower lr).
- ``none``: both halves learn from the whole loss at ``lr`` (the make stage, baselines).

An :class:`Objective` replaces what trains and what the prediction is fitted to, for a run whose parameters are not
PLP halves and whose target is not the diffusion target (ZipLoRA's merger coefficients, fitted to the predictions of
the two LoRAs it merges: :mod:`b4m.baselines.ziplora`). Sampling, accumulation, mixed precision, the NaN stop,
checkpoints and exact resume stay this loop's.

Randomness (which images, noise, timesteps) comes from CPU generators whose state is checkpointed, so a resumed
run continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from . import distributed
from .adapter_file import AdapterFile, adapter_from_model, load_adapter, save_adapter
from .cuda_graphs import GraphedMicroStep
from .errors import B4MError, DivergedError
from .io_utils import load_safetensors, save_safetensors
from .models.base import Conditioning, DiffusionModel
from .optim import create_optimizer
from .plp import PLPConfig, plp_layers, routing

ROUTINGS = ("clean", "mixed", "none")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class TrainSet:
    """Cached training data of one source: latents and their conditioning (one row per image)."""

    name: str
    latents: torch.Tensor  # (N, C, h, w)
    cond: Conditioning  # N rows
    weight: float = 1.0  # the set's weight in the loss
    main: bool = True  # main sets feed the owned half under clean routing, the others the other half

    def __post_init__(self) -> None:
        if len(self.cond) != len(self.latents):
            raise B4MError(f"training set {self.name}: {len(self.latents)} latents but {len(self.cond)} captions")
        if len(self.latents) == 0:
            raise B4MError(f"training set {self.name} is empty")


@dataclass
class TrainConfig:
    """Settings of one training run (one stage). Defaults are the official B4M settings minus their bugs."""

    steps: int = 1000
    lr: float = 1e-4
    other_lr: float | None = None  # lr of the non-owned half under routing "mixed" (default lr / 10)
    routing: str = "clean"
    # lr of the up half (B) over the lr of the down half (D), every routing: LoRA+'s ratio (peft's
    # loraplus_lr_ratio). With the paper's assignment the content half is B, learned through the frozen C only.
    up_lr_ratio: float = 1.0
    owned: str | None = None  # "up" or "down": the half the main sets train (clean and mixed routing)
    batch_size: int = 1  # images per set per micro-step
    grad_accum: int = 4  # micro-steps per optimizer step
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    precondition: bool = False
    precond_reg: float = 1e-2
    precond_factors: str = "learned"
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it, else none
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more compute
    fused_optimizer: bool = False  # AdamW's fused kernel (one launch for all tensors) instead of its foreach path
    cuda_graphs: bool = False  # capture each micro-step's forward and backward as a CUDA graph (b4m.cuda_graphs)
    # Draw a step's grad_accum micro-steps as one batch: the same loss (each set's mean over the step's images),
    # one forward and backward instead of grad_accum; activations of all of them at once.
    fold_accumulation: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    check_every: int = 10  # steps between loss reads (NaN check, progress bar); no per-step .item()
    validate_every: int = 0  # 0: no validation images
    tensorboard: bool = False  # write loss and lr to out/tensorboard (needs the tensorboard package)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise B4MError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.owned not in (None, "up", "down"):
            raise B4MError(f"owned must be 'up' or 'down', got {self.owned!r}")
        if self.optimizer not in OPTIMIZERS:
            raise B4MError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.mixed_precision not in PRECISIONS:
            raise B4MError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if not self.up_lr_ratio > 0:
            raise B4MError(f"up_lr_ratio must be > 0, got {self.up_lr_ratio}")
        if not self.lr > 0:
            raise B4MError(f"lr must be > 0, got {self.lr}")
        if self.other_lr is not None and not self.other_lr >= 0:
            raise B4MError(f"other_lr must be at least 0, got {self.other_lr}")
        if not 0 <= self.seed < 2**63:
            raise B4MError(f"seed must be a whole number from 0, got {self.seed}")
        if self.validate_every < 0:
            raise B4MError(f"validate_every must be at least 0 (0: no validation images), got {self.validate_every}")
        for name in ("steps", "batch_size", "grad_accum", "check_every", "checkpoint_every"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise B4MError(f"{name} must be positive, got {getattr(self, name)}")


class Objective(Protocol):
    """What a run trains and fits the prediction to, when that is not the PLP halves and the diffusion target.

    ``name`` goes into the resume fingerprint. ``param_groups`` are the optimizer's. ``target`` is called under
    ``torch.no_grad()`` with the micro-step's batch and ``sources`` (for every row, the index in ``sets`` of the set
    it was drawn from) and returns what the prediction is fitted to. ``penalty`` is added to every micro-step's loss.
    ``state_dict``/``load_state_dict`` hold the trained tensors for checkpoints.
    """

    name: str

    def param_groups(self, config: TrainConfig) -> list[dict]: ...

    def target(
        self, model: DiffusionModel, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, sources
    ) -> torch.Tensor: ...

    def penalty(self) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    first_step_seconds: float  # includes warm-up (allocations, autotuning); the rest is steady state
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last check)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_dir(out: Path, step: int) -> Path:
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
    final = _checkpoint_dir(out, step)
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


def _prune(out: Path, keep: int) -> None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# The loop


# Settings that may change between sessions of one run (e.g. resume with the low-memory preset on a smaller GPU).
_SESSION_KEYS = (
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


def _fingerprint(config: TrainConfig, sets: list[TrainSet], objective: Objective | None = None) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    c = asdict(config)
    for k in _SESSION_KEYS:
        c.pop(k)
    c["sets"] = [(s.name, len(s.latents), s.weight, s.main) for s in sets]
    if objective is not None:
        c["objective"] = objective.name
    return c


def _param_groups(model: DiffusionModel, config: TrainConfig, objective: Objective | None = None) -> list[dict]:
    if objective is not None:
        return objective.param_groups(config)
    layers = plp_layers(model.denoiser).values()
    ups = [layer.up_learned for layer in layers]
    downs = [layer.down_learned for layer in layers]
    lr = {"up": config.lr * config.up_lr_ratio, "down": config.lr}
    if config.routing == "none":
        if config.up_lr_ratio == 1.0:
            return [{"params": [p for pair in zip(ups, downs, strict=True) for p in pair], "lr": config.lr}]
        return [{"params": ups, "lr": lr["up"]}, {"params": downs, "lr": lr["down"]}]
    other_half = "down" if config.owned == "up" else "up"
    other_lr = lr[other_half] if config.routing == "clean" else (config.other_lr or lr[other_half] / 10)
    owned, other = (ups, downs) if config.owned == "up" else (downs, ups)
    return [{"params": owned, "lr": lr[config.owned]}, {"params": other, "lr": other_lr}]


def make_optimizer(
    model: DiffusionModel, config: TrainConfig, objective: Objective | None = None
) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.SGD
    extra = {"fused": True} if config.fused_optimizer and config.optimizer == "adamw" else {}
    return create_optimizer(
        model.denoiser,
        cls,
        lr=config.lr,
        precondition=config.precondition,
        reg=config.precond_reg,
        factors=config.precond_factors,
        max_grad_norm=config.max_grad_norm,
        param_groups=_param_groups(model, config, objective),
        weight_decay=config.weight_decay,
        **extra,
    )


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


def draw_batch(
    model: DiffusionModel,
    sets: list[TrainSet],
    config: TrainConfig,
    g: torch.Generator,
    objective: Objective | None = None,
) -> Batch:
    """Draw one micro-step: ``batch_size`` images of every set, main sets first, their noise and timesteps (all from
    ``g``), and the target (the diffusion target, or the ``objective``'s).

    With several processes (:mod:`b4m.distributed`) every rank draws the whole batch and keeps its share of the rows
    of every set, weighted as in the whole batch: the ranks' losses add up to the one-process loss."""
    ordered = [s for s in sets if s.main] + [s for s in sets if not s.main]
    picks = [torch.randint(0, len(s.latents), (config.batch_size,), generator=g) for s in ordered]
    n_main = config.batch_size * sum(s.main for s in sets)
    device = model.device
    latents = torch.cat([s.latents[i] for s, i in zip(ordered, picks, strict=True)]).to(device)
    cond = Conditioning.cat([s.cond[i] for s, i in zip(ordered, picks, strict=True)]).to(device)
    weights = torch.cat([torch.full((config.batch_size,), s.weight / config.batch_size) for s in ordered]).to(device)
    noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
    timesteps = torch.randint(0, model.num_train_timesteps, (len(latents),), generator=g).to(device)
    order = [i for i, s in enumerate(sets) if s.main] + [i for i, s in enumerate(sets) if not s.main]
    sources = [i for i in order for _ in range(config.batch_size)]
    dist = distributed.current()
    rows = dist.shard_rows(len(ordered), config.batch_size)
    if rows is not None:  # this rank's share of every set's rows: main rows still first
        rows_here = rows.to(device)
        latents, cond, weights, noise, timesteps = (x[rows_here] for x in (latents, cond, weights, noise, timesteps))
        sources = [sources[i] for i in rows.tolist()]
        n_main //= dist.world_size
    noisy = model.add_noise(latents, noise, timesteps)
    if objective is None:
        target = model.target(latents, noise, timesteps)
    else:
        with torch.no_grad():
            target = objective.target(model, noisy, timesteps, cond, sources)
    return Batch(noisy, timesteps, cond, target, weights, n_main)


def batch_loss(
    model: DiffusionModel, batch: Batch, config: TrainConfig, objective: Objective | None = None
) -> torch.Tensor:
    """The weighted diffusion loss of a drawn batch (routing applied); with an ``objective``, plus its penalty."""
    route = config.routing == "clean" and 0 < batch.n_main < len(batch.noisy)
    with routing(model.denoiser, batch.n_main, config.owned) if route else contextlib.nullcontext():
        pred = model.predict(batch.noisy, batch.timesteps, batch.cond)
    per_sample = F.mse_loss(pred.float(), batch.target.float(), reduction="none").mean(dim=(1, 2, 3))
    loss = (per_sample * batch.weights).sum()
    if objective is None:
        return loss
    return loss + objective.penalty() / distributed.current().world_size  # counted once over ranks


def micro_step_loss(
    model: DiffusionModel,
    sets: list[TrainSet],
    config: TrainConfig,
    g: torch.Generator,
    objective: Objective | None = None,
) -> torch.Tensor:
    """The weighted diffusion loss of one micro-step (:func:`draw_batch`, then :func:`batch_loss`)."""
    return batch_loss(model, draw_batch(model, sets, config, g, objective), config, objective)


def train_step(
    model: DiffusionModel,
    sets: list[TrainSet],
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    g: torch.Generator,
    *,
    precision: str = "no",
    scaler: torch.amp.GradScaler | None = None,
    objective: Objective | None = None,
    graphed: GraphedMicroStep | None = None,
) -> torch.Tensor:
    """One optimizer step: ``config.grad_accum`` micro-steps (each one forward and one backward of a batch holding
    every set), then the optimizer's step and ``zero_grad``.

    Args:
        model: The model, PLP layers attached, denoiser in train mode.
        sets: Cached training sets, already on the model's device.
        config: Loop settings (routing, batch size, accumulation).
        optimizer: From :func:`make_optimizer`.
        g: The CPU generator that draws images, noise and timesteps.
        precision: ``no``, ``bf16`` or ``fp16`` (autocast), as resolved by :func:`resolve_precision`.
        scaler: The loss scaler (fp16); None steps the optimizer directly.
        objective: See :func:`train`.
        graphed: From :func:`graphed_micro_step`: run each micro-step's forward and backward as a CUDA graph.

    Returns:
        The step's loss (the mean over its micro-steps) as a tensor on the device: reading it is a host sync. With
        several processes, the gradients and the loss are summed over them before the optimizer's step.
    """
    total = torch.zeros((), device=model.device)
    loss_fn = scaled_loss(model, config, precision, objective) if graphed is None else None
    for _ in range(config.grad_accum):
        batch = draw_batch(model, sets, config, g, objective)
        if graphed is not None:
            total += graphed(batch)
            continue
        loss = loss_fn(batch)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    distributed.current().all_reduce_grads(params, total)  # no-op with one process
    if scaler is not None:
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=graphed is None)  # a captured graph adds into the same gradient tensors
    return total


def scaled_loss(
    model: DiffusionModel, config: TrainConfig, precision: str, objective: Objective | None = None
) -> Callable[[Batch], torch.Tensor]:
    """``loss(batch)``: :func:`batch_loss` under the run's autocast, divided by the accumulation count."""
    use_amp = precision != "no"
    amp_dtype = torch.float16 if precision == "fp16" else torch.bfloat16

    def loss(batch: Batch) -> torch.Tensor:
        # No autocast weight cache: a CUDA graph capture cannot keep it (and PLP weights are cast per call anyway).
        with torch.autocast(model.device.type, dtype=amp_dtype, enabled=use_amp, cache_enabled=False):
            return batch_loss(model, batch, config, objective) / config.grad_accum

    return loss


def graphed_micro_step(
    model: DiffusionModel,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    precision: str,
    objective: Objective | None = None,
) -> GraphedMicroStep | None:
    """The CUDA-graph micro-step when ``config.cuda_graphs`` asks for it and the run allows it (a CUDA device, no
    fp16 loss scaling, no gradient checkpointing, no objective); else None (eager)."""
    usable = (
        model.device.type == "cuda" and precision != "fp16" and not config.gradient_checkpointing and objective is None
    )
    if not (config.cuda_graphs and usable):
        return None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return GraphedMicroStep(scaled_loss(model, config, precision), params)


def enable_gradient_checkpointing(model: DiffusionModel) -> None:
    """Turn on activation checkpointing in the model's denoiser (diffusers' non-reentrant checkpoints per block).

    The PLP layers need nothing special: each block's forward is recomputed in the backward pass, and the gradient
    of every adapter (routed or not) is the one computed without checkpointing.

    Raises:
        B4MError: The denoiser does not support it.
    """
    enable = getattr(model.denoiser, "enable_gradient_checkpointing", None)
    if enable is None:
        raise B4MError(f"{type(model.denoiser).__name__} does not support gradient checkpointing")
    try:
        enable()
    except ValueError as e:  # diffusers models that lack it say so with a ValueError
        raise B4MError(f"{type(model.denoiser).__name__}: {e}") from e


def train(
    model: DiffusionModel,
    plp: PLPConfig | None,
    sets: list[TrainSet],
    config: TrainConfig,
    out: Path,
    *,
    role: str = "content",
    resume: bool | Path = False,
    validate: Callable[[int], None] | None = None,
    progress: Callable[[int, int, float | None], None] | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Train the PLP layers already attached to ``model.denoiser`` for ``config.steps`` optimizer steps.

    Args:
        model: The base model, with PLP layers attached (and loaded, for make).
        plp: The adapter's config (stored in checkpoints); ``None`` with an ``objective``.
        role: The role written into checkpoint adapter files ("content", "style" or "fused").
        sets: Cached training sets.
        config: Loop settings.
        out: Run folder; checkpoints go to ``out/checkpoints/step-N``.
        resume: ``True`` continues from the latest checkpoint in ``out``; a path continues from that checkpoint.
        validate: Called with the step number every ``config.validate_every`` steps.
        progress: Called as ``progress(step, total, loss_or_None)`` after every step.
        objective: Train the objective's parameters against its target instead of the PLP halves against the
            diffusion target (routing must be ``none``); checkpoints then hold its state, not an adapter file.

    With several processes (``accelerate launch``, :mod:`b4m.distributed`) every rank runs this loop on its share of
    each micro-batch; only rank 0 writes checkpoints and TensorBoard logs, validates and reports progress.

    Raises:
        B4MError: Bad settings, a checkpoint of another run, or a NaN/Inf loss (with the step range and the last
            good checkpoint).
    """
    out = Path(out)
    config = folded(config)
    dist = distributed.current()
    dist.check_batch(config.batch_size)
    if dist.device is not None and model.device != dist.device:
        raise B4MError(f"process {dist.rank} of {dist.world_size}: the model is on {model.device}, not {dist.device}")
    if not sets:
        raise B4MError("no training data")
    if config.routing != "none" and config.owned is None:
        raise B4MError(f"routing {config.routing!r} needs owned = 'up' or 'down' (which half the main sets train)")
    if objective is not None and config.routing != "none":
        raise B4MError(f"routing {config.routing!r} splits PLP halves; a run with an objective needs routing none")
    if objective is None and plp is None:
        raise B4MError("no PLP config given (the checkpoints store it)")
    if config.routing == "clean" and all(s.main for s in sets):
        raise B4MError("clean routing needs auxiliary sets (the other half would never learn); use routing none")
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.denoiser.train()
    # The cached sets move to the device once (latents and embeddings of a few dozen images: megabytes).
    sets = [TrainSet(s.name, s.latents.to(model.device), s.cond.to(model.device), s.weight, s.main) for s in sets]
    optimizer = make_optimizer(model, config, objective)
    g = torch.Generator().manual_seed(config.seed)
    start_step = 0
    fingerprint = _fingerprint(config, sets, objective)

    if resume:
        ckpt = latest_checkpoint(out) if resume is True else Path(resume)
        if ckpt is None:
            raise B4MError(f"{out}: --resume given but there is no checkpoint in {out / 'checkpoints'}")
        start_step = _restore(ckpt, model, optimizer, g, fingerprint, objective)

    precision = resolve_precision(config.mixed_precision, model.device)
    scaler = torch.amp.GradScaler(model.device.type) if precision == "fp16" else None
    graphed = graphed_micro_step(model, config, optimizer, precision, objective)

    writer = _tensorboard(out) if config.tensorboard and dist.is_main else None
    t0 = time.perf_counter()
    losses: list[tuple[int, float]] = []
    running = torch.zeros((), device=model.device)
    last_good = latest_checkpoint(out)
    last_check = start_step
    first = 0.0
    for step in range(start_step + 1, config.steps + 1):
        running += train_step(
            model, sets, config, optimizer, g, precision=precision, scaler=scaler, objective=objective, graphed=graphed
        )

        loss_value = None
        if step % config.check_every == 0 or step == config.steps or step % config.checkpoint_every == 0:
            loss_value = running.item() / (step - last_check)  # the one host sync of the loop
            if not math.isfinite(loss_value):
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
                raise DivergedError(f"loss became NaN/Inf between steps {last_check + 1} and {step}; {where}")
            losses.append((step, loss_value))
            if writer is not None:
                writer.add_scalar("loss", loss_value, step)
                for i, group in enumerate(optimizer.param_groups):
                    writer.add_scalar(f"lr/group{i}", group["lr"], step)
            running.zero_()
            last_check = step
        checkpoint = step % config.checkpoint_every == 0 or step == config.steps
        validating = validate is not None and config.validate_every and step % config.validate_every == 0
        if checkpoint and dist.is_main:
            state = {"step": step, "generator": g.get_state(), "fingerprint": json.dumps(fingerprint, sort_keys=True)}
            save_checkpoint(out, step, model, plp, role, optimizer, state, objective)
            _prune(out, config.keep_checkpoints)
        if checkpoint:
            last_good = _checkpoint_dir(out, step)
        if validating and dist.is_main:
            validate(step)
            model.denoiser.train()
        if checkpoint or validating:
            dist.barrier()  # the other ranks wait for rank 0's files (a no-op with one process)
        if step == start_step + 1:
            if model.device.type == "cuda":
                torch.cuda.synchronize()  # once, so the warm-up step is timed apart from the steady state
            first = time.perf_counter() - t0
        if progress is not None and dist.is_main:
            progress(step, config.steps, loss_value)
    if writer is not None:
        writer.close()
    model.denoiser.eval()
    final = losses[-1][1] if losses else float("nan")
    steps_done = config.steps - start_step
    return TrainResult(steps_done, final, time.perf_counter() - t0, first if steps_done else 0.0, losses)


def folded(config: TrainConfig) -> TrainConfig:
    """``config`` as the loop runs it: with ``fold_accumulation``, one micro-step of ``batch_size · grad_accum``
    images per set instead of ``grad_accum`` micro-steps of ``batch_size``."""
    if not config.fold_accumulation or config.grad_accum == 1:
        return config
    return replace(config, batch_size=config.batch_size * config.grad_accum, grad_accum=1)


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` on a CUDA GPU that supports it, else ``no`` (fp32)."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise B4MError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _restore(
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
    saved = {k: v for k, v in json.loads(state["fingerprint"]).items() if k not in _SESSION_KEYS}
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
