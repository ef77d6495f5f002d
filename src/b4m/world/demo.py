"""``b4m demo``: B4M end to end on the built-in world, scored against ground truth, in a few minutes on a CPU.

A novel content (never rendered in pretraining; default: a teapot) and a novel style (default: sunburst) stand for a
user's own subject and an artist's style. The demo renders their reference sets and the auxiliary sets, runs the
content run, the style run and make on the shipped world model, generates every evaluation prompt with several seeds,
scores the images with the shipped oracle and writes ``report.json`` and ``report.html`` (references, the generated
grid, the metric table with 95% intervals). For reference it also scores the base model prompted with the same
placeholder prompts and no adapter (what a user gets without training).
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..adapter.config import PLPConfig
from ..errors import B4MError
from ..files import atomic_path, check_output
from ..lora_files.factors import applied
from ..method.config import B4MConfig, MakeConfig
from ..method.stages import run as run_b4m
from ..models.base import SampleRequest
from ..report import interval_text, summarize
from ..report import png_data_url as _png
from ..training.config import TrainConfig
from ..training.sets import encode_sets
from .catalog import default_catalog
from .tasks import METRICS, TaskConfig, make_task, score_images

#: The demo's pass marks: B4M's images must reach these accuracies.
BARS = {"content": 0.60, "style": 0.60, "prompt": 0.80}
BINARY = {"content", "style", "content_leak", "style_leak"}


@dataclass
class DemoConfig:
    content: str = "teapot"
    style: str = "brick"
    steps: int = 60  # content run and style run, each
    make_steps: int = 40
    lr: float = 5e-3
    up_lr_ratio: float = 1.0  # lr of the up half (B: the content half) over the down half's, in the two runs
    rank: int = 64  # the paper's; at 16 the content run barely learns (bench/results/demo-sweep-h100-2026-11-24.json)
    batch_size: int = 2  # images per set per step
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    prompts: int = 4
    sample_steps: int = 25
    guidance_scale: float | None = None  # None: the model's default
    seed: int = 0
    baseline: bool = True  # also score the base model with the same prompts and no adapter
    mixed_precision: str = "auto"  # bf16 on a GPU that has it; "no" runs fp32 everywhere, as on a CPU

    def b4m_config(self) -> B4MConfig:
        train = TrainConfig(
            steps=self.steps,
            lr=self.lr,
            up_lr_ratio=self.up_lr_ratio,
            mixed_precision=self.mixed_precision,
            batch_size=self.batch_size,
            grad_accum=1,
            checkpoint_every=10**9,
            seed=self.seed,
        )
        make = MakeConfig(
            steps=self.make_steps,
            lr=self.lr / 2,
            batch_size=self.batch_size,
            grad_accum=1,
            checkpoint_every=10**9,
            mixed_precision=self.mixed_precision,
        )
        return B4MConfig(adapter=PLPConfig(rank=self.rank, seed=self.seed), train=train, make=make)


def _summary(scores: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return summarize(scores, METRICS, BINARY)


def _table_rows(report: dict) -> list[tuple[str, str, list[str]]]:
    rows = []
    for method, summary in report["metrics"].items():
        cells = [interval_text(summary[k]) for k in METRICS]
        rows.append((method, method, cells))
    return rows


def write_html(report: dict, images: dict[str, np.ndarray], path: Path) -> None:
    """The report as one self-contained HTML page."""
    esc = html.escape
    cfg = report["config"]
    seeds = len(cfg["seeds"])
    parts = [
        "<!doctype html><meta charset='utf-8'><title>b4m demo</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}td,th{padding:.3em .8em;text-align:right}"
        "th:first-child,td:first-child{text-align:left}table{border-collapse:collapse}tr:nth-child(even){background:#f4f4f4}"
        "img{image-rendering:pixelated}</style>",
        f"<h1>b4m demo: {esc(report['content'])} × {esc(report['style'])}</h1>",
        f"<p>Built-in world, base model <code>{esc(report['model'])}</code>, {esc(report['device'])}, "
        f"{report['seconds']['total']:.0f} s in all. Content and style are novel: pretraining never rendered "
        "them.</p>",
        "<h2>References</h2><p>Content (in the plain look, captioned with <code>sks</code>):</p>",
        f"<img src='{_png(images['content_refs'], 8)}'>",
        "<p>Style (on known contents, captioned with <code>zwx</code>):</p>",
        f"<img src='{_png(images['style_refs'], 8)}'>",
        "<h2>Generated</h2><p>One row per prompt, one column per seed.</p>",
    ]
    for method, arr in images.items():
        if method in ("content_refs", "style_refs"):
            continue
        parts.append(f"<h3>{esc(method)}</h3><img src='{_png(arr, seeds)}'><ol>")
        parts += [f"<li><code>{esc(p)}</code></li>" for p in report["prompts"]]
        parts.append("</ol>")
    parts.append("<h2>Scores</h2><p>Oracle accuracy (content, style; prompt = mean of position, size, background), ")
    parts.append(
        "leakage, and cosine of oracle embeddings with the references; 95% intervals.</p><table><tr><th></th>"
    )
    parts += [f"<th>{esc(k)}</th>" for k in METRICS]
    parts.append("</tr>")
    for _, method, cells in _table_rows(report):
        parts.append(f"<tr><td>{esc(method)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    verdict = "passed" if report["passed"] else "did not pass"
    bars = ", ".join(f"{k} ≥ {v:.2f}" for k, v in BARS.items())
    parts.append(f"</table><p>B4M {verdict} the bars ({bars}).</p>")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))


def run_world_demo(out: str | Path, config: DemoConfig | None = None, console=None, model=None, oracle=None) -> dict:
    """Run the demo; returns the report (also written to ``out/report.json`` and ``out/report.html``)."""
    from ..device import default_device
    from ..loading import load_model
    from .weights import load_shipped_oracle

    config = config or DemoConfig()
    b4m_config = config.b4m_config()  # bad settings fail here, before the model loads
    for name, value in (
        ("prompts", config.prompts),
        ("seeds", len(config.seeds)),
        ("sample_steps", config.sample_steps),
    ):
        if value < 1:
            raise B4MError(f"demo {name} must be at least 1, got {value}")
    catalog = default_catalog()
    catalog.content(config.content)  # an unknown name fails here, before any folder is made
    catalog.style(config.style)
    out = Path(out)
    check_output(out, folder=True)
    out.mkdir(parents=True, exist_ok=True)
    say = console.print if console else (lambda *a, **k: None)
    t0 = time.perf_counter()
    device = default_device()
    model = model or load_model("world", device=device)
    oracle = oracle or load_shipped_oracle("a", device=device)
    task = make_task(
        catalog, config.content, config.style, model.resolution, TaskConfig(prompts=config.prompts, seed=config.seed)
    )
    say(f"[bold]b4m demo[/]: content {config.content}, style {config.style} (both novel), {device}")

    with torch.no_grad():
        content_sets = encode_sets(model, task.content_refs, task.content_aux)
        style_sets = encode_sets(model, task.style_refs, task.style_aux)
    t_data = time.perf_counter()
    say(f"content run and style run: {config.steps} steps each; make: {config.make_steps} steps")
    result = run_b4m(content_sets, style_sets, model, b4m_config, out / "runs")
    t_train = time.perf_counter()

    guidance = config.guidance_scale if config.guidance_scale is not None else model.default_guidance
    request = SampleRequest(task.prompts, list(config.seeds), steps=config.sample_steps, guidance_scale=guidance)
    scenes = [s for s in task.scenes for _ in config.seeds]
    generated: dict[str, np.ndarray] = {}
    with applied(model.denoiser, result.made.adapter.factors()):
        generated["B4M"] = model.sample_arrays(request)
    if config.baseline:
        generated["base model, no adapter"] = model.sample_arrays(request)
    t_gen = time.perf_counter()

    scores = {m: score_images(oracle, imgs, scenes, task) for m, imgs in generated.items()}
    metrics = {m: _summary(s) for m, s in scores.items()}
    passed = all(metrics["B4M"][k]["mean"] >= v for k, v in BARS.items())
    report = {
        "content": config.content,
        "style": config.style,
        "model": model.identity,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "config": {**asdict(config), "guidance_scale": guidance},
        "prompts": task.prompts,
        "metrics": metrics,
        "per_image": scores,
        "bars": BARS,
        "passed": passed,
        "seconds": {
            "data": round(t_data - t0, 1),
            "train": round(t_train - t_data, 1),
            "generate": round(t_gen - t_train, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "train": result.info,
    }
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=str))
    images = {"content_refs": task.content_refs.images, "style_refs": task.style_refs.images, **generated}
    write_html(report, images, out / "report.html")
    return report
