"""Recompute the intervals of saved benchmark results with the current code (b4m.world.bench.results.intervals):
the per-image scores are kept, the summaries and paired differences are computed again and results.json /
results.csv rewritten in place (each through a temporary file). Used when the interval method changed (2026-12-04:
from resampling pairs to resampling whole contents and styles), so old and new tables use the same intervals.

    python bench/intervals.py bench/results/world-v2/test-seed0 bench/results/world-v2/test-seed1 …
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from b4m.files import atomic_path
from b4m.world.bench.results import intervals, write_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="bench output folders (each with results.json)")
    for folder in parser.parse_args().folders:
        path = folder / "results.json"
        results = json.loads(path.read_text())
        before = results["intervals"]
        results.update(intervals(results["per_image"], results["items"], results["reference"]))
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(results, indent=1) + "\n")
        write_csv(results, folder / "results.csv")
        print(f"{folder}: {before} -> {results['intervals']}")


if __name__ == "__main__":
    main()
