"""The dev grid's table and each method's chosen setting (the rule: b4m.world.bench.selection).

python bench/dev_grid.py bench/results/world-v2/dev-grid/* [--json chosen.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from b4m.world.bench.selection import grid_table, read_grid, select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="b4m bench output folders, one per configuration")
    parser.add_argument("--json", type=Path, help="write each method's chosen cell here")
    args = parser.parse_args()
    cells = read_grid(args.folders)
    print(grid_table(cells))
    chosen = select(cells)
    for method, cell in chosen.items():
        print(f"{method}: {cell.config if cell else 'diverged at every configuration'}")
    if args.json:
        args.json.write_text(json.dumps({m: asdict(c) if c else None for m, c in chosen.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
