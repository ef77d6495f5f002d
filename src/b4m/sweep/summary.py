"""What a sweep shows and leaves: its jobs' metrics (:func:`read_metric`), the live table, the summary (a dict, written
to ``summary.json``) and its table (:func:`summary_table`)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_path
from .jobs import Job, JobState
from .slots import Slot

GOALS = ("min", "max")
STATUS_STYLE = {"waiting": "dim", "running": "cyan", "done": "green", "failed": "red", "skipped": "yellow"}


# --------------------------------------------------------------------------------------------------------------------
# Metrics and logs


def _guess_result(job: Job) -> Path | None:
    cmd = job.command
    out = None
    for i, arg in enumerate(cmd):
        if arg in ("-o", "--output") and i + 1 < len(cmd):
            out = cmd[i + 1]
        elif arg.startswith("--output="):
            out = arg.split("=", 1)[1]
    if out is None:
        return None
    for name in ("run.json", "results.json"):
        if (Path(out) / name).exists():
            return Path(out) / name
    return None


def read_metric(job: Job, key: str) -> float | None:
    """``key`` (dotted for nested keys) of the job's result JSON, if it has a number there."""
    path = Path(job.result) if job.result else _guess_result(job)
    if path is None or not path.exists():
        return None
    try:
        value: Any = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def last_line(path: Path, limit: int = 4096) -> str:
    """The last non-empty line of a log (progress bars' carriage returns count as line ends)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------------------------------------------------
# The live table


def live_table(states: dict[str, JobState], t0: float, logs: Path | None = None):
    """The live table: one row per job (status, slot, attempt, time, its log's last line)."""
    from rich.table import Table

    counts = {k: sum(s.status == k for s in states.values()) for k in STATUS_STYLE}
    title = f"{time.perf_counter() - t0:.0f} s: {counts['done']}/{len(states)} done, {counts['running']} running"
    title += "".join(f", {counts[k]} {k}" for k in ("failed", "skipped") if counts[k])
    table = Table(title=title, title_justify="left")
    for column in ("job", "status", "slot", "try", "s", "last line"):
        table.add_column(column, justify="right" if column in ("try", "s") else "left", no_wrap=column != "last line")
    now = time.perf_counter()
    for s in states.values():
        seconds = s.seconds + (now - s.started if s.status == "running" else 0.0)
        running = s.status == "running" and logs is not None
        last = last_line(logs / f"{s.job.name}.log")[-70:] if running else s.note
        status = f"[{STATUS_STYLE[s.status]}]{s.status}[/]"
        table.add_row(
            s.job.name, status, s.slot or "", str(s.attempts or ""), f"{seconds:.0f}", last, end_section=False
        )
    return table


# --------------------------------------------------------------------------------------------------------------------
# The summary


def summarize(
    states: dict[str, JobState], slots: Sequence[Slot], metric: str | None, goal: str, seconds: float, out: Path
) -> dict:
    """The sweep's summary: counts, the ranking by ``metric`` (best per seed group) and one row per job."""
    rows = [
        {
            "name": s.job.name,
            "status": s.status,
            "attempts": s.attempts,
            "returncode": s.returncode,
            "seconds": round(s.seconds, 2),
            "slot": s.slot,
            "metric": s.metric,
            "note": s.note,
            "group": s.job.group,
            "depends_on": s.job.depends_on,
            "command": s.job.display,
            "log": str(out / "logs" / f"{s.job.name}.log") if s.attempts else None,
        }
        for s in states.values()
    ]
    ranked = sorted((r for r in rows if r["metric"] is not None), key=lambda r: r["metric"], reverse=goal == "max")
    best: dict[str, str] = {}
    for r in ranked:
        if r["group"] and r["group"] not in best:
            best[r["group"]] = r["name"]
    counts = {k: sum(r["status"] == k for r in rows) for k in ("done", "failed", "skipped")}
    return {
        "seconds": round(seconds, 2),
        "slots": [s.name for s in slots],
        **counts,
        "metric": metric,
        "goal": goal,
        "ranking": [r["name"] for r in ranked],
        "best_per_group": best,
        "jobs": rows,
    }


def write_summary(summary: dict, out: Path) -> None:
    """``out/summary.json``, written whole or not at all."""
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))


def summary_table(summary: dict):
    """The summary as a rich table: jobs ranked by the metric (when there is one), the rest in file order."""
    from rich.table import Table

    rows = {r["name"]: r for r in summary["jobs"]}
    order = summary["ranking"] + [n for n in rows if n not in summary["ranking"]]
    metric = summary["metric"]
    title = f"{summary['done']} done, {summary['failed']} failed, {summary['skipped']} skipped"
    title += f" in {summary['seconds']:.0f} s"
    if metric:
        title += f"; ranked by {metric} ({'lowest' if summary['goal'] == 'min' else 'highest'} first)"
    table = Table(title=title, title_justify="left")
    for column in ("job", "status", "tries", "slot", "s", *([metric] if metric else []), "note"):
        table.add_column(column, justify="right" if column in ("tries", "s", metric) else "left")
    for name in order:
        r = rows[name]
        cells = [name, f"[{STATUS_STYLE[r['status']]}]{r['status']}[/]", str(r["attempts"]), r["slot"] or ""]
        cells.append(f"{r['seconds']:.0f}")
        if metric:
            cells.append("" if r["metric"] is None else f"{r['metric']:.4g}")
        cells.append(r["note"])
        table.add_row(*cells)
    return table
