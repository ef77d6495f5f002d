"""One training loop for every stage (content, style, make) and every baseline.

A stage hands the loop cached training sets (latents and text conditioning) and says how gradients are routed.
Each micro-step draws ``batch_size`` images from every set, runs them through the denoiser as one batch, and
weights the per-sample diffusion losses so that ``loss = Σ_set weight_set · mean(loss over the set's samples)``.
For a content run that is the paper's eq. 12: ``L_main + mean_i L_aux_i``.

Routing (``TrainConfig.routing``):

- ``clean`` (default): the owned half learns only from the main sets, the other half only from the auxiliary sets,
  in one forward and one backward (see :func:`b4m.adapter.walker.routing`).
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
import dataclasses
import gc
import json
import math
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapter.config import PLPConfig
from ..adapter.optim import create_optimizer
from ..adapter.walker import plp_layers, routing
from ..cuda_graphs import GraphCaptureFailed, GraphedMicroStep
from ..errors import B4MError, DivergedError, Interrupted, first_line
from ..models.base import DiffusionModel
from . import distributed
from .batch import Batch, draw_batch, split_batch
from .checkpoint import (
    Stopper,
    checkpoint_dir,
    clean_leftovers,
    fingerprint,
    latest_checkpoint,
    prune,
    resume_from,
    save_checkpoint,
)
from .config import TrainConfig, folded, resolve_precision
from .objective import Objective
from .sets import TrainSet
from .speed import FirstStepNotGraphable, FirstStepOutOfMemory, enable_gradient_checkpointing, speed_plans


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    first_step_seconds: float  # includes warm-up (allocations, autotuning); the rest is steady state
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last check)
    images: int = 0  # training images drawn by this call: steps × images per set per step × sets (all processes)
    speed: str = "as configured"  # the settings the run used (b4m.training.speed)


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
    if config.routing == "clean":
        other_lr = lr[other_half]
    else:  # mixed: the official 10× lower lr unless other_lr says otherwise (0 freezes the other half)
        other_lr = config.other_lr if config.other_lr is not None else lr[other_half] / 10
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
        max_grad_norm=config.max_grad_norm or None,  # 0: no clipping
        param_groups=_param_groups(model, config, objective),
        weight_decay=config.weight_decay,
        **extra,
    )


def batch_loss(
    model: DiffusionModel, batch: Batch, config: TrainConfig, objective: Objective | None = None
) -> torch.Tensor:
    """The weighted diffusion loss of a drawn batch (routing applied); with an ``objective``, plus its penalty."""
    route = config.routing == "clean" and batch.routed
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
    draws: int = 1,
) -> torch.Tensor:
    """One optimizer step: ``config.grad_accum`` micro-steps (each one forward and one backward of a batch holding
    every set; ``draws``: see :func:`draw_batch`), then the optimizer's step and ``zero_grad``.

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
    rest_fn = scaled_loss(model, config, precision) if graphed is None else None  # the penalty once per micro-step
    for _ in range(config.grad_accum):
        batch = draw_batch(model, sets, config, g, objective, draws)
        if graphed is not None:
            total += graphed(batch)
            continue
        for i, part in enumerate(split_batch(batch, config.rows_per_forward)):
            loss = (rest_fn if i else loss_fn)(part)
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
    """Train the PLP layers already attached to ``model.denoiser`` for ``config.steps`` optimizer steps, at the speed
    settings :func:`b4m.training.speed.speed_plans` chooses (``config.speed``): when the first step of one runs out
    of GPU memory (nothing trained or written yet), the next is tried, with one warning; when its CUDA graph cannot
    be captured, the same settings are tried without CUDA graphs. Arguments: see :func:`train_once`."""
    plans = list(speed_plans(config, model.device))
    checkpointing = bool(getattr(model.denoiser, "is_gradient_checkpointing", False))
    graphs = True  # False once a capture failed: no later plan captures either
    for i, (label, settings) in enumerate(plans):
        settings = settings if graphs else dataclasses.replace(settings, cuda_graphs=False)
        capture_failed = False
        try:
            result = train_once(
                model,
                plp,
                sets,
                settings,
                out,
                role=role,
                resume=resume,
                validate=validate,
                progress=progress,
                objective=objective,
            )
            return dataclasses.replace(result, speed=label)
        except FirstStepOutOfMemory as e:
            error = str(e)
        except FirstStepNotGraphable as e:
            error, graphs, capture_failed = str(e), False, True
            plans.insert(i + 1, (f"{label}, without CUDA graphs (their capture failed)", settings))
        finally:  # the denoiser as it was: the next run on this model (b4m run, the bench) starts clean
            if settings.gradient_checkpointing and not checkpointing:
                model.denoiser.disable_gradient_checkpointing()
        for p in model.denoiser.parameters():  # the failed step's gradients (no weight was updated)
            p.grad = None
        release_memory(model.device)
        if capture_failed:
            warnings.warn(
                f"CUDA graph capture failed at the first step with {label} ({error}); starting again without",
                stacklevel=2,
            )
            continue
        if i + 1 == len(plans):
            raise B4MError(f"out of GPU memory at the first step with {label} ({error}); {memory_advice(settings)}")
        warnings.warn(
            f"out of GPU memory at the first step with {label}; starting again with {plans[i + 1][0]}", stacklevel=2
        )
    raise AssertionError("unreachable")


def memory_advice(config: TrainConfig) -> str:
    """What to try after the first step of ``config`` ran out of GPU memory, the lightest change first."""
    if not config.gradient_checkpointing:  # with a preset or given settings, auto would have fallen back
        auto = "leave the speed settings to b4m (no --preset fast), or " if config.speed != "auto" else ""
        return f"{auto}use --preset low-memory"
    if config.rows_per_forward != 1:
        return "set train.rows_per_forward = 1, or use --preset low-memory-8bit (8-bit base weights)"
    return (
        "use --preset low-memory-8bit (8-bit base weights) if the run does not, a smaller batch or a lower resolution"
    )


def release_memory(device: torch.device) -> None:
    """Give a failed first step's memory back before the next plan starts: a full garbage collection (tensors that
    only a reference cycle kept, such as frames of the error's traceback, are freed now, not at the collector's next
    turn), then the CUDA allocator's cached blocks (what accelerate's ``find_executable_batch_size`` does between
    batch sizes)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_once(
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
    """Train the PLP layers already attached to ``model.denoiser`` for ``config.steps`` optimizer steps, with the
    settings as given.

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

    With several processes (``accelerate launch``, :mod:`b4m.training.distributed`) every rank runs this loop on its
    share of each micro-batch; only rank 0 writes checkpoints and TensorBoard logs, validates and reports progress.

    Raises:
        B4MError: Bad settings, a checkpoint of another run, or a NaN/Inf loss (with the step range and the last
            good checkpoint).
    """
    out = Path(out)
    given = config  # its fingerprint: a folded step trains on what the micro-steps would, so a run resumes across it
    draws = config.grad_accum if config.fold_accumulation else 1
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
    run_fingerprint = fingerprint(given, sets, objective)

    if dist.is_main:
        clean_leftovers(out)  # what a killed checkpoint write left: never resumed from
    if resume:
        start_step = resume_from(out, resume, model, optimizer, g, run_fingerprint, objective)

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
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stopper = Stopper(config.checkpoint_minutes, lambda: last_good)
    with stopper:
        for step in range(start_step + 1, config.steps + 1):
            try:
                running += train_step(
                    model,
                    sets,
                    config,
                    optimizer,
                    g,
                    precision=precision,
                    scaler=scaler,
                    objective=objective,
                    graphed=graphed,
                    draws=draws,
                )
            except torch.OutOfMemoryError as e:  # at the first step nothing is trained or written: try other settings
                if step == start_step + 1:
                    raise FirstStepOutOfMemory(first_line(e)) from e
                raise
            except GraphCaptureFailed as e:  # the capture happens at the first step: likewise
                if step == start_step + 1 and config.speed == "auto":
                    raise FirstStepNotGraphable(first_line(e)) from e
                raise

            regular = step % config.checkpoint_every == 0 or step == config.steps
            read = regular or step % config.check_every == 0
            stop, timed = stopper.poll(step, read, model.device)
            checkpoint = regular or stop or timed
            loss_value = None
            if read or checkpoint:
                loss_value = running.item() / (step - last_check)  # the one host sync of the loop
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
                if not math.isfinite(loss_value):
                    raise DivergedError(f"loss became NaN/Inf between steps {last_check + 1} and {step}; {where}")
                if checkpoint and not all_finite(params):  # a finite loss, then a step to NaN (an lr far too high)
                    raise DivergedError(f"the trained weights hold NaN/Inf after step {step}; {where}")
                losses.append((step, loss_value))
                if writer is not None:
                    writer.add_scalar("loss", loss_value, step)
                    for i, group in enumerate(optimizer.param_groups):
                        writer.add_scalar(f"lr/group{i}", group["lr"], step)
                running.zero_()
                last_check = step
            validating = validate is not None and config.validate_every and step % config.validate_every == 0
            if checkpoint and dist.is_main:
                state = {
                    "step": step,
                    "generator": g.get_state(),
                    "fingerprint": json.dumps(run_fingerprint, sort_keys=True),
                }
                save_checkpoint(out, step, model, plp, role, optimizer, state, objective)
                prune(out, config.keep_checkpoints)
            if checkpoint:
                last_good = checkpoint_dir(out, step)
                stopper.checkpointed()
                # a signal that came while the checkpoint was written: this one is the one to resume from
                stop = stop or (not dist.enabled and stopper.signum is not None)
            if validating and dist.is_main and not stop:
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
            if stop:
                if writer is not None:
                    writer.close()
                name = signal.Signals(stopper.signum).name
                raise Interrupted(
                    f"stopped by {name} after step {step} of {config.steps}; checkpoint {last_good}", stopper.signum
                )
    if writer is not None:
        writer.close()
    model.denoiser.eval()
    final = losses[-1][1] if losses else float("nan")
    steps_done = config.steps - start_step
    images = steps_done * config.batch_size * config.grad_accum * len(sets)
    return TrainResult(steps_done, final, time.perf_counter() - t0, first if steps_done else 0.0, losses, images)


def all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every value of ``params`` is finite (one host sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise B4MError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(log_dir=str(out / "tensorboard"))
