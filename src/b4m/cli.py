"""The ``b4m`` command line: a thin layer over the Python API. Errors are printed as one line, without a traceback."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import B4MError

app = typer.Typer(
    name="b4m",
    help="Break-for-Make: learn a content and a style in separate halves of one LoRA, then make them together.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"b4m {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="A b4m adapter file or a plain LoRA (diffusers or kohya format).")],
    modules: Annotated[bool, typer.Option("--modules", help="List every adapted module.")] = False,
) -> None:
    """Print what a LoRA or b4m file holds: targets, rank, ratio, role, fingerprint."""
    from .inspect import describe

    info = describe(file)
    table = Table(show_header=False, box=None)
    for key, value in info.items():
        if key == "modules":
            continue
        table.add_row(f"[bold]{key}[/]", str(value))
    console.print(table)
    if modules:
        for name in info["modules"]:
            console.print(f"  {name}")


@app.command("dry-run")
def dry_run_cmd(
    model: Annotated[str, typer.Option(help="Diffusers model folder, UNet config.json, or Hub id.")],
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 64,
    ratio: Annotated[float, typer.Option(help="Frozen fraction d of each factor.")] = 0.5,
    targets: Annotated[
        str, typer.Option(help="Comma-separated module names or dotted suffixes, or a regex prefixed with 're:'.")
    ] = "to_q,to_k,to_v,to_out.0",
    exclude: Annotated[str, typer.Option(help="Same rule as --targets; wins over it.")] = "",
    all_modules: Annotated[bool, typer.Option("--modules", help="List every matched module.")] = False,
) -> None:
    """List the modules a PLP adapter would adapt, with trainable and frozen parameter counts (no weights loaded)."""
    from .plp import PLPConfig, dry_run
    from .unet_skeleton import unet_skeleton

    config = PLPConfig(rank=rank, ratio=ratio, targets=_patterns(targets), exclude=_patterns(exclude))
    result = dry_run(unet_skeleton(model), config)
    lines = result.lines()
    if not all_modules and len(lines) > 12:
        lines = [*lines[:6], f"  … {len(result.modules) - 8} more (--modules lists all) …", *lines[-4:]]
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    mib = (result.trainable + result.frozen) * 4 / 2**20
    console.print(f"adapter file size (fp32): {mib:.1f} MiB", highlight=False)


def _patterns(text: str) -> list[str] | str:
    text = text.strip()
    if text.startswith("re:"):
        return text[3:]
    return [p.strip() for p in text.split(",") if p.strip()]


@app.command()
def fuse(
    content: Annotated[Path, typer.Argument(help="The content run's .b4m.safetensors file.")],
    style: Annotated[Path, typer.Argument(help="The style run's .b4m.safetensors file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the fused .b4m.safetensors.")],
) -> None:
    """Fuse a content run and a style run into LoRA_f (the make stage with no fine-tuning steps)."""
    from .adapter_file import fuse as fuse_files
    from .adapter_file import load_adapter, save_adapter
    from .io_utils import check_output

    check_output(output, content, style)
    fused = fuse_files(load_adapter(content), load_adapter(style))
    save_adapter(fused, output)
    console.print(f"wrote {output} (fingerprint {fused.fingerprint()})", highlight=False)


@app.command()
def export(
    file: Annotated[Path, typer.Argument(help="A b4m adapter file (content, style or fused).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the plain LoRA .safetensors.")],
    format: Annotated[str, typer.Option(help="diffusers (diffusers/peft) or kohya (ComfyUI, A1111).")] = "diffusers",
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "fp32",
    scale: Annotated[float, typer.Option(help="Multiplier of the whole ΔW.")] = 1.0,
    content_scale: Annotated[float, typer.Option(help="Multiplier of the content half.")] = 1.0,
    style_scale: Annotated[float, typer.Option(help="Multiplier of the style half.")] = 1.0,
    unet_config: Annotated[
        str | None, typer.Option(help="Model folder or UNet config.json (kohya SDXL key names need it).")
    ] = None,
) -> None:
    """Export a b4m adapter as a plain LoRA that diffusers, ComfyUI or A1111 load with no custom code."""
    from .adapter_file import load_adapter
    from .io_utils import check_output
    from .lora_io import dtype_from_name, save_lora
    from .unet_skeleton import read_unet_config

    check_output(output, file)
    torch_dtype = dtype_from_name(dtype)
    adapter = load_adapter(file)
    factors = adapter.factors(scale=scale, content_scale=content_scale, style_scale=style_scale)
    metadata = {"b4m_role": adapter.role, "b4m_fingerprint": adapter.fingerprint(), **adapter.metadata}
    config = read_unet_config(unet_config) if unet_config else None
    save_lora(factors, output, format=format, dtype=torch_dtype, metadata=metadata, unet_config=config)
    console.print(f"wrote {output} ({format}, {dtype}, {len(factors)} modules)", highlight=False)


# --------------------------------------------------------------------------------------------------------------------
# Stages. Every flag left unset falls back to the --config file, then to the stage's defaults.

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with any of the settings.")]
PrintOpt = Annotated[bool, typer.Option("--print-config", help="Print the merged config as TOML and exit.")]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Diffusers folder, single file, Hub id, a world model folder, or world (default)."
    ),
]
OutOpt = Annotated[str | None, typer.Option("--output", "-o", help="Run folder.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the run folder's latest checkpoint.")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace the run already in the output folder (its checkpoints go).")
]


def _stage_config(stage: str, config: Path | None, overrides: dict):
    from .config import load_config
    from .stages import STAGE_DEFAULTS

    return load_config(config, overrides, STAGE_DEFAULTS[stage])


# Where each stage flag goes in the config (flags left unset do not override anything).
FLAG_KEYS = {
    "model": "model",
    "images": "images",
    "prompt": "prompt",
    "output": "output",
    "aux": "aux",
    "resolution": "resolution",
    "placeholder": "placeholder",
    "content": "content",
    "style": "style",
    "style_weight": "style_weight",
    "steps": "train.steps",
    "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum",
    "lr": "train.lr",
    "rank": "adapter.rank",
    "seed": "adapter.seed",
    "mixed_precision": "train.mixed_precision",
    "routing": "train.routing",
    "precondition": "train.precondition",
    "validate_every": "train.validate_every",
    "checkpoint_every": "train.checkpoint_every",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "tensorboard": "train.tensorboard",
    "export_dtype": "export.dtype",
    "export_format": "export.formats",
    "preset": "preset",
}


def _run_stage(
    stage: str, flags: dict, config: Path | None, print_config: bool, resume: bool, overwrite: bool = False
) -> None:
    from .config import to_toml
    from .stages import run_break, run_make

    overrides = {FLAG_KEYS[k]: v for k, v in flags.items() if k in FLAG_KEYS}
    cfg = _stage_config(stage, config, overrides)
    if print_config:
        typer.echo(to_toml(cfg), nl=False)
        return
    # Under accelerate launch: the process group, each rank's own GPU as the current device before the model loads,
    # a batch that splits over the ranks, and output from rank 0 only (one process: none of this does anything).
    from .distributed import current
    from .train import folded

    dist = current()
    dist.check_batch(folded(cfg.train).batch_size)  # the batch the loop runs (fold_accumulation multiplies it)
    out = console if dist.is_main else None
    if stage == "make":
        run_make(cfg, resume=resume, overwrite=overwrite, console=out)
        return
    run_break(stage, cfg, resume=resume, overwrite=overwrite, console=out)


MixedOpt = Annotated[str | None, typer.Option(help="no, bf16 or fp16 autocast (adapters stay fp32).")]
CkptOpt = Annotated[
    bool | None,
    typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Trade compute for memory."),
]
TbOpt = Annotated[
    bool | None, typer.Option("--tensorboard/--no-tensorboard", help="Log loss and lr to OUTPUT/tensorboard.")
]
ExportDtypeOpt = Annotated[str | None, typer.Option(help="Plain LoRA export dtype: fp32, bf16 or fp16.")]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        help="fast (fused AdamW, a step's images in one batch, CUDA graphs) or low-memory (gradient "
        "checkpointing); flags win."
    ),
]
BatchOpt = Annotated[
    int | None, typer.Option(help="Images per set per micro-step (default 1); split over accelerate's processes.")
]
AccumOpt = Annotated[int | None, typer.Option(help="Micro-steps per optimizer step (default 4).")]
ExportFormatOpt = Annotated[
    list[str] | None, typer.Option(help="Plain LoRA export format(s): diffusers, kohya (repeatable).")
]


def _break_command(role: str):
    def command(
        model: ModelOpt = None,
        images: Annotated[
            str | None, typer.Option(help="Folder of training images (+ optional same-name .txt).")
        ] = None,
        prompt: Annotated[str | None, typer.Option(help="Caption of the images, with the placeholder token.")] = None,
        output: OutOpt = None,
        aux: Annotated[
            str | None, typer.Option(help="Folder of folders: auxiliary sets (default: generated).")
        ] = None,
        steps: Annotated[int | None, typer.Option(help="Optimizer steps (default 1000).")] = None,
        batch_size: BatchOpt = None,
        grad_accum: AccumOpt = None,
        rank: Annotated[int | None, typer.Option(help="LoRA rank (default 64).")] = None,
        lr: Annotated[float | None, typer.Option(help="Learning rate (default 1e-4).")] = None,
        resolution: Annotated[int | None, typer.Option(help="Training resolution (default: the model's).")] = None,
        placeholder: Annotated[
            str | None, typer.Option(help="The concept's token, e.g. sks (a caption without it is warned about).")
        ] = None,
        seed: Annotated[
            int | None, typer.Option(help="Seed of the frozen parts (runs to fuse must share it).")
        ] = None,
        mixed_precision: MixedOpt = None,
        routing: Annotated[str | None, typer.Option(help="clean (default), mixed (official) or none.")] = None,
        validate_every: Annotated[int | None, typer.Option(help="Sample validation images every N steps.")] = None,
        checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
        gradient_checkpointing: CkptOpt = None,
        tensorboard: TbOpt = None,
        export_dtype: ExportDtypeOpt = None,
        export_format: ExportFormatOpt = None,
        preset: PresetOpt = None,
        config: ConfigOpt = None,
        print_config: PrintOpt = False,
        resume: ResumeOpt = False,
        overwrite: OverwriteOpt = False,
    ) -> None:
        flags = dict(locals())
        _run_stage(
            role, flags, flags.pop("config"), flags.pop("print_config"), flags.pop("resume"), flags.pop("overwrite")
        )

    command.__doc__ = (
        f"Break: learn a {role} in its half of the adapter, the other half learning auxiliary "
        f"{'styles' if role == 'content' else 'contents'} (multi-correspondence)."
    )
    return command


app.command("content")(_break_command("content"))
app.command("style")(_break_command("style"))


@app.command()
def make(
    content: Annotated[str | None, typer.Option(help="Content run folder or .b4m.safetensors.")] = None,
    style: Annotated[str | None, typer.Option(help="Style run folder or .b4m.safetensors.")] = None,
    output: OutOpt = None,
    model: ModelOpt = None,
    steps: Annotated[int | None, typer.Option(help="Fine-tuning steps (default 50; 0 = fuse only).")] = None,
    style_weight: Annotated[
        float | None, typer.Option(help="Weight of the style images' loss, the content's being 1 (default 0.5).")
    ] = None,
    batch_size: BatchOpt = None,
    grad_accum: AccumOpt = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default 1e-4).")] = None,
    resolution: Annotated[int | None, typer.Option(help="Training resolution (default: the model's).")] = None,
    precondition: Annotated[
        bool | None, typer.Option("--precondition/--no-precondition", help="Riemannian preconditioner (default on).")
    ] = None,
    mixed_precision: MixedOpt = None,
    gradient_checkpointing: CkptOpt = None,
    tensorboard: TbOpt = None,
    export_dtype: ExportDtypeOpt = None,
    export_format: ExportFormatOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    print_config: PrintOpt = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Make: fuse a content run and a style run, then fine-tune briefly with the Riemannian preconditioner."""
    flags = dict(locals())
    _run_stage(
        "make", flags, flags.pop("config"), flags.pop("print_config"), flags.pop("resume"), flags.pop("overwrite")
    )


@app.command()
def generate(
    run: Annotated[str, typer.Argument(help="A run folder (fused, content or style) or a .b4m.safetensors file.")],
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for the images and the grid.")] = "out",
    n: Annotated[int, typer.Option("-n", help="Images per prompt (seeds seed … seed+n-1).")] = 4,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    model: ModelOpt = None,
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt.")] = "",
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 25,
    guidance_scale: Annotated[
        float | None, typer.Option(help="Classifier-free guidance scale (default: the model's; 5 for SD/SDXL).")
    ] = None,
    scheduler: Annotated[str | None, typer.Option(help="euler, euler_a, dpm++, ddim, pndm, unipc.")] = None,
    scale: Annotated[float, typer.Option(help="Multiplier of the whole adapter.")] = 1.0,
    content_scale: Annotated[float, typer.Option(help="Multiplier of the content half.")] = 1.0,
    style_scale: Annotated[float, typer.Option(help="Multiplier of the style half.")] = 1.0,
    merge: Annotated[bool, typer.Option(help="Merge the adapter into the weights (faster sampling).")] = False,
    resolution: Annotated[int | None, typer.Option(help="Image size (default: the model's).")] = None,
) -> None:
    """Generate images with a made (or content/style) adapter; PNG metadata holds prompt, seed and settings."""
    from .stages import generate as run_generate

    run_generate(
        run,
        prompts,
        output=output,
        model=model,
        n=n,
        seed=seed,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        scale=scale,
        content_scale=content_scale,
        style_scale=style_scale,
        merge=merge,
        resolution=resolution,
        console=console,
    )


world_app = typer.Typer(help="The built-in world: pretrain its base model, render scenes.", no_args_is_help=True)
app.add_typer(world_app, name="world")


@world_app.command("pretrain")
def world_pretrain(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for checkpoints and the trained model.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps (sets the lr schedule).")] = 20_000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 256,
    resolution: Annotated[int, typer.Option(help="Image size in pixels (32 or 64).")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 5e-4,
    dataset_size: Annotated[int, typer.Option(help="Renders made once and sampled from.")] = 200_000,
    seed: Annotated[int, typer.Option(help="Seed of the data, the held-out combinations and the weights.")] = 0,
    compile: Annotated[bool, typer.Option(help="torch.compile the UNet (falls back to eager if it fails).")] = False,
    max_minutes: Annotated[
        float, typer.Option(help="Stop after this much training time, checkpointed; continue with --resume.")
    ] = 0.0,
    stop_at: Annotated[int, typer.Option(help="Stop after this step, checkpointed (0: run to --steps).")] = 0,
    log_every: Annotated[int, typer.Option(help="Steps between loss lines.")] = 100,
    resume: ResumeOpt = False,
) -> None:
    """Train the world's base text-to-image model on renders of known contents × known styles (resumable)."""
    from .world.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(
        resolution=resolution,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        dataset_size=dataset_size,
        seed=seed,
        compile=compile,
        max_seconds=max_minutes * 60,
        stop_at=stop_at,
        log_every=log_every,
    )
    started = time.perf_counter()

    def progress(step: int, total: int, loss: float) -> None:
        elapsed = time.perf_counter() - started
        console.print(f"step {step}/{total}  loss {loss:.4f}  {elapsed:.0f} s", highlight=False)

    pretrain(config, output, resume=resume, progress=progress)
    console.print(f"wrote {output / 'model'}", highlight=False)


@world_app.command("oracle")
def world_oracle(
    output: Annotated[Path, typer.Option("--output", "-o", help="The oracle file to write (.safetensors).")],
    catalog: Annotated[
        Path | None, typer.Option(help="A catalog TOML (default: the built-in one; extend it with extends).")
    ] = None,
    arch: Annotated[str, typer.Option(help="Trunk: cnn_a (residual, GroupNorm) or cnn_b (BatchNorm).")] = "cnn_a",
    seed: Annotated[int, typer.Option(help="Seed of weights, renders and augmentation.")] = 0,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 6000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 256,
    width: Annotated[int, typer.Option(help="Channels of the first stage.")] = 64,
    resolution: Annotated[int, typer.Option(help="Image size the oracle reads (the world model's).")] = 32,
    workers: Annotated[int, typer.Option(help="Render processes (0: one per core but one).")] = 0,
    check: Annotated[int, typer.Option(help="Fresh renders to measure the accuracy on afterwards.")] = 4000,
) -> None:
    """Train an oracle (content, style, position, size, background classifier) on fresh renders of a catalog."""
    import json

    from .world import default_catalog, load_catalog
    from .world.oracle import OracleConfig, fresh_render_accuracy, save_oracle, train_oracle

    cat = load_catalog(catalog) if catalog else default_catalog()
    config = OracleConfig(
        arch=arch,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        width=width,
        resolution=resolution,
        workers=workers,
        log_every=max(1, steps // 20),
    )
    started = time.perf_counter()

    def progress(step: int, total: int, loss: float) -> None:
        elapsed = time.perf_counter() - started
        console.print(f"step {step}/{total}  loss {loss:.4f}  {elapsed:.0f} s", highlight=False)

    oracle = train_oracle(cat, config, progress=progress)
    seconds = time.perf_counter() - started
    save_oracle(oracle, output)
    accuracy = fresh_render_accuracy(oracle, cat, n=check, seed=10_000 + seed) if check else {}
    record = {"config": config.__dict__, "train_seconds": round(seconds, 1), "fresh_render_accuracy": accuracy}
    output.with_suffix(".json").write_text(json.dumps(record, indent=1))
    console.print(
        "fresh renders: " + "  ".join(f"{a} {v:.3f}" for a, v in accuracy.items()) + f"  ({seconds:.0f} s training)",
        highlight=False,
    )


@world_app.command("evaluate")
def world_evaluate(
    oracle: Annotated[
        str, typer.Option(help="The oracle that scores: shipped a or b, or a file (see b4m world oracle).")
    ] = "a",
    model: Annotated[str, typer.Option(help="A world model folder, or world (the shipped one).")] = "world",
    second: Annotated[
        str | None, typer.Option(help="A second oracle (a, b or a file); reports how often the two agree.")
    ] = None,
    n: Annotated[int, typer.Option(help="Images to generate and score.")] = 512,
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = 25,
    guidance: Annotated[
        list[float] | None,
        typer.Option(
            "--guidance-scale", "--guidance", help="CFG scale (default: the model's); repeat to compare several."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the scenes and the noise.")] = 0,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for quality.json and a grid.")] = None,
) -> None:
    """The base model's quality bar: images of held-out content × style pairs, scored by the oracle."""
    import json

    import numpy as np
    from PIL import Image

    from .models import load_model
    from .models.base import SampleRequest
    from .stages import default_device
    from .world import default_catalog
    from .world.oracle import ATTRIBUTES, load_oracle
    from .world.quality import QualityConfig, base_model_quality, held_out_pairs

    cat = default_catalog()
    device = default_device()
    from .world.weights import oracle_file

    def oracle_path(name: str) -> Path:
        return oracle_file(name) if name in ("a", "b") else Path(name)

    first = load_oracle(oracle_path(oracle), cat, device=device)
    other = load_oracle(oracle_path(second), cat, device=device) if second else None
    base = load_model(model, device=device)
    pairs = held_out_pairs(base)
    results = []
    for g in guidance or [None]:
        used = base.guidance(SampleRequest([], [], guidance_scale=g))
        config = QualityConfig(n=n, seed=seed, steps=steps, guidance_scale=g)
        result, images, _ = base_model_quality(base, first, cat, pairs, config, other)
        results.append(result)
        line = "  ".join(
            f"{a} {result[a]['accuracy']:.3f} [{result[a]['low']:.3f}, {result[a]['high']:.3f}]" for a in ATTRIBUTES
        )
        console.print(f"guidance {used}: {line}", highlight=False)
        if other is not None:
            console.print(
                "  agreement: " + "  ".join(f"{a} {v:.3f}" for a, v in result["agreement"].items()), highlight=False
            )
        if output:
            output.mkdir(parents=True, exist_ok=True)
            tiles = images[:64]
            rows = [np.concatenate(list(tiles[i : i + 16]), axis=1) for i in range(0, len(tiles), 16)]
            Image.fromarray(np.concatenate(rows, axis=0)).save(output / f"samples-g{used}.png")
    if output:
        (output / "quality.json").write_text(json.dumps({"pairs": len(pairs), "results": results}, indent=1))


@app.command()
def demo(
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Folder for report.html, report.json and runs.")
    ] = Path("demo"),
    content: Annotated[str, typer.Option(help="The content (a novel one stands for the user's subject).")] = "teapot",
    style: Annotated[str, typer.Option(help="The style (a novel one stands for the artist's style).")] = "brick",
    steps: Annotated[int, typer.Option(help="Steps of the content run and of the style run.")] = 60,
    rank: Annotated[int, typer.Option(help="Adapter rank (64, the paper's).")] = 64,
    make_steps: Annotated[int, typer.Option(help="Steps of make.")] = 40,
    seeds: Annotated[int, typer.Option(help="Seeds per prompt.")] = 4,
    prompts: Annotated[int, typer.Option(help="Evaluation prompts.")] = 4,
    sample_steps: Annotated[int, typer.Option(help="Sampler steps.")] = 25,
    seed: Annotated[int, typer.Option(help="Seed of the data, the adapter and the training.")] = 0,
    baseline: Annotated[bool, typer.Option(help="Also score the base model without an adapter.")] = True,
) -> None:
    """B4M end to end on the built-in world: references, content, style, make, generate, scores (a few CPU minutes)."""
    from .report import interval_text
    from .world.demo import DemoConfig, run_world_demo
    from .world.tasks import METRICS

    config = DemoConfig(
        content=content,
        style=style,
        steps=steps,
        rank=rank,
        make_steps=make_steps,
        seeds=list(range(seeds)),
        prompts=prompts,
        sample_steps=sample_steps,
        seed=seed,
        baseline=baseline,
    )
    report = run_world_demo(output, config, console=console)
    table = Table(title=f"{content} × {style}: oracle scores, 95% intervals")
    table.add_column("metric")
    for method in report["metrics"]:
        table.add_column(method, justify="right")
    for k in METRICS:
        cells = (interval_text(m[k]) for m in report["metrics"].values())
        table.add_row(k, *cells)
    console.print(table)
    verdict = "[green]passed[/]" if report["passed"] else "[red]did not pass[/]"
    bars = ", ".join(f"{k} ≥ {v:.2f}" for k, v in report["bars"].items())
    console.print(f"B4M {verdict} the bars ({bars}); {report['seconds']['total']:.0f} s", highlight=False)
    console.print(f"report: {output / 'report.html'}", highlight=False)


# --------------------------------------------------------------------------------------------------------------------
# Benchmark and metrics


def _comma_list(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


@app.command()
def bench(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for results.json, results.csv, report.html and runs.")
    ] = Path("runs/bench"),
    methods: Annotated[
        str, typer.Option(help="Comma-separated methods, or default, ablations, all (see --list).")
    ] = "default",
    pairs: Annotated[
        str | None, typer.Option(help="Content-style pairs, e.g. teapot:sunburst,dog:brick (overrides the lists).")
    ] = None,
    contents: Annotated[str | None, typer.Option(help="Comma-separated contents (default: the 4 novel ones).")] = None,
    styles: Annotated[str | None, typer.Option(help="Comma-separated styles (default: the 4 novel ones).")] = None,
    prompts: Annotated[int | None, typer.Option(help="Evaluation prompts per pair (default 4).")] = None,
    seeds: Annotated[int | None, typer.Option(help="Sampling seeds per prompt (default 4).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="The CI preset: 1 pair, 1 prompt, 1 seed, 2 steps.")] = False,
    model: Annotated[
        str, typer.Option("--model", "-m", help="world (the shipped model) or a world folder.")
    ] = "world",
    oracle: Annotated[str, typer.Option(help="Shipped oracle a or b, or an oracle file.")] = "a",
    steps: Annotated[int | None, typer.Option(help="Steps of every stage-1 run and of JTtrain (default 150).")] = None,
    make_steps: Annotated[int | None, typer.Option(help="Steps of B4M's make (default 50).")] = None,
    merge_steps: Annotated[int | None, typer.Option(help="Steps of ZipLoRA's merge (default 100).")] = None,
    sample_steps: Annotated[int | None, typer.Option(help="Sampler steps (default 25).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate of the runs (default 2e-3; make: half).")] = None,
    rank: Annotated[int | None, typer.Option(help="Adapter rank of every method (default 64, the paper's).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the data, adapters and training (default 0).")] = None,
    mixed_precision: Annotated[
        str | None,
        typer.Option(help="Training precision: auto (bf16 on a GPU, fp32 on a CPU), no, bf16 or fp16."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --output (finished units are not run again).")
    ] = False,
    max_minutes: Annotated[
        float, typer.Option(help="Stop before a new unit after this many minutes (0: no limit); then --resume.")
    ] = 0.0,
    keep_runs: Annotated[bool, typer.Option("--keep-runs", help="Keep every run's checkpoints under runs/.")] = False,
    list_methods: Annotated[bool, typer.Option("--list", help="List the methods and ablations and exit.")] = False,
    workers: Annotated[
        int, typer.Option(help="Worker processes for the units (0: one per GPU when there are several, else 1).")
    ] = 0,
) -> None:
    """Methods × content-style pairs × prompts × seeds on the built-in world, scored against ground truth."""
    from .bench import VARIANTS, BenchConfig, parse_pairs, quick_config, run_bench
    from .report import interval_text

    if list_methods:
        for name, variant in VARIANTS.items():
            console.print(f"{name:22s} {variant.summary}", highlight=False, soft_wrap=True)
        return
    overrides = {
        "methods": methods,
        "prompts": prompts,
        "seeds": seeds,
        "model": model,
        "oracle": oracle,
        "steps": steps,
        "make_steps": make_steps,
        "merge_steps": merge_steps,
        "sample_steps": sample_steps,
        "lr": lr,
        "rank": rank,
        "seed": seed,
        "mixed_precision": mixed_precision,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if pairs:
        overrides["pairs"] = parse_pairs(pairs)
    elif contents or styles:
        overrides["pairs"] = None
        overrides.update(
            {k: v for k, v in (("contents", _comma_list(contents)), ("styles", _comma_list(styles))) if v}
        )
    config = quick_config(**overrides) if quick else BenchConfig(**overrides)
    from .bench import default_workers

    results = run_bench(
        output,
        config,
        console=console,
        resume=resume,
        max_minutes=max_minutes,
        keep_runs=keep_runs,
        workers=workers or default_workers(),
    )
    if not results.get("complete", True):
        return
    ref = results["reference"]
    table = Table(title=f"b4m bench: means; average and Δ average vs {ref} with 95% intervals (paired)")
    for column in ("method", "content", "style", "prompt", "average", "c-leak", "s-leak", "Δ average", "s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for m, summary in results["summary"].items():
        a, d = summary["average"], results["differences"][m]["average"]
        means = [f"{summary[k]['mean']:.2f}" for k in ("content", "style", "prompt")]
        leaks = [f"{summary[k]['mean']:.2f}" for k in ("content_leak", "style_leak")]
        average = interval_text(a)
        diff = "" if m == ref else interval_text(d, signed=True)
        table.add_row(m, *means, average, *leaks, diff, f"{results['wall_seconds'][m]['total']:.0f}")
    console.print(table)
    console.print(f"report: {output / 'report.html'}", highlight=False)


@app.command("eval")
def eval_cmd(
    images: Annotated[Path, typer.Argument(help="Folder of generated images (b4m's grids are skipped).")],
    content_refs: Annotated[Path | None, typer.Option(help="Folder of content reference images.")] = None,
    style_refs: Annotated[Path | None, typer.Option(help="Folder of style reference images.")] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="Text file, one prompt per line (one for all images, or one per image in name order)."),
    ] = None,
    clip: Annotated[str, typer.Option(help="CLIP model folder or Hub id (style and prompt alignment).")] = (
        "openai/clip-vit-large-patch14"
    ),
    dino: Annotated[str, typer.Option(help="DINOv2 model folder or Hub id (content alignment).")] = (
        "facebook/dinov2-base"
    ),
    placeholder: Annotated[
        list[str] | None, typer.Option(help="Word removed from the prompts before scoring (repeatable), e.g. sks.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when available).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images or prompts per forward pass.")] = 32,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the scores as JSON.")] = None,
) -> None:
    """The paper's metrics on real models: content (DINOv2), style and prompt (CLIP) alignment of an image folder."""
    import json

    from .io_utils import atomic_path
    from .metrics.evaluate import evaluate_folder
    from .metrics.stats import bootstrap_mean
    from .report import interval_text

    result = evaluate_folder(
        images,
        content_refs,
        style_refs,
        prompts,
        clip=clip,
        dino=dino,
        placeholders=placeholder or (),
        device=device,
        batch_size=batch_size,
    )
    intervals = {}
    for metric, scores in result["per_image"].items():
        iv = bootstrap_mean(scores)
        intervals[metric] = {"mean": iv.estimate, "low": iv.low, "high": iv.high}
    result["intervals"] = intervals
    table = Table(title=f"{result['n_images']} images: mean cosine, 95% bootstrap interval")
    table.add_column("metric")
    table.add_column("score", justify="right")
    for metric, iv in intervals.items():
        table.add_row(metric, interval_text(iv, 4))
    if "average" in result["mean"]:
        table.add_row("average", f"{result['mean']['average']:.4f}")
    console.print(table)
    console.print("models: " + ", ".join(f"{k} {v}" for k, v in result["models"].items()), highlight=False)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(output) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
        console.print(f"wrote {output}", highlight=False)


# --------------------------------------------------------------------------------------------------------------------
# Several runs at once


@app.command()
def sweep(
    jobs: Annotated[
        Path,
        typer.Argument(help="Jobs file (TOML or JSON): name, argv (a b4m command) or command, depends_on, seeds."),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for logs/ and summary.json.")] = Path(
        "runs/sweep"
    ),
    workers: Annotated[int | None, typer.Option(help="Jobs at once (default: one per GPU; 1 without a GPU).")] = None,
    gpus: Annotated[
        str | None, typer.Option(help="GPU indices to use, e.g. 0,1 (default: every visible one).")
    ] = None,
    jobs_per_gpu: Annotated[int | None, typer.Option(help="Jobs sharing each GPU at once (default 1).")] = None,
    retries: Annotated[int | None, typer.Option(help="Times a failed job is run again (default 1).")] = None,
    metric: Annotated[
        str | None, typer.Option(help="Key of each job's run.json/results.json to rank by, e.g. final_loss.")
    ] = None,
    goal: Annotated[str | None, typer.Option(help="min or max: which end of the metric ranks first.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the jobs and the slots, and exit.")] = False,
) -> None:
    """Run independent b4m commands at once, one per free GPU: content and style runs, make per pair, seeds."""
    from .sweep import load_jobs, make_slots, run_jobs

    job_list, settings = load_jobs(jobs)

    def pick(flag, key: str, default):
        return flag if flag is not None else settings.get(key, default)

    slots = make_slots(pick(workers, "workers", None), pick(gpus, "gpus", None), pick(jobs_per_gpu, "jobs_per_gpu", 1))
    if dry_run:
        for job in job_list:
            after = f"  (after {', '.join(job.depends_on)})" if job.depends_on else ""
            console.print(f"{job.name}: {job.display}{after}", highlight=False, markup=False, soft_wrap=True)
        console.print("slots: " + ", ".join(s.name for s in slots), highlight=False)
        return
    summary = run_jobs(
        job_list,
        output,
        slots=slots,
        retries=pick(retries, "retries", 1),
        metric=pick(metric, "metric", None),
        goal=pick(goal, "goal", "min"),
        console=console,
    )
    if summary["failed"] or summary["skipped"]:
        raise typer.Exit(1)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main() -> None:
    import warnings

    warnings.showwarning = _show_warning  # one line per warning, no source excerpt
    try:
        app()
    except B4MError as e:
        print(f"error: {e}", file=sys.stderr)  # one line, never wrapped
        sys.exit(2)


if __name__ == "__main__":
    main()
