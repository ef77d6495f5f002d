"""Recompute the intervals of saved benchmark results with the current code (b4m.world.bench.results.intervals):
the per-image scores are kept, the summaries and paired differences are computed again and results.json /
results.csv rewritten in place (each through a temporary file). Used when the interval method changed (2026-12-04:
from resampling pairs to resampling whole contents and styles), so old and new tables use the same intervals.

    python bench/intervals.py bench/results/world-v2/test-seed0 bench/results/world-v2/test-seed1 …
"""

from __future__ import annotations

import argparse
from pathlib import Path

from b4m.world.bench.results import intervals, write_csv
from b4m.world.bench.saved import read_results, results_path, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="bench output folders (each with results.json)")
    for folder in parser.parse_args().folders:
        path = results_path(folder)
        results = read_results(path)
        before = results["intervals"]
        results.update(intervals(results["per_image"], results["items"], results["reference"]))
        write_results(path, results)
        write_csv(results, folder / "results.csv")
        print(f"{folder}: {before} -> {results['intervals']}")


if __name__ == "__main__":
    main()
