"""Where each method wins and loses in a saved bench: a metric's mean per content or per style (over that concept's
pairs), one column per method, as Markdown (b4m.world.bench.results.concept_means; report.html has the same tables).
A concept's stage-1 run is shared by its pairs, so each cell is one run's draw.

    python bench/by_concept.py bench/results/world-v2/test-make100-all-seed0 --axis style \\
        --methods b4m,jttrain,direct_merge,klora
"""

from __future__ import annotations

import argparse
from pathlib import Path

from b4m.errors import B4MError
from b4m.world.bench.results import CONCEPT_METRICS, concept_means
from b4m.world.bench.saved import read_results, results_path


def table(results: dict, axis: str, metric: str | None = None, methods: list[str] | None = None) -> str:
    """The Markdown table: one row per concept, one column per method (``methods``: those, in that order)."""
    means = concept_means(results, axis, metric)
    known = list(next(iter(means.values())))
    methods = methods or known
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SystemExit(
            f"error: no per-pair {metric or CONCEPT_METRICS[axis]} for {', '.join(unknown)}; has: {', '.join(known)}"
        )
    lines = [f"| {axis} | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    lines += [f"| {c} | " + " | ".join(f"{row[m]:.2f}" for m in methods) + " |" for c, row in means.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a bench output folder (results.json or results.json.gz)")
    parser.add_argument("--axis", choices=sorted(CONCEPT_METRICS), default="style")
    parser.add_argument("--metric", help="content, style, prompt, average, … (default: the axis's own)")
    parser.add_argument("--methods", help="comma-separated methods (default: every method with per-pair scores)")
    args = parser.parse_args()
    try:
        results = read_results(results_path(args.folder))
    except B4MError as e:
        raise SystemExit(f"error: {e}") from None
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    print(table(results, args.axis, args.metric, methods))


if __name__ == "__main__":
    main()
