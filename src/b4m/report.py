"""Pieces shared by the reports of ``b4m demo`` and ``b4m bench``: metric summaries with 95% intervals, image grids
as inline PNGs, and the HTML page around them.

- :func:`summarize`: per metric, the mean with a 95% interval. Proportions (0/1 scores such as oracle accuracy and
  leakage) get a Wilson interval and other scores a bootstrap interval of the mean, unless ``groups`` is given: then
  every metric gets a cluster bootstrap that resamples whole groups (the images of one content-style pair share
  that pair's adapters, so treating them as independent makes intervals too narrow), or ``crossed``: whole contents
  and whole styles are resampled (the benchmark's: pairs share their concepts' runs).
- :func:`png_data_url`: a grid of small uint8 images as a ``data:image/png`` URL, upscaled with nearest neighbours
  (4× by default) so 32-px images stay visible in a browser.
- :func:`image_table`: images as an HTML table (a row per prompt or method, a column per seed) with a small note
  (a score) under each image.
- :func:`html_page`: a self-contained page (title, one style sheet, the body parts given).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from .metrics.stats import bootstrap_mean, wilson_interval

STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:80em}td,th{padding:.3em .8em;text-align:right}"
    "th:first-child,td:first-child{text-align:left}table{border-collapse:collapse;margin:.5em 0 1em}"
    "tr:nth-child(even){background:#f4f4f4}img{image-rendering:pixelated}.small{color:#555;font-size:90%}"
)


def summarize(
    scores: Mapping[str, Sequence[float]],
    metrics: Iterable[str] | None = None,
    binary: Iterable[str] = (),
    *,
    groups: Sequence[Hashable] | None = None,
    crossed: tuple[Sequence[Hashable], Sequence[Hashable]] | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{metric: {"mean", "low", "high"}}`` for ``metrics`` (default: every key of ``scores``), 95% intervals.

    Without ``groups`` or ``crossed``, a metric in ``binary`` (every score 0 or 1) gets the Wilson interval of its
    proportion and the others a percentile bootstrap of the mean (items resampled); with ``groups`` (one label per
    score) every metric gets the bootstrap that resamples whole groups, with ``crossed`` (two labels per score) the
    one that resamples whole rows and columns (:mod:`b4m.metrics.stats`).
    """
    binary = set(binary)
    out = {}
    for k in scores if metrics is None else metrics:
        v = [float(x) for x in scores[k]]
        if groups is not None or crossed is not None:
            iv = bootstrap_mean(v, groups=groups, crossed=crossed, seed=seed)
        elif k in binary:
            iv = wilson_interval(round(sum(v)), len(v))
        else:
            iv = bootstrap_mean(v, seed=seed)
        out[k] = {"mean": float(np.mean(v)), "low": float(iv.low), "high": float(iv.high)}
    return out


def interval_text(summary: Mapping[str, float], digits: int = 2, *, signed: bool = False) -> str:
    """``"0.83 [0.78, 0.87]"`` from a ``{"mean", "low", "high"}`` dict (a :func:`summarize` entry)."""
    spec = f"{'+' if signed else ''}.{digits}f"
    return f"{summary['mean']:{spec}} [{summary['low']:{spec}}, {summary['high']:{spec}}]"


def png_data_url(images: np.ndarray | Sequence, columns: int, scale: int = 4) -> str:
    """A grid of equally sized uint8 images (``(N, H, W, 3)`` or PIL images), ``columns`` wide, as an inline data
    URL; each image upscaled ``scale`` times with nearest neighbours, 2-px white gutters."""
    arr = np.stack([np.asarray(im) for im in images])
    n, h, w, _ = arr.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    canvas = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(arr):
        r, c = divmod(i, columns)
        canvas[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = im
    big = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_table(
    images: np.ndarray | Sequence,
    columns: int,
    *,
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    notes: Sequence[str] = (),
    titles: Sequence[str] = (),
    scale: int = 4,
) -> str:
    """Images (uint8 ``(N, H, W, 3)`` or PIL) as an HTML table ``columns`` wide, each upscaled ``scale`` times, with
    its note (escaped) in small type under it and its title as a tooltip; row labels on the left, column labels on
    top."""
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in column_labels)
    parts = [f"<table class='cells'><tr><th></th>{head}</tr>" if column_labels else "<table class='cells'>"]
    for r in range(-(-len(images) // columns)):
        label = row_labels[r] if r < len(row_labels) else ""
        parts.append(f"<tr><td class='small'>{esc(label)}</td>")
        for i in range(r * columns, min(len(images), (r + 1) * columns)):
            title = f" title='{esc(titles[i])}'" if i < len(titles) else ""
            note = f"<br><span class='small'>{esc(notes[i])}</span>" if i < len(notes) else ""
            parts.append(f"<td><img src='{png_data_url([images[i]], 1, scale)}'{title}>{note}</td>")
        parts.append("</tr>")
    parts.append("</table>")
    return "".join(parts)


def html_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain HTML table; every cell is escaped."""
    esc = html.escape
    parts = ["<table><tr>", *(f"<th>{esc(h)}</th>" for h in header), "</tr>"]
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    return "".join(parts)


def html_page(title: str, body: Iterable[str]) -> str:
    """A self-contained HTML page: ``title`` (escaped) and the ``body`` parts (HTML, joined by newlines)."""
    head = f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>"
    return "\n".join([head, *body])
