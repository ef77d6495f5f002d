"""Choosing each method's setting from a grid of dev-split benchmarks (docs/benchmarks.md, "Benchmark protocol on
world v2"): one ``results.json`` per configuration, the same rule for every method.

The rule, in order:

1. a configuration in which any unit of the method diverged (``results.json`` ``failed``) is not eligible: a user
   of that setting would get a broken adapter on some concepts;
2. among the rest, the highest dev average (mean of content, style and prompt accuracy over the pairs);
3. a tie within :data:`TIE` goes to the cheaper configuration: fewer steps, then the lower learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import B4MError
from .saved import read_results, results_path

TIE = 0.005


@dataclass(frozen=True)
class GridCell:
    """One method at one configuration: its dev average (None when it diverged) and what it cost."""

    method: str
    lr: float
    steps: int
    average: float | None
    low: float | None
    high: float | None
    diverged: int  # pairs whose unit diverged
    pairs: int
    seconds: float | None  # one worker's seconds per pair, stage-1 runs counted in full

    @property
    def config(self) -> str:
        return f"lr {self.lr:g} × {self.steps} steps"


def read_grid(folders: list[Path]) -> list[GridCell]:
    """Every (method, configuration) of the benchmarks in ``folders`` (each holding a complete ``results.json``).

    Raises:
        B4MError: A folder without results, an unfinished run, or runs that differ in anything but lr and steps.
    """
    cells: list[GridCell] = []
    shared: dict | None = None
    for folder in folders:
        path = results_path(folder)
        results = read_results(path)
        if not results.get("complete", True):
            raise B4MError(f"{path}: the run is not finished (b4m bench --resume)")
        settings = dict(results["settings"])
        lr, steps = float(settings.pop("lr")), int(settings.pop("steps"))
        if settings.pop("method_settings", None):  # empty in a grid run (results written before it existed: absent)
            raise B4MError(f"{path}: a run with per-method settings (--method-settings) is not a grid configuration")
        if shared is None:
            shared = settings
        elif settings != shared:
            keys = sorted(k for k in {*settings, *shared} if settings.get(k) != shared.get(k))
            raise B4MError(f"{path}: differs from the other runs in {', '.join(keys)}, not only lr and steps")
        failed = results.get("failed", {})
        pairs = len(settings["pairs"])
        for method in settings["methods"]:
            summary = results["summary"].get(method)
            average = summary["average"] if summary else None
            wall = results["wall_seconds"].get(method, {})
            cells.append(
                GridCell(
                    method,
                    lr,
                    steps,
                    average["mean"] if average else None,
                    average.get("low") if average else None,
                    average.get("high") if average else None,
                    len(failed.get(method, {})),
                    pairs,
                    wall.get("standalone_seconds_per_pair"),
                )
            )
    return cells


def eligible(cell: GridCell) -> bool:
    return cell.diverged == 0 and cell.average is not None


def select(cells: list[GridCell]) -> dict[str, GridCell | None]:
    """Each method's chosen cell by the module's rule (None: it diverged at every configuration)."""
    chosen: dict[str, GridCell | None] = {}
    for method in dict.fromkeys(c.method for c in cells):
        candidates = [c for c in cells if c.method == method and eligible(c)]
        if not candidates:
            chosen[method] = None
            continue
        best = max(c.average for c in candidates)
        near = [c for c in candidates if c.average >= best - TIE]
        chosen[method] = min(near, key=lambda c: (c.steps, c.lr))
    return chosen


def grid_table(cells: list[GridCell]) -> str:
    """A Markdown table: methods as rows, configurations as columns, the chosen cell in bold."""
    configs = sorted({(c.steps, c.lr) for c in cells})
    chosen = select(cells)
    header = "| method | " + " | ".join(f"lr {lr:g}, {steps} steps" for steps, lr in configs) + " |"
    lines = [header, "|---|" + "---:|" * len(configs)]
    for method, pick in chosen.items():
        row = []
        for steps, lr in configs:
            cell = next((c for c in cells if c.method == method and (c.steps, c.lr) == (steps, lr)), None)
            if cell is None:
                row.append("")
            elif not eligible(cell):
                row.append(f"diverged ({cell.diverged}/{cell.pairs})")
            else:
                text = f"{cell.average:.3f} [{cell.low:.2f}, {cell.high:.2f}]"
                row.append(f"**{text}**" if cell == pick else text)
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)
