"""The stages: ``content`` and ``style`` (break), ``make``, and ``generate``.

A stage's settings come, lowest first, from the stage's defaults, a preset, the ``--config`` file and the flags
given; its options are generated from the config dataclasses (:mod:`b4m.cli.options`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .console import console
from .options import with_settings

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with any of the settings.")]
PrintOpt = Annotated[bool, typer.Option("--print-config", help="Print the merged config as TOML and exit.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the run folder's latest checkpoint.")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace the run already in the output folder (its checkpoints go).")
]


GenerateOpt = Annotated[
    int,
    typer.Option(
        "--generate",
        help="After make, this many images of each --generate-prompt into OUTPUT/images (what b4m generate writes), "
        "the base model loaded once; make's own samples/ grid is then left out unless its \\[validation] table sets "
        "prompts or seeds.",
    ),
]
GeneratePromptOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--generate-prompt",
        help="A prompt of --generate's images (repeat for more); default 'a <content placeholder> in <style "
        "placeholder> style'.",
        show_default=False,
    ),
]


def run_stage(
    stage: str,
    settings: dict[str, Any],
    config: Path | None,
    print_config: bool,
    resume: bool,
    overwrite: bool,
    images: int = 0,
    image_prompts: list[str] | None = None,
) -> None:
    """Run ``stage`` with ``settings`` (``{config key: value}``) over the ``config`` file, or print the result; make
    with ``images``: then that many images of each of ``image_prompts`` (:func:`b4m.runs.flow.make_and_generate`)."""
    from ..errors import B4MError
    from ..runs.config import stage_config, to_toml
    from ..runs.stages import run_break, run_make
    from ..training.config import folded
    from ..training.distributed import current

    sources: dict[str, str] = {}
    cfg = stage_config(stage, config, settings, sources)
    if print_config:  # with where each value comes from: a default, the base model, a preset, the file, a flag
        typer.echo(to_toml(cfg, sources), nl=False)
        return
    # Under accelerate launch: the process group, each rank's own GPU as the current device before the model loads,
    # a batch that splits over the ranks, and output from rank 0 only (one process: none of this does anything).
    dist = current()
    dist.check_batch(folded(cfg.train).batch_size)  # the batch the loop runs (fold_accumulation multiplies it)
    out = console if dist.is_main else None
    if image_prompts and not images:
        raise B4MError("--generate-prompt needs --generate N (the images of each prompt)")
    if images:
        from ..runs.flow import make_and_generate

        if dist.enabled:
            raise B4MError("--generate runs in one process: leave it out here and run b4m generate afterwards")
        make_and_generate(cfg, image_prompts or [], images, resume=resume, overwrite=overwrite, console=out)
    elif stage == "make":
        run_make(cfg, resume=resume, overwrite=overwrite, console=out)
    else:
        run_break(stage, cfg, resume=resume, overwrite=overwrite, console=out)


def _stage_command(stage: str, doc: str):
    def command(
        settings: dict[str, Any],
        config: ConfigOpt = None,
        print_config: PrintOpt = False,
        resume: ResumeOpt = False,
        overwrite: OverwriteOpt = False,
    ) -> None:
        run_stage(stage, settings, config, print_config, resume, overwrite)

    command.__name__, command.__doc__ = stage, doc
    return with_settings(stage, command)


content = _stage_command(
    "content",
    "Break: learn a content in its half of the adapter, the other half learning auxiliary styles "
    "(multi-correspondence).",
)
style = _stage_command(
    "style",
    "Break: learn a style in its half of the adapter, the other half learning auxiliary contents "
    "(multi-correspondence).",
)


def _make(
    settings: dict[str, Any],
    config: ConfigOpt = None,
    print_config: PrintOpt = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    generate: GenerateOpt = 0,
    generate_prompt: GeneratePromptOpt = None,
) -> None:
    run_stage("make", settings, config, print_config, resume, overwrite, generate, generate_prompt)


_make.__name__ = "make"
_make.__doc__ = (
    "Make: fuse a content run and a style run, then fine-tune briefly with the Riemannian preconditioner "
    "(--generate N: then N images of each prompt)."
)
make = with_settings("make", _make)


def generate(
    run: Annotated[
        str | None,
        typer.Argument(
            help="A run folder (fused, content or style) or a .b4m.safetensors file; with --content-lora and "
            "--style-lora there is none and every argument is a prompt.",
            show_default=False,
        ),
    ] = None,
    prompts: Annotated[list[str] | None, typer.Argument(help="One or more prompts.", show_default=False)] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for the images and the grid.")] = "out",
    n: Annotated[int, typer.Option("-n", help="Images per prompt (seeds seed … seed+n-1).")] = 4,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Diffusers folder, single file, Hub id, a world model folder, or world (default: the run's).",
        ),
    ] = None,
    transformer: Annotated[
        str | None,
        typer.Option(
            help="A FLUX.1 or FLUX.2 \\[klein] transformer .safetensors file (BFL/ComfyUI or diffusers names) that "
            "replaces the transformer of --model, a diffusers FLUX folder or Hub id (default: the run's).",
            show_default=False,
        ),
    ] = None,
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt.")] = "",
    steps: Annotated[
        int | None,
        typer.Option(help="Sampling steps (default: the model's: 25; FLUX.1 schnell 4).", show_default=False),
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(help="Classifier-free guidance scale (default: the model's; 5 for SD/SDXL, 0 FLUX.1 schnell)."),
    ] = None,
    scheduler: Annotated[str | None, typer.Option(help="euler, euler_a, dpm++, ddim, pndm, unipc.")] = None,
    scale: Annotated[float, typer.Option(help="Multiplier of the whole adapter (of both LoRAs).")] = 1.0,
    content_scale: Annotated[float, typer.Option(help="Multiplier of the content half (of --content-lora).")] = 1.0,
    style_scale: Annotated[float, typer.Option(help="Multiplier of the style half (of --style-lora).")] = 1.0,
    merge: Annotated[
        bool, typer.Option(help="Merge the adapter into the weights (faster sampling; --combine sum always does).")
    ] = False,
    resolution: Annotated[int | None, typer.Option(help="Image size (default: the model's).")] = None,
    upscale: Annotated[
        int, typer.Option(help="Write the images this many times larger (nearest neighbour; e.g. 4 for 32-px ones).")
    ] = 1,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Keep the images an earlier generate drew in the output folder with the same prompts and settings, "
            "and draw only the missing ones (more seeds, another prompt, what an interruption lost).",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the images an earlier generate left in the output folder.")
    ] = False,
    content_lora: Annotated[
        str | None,
        typer.Option(
            help="A plain LoRA file (diffusers/peft or kohya .safetensors) of a subject, combined with --style-lora "
            "instead of a run; --model is its base model (default: world).",
            show_default=False,
        ),
    ] = None,
    style_lora: Annotated[
        str | None,
        typer.Option(help="A plain LoRA file of a style, combined with --content-lora.", show_default=False),
    ] = None,
    combine: Annotated[
        str,
        typer.Option(
            help="How --content-lora and --style-lora combine: k-lora (K-LoRA, Ouyang et al. 2025: per layer and "
            "sampling step, the LoRA with the larger Top-K sum) or sum (direct merge: the two ΔW added, weighted "
            "by --content-scale and --style-scale)."
        ),
    ] = "k-lora",
    base_weights: Annotated[
        str,
        typer.Option(
            help="The denoiser's and text encoders' linear weights: auto (the run's own setting; full width for "
            "LoRA files), full (the loading dtype), int8 or float8 (stored in 8 bits by torchao, pip install "
            "'b4m\\[lowmem]'; the adapter runs unmerged, --merge falls back with a warning)."
        ),
    ] = "auto",
) -> None:
    """Generate images with a made (or content/style) adapter, or with two plain LoRAs combined (--content-lora,
    --style-lora, --combine); PNG metadata holds prompt, seed and settings."""
    from ..runs.generation import generate as run_generate

    prompts = list(prompts or [])
    if content_lora is not None or style_lora is not None:  # no run: the first argument is a prompt too
        prompts, run = ([run] if run is not None else []) + prompts, None
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
        upscale=upscale,
        resume=resume,
        overwrite=overwrite,
        content_lora=content_lora,
        style_lora=style_lora,
        combine=combine,
        base_weights=base_weights,
        transformer=transformer,
        console=console,
    )


def run(
    content_images: Annotated[str | None, typer.Option(help="Folder of the content's images.")] = None,
    content_prompt: Annotated[
        str | None,
        typer.Option(help="Caption of the content images, with its placeholder, e.g. 'a photo of sks dog'."),
    ] = None,
    style_images: Annotated[str | None, typer.Option(help="Folder of the style's images.")] = None,
    style_prompt: Annotated[
        str | None, typer.Option(help="Caption of the style images, with its placeholder, e.g. 'a cat in zwx style'.")
    ] = None,
    content_placeholder: Annotated[str | None, typer.Option(help="The content's token (default sks).")] = None,
    style_placeholder: Annotated[str | None, typer.Option(help="The style's token (default zwx).")] = None,
    content_aux: Annotated[
        str | None, typer.Option(help="Auxiliary sets of the content run (default: generated).")
    ] = None,
    style_aux: Annotated[
        str | None, typer.Option(help="Auxiliary sets of the style run (default: generated).")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Folder for the three run folders and the images.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Diffusers folder, single file, Hub id, or world (default).")
    ] = None,
    transformer: Annotated[
        str | None,
        typer.Option(
            help="A FLUX.1 or FLUX.2 \\[klein] transformer .safetensors file (BFL/ComfyUI or diffusers names) that "
            "replaces the transformer of --model, then a diffusers FLUX folder or Hub id.",
            show_default=False,
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="fast, low-memory or low-memory-8bit, for every stage (b4m content --help says what each sets)."
        ),
    ] = None,
    resolution: Annotated[
        int | None, typer.Option(help="Training resolution (default: the model's, at most 512).")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="Adapter rank (default 64, the paper's).")] = None,
    steps: Annotated[int | None, typer.Option(help="Steps of the content run and of the style run.")] = None,
    make_steps: Annotated[int | None, typer.Option(help="Steps of make.")] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt", "-p", help="Prompt of the images at the end; repeatable (default: 'a sks in zwx style')."
        ),
    ] = None,
    n: Annotated[int | None, typer.Option("-n", help="Images per prompt (default 4).")] = None,
    seed: Annotated[int | None, typer.Option(help="First seed of the images (default 0).")] = None,
    upscale: Annotated[int | None, typer.Option(help="Write the images this many times larger (nearest).")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Flow file (TOML): see docs/pipeline.md.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip the finished stages, continue the interrupted one.")
    ] = False,
    overwrite: OverwriteOpt = False,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the merged flow as a flow file (TOML) and exit.")
    ] = False,
) -> None:
    """The whole flow in one process: content run, style run, make and a few images, the base model loaded once.
    Each stage's folder under -o is what its own command writes (b4m make can pair OUT/content with other styles)."""
    from ..runs.flow import flow_config, flow_to_toml, run_flow

    flags = {
        "output": output,
        "model": model,
        "transformer": transformer,
        "preset": preset,
        "resolution": resolution,
        "adapter.rank": rank,
        "content.images": content_images,
        "content.prompt": content_prompt,
        "content.aux": content_aux,
        "content.placeholder": content_placeholder,
        "content.train.steps": steps,
        "style.images": style_images,
        "style.prompt": style_prompt,
        "style.aux": style_aux,
        "style.placeholder": style_placeholder,
        "style.train.steps": steps,
        "make.train.steps": make_steps,
    }
    flow = flow_config(config, flags, {"prompts": prompt or None, "n": n, "seed": seed, "upscale": upscale})
    if print_config:
        print(flow_to_toml(flow), end="")
        return
    run_flow(flow, resume=resume, overwrite=overwrite, console=console)
