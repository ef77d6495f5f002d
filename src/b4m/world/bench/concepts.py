"""Where each method wins and loses in a bench: a metric's mean per content or per style, over that concept's pairs
(report.html's "By concept" tables, ``bench/by_concept.py`` for saved runs). Light on purpose, like
:mod:`~b4m.world.bench.saved`: reading results needs no torch."""

from __future__ import annotations

from collections import defaultdict

from ...errors import B4MError

#: What each axis is read for: a content's pairs for content accuracy, a style's pairs for style accuracy.
CONCEPT_METRICS = {"content": "content", "style": "style"}


def concept_means(results: dict, axis: str, metric: str | None = None) -> dict[str, dict[str, float]]:
    """``{concept: {method: mean}}`` of ``metric`` (default: the axis's own, :data:`CONCEPT_METRICS`) over the images
    of each ``axis`` (``content`` or ``style``) concept, concepts in the order of results.json's items, methods in
    its per-image order (a method that diverged and was not scored has no per-image scores, so no column). A
    concept's stage-1 run is one draw shared by all its pairs: these are single-run figures, where a method wins and
    loses, not what it scores in general. ``B4MError`` for an unknown axis or metric."""
    if axis not in CONCEPT_METRICS:
        raise B4MError(f"unknown axis {axis!r}; one of: {', '.join(CONCEPT_METRICS)}")
    metric = metric or CONCEPT_METRICS[axis]
    if metric not in results["metrics"]:
        raise B4MError(f"unknown metric {metric!r}; one of: {', '.join(results['metrics'])}")
    rows: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(results["items"]):
        rows[item[axis]].append(i)
    return {
        concept: {
            method: sum(scores[metric][i] for i in indices) / len(indices)
            for method, scores in results["per_image"].items()
        }
        for concept, indices in rows.items()
    }
