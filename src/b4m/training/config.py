"""``TrainConfig``: the settings of one training run (one stage, or one baseline's run)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import B4MError
from ..settings import setting

ROUTINGS = ("clean", "mixed", "none")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("auto", "no", "bf16", "fp16")
TIMESTEP_BIASES = ("none", "high-noise", "low-noise")
SPEEDS = ("auto", "fixed")

# The commands whose flags set a field (``metadata["commands"]``; b4m.cli builds its options from this metadata).
_STAGES = ("content", "style", "make")
_BREAK = ("content", "style")


@dataclass
class TrainConfig:
    """Settings of one training run (one stage). Defaults are the official B4M settings minus their bugs.

    Each field's ``metadata["help"]`` says what it does; ``flag`` and ``commands`` name its command-line option and
    the ``b4m`` commands that offer it (``notes``: what a value means on one command).
    """

    steps: int = setting(1000, "Optimizer steps.", flag="--steps", commands=_STAGES, notes={"make": "0 fuses only"})
    lr: float = setting(1e-4, "Learning rate.", flag="--lr", commands=_STAGES)
    other_lr: float | None = setting(
        None, "Learning rate of the half that is not owned, under routing mixed (None: lr/10)."
    )
    routing: str = setting(
        "clean",
        "Gradient routing: clean (each half learns only its own sets), mixed (the official code's) or "
        "none (both halves learn every set); make takes none or clean.",
        flag="--routing",
        commands=_STAGES,
    )
    up_lr_ratio: float = setting(
        1.0,
        "Learning rate of the up half (B) over the down half's (D), under every routing: LoRA+'s ratio "
        "(peft's loraplus_lr_ratio). With the paper's assignment the content half is B, learned through the "
        "frozen C only.",
    )
    owned: str | None = setting(None, "up or down: the half the main sets train (clean and mixed routing).")
    batch_size: int = setting(
        1, "Images per set per micro-step; split over accelerate's processes.", flag="--batch-size", commands=_STAGES
    )
    grad_accum: int = setting(4, "Micro-steps per optimizer step.", flag="--grad-accum", commands=_STAGES)
    optimizer: str = setting("adamw", "adamw or sgd.")
    weight_decay: float = setting(1e-2, "The optimizer's weight decay.")
    precondition: bool = setting(
        False, "Riemannian preconditioner on the learned halves.", flag="--precondition", commands=_STAGES
    )
    precond_reg: float = setting(1e-2, "Damping δ of the preconditioner's r × r inverses.")
    precond_factors: str = setting(
        "learned", "The preconditioner's Gram matrices: learned (of B and D, the paper) or full ([A; B], [C, D])."
    )
    max_grad_norm: float = setting(1.0, "Clip the global gradient norm to this value; 0 does not clip.")
    mixed_precision: str = setting(
        "auto",
        "Autocast: auto (bf16 on a GPU that has it, else none), no, bf16 or fp16; adapters stay fp32.",
        flag="--mixed-precision",
        commands=_STAGES,
    )
    gradient_checkpointing: bool = setting(
        False,
        "Recompute activations in the backward pass: less memory, more compute.",
        flag="--gradient-checkpointing",
        commands=_STAGES,
    )
    speed: str = setting(
        "auto",
        "auto: on a GPU, CUDA graphs and fused AdamW; if the first step runs out of memory, the micro-steps one at a "
        "time, then gradient checkpointing, then one image per forward (b4m.training.speed); fixed: the speed "
        "settings as given (a preset, or giving any of them, sets it).",
    )
    fused_optimizer: bool = setting(
        False, "AdamW's fused kernel (one launch for all tensors) instead of its foreach path."
    )
    cuda_graphs: bool = setting(
        False, "Capture each micro-step's forward and backward as a CUDA graph (b4m.cuda_graphs)."
    )
    fold_accumulation: bool = setting(
        False,
        "Draw a step's grad_accum micro-steps as one batch: the same loss (each set's mean over the "
        "step's images), one forward and backward instead of grad_accum; activations of all of them at once.",
    )
    rows_per_forward: int = setting(
        0,
        "Split each micro-step's batch into forwards of at most this many images, each with its own backward: the "
        "activations of that many images at a time, the same gradients (summed in another order); 0: the whole "
        "batch in one forward. Not with cuda_graphs (a graph holds a whole micro-step).",
    )
    timestep_bias: str = setting(
        "none",
        "Noise levels the run's timesteps favour: none (uniform), high-noise or low-noise (t = (1 - u^k)·T or u^k·T "
        "for uniform u, k = timestep_bias_exponent: ai-toolkit's content_or_style sampling).",
        flag="--timestep-bias",
        commands=_STAGES,
    )
    timestep_bias_exponent: float = setting(3.0, "The exponent k of timestep_bias (3: ai-toolkit's cubic).")
    # A checkpoint of an SDXL-size run is 0.74 GB (the adapter and AdamW's state; 1.2 s to write on our 2-core CPU):
    # every 100 steps that was 10 a 1,000-step run, the step count a fast GPU runs in under 4 minutes.
    checkpoint_every: int = setting(250, "Checkpoint every N steps.", flag="--checkpoint-every", commands=_STAGES)
    checkpoint_minutes: float = setting(
        10.0,
        "Also checkpoint every N minutes of training; 0 checkpoints by steps only.",
        flag="--checkpoint-minutes",
        commands=_STAGES,
    )
    keep_checkpoints: int = setting(2, "Checkpoints kept, the newest.")
    check_every: int = setting(10, "Steps between loss reads (NaN check, progress bar); no .item() on every step.")
    validate_every: int = setting(
        0,
        "Sample validation images every N steps while training; 0: only once, at the end (validation.seeds = [] in "
        "a config: never).",
        flag="--validate-every",
        commands=_BREAK,
    )
    tensorboard: bool = setting(
        False,
        "Log loss and lr to OUTPUT/tensorboard; needs the tensorboard package.",
        flag="--tensorboard",
        commands=_STAGES,
    )
    seed: int = setting(0, "Seed of the generator that draws the images, noise and timesteps.")

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise B4MError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.owned not in (None, "up", "down"):
            raise B4MError(f"owned must be 'up' or 'down', got {self.owned!r}")
        if self.optimizer not in OPTIMIZERS:
            raise B4MError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.mixed_precision not in PRECISIONS:
            raise B4MError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if self.speed not in SPEEDS:
            raise B4MError(f"speed must be one of {', '.join(SPEEDS)}, got {self.speed!r}")
        if self.timestep_bias not in TIMESTEP_BIASES:
            raise B4MError(f"timestep_bias must be one of {', '.join(TIMESTEP_BIASES)}, got {self.timestep_bias!r}")
        if not self.timestep_bias_exponent >= 1:  # also catches NaN; below 1 the bias turns the other way
            raise B4MError(f"timestep_bias_exponent must be at least 1, got {self.timestep_bias_exponent}")
        if not self.up_lr_ratio > 0:
            raise B4MError(f"up_lr_ratio must be > 0, got {self.up_lr_ratio}")
        if not self.lr > 0:
            raise B4MError(f"lr must be > 0, got {self.lr}")
        if self.other_lr is not None and not self.other_lr >= 0:
            raise B4MError(f"other_lr must be at least 0, got {self.other_lr}")
        if not 0 <= self.seed < 2**63:
            raise B4MError(f"seed must be a whole number from 0, got {self.seed}")
        if self.max_grad_norm is None:  # the Python API's older spelling of "no clipping"
            self.max_grad_norm = 0.0
        if not self.max_grad_norm >= 0:  # also catches NaN
            raise B4MError(f"max_grad_norm must be at least 0 (0: no clipping), got {self.max_grad_norm}")
        if not 0 <= self.checkpoint_minutes < float("inf"):  # also catches NaN
            raise B4MError(f"checkpoint_minutes must be at least 0 (0: by steps only), got {self.checkpoint_minutes}")
        if self.validate_every < 0:
            raise B4MError(f"validate_every must be at least 0 (0: only at the end), got {self.validate_every}")
        if self.rows_per_forward < 0:
            raise B4MError(f"rows_per_forward must be at least 0 (0: the whole batch), got {self.rows_per_forward}")
        if self.rows_per_forward and self.cuda_graphs:
            raise B4MError("rows_per_forward needs cuda_graphs off: a CUDA graph holds a whole micro-step")
        for name in ("steps", "batch_size", "grad_accum", "check_every", "checkpoint_every"):
            least = 0 if name == "steps" else 1  # steps 0: make returns the fused adapter as it is
            if getattr(self, name) < least:
                raise B4MError(f"{name} must be at least {least}, got {getattr(self, name)}")


def folded(config: TrainConfig) -> TrainConfig:
    """``config`` as the loop runs it: with ``fold_accumulation``, one micro-step of ``batch_size · grad_accum``
    images per set instead of ``grad_accum`` micro-steps of ``batch_size``."""
    if not config.fold_accumulation or config.grad_accum == 1:
        return config
    return replace(config, batch_size=config.batch_size * config.grad_accum, grad_accum=1)


def resolve_precision(mixed_precision: str, device) -> str:
    """``auto`` → ``bf16`` on a CUDA GPU that supports it, else ``no`` (fp32)."""
    if mixed_precision != "auto":
        return mixed_precision
    import torch  # here: reading a TrainConfig (e.g. a command's --help) must not load torch

    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
