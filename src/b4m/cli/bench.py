"""Scores: ``bench`` (methods on the built-in world, against ground truth) and ``eval`` (the paper's metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .console import console


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
    split: Annotated[
        str,
        typer.Option(help="dev: the pairs every setting is chosen on (4 × 4); test: the reported table's (6 × 6)."),
    ] = "dev",
    contents: Annotated[
        str | None, typer.Option(help="Comma-separated contents (default: the split's novel ones).")
    ] = None,
    styles: Annotated[
        str | None, typer.Option(help="Comma-separated styles (default: the split's novel ones).")
    ] = None,
    prompts: Annotated[int | None, typer.Option(help="Evaluation prompts per pair (default 4).")] = None,
    seeds: Annotated[int | None, typer.Option(help="Sampling seeds per prompt (default 4).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="The CI preset: 1 pair, 1 prompt, 1 seed, 2 steps.")] = False,
    model: Annotated[
        str, typer.Option("--model", "-m", help="world (the shipped model) or a world folder.")
    ] = "world",
    oracle: Annotated[str, typer.Option(help="Shipped oracle a or b, or an oracle file.")] = "a",
    steps: Annotated[int | None, typer.Option(help="Steps of every stage-1 run and of JTtrain (default 150).")] = None,
    make_steps: Annotated[int | None, typer.Option(help="B4M's make steps (default 100; b4m make's is 50).")] = None,
    merge_steps: Annotated[int | None, typer.Option(help="Steps of ZipLoRA's merge (default 100).")] = None,
    sample_steps: Annotated[int | None, typer.Option(help="Sampler steps (default 25).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate of the runs (default 2e-3; make: half).")] = None,
    rank: Annotated[int | None, typer.Option(help="Adapter rank of every method (default 64, the paper's).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the data, adapters and training (default 0).")] = None,
    mixed_precision: Annotated[
        str | None,
        typer.Option(help="Training precision: auto (bf16 on a GPU, fp32 on a CPU), no, bf16 or fp16."),
    ] = None,
    method_settings: Annotated[
        Path | None,
        typer.Option(
            help="JSON of each method's own lr and steps, e.g. the dev grid's choices (bench/dev_grid.py --json): "
            '{"jttrain": {"lr": 0.001, "steps": 150}, …}; other keys are ignored.'
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="Speed preset of every training run, as in b4m content (fast: CUDA graphs, fused AdamW)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --output (finished units are not run again).")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start again in an --output that holds a bench run (deletes it).")
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
    from ..world.bench.variants import VARIANTS, BenchConfig, parse_pairs, quick_config

    if list_methods:
        for name, variant in VARIANTS.items():
            console.print(f"{name:22s} {variant.summary}", highlight=False, soft_wrap=True)
        return
    given = {
        "split": split,
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
        "preset": preset,
    }
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if method_settings is not None:  # the file may name more methods (a grid's bounds): the ones run are kept
        from ..world.bench.variants import resolve_methods

        run = set(resolve_methods(methods))
        overrides["method_settings"] = {m: v for m, v in _read_method_settings(method_settings).items() if m in run}
    if pairs:
        overrides["pairs"] = parse_pairs(pairs)
    elif contents or styles:
        overrides["pairs"] = None
        lists = {"contents": _comma_list(contents), "styles": _comma_list(styles)}
        overrides.update({k: v for k, v in lists.items() if v})
    config = quick_config(**overrides) if quick else BenchConfig(**overrides)
    if quick:
        console.print(
            "--quick is a smoke test (2 steps per run, rank 4, one pair): it checks that every method runs and is "
            "recorded; its scores say nothing about the methods",
            highlight=False,
        )
    from ..world.bench.run import run_bench  # (torch: only once the settings were checked)
    from ..world.bench.workers import default_workers

    results = run_bench(
        output,
        config,
        console=console,
        resume=resume,
        overwrite=overwrite,
        max_minutes=max_minutes,
        keep_runs=keep_runs,
        workers=workers or default_workers(),
    )
    if results.get("complete", True):
        _print_results(results)
        console.print(f"report: {output / 'report.html'}", highlight=False)


def _read_method_settings(path: Path) -> dict[str, dict[str, Any]]:
    import json

    from ..errors import B4MError

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise B4MError(f"{path}: no such file") from None
    except ValueError as e:
        raise B4MError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise B4MError(f"{path}: expected an object of method: {{lr, steps}}")
    out = {}
    for method, value in data.items():
        if value is None:
            raise B4MError(f"{path}: {method} has no setting (it diverged at every configuration of the grid)")
        if not isinstance(value, dict):
            raise B4MError(f"{path}: {method}: expected an object with lr and steps")
        out[method] = {k: value[k] for k in ("lr", "steps") if k in value}
    return out


def _comma_list(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _print_results(results: dict[str, Any]) -> None:
    """The benchmark's summary table: per method, the means, and the paired difference to the reference."""
    from ..report import interval_text

    ref = results["reference"]
    table = Table(title=f"b4m bench: means; average and Δ average vs {ref} with 95% intervals (paired)")
    for column in ("method", "content", "style", "prompt", "average", "c-leak", "s-leak", "Δ average", "seconds"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=column == "method")
    for m, summary in results["summary"].items():
        a, d = summary["average"], results["differences"][m]["average"]
        means = [f"{summary[k]['mean']:.2f}" for k in ("content", "style", "prompt")]
        leaks = [f"{summary[k]['mean']:.2f}" for k in ("content_leak", "style_leak")]
        diff = "" if m == ref else interval_text(d, signed=True)
        table.add_row(m, *means, interval_text(a), *leaks, diff, f"{results['wall_seconds'][m]['total']:.0f}")
    console.print(table)


def evaluate(
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

    from ..files import atomic_path
    from ..metrics.evaluate import evaluate_folder, mean_intervals
    from ..report import interval_text

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
    result["intervals"] = mean_intervals(result["per_image"])
    table = Table(title=f"{result['n_images']} images: mean cosine, 95% bootstrap interval")
    table.add_column("metric")
    table.add_column("score", justify="right")
    for metric, iv in result["intervals"].items():
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
