"""The benchmark's results: per-method summaries with intervals, paired differences against B4M, per-pair means,
costs; written as ``results.json`` (by :func:`~b4m.world.bench.run.run_bench`), ``results.csv`` and
``report.html``."""

from __future__ import annotations

import csv
import html
import io
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ...files import atomic_path
from ...images import grid_image, save_png
from ...metrics.stats import paired_bootstrap
from ...report import html_page, html_table, interval_text, png_data_url, summarize
from .concepts import CONCEPT_METRICS, concept_means
from .units import PairData, Unit
from .variants import BINARY, BOUNDS, LOWER_IS_BETTER, METRICS, REFERENCE, VARIANTS, BenchConfig, variant_config


def make_results(
    config: BenchConfig, model, data: list[PairData], units: dict[str, dict[str, Unit]], environment: dict
) -> dict:
    """results.json's contents: settings, ``environment`` (:func:`b4m.environment.record`), per-image scores,
    summaries with intervals, paired differences against the reference, per-pair means, wall times and losses."""
    seeds = list(range(config.seeds))
    items = [
        {"pair": d.label, "content": d.content, "style": d.style, "prompt_index": i, "prompt": p, "seed": s}
        for d in data
        for i, p in enumerate(d.task.prompts)
        for s in seeds
    ]
    methods = list(units)
    per_image = {m: {k: [x for d in data for x in units[m][d.label].scores[k]] for k in METRICS} for m in methods}
    reference = REFERENCE if REFERENCE in per_image else methods[0]
    per_pair = {
        m: {d.label: {k: float(np.mean(units[m][d.label].scores[k])) for k in METRICS} for d in data} for m in methods
    }
    wall = {}
    for m in methods:
        parts = {k: sum(units[m][d.label].seconds[k] for d in data) for k in ("train", "sample", "score")}
        wall[m] = {k: round(v, 2) for k, v in parts.items()}
        wall[m]["total"] = round(sum(parts.values()), 2)
        standalone = np.mean([units[m][d.label].seconds["standalone"] for d in data])
        wall[m]["standalone_seconds_per_pair"] = round(float(standalone), 2)
    stage1 = {m: {k: sum(units[m][d.label].stage1[k] for d in data) for k in ("trained", "reused")} for m in methods}
    cost = {}  # mean per pair of each part (units.unit_cost); the cost of N contents × M styles is
    for m in methods:  # N·content + M·style + N·M·pair, in images and in one worker's seconds
        keys = sorted({k for d in data for k in units[m][d.label].cost})
        if keys:
            cost[m] = {k: round(float(np.mean([units[m][d.label].cost.get(k, 0.0) for d in data])), 3) for k in keys}
    configs = {m: asdict(variant_config(m, config)) for m in methods if VARIANTS[m].method not in BOUNDS}
    settings = asdict(config)
    settings["pairs"] = [list(p) for p in config.pair_list()]
    settings["guidance_scale_used"] = (
        config.guidance_scale if config.guidance_scale is not None else model.default_guidance
    )
    return {
        "benchmark": "b4m bench (built-in world)",
        "settings": settings,
        "model": model.identity,
        **environment,
        "metrics": list(METRICS),
        "binary_metrics": sorted(BINARY),
        "lower_is_better": sorted(LOWER_IS_BETTER),
        **intervals(per_image, items, reference),
        "methods": {m: VARIANTS[m].summary for m in methods},
        "method_configs": configs,
        "per_pair": per_pair,
        "wall_seconds": wall,
        "cost": cost,
        "stage1_runs": stage1,
        "final_losses": {m: {d.label: units[m][d.label].losses for d in data} for m in methods},
        "items": items,
        "per_image": per_image,
    }


INTERVALS = "crossed bootstrap over contents and styles"


def intervals(per_image: dict, items: list[dict], reference: str) -> dict:
    """``intervals`` (what they are), ``reference``, ``summary`` (each method's mean and 95% interval per metric) and
    ``differences`` (each method minus ``reference``, paired by image) of results.json, from its ``per_image``
    scores and ``items``. Whole contents and whole styles are resampled (:mod:`b4m.metrics.stats`, ``crossed``):
    a concept's runs are shared by all its pairs. One pair: Wilson intervals (0/1 metrics) and an item bootstrap."""
    several = len({it["pair"] for it in items}) >= 2
    crossed = ([it["content"] for it in items], [it["style"] for it in items]) if several else None
    summary = {m: summarize(scores, METRICS, BINARY, crossed=crossed) for m, scores in per_image.items()}
    differences = {}
    for m, scores in per_image.items():
        differences[m] = {}
        for k in METRICS:
            iv = paired_bootstrap(scores[k], per_image[reference][k], crossed=crossed)
            differences[m][k] = {"mean": iv.estimate, "low": iv.low, "high": iv.high}
    label = INTERVALS if several else "Wilson (0/1 metrics) / item bootstrap (one pair)"
    return {"intervals": label, "reference": reference, "summary": summary, "differences": differences}


CSV_COLUMNS = (
    "method",
    "metric",
    "mean",
    "low",
    "high",
    "reference",
    "diff",
    "diff_low",
    "diff_high",
    "n_images",
    "n_pairs",
    "seconds",
)


def write_csv(results: dict, path: Path) -> None:
    """One row per method × metric: mean with its interval, the paired difference against the reference."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    n_images = len(results["items"])
    n_pairs = len(results["settings"]["pairs"])
    for m, summary in results["summary"].items():
        for k in results["metrics"]:
            s, d = summary[k], results["differences"][m][k]
            writer.writerow(
                [
                    m,
                    k,
                    f"{s['mean']:.6g}",
                    f"{s['low']:.6g}",
                    f"{s['high']:.6g}",
                    results["reference"],
                    f"{d['mean']:.6g}",
                    f"{d['low']:.6g}",
                    f"{d['high']:.6g}",
                    n_images,
                    n_pairs,
                    results["wall_seconds"][m]["total"],
                ]
            )
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _cost_text(cost: dict | None) -> str:
    if not cost:
        return ""
    parts = [
        f"{part} {cost[f'{part}_images']:.0f} images ({cost[f'{part}_seconds']:.1f} s)"
        for part in ("content", "style", "pair")
        if cost.get(f"{part}_images")
    ]
    return (
        f" Training per pair: {', '.join(parts)}; N contents × M styles cost N·content + M·style + N·M·pair."
        if parts
        else ""
    )


def _concept_tables(results: dict) -> list[str]:
    """report.html's "By concept" tables (content accuracy per content, style accuracy per style), with more than
    one concept on an axis."""
    out = []
    for axis, metric in CONCEPT_METRICS.items():
        means = concept_means(results, axis)
        if len(means) < 2:
            continue
        methods = list(next(iter(means.values())))
        out.append(f"<h3>{metric} accuracy by {axis}</h3>")
        out.append(
            html_table([axis, *methods], [[c, *(f"{row[m]:.2f}" for m in methods)] for c, row in means.items()])
        )
    if out:
        out.insert(
            0,
            "<h2>By concept</h2><p class='small'>Each concept's pairs share its stage-1 run: single-run figures, "
            "where a method wins and loses.</p>",
        )
    return out


def write_html(results: dict, data: list[PairData], images: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """``report.html``: settings, the summary table, a table per method, image grids per pair."""
    esc = html.escape
    st = results["settings"]
    ref = results["reference"]
    metrics = results["metrics"]
    body = [
        "<h1>b4m bench: built-in world</h1>",
        f"<p>Model <code>{esc(results['model'])}</code>, {esc(results['device'])}, {esc(results['date'])}, commit "
        f"<code>{esc(str(results['commit']))}</code>{' (with uncommitted changes)' if results['dirty'] else ''}; "
        f"{sum(w['total'] for w in results['wall_seconds'].values()):.0f} s in the methods' runs over "
        f"{len(results['commands'])} command(s).</p>",
        f"<p>{len(st['pairs'])} pairs × {st['prompts']} prompts × {st['seeds']} seeds = {len(results['items'])} "
        f"images per method. Stage-1 runs and JTtrain {st['steps']} steps, make {st['make_steps']}, ZipLoRA merge "
        f"{st['merge_steps']}, rank {st['rank']}, lr {st['lr']}, batch {st['batch_size']} per set; sampler "
        f"{st['sample_steps']} steps, guidance {st['guidance_scale_used']}."
        + "".join(
            f" {esc(m)}: lr {v.get('lr', st['lr'])}, {v.get('steps', st['steps'])} steps."
            for m, v in st.get("method_settings", {}).items()
        )
        + "</p>",
        "<p class='small'>Oracle accuracy (content, style; prompt = mean of position, size and background accuracy; "
        "average = mean of the three), leakage (content leak: the image shows a content of the style references; "
        "style leak: still in the references' plain look; lower is better) and cosines of the oracle's embeddings "
        f"with the references. 95% intervals: {esc(results['intervals'])}. Δ is the paired difference to "
        f"<code>{esc(ref)}</code> on the same items.</p>",
        "<h2>Summary</h2>",
        html_table(
            ["method", *metrics, "seconds"],
            [
                [
                    m,
                    *(interval_text(results["summary"][m][k]) for k in metrics),
                    f"{results['wall_seconds'][m]['total']:.0f}",
                ]
                for m in results["summary"]
            ],
        ),
        *(
            f"<p><b>{esc(m)}</b>: training diverged on {len(errs)} of {len(st['pairs'])} pairs "
            f"({esc('; '.join(f'{k}: {v}' for k, v in errs.items()))}); not scored.</p>"
            for m, errs in results.get("failed", {}).items()
        ),
        *_concept_tables(results),
        "<h2>Per method</h2>",
    ]
    for m, summary in results["summary"].items():
        w = results["wall_seconds"][m]
        runs = results["stage1_runs"][m]
        body.append(
            f"<h3>{esc(m)}</h3><p>{esc(results['methods'][m])}. Wall time {w['total']:.1f} s (train "
            f"{w['train']:.1f}, sample {w['sample']:.1f}, score {w['score']:.1f}); one pair alone "
            f"≈ {w['standalone_seconds_per_pair']:.1f} s; stage-1 runs trained {runs['trained']}, reused "
            f"{runs['reused']}.{_cost_text(results['cost'].get(m))}</p>"
        )
        rows = []
        for k in metrics:
            diff = "" if m == ref else interval_text(results["differences"][m][k], signed=True)
            rows.append([k, interval_text(summary[k]), diff])
        body.append(html_table(["metric", "mean [95%]", f"Δ vs {ref} [95%]"], rows))
    body.append("<h2>Images per pair</h2><p>One row per prompt, one column per seed.</p>")
    for d in data:
        body.append(f"<h3>{esc(d.content)} × {esc(d.style)}</h3>")
        body.append(
            f"<p>Content references <img src='{png_data_url(d.task.content_refs.images, 8)}'> "
            f"style references <img src='{png_data_url(d.task.style_refs.images, 8)}'></p><ol class='small'>"
        )
        body += [
            f"<li><code>{esc(p)}</code> (base: <code>{esc(w)}</code>)</li>"
            for p, w in zip(d.task.prompts, d.task.word_prompts, strict=True)
        ]
        body.append("</ol><table>")
        body += [
            f"<tr><td>{esc(m)}</td><td><img src='{png_data_url(images[m][d.label], st['seeds'], 2)}'></td></tr>"
            for m in images
        ]
        body.append("</table>")
    with atomic_path(path) as tmp:
        tmp.write_text(html_page("b4m bench", body))


FIGURE_COLUMNS = 12  # columns side by side in a figure before it wraps to another block
FIGURE_PROMPT_PAIRS = 3  # pairs shown with every prompt in figure-prompts.png


def write_figures(results: dict, data: list[PairData], images: dict[str, dict[str, np.ndarray]], out: Path) -> None:
    """``figure.png``: one column per pair (its first prompt, sampling seed 0); ``figure-prompts.png``: the first
    :data:`FIGURE_PROMPT_PAIRS` pairs with each of their prompts (seed 0), where the renderer's row shows what each
    prompt asks for. Rows: a content reference, a style reference and each scored method. The prompts are in each
    PNG's text (``"prompts"``); the full grids are in report.html."""
    seeds = results["settings"]["seeds"]
    every_pair = [(d, 0) for d in data]
    with_prompts = [(d, i) for d in data[:FIGURE_PROMPT_PAIRS] for i in range(len(d.task.prompts))]
    _write_figure(results, every_pair, images, seeds, out / "figure.png")
    _write_figure(results, with_prompts, images, seeds, out / "figure-prompts.png")


def _write_figure(
    results: dict,
    columns: list[tuple[PairData, int]],
    images: dict[str, dict[str, np.ndarray]],
    seeds: int,
    path: Path,
    upscale: int = 3,
) -> None:
    """A figure of ``columns`` (pair, prompt index; sampling seed 0), in blocks of :data:`FIGURE_COLUMNS`."""
    from PIL import Image

    methods = [m for m in images if m in results["summary"]]
    labels = ["content ref", "style ref", *methods]
    several = len({d.label for d, _ in columns}) < len(columns)  # a pair shown with several prompts
    blocks = []
    for start in range(0, len(columns), FIGURE_COLUMNS):
        chunk = columns[start : start + FIGURE_COLUMNS]
        tiles = [d.task.content_refs.images[0] for d, _ in chunk] + [d.task.style_refs.images[0] for d, _ in chunk]
        for m in methods:
            tiles += [images[m][d.label][i * seeds] for d, i in chunk]  # prompt-major, seeds inner
        tiles = [Image.fromarray(np.asarray(t)) for t in tiles]
        blocks.append(
            grid_image(
                tiles,
                len(chunk),
                gap=2,
                upscale=upscale,
                row_labels=labels,
                # the default font has no ×
                column_labels=[f"{d.content} / {d.style}" + (f" #{i + 1}" if several else "") for d, i in chunk],
            )
        )
    width = max(b.width for b in blocks)
    figure = Image.new("RGB", (width, sum(b.height for b in blocks)), (255, 255, 255))
    y = 0
    for block in blocks:
        figure.paste(block, (0, y))
        y += block.height
    prompts = {f"{d.label}#{i + 1}" if several else d.label: d.task.prompts[i] for d, i in columns}
    save_png(figure, path, {"benchmark": "b4m bench", "commit": results.get("commit"), "prompts": prompts})
