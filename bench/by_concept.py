"""A saved bench's scores per content or per style: where each method wins and loses, as a Markdown table.

A metric's mean over each concept's pairs, one column per method (b4m.world.bench.concepts.concept_means; a bench's
report.html has the same tables). A concept's stage-1 run is shared by its pairs, so each cell is one run's draw.

    python bench/by_concept.py bench/results/world-v2/test-make100-all-seed0 --axis style \\
        --methods b4m,jttrain,direct_merge,klora
"""

from __future__ import annotations

import argparse
from pathlib import Path

from b4m.errors import B4MError
from b4m.world.bench.concepts import CONCEPT_METRICS, concept_means
from b4m.world.bench.saved import read_results, results_path


def table(results: dict, axis: str, metric: str | None = None, methods: list[str] | None = None) -> str:
    """The Markdown table: one row per concept, one column per method (``methods``: those, in that order).
    ``B4MError`` for an unknown axis or metric, or a method the results do not score."""
    means = concept_means(results, axis, metric)
    scored = list(results["per_image"])
    for m in methods or []:
        if m in results.get("failed", {}):
            failed = results["failed"][m]
            raise B4MError(f"{m} diverged on {len(failed)} of {len(results['settings']['pairs'])} pairs (not scored)")
        if m not in scored:
            raise B4MError(f"no scores for {m!r}; scored: {', '.join(scored)}")
    methods = methods or scored
    lines = [f"| {axis} | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    lines += [f"| {c} | " + " | ".join(f"{row[m]:.2f}" for m in methods) + " |" for c, row in means.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a bench output folder (results.json or results.json.gz)")
    parser.add_argument("--axis", choices=list(CONCEPT_METRICS), default="style")
    parser.add_argument("--metric", help="content, style, prompt, average, … (default: the axis's own)")
    parser.add_argument("--methods", help="comma-separated methods (default: every scored method)")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    try:
        text = table(read_results(results_path(args.folder)), args.axis, args.metric, methods)
    except B4MError as e:
        raise SystemExit(f"error: {args.folder}: {e}") from None
    print(text)
    return text


if __name__ == "__main__":
    main()
