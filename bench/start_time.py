"""How long each ``b4m`` command takes before it does real work (issue 19: a command's start before its first GPU
work ≤ 5 s): interpreter start and imports, measured as a user meets them.

For each command, three cases, each the median wall time of ``--repeats`` runs in fresh processes:

- ``help``: ``b4m CMD --help`` (``b4m --version`` for the root);
- ``bad input``: the command with an input that fails before any model loads (a missing image folder, adapter file
  or run folder; for ``dry-run`` an empty folder as the model; for ``bench`` an unknown method; for ``ui`` a port that
  is not a number), which must print its one-line error and exit with status 2;
- ``imports``: the total of ``python -X importtime -m b4m.cli CMD --help`` (the top-level imports' cumulative times,
  as importtime reports them: an upper bound, importtime slows every import a little).

Each bad-input case is also run once under ``-X importtime`` to record which heavy packages it imported (torch,
diffusers, transformers, gradio, torchao).

With ``--before SRC`` (the ``src`` folder of another checkout, e.g. ``git worktree add /tmp/before COMMIT``), every
case runs on both trees in the same session, the two alternating run by run so that the machine's load falls on both
alike, and the script checks that both print the same last line of output (the one-line error) with the same status.
``--after SRC`` picks the tree measured as "after" (default: this checkout's ``src``).

    python bench/start_time.py --before /tmp/before/src --after /tmp/after/src

writes ``bench/results/start-time-DATE.json`` (the table, both commits, the date, the machine) and prints the table
as markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEAVY = ("torch", "diffusers", "transformers", "peft", "gradio", "torchao")


def cases(scratch: Path) -> list[tuple[str, str, list[str]]]:
    """``(command, case, arguments)`` rows; ``scratch`` holds the empty folder and the outputs that are never
    written."""
    empty = scratch / "empty"
    empty.mkdir(exist_ok=True)
    missing = str(scratch / "missing")
    out = str(scratch / "out")
    bad = {
        "inspect": ["inspect", f"{missing}.safetensors"],
        "dry-run": ["dry-run", "--model", str(empty)],
        "content": ["content", "--images", missing, "--prompt", "a photo of sks dog", "-o", out],
        "style": ["style", "--images", missing, "--prompt", "a cat in zwx style", "-o", out],
        "make": ["make", "--content", missing, "--style", missing, "-o", out],
        "generate": ["generate", f"{missing}.b4m.safetensors", "a sks dog", "-o", out],
        "run": [
            "run",
            *("--content-images", missing, "--content-prompt", "a photo of sks dog"),
            *("--style-images", missing, "--style-prompt", "a cat in zwx style", "-o", out),
        ],
        "bench": ["bench", "--methods", "no-such-method", "-o", out],
        "ui": ["ui", "--port", "not-a-number"],
    }
    rows = [("--version", "help", ["--version"])]
    for command, bad_args in bad.items():
        rows += [(command, "help", [command, "--help"]), (command, "bad input", bad_args)]
    rows += [(c, "imports", [*a]) for c, case, a in rows if case == "help"]
    return rows


def run_once(src: Path, case: str, args: list[str]) -> dict:
    """One fresh process of ``b4m ARGS`` on the tree ``src``: wall seconds, status, last output line (``imports``:
    the importtime total instead of the wall time)."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("PYTHONWARNINGS", None)
    entry = shutil.which("b4m")
    if case == "imports":
        command = [sys.executable, "-X", "importtime", "-m", "b4m.cli", *args]
    else:  # the console script itself, as a user starts it (PYTHONPATH puts the tree's b4m first)
        command = [entry, *args] if entry else [sys.executable, "-m", "b4m.cli", *args]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    wall = time.perf_counter() - start
    lines = [line for line in (done.stdout + done.stderr).splitlines() if not line.startswith("import time:")]
    result = {"seconds": wall, "rc": done.returncode, "last_line": lines[-1].strip() if lines else ""}
    if case == "imports":
        result["seconds"] = importtime_total(done.stderr)
    return result


def importtime_total(stderr: str) -> float:
    """Seconds of the top-level imports of a ``-X importtime`` log (each one's cumulative time, nested ones
    inside)."""
    total = 0
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)  # no leading spaces: a top-level import
        if m:
            total += int(m.group(1))
    return total / 1e6


def heavy_imports(src: Path, args: list[str]) -> list[str]:
    """The heavy packages a run of ``b4m ARGS`` imports."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "b4m.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    names = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", done.stderr, re.M))
    return [h for h in HEAVY if h in names]


def commit_of(src: Path) -> str:
    try:
        done = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True)
    except OSError:
        return "unknown"
    return done.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def machine() -> dict:
    cpu = platform.processor() or ""
    with open("/proc/cpuinfo") as f:  # Linux
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "diffusers", "transformers", "gradio", "torchao", "typer"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
        "versions": versions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="src folder of the tree to measure as 'before'")
    parser.add_argument("--after", type=Path, default=HERE.parent / "src", help="src folder measured as 'after'")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--commands", help="comma-separated commands (default: all)")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/start-time-DATE.json)")
    a = parser.parse_args()

    now = datetime.datetime.now(datetime.UTC)
    trees = {"after": a.after.resolve()}
    if a.before:
        trees = {"before": a.before.resolve(), **trees}
    info = {
        "what": "seconds before a b4m command does real work: median wall time of fresh processes (help, bad input) "
        "and the importtime total of CMD --help",
        "commits": {name: commit_of(src) for name, src in trees.items()},
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "repeats": a.repeats,
        "script": "bench/start_time.py",
    }
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        todo = cases(Path(scratch))
        if a.commands:
            keep = set(a.commands.split(","))
            todo = [row for row in todo if row[0] in keep]
        for command, case, args in todo:
            runs: dict[str, list[dict]] = {name: [] for name in trees}
            for _ in range(a.repeats):
                for name, src in trees.items():  # alternating: the machine's load falls on both alike
                    runs[name].append(run_once(src, case, args))
            row = {"command": command, "case": case, "args": ["b4m", *args]}
            for name, results in runs.items():
                row[name] = {
                    "median_s": round(statistics.median(r["seconds"] for r in results), 3),
                    "runs_s": [round(r["seconds"], 3) for r in results],
                    "rc": sorted({r["rc"] for r in results}),
                    "last_line": results[0]["last_line"] if case == "bad input" else None,
                }
                if case == "bad input":
                    row[name]["imports"] = heavy_imports(trees[name], args)
            if case == "bad input" and len(trees) == 2:
                same = {(r["rc"], r["last_line"]) for results in runs.values() for r in results}
                row["same_error"] = len(same) == 1
            rows.append(row)
            print(
                f"{command:10s} {case:10s} " + "  ".join(f"{n} {row[n]['median_s']:.2f} s" for n in trees),
                file=sys.stderr,
                flush=True,
            )
    info["machine"]["load_average_at_end"] = os.getloadavg()
    info["rows"] = rows
    out = a.out or HERE / "results" / f"start-time-{now.date().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1) + "\n")
    print(markdown(info, list(trees)))
    print(f"wrote {out}", file=sys.stderr)


def markdown(info: dict, names: list[str]) -> str:
    """The table as markdown: one line per command and case."""
    head = "| command | case | " + " | ".join(f"{n} (s)" for n in names) + " | heavy imports (bad input) |"
    lines = [head, "|" + "---|" * (3 + len(names))]
    for row in info["rows"]:
        heavy = (
            " → ".join(", ".join(row[n].get("imports") or ["none"]) for n in names)
            if "imports" in row[names[-1]]
            else ""
        )
        values = " | ".join(f"{row[n]['median_s']:.2f}" for n in names)
        lines.append(f"| `{' '.join(row['args'][:3])}` | {row['case']} | {values} | {heavy} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
