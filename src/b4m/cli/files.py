"""Commands on adapter files: ``inspect``, ``dry-run``, ``fuse``, ``export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .console import console


def inspect(
    file: Annotated[Path, typer.Argument(help="A b4m adapter file or a plain LoRA (diffusers or kohya format).")],
    modules: Annotated[bool, typer.Option("--modules", help="List every adapted module.")] = False,
) -> None:
    """Print what a LoRA or b4m file holds: targets, rank, ratio, role, fingerprint."""
    from ..describe import describe

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


def dry_run(
    model: Annotated[
        str,
        typer.Option(
            help="Diffusers model folder (SD, SDXL, FLUX.1, FLUX.2 klein), UNet config.json, Hub id, world or a world "
            "model folder."
        ),
    ] = "world",
    transformer: Annotated[
        str | None,
        typer.Option(
            help="A FLUX transformer .safetensors file to use with --model (a FLUX folder): checked against it from "
            "its header.",
            show_default=False,
        ),
    ] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 64,
    ratio: Annotated[float, typer.Option(help="Frozen fraction d of each factor.")] = 0.5,
    targets: Annotated[
        str,
        typer.Option(
            help="Comma-separated module names or dotted suffixes, or a regex prefixed with 're:'; default: the "
            "model's (to_q,to_k,to_v,to_out.0; FLUX.1 and FLUX.2 klein: the attention projections of their double and "
            "single blocks)."
        ),
    ] = "",
    exclude: Annotated[str, typer.Option(help="Same rule as --targets; wins over it.")] = "",
    all_modules: Annotated[bool, typer.Option("--modules", help="List every matched module.")] = False,
) -> None:
    """List the modules a PLP adapter would adapt, with trainable and frozen parameter counts (no weights loaded)."""
    from ..adapter.config import PLPConfig
    from ..errors import B4MError
    from ..loading import check_transformer, denoiser_config, flux_family, transformer_skeleton
    from ..unet_skeleton import unet_skeleton

    if transformer:  # the file fits the folder (family, blocks, width): its header against the folder's config
        described = check_transformer(model, transformer).describe()
        console.print(f"transformer: {transformer}, {described}", highlight=False, soft_wrap=True)
    elif Path(model).suffix.lower() == ".safetensors" and Path(model).is_file():
        _refuse_flux_file(model)

    # no --targets: the model's own, which the walker takes from the skeleton's class (FLUX.1's, klein's, the UNets')
    config = PLPConfig(rank=rank, ratio=ratio, targets=_patterns(targets), exclude=_patterns(exclude))
    family = flux_family(model)  # FLUX.1 or FLUX.2 [klein], a local folder or a cached Hub id: their transformer
    if family:
        skeleton = transformer_skeleton(model, family)
        if skeleton is None:
            raise B4MError(f"{model}: no transformer/config.json (a Hub id: download the model first, hf download)")
    else:
        found = denoiser_config(model)  # the world, local folders and cached Hub ids: their config files
        skeleton = unet_skeleton(found[0] if found else model)
    from ..adapter import walker  # torch: after the model's config files were found

    result = walker.dry_run(skeleton, config)
    lines = result.lines()
    if not all_modules and len(lines) > 12:
        lines = [*lines[:6], f"  … {len(result.modules) - 8} more (--modules lists all) …", *lines[-4:]]
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    mib = (result.trainable + result.frozen) * 4 / 2**20
    console.print(f"adapter file size (fp32): {mib:.1f} MiB", highlight=False)


def _refuse_flux_file(model: str) -> None:
    """A FLUX transformer file given as ``--model``: the one-line error naming ``--transformer`` (as loading says)."""
    from ..errors import B4MError
    from ..models.flux_file import not_a_whole_model, read_transformer_file

    try:
        file = read_transformer_file(model)
    except B4MError:
        return  # another kind of file: the usual path says what it is
    raise not_a_whole_model(file)


def _patterns(text: str) -> list[str] | str:
    """``--targets``/``--exclude``: a comma-separated list, or one regex after ``re:``."""
    text = text.strip()
    if text.startswith("re:"):
        return text[3:]
    return [p.strip() for p in text.split(",") if p.strip()]


def fuse(
    content: Annotated[Path, typer.Argument(help="The content run's .b4m.safetensors file.")],
    style: Annotated[Path, typer.Argument(help="The style run's .b4m.safetensors file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the fused .b4m.safetensors.")],
) -> None:
    """Fuse a content run and a style run into LoRA_f (the make stage with no fine-tuning steps)."""
    from ..adapter.file import fuse as fuse_files
    from ..adapter.file import load_adapter, save_adapter
    from ..files import check_output

    check_output(output, content, style)
    fused = fuse_files(load_adapter(content), load_adapter(style))
    save_adapter(fused, output)
    console.print(f"wrote {output} (fingerprint {fused.fingerprint()})", highlight=False)


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
    from ..adapter.file import load_adapter
    from ..files import check_output
    from ..loading import denoiser_config, model_of_identity
    from ..lora_files import dtype_from_name, save_lora
    from ..unet_skeleton import read_unet_config

    check_output(output, file)
    torch_dtype = dtype_from_name(dtype)
    adapter = load_adapter(file)
    factors = adapter.factors(scale=scale, content_scale=content_scale, style_scale=style_scale)
    metadata = {"b4m_role": adapter.role, "b4m_fingerprint": adapter.fingerprint(), **adapter.metadata}
    family = adapter.config.base_model.partition(":")[0]
    if family in ("flux", "flux2"):  # transformer names: the FLUX families' own file layouts
        naming = save_lora(factors, output, format=format, dtype=torch_dtype, metadata=metadata, family=family)
        config = None
    else:
        if unet_config:
            config = read_unet_config(unet_config)
        else:  # the adapter's base model, where its config files say it without the Hub (the world, a local folder)
            found = denoiser_config(model_of_identity(adapter.config.base_model) or "")
            config = found[0] if found else None
        naming = save_lora(factors, output, format=format, dtype=torch_dtype, metadata=metadata, unet_config=config)
    console.print(f"wrote {output} ({format}, {dtype}, {len(factors)} modules)", highlight=False)
    if naming == "sgm":
        console.print("kohya names in SDXL's SGM block layout (lora_unet_input_blocks_…), as kohya writes them")
    elif naming == "diffusers":
        hint = (
            ""
            if config is not None
            else "; for SDXL's SGM layout (what kohya's SDXL scripts write), pass --unet-config"
        )
        console.print(f"kohya names in diffusers' block layout (lora_unet_down_blocks_…){hint}", highlight=False)
