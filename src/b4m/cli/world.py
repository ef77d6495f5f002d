"""The built-in world: ``world pretrain``, ``world oracle``, ``world evaluate``, ``world render``, ``world score``,
and ``demo``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import B4MError
from ..world import defaults as world_defaults
from .console import console

ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the output folder's latest checkpoint.")]


def _step_printer():
    """``progress(step, total, loss)``: one line per call, with the seconds since this was made."""
    started = time.perf_counter()

    def progress(step: int, total: int, loss: float) -> None:
        elapsed = time.perf_counter() - started
        console.print(f"step {step}/{total}  loss {loss:.4f}  {elapsed:.0f} s", highlight=False)

    return progress


def pretrain(
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
    from ..world.pretrain import PretrainConfig
    from ..world.pretrain import pretrain as run_pretrain

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
    run_pretrain(config, output, resume=resume, progress=_step_printer())
    console.print(f"wrote {output / 'model'}", highlight=False)


def oracle(
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
    from ..world import default_catalog, load_catalog
    from ..world.oracle import OracleConfig, save_oracle
    from ..world.oracle_training import fresh_render_accuracy, save_record, train_oracle

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
    trained = train_oracle(cat, config, progress=_step_printer())
    seconds = time.perf_counter() - started
    save_oracle(trained, output)
    accuracy = fresh_render_accuracy(trained, cat, n=check, seed=10_000 + seed) if check else {}
    save_record(output, config, seconds, accuracy)
    console.print(
        "fresh renders: " + "  ".join(f"{a} {v:.3f}" for a, v in accuracy.items()) + f"  ({seconds:.0f} s training)",
        highlight=False,
    )


def evaluate(
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
    from ..device import default_device
    from ..loading import load_model
    from ..models.base import SampleRequest
    from ..world import default_catalog
    from ..world.oracle import ATTRIBUTES, load_oracle
    from ..world.quality import QualityConfig, base_model_quality, held_out_pairs, save_quality, save_samples
    from ..world.weights import ORACLES, oracle_file

    def oracle_path(name: str) -> Path:
        return oracle_file(name) if name in ORACLES else Path(name)

    cat = default_catalog()
    device = default_device()
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
            save_samples(images, output / f"samples-g{used}.png", {"config": result["config"]})
    if output:
        save_quality(output, pairs, results)


def demo(
    output: Annotated[
        Path,
        typer.Option(
            "-o",
            "--output",
            help="Folder for report.html, report.json, the run folders and images (a rerun replaces them).",
        ),
    ] = Path("demo"),
    content: Annotated[
        str, typer.Option(help="The content (a novel one stands for the user's subject).")
    ] = world_defaults.DEMO_CONTENT,
    style: Annotated[
        str, typer.Option(help="The style (a novel one stands for the artist's style).")
    ] = world_defaults.DEMO_STYLE,
    steps: Annotated[
        int, typer.Option(help="Steps of the content run and of the style run.")
    ] = world_defaults.BREAK_STEPS,
    rank: Annotated[int, typer.Option(help="Adapter rank (64, the paper's).")] = world_defaults.RANK,
    make_steps: Annotated[int, typer.Option(help="Steps of make.")] = world_defaults.MAKE_STEPS,
    seeds: Annotated[int, typer.Option(help="Seeds per prompt.")] = 4,
    prompts: Annotated[int, typer.Option(help="Evaluation prompts.")] = 4,
    sample_steps: Annotated[int, typer.Option(help="Sampler steps.")] = 25,
    seed: Annotated[int, typer.Option(help="Seed of the data, the adapter and the training.")] = 0,
    baseline: Annotated[bool, typer.Option(help="Also score the base model without an adapter.")] = True,
) -> None:
    """B4M end to end on the built-in world: references, content, style, make, generate, scores (a few CPU minutes)."""
    from ..report import interval_text
    from ..world.demo import NOT_PASSED_NOTE, DemoConfig, run_world_demo
    from ..world.tasks import METRICS

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
    if not report["passed"]:
        console.print(NOT_PASSED_NOTE, highlight=False, markup=False, soft_wrap=True)
    console.print(f"report: {output / 'report.html'}", highlight=False)
    made, prompt = report["runs"]["make"], report["prompts"][0]
    console.print(
        f"run folders: {report['runs']['content']}, {report['runs']['style']}, {made}; next, e.g.:\n"
        f'  b4m generate {made} "{prompt}" -n 4 --upscale 4 -o {output / "more"}',
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def render(
    output: Annotated[Path, typer.Option("--output", "-o", help="The folder to write (new or empty).")],
    content: Annotated[str | None, typer.Option(help="A catalog content (in the plain look).")] = None,
    style: Annotated[str | None, typer.Option(help="A catalog style (on known contents).")] = None,
    aux: Annotated[
        bool,
        typer.Option(
            "--aux",
            help="With one concept: its run's auxiliary sets instead of its references (a folder of folders, for "
            "b4m content/style --aux). With both, every set is written: references and auxiliary sets.",
        ),
    ] = False,
    n: Annotated[int, typer.Option("--n", "-n", help="Images per set.")] = 4,
    sets: Annotated[int, typer.Option(help="Auxiliary sets per run.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the scenes (the demo's and the benchmark's is 0).")] = 0,
    placeholder: Annotated[
        str | None, typer.Option(help="The word the captions use for the concept (default: sks, zwx for a style).")
    ] = None,
) -> None:
    """Render reference folders of the built-in world: images with same-name .txt captions, as b4m content and
    b4m style read them (the sets the demo and the benchmark train on, for the same seed and counts)."""
    from ..world import default_catalog
    from ..world.catalog import PLACEHOLDERS
    from ..world.references import render_sets
    from ..world.tasks import TaskConfig

    if content and style and (aux or placeholder):
        raise B4MError("--aux and --placeholder go with one concept: --content or --style, not both")
    if n < 1 or sets < 1:
        raise B4MError(f"--n and --sets must be at least 1, got {n} and {sets}")
    words = {"content_word": PLACEHOLDERS[0], "style_word": PLACEHOLDERS[1]}
    if placeholder:
        words["content_word" if content else "style_word"] = placeholder
    role = "content" if content else "style"
    which = None if content and style else ((f"{role}-aux",) if aux else (role,))
    config = TaskConfig(refs=n, aux_sets=sets, aux_size=n, seed=seed, **words)
    task, folders = render_sets(default_catalog(), content, style, 32, config, output, which)
    for name, folder in folders.items():
        count = len(list(folder.rglob("*.png")))
        console.print(f"wrote {count} images with captions ({name}) to {folder}", highlight=False)
    _next_commands(task, folders, output, content, style)


def _next_commands(task, folders: dict[str, Path], output: Path, content: str | None, style: str | None) -> None:
    """What to run next, printed after world render (the runs read each image's own caption; --prompt is the
    caption of images without one)."""
    import re

    cw, sw = task.config.content_word, task.config.style_word
    shown = re.sub(r"^a (?=[aeiou])", "an ", f"a {task.style_ref_contents[0]}")
    prompts = {"content": f"a {cw} in plain style", "style": f"{shown} in {sw} style"}
    words = {"content": cw, "style": sw}
    if content and style:
        runs = {r: Path("runs") / getattr(task, r) for r in ("content", "style")}
        made = Path("runs") / f"{task.content}_{task.style}"
        lines = [
            f'b4m {r} --images {folders[r]} --aux {folders[r + "-aux"]} --prompt "{prompts[r]}" '
            f"--placeholder {words[r]} -o {runs[r]}"
            for r in ("content", "style")
        ]
        lines += [
            f"b4m make --content {runs['content']} --style {runs['style']} -o {made}",
            f'b4m generate {made} "{task.prompts[0]}" -n 4 -o out/{made.name}   # prints the world scores',
        ]
    else:
        role, concept = ("content", content) if content else ("style", style)
        same = f"--n {task.config.refs} --seed {task.config.seed}"
        if f"{role}-aux" in folders:
            refs, aux = "REFS", output
            lines = [f"b4m world render --{role} {concept} {same} -o REFS   # the references, if not rendered yet"]
        else:
            refs, aux = output, Path(f"{output}-aux")
            lines = [f"b4m world render --{role} {concept} --aux {same} -o {aux}   # the run's auxiliary sets"]
        lines.append(
            f'b4m {role} --images {refs} --aux {aux} --prompt "{prompts[role]}" --placeholder {words[role]} '
            f"-o runs/{concept}"
        )
    console.print("next:\n" + "\n".join(f"  {line}" for line in lines), highlight=False, markup=False, soft_wrap=True)


def score(
    folder: Annotated[Path, typer.Argument(help="A folder of world images (b4m generate writes the scene in each).")],
    content: Annotated[str, typer.Option(help="The catalog content the content placeholder (sks) stands for.")],
    style: Annotated[str, typer.Option(help="The catalog style the style placeholder (zwx) stands for.")],
    content_refs: Annotated[
        Path | None, typer.Option(help="Content references (default: rendered as world render does).")
    ] = None,
    style_refs: Annotated[
        Path | None, typer.Option(help="Style references (default: rendered as world render does).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the rendered references.")] = 0,
    n: Annotated[int, typer.Option("--n", "-n", help="Rendered references per set.")] = 4,
    oracle: Annotated[str, typer.Option(help="The oracle: shipped a or b, or a file.")] = "a",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write every image's scores to this file.")
    ] = None,
) -> None:
    """Score a folder of world images against ground truth: content, style, prompt (position, size, background),
    leakage and cosines with the references, with 95% intervals (the demo's scores)."""
    import json

    from ..device import default_device
    from ..files import atomic_path
    from ..report import interval_text
    from ..world import default_catalog
    from ..world.oracle import load_oracle
    from ..world.score import References, score_folder
    from ..world.tasks import TaskConfig, make_task
    from ..world.weights import ORACLES, oracle_file

    cat = default_catalog()
    cat.content(content)  # an unknown name fails here, with the catalog's list
    cat.style(style)
    if bool(content_refs) != bool(style_refs):
        raise B4MError("give both --content-refs and --style-refs, or neither")
    if content_refs and style_refs:
        refs = References.from_folders(content_refs, style_refs, cat)
    else:
        refs = References.of_task(make_task(cat, content, style, 32, TaskConfig(refs=n, aux_size=n, seed=seed)))
    scorer = load_oracle(oracle_file(oracle) if oracle in ORACLES else Path(oracle), cat, device=default_device())
    result = score_folder(folder, content, style, scorer, refs, cat)
    table = Table(title=f"{folder}: {len(result.files)} images scored, oracle {oracle}, 95% intervals")
    for column in ("metric", "score", "images"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for k, v in result.summary().items():
        table.add_row(k, interval_text(v), str(v["n"]))
    console.print(table)
    console.print(f"references: {refs.source}", highlight=False)
    if result.not_scored:
        console.print(f"not scored: {len(result.not_scored)} images", highlight=False)
        for path, why in result.not_scored[:10]:
            console.print(f"  {path.name}: {why}", highlight=False, markup=False)
    if json_out:
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=1))
        console.print(f"wrote {json_out}", highlight=False)
