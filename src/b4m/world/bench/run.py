"""``run_bench``: the whole benchmark in one call, resumable across commands (and across machines: units and stage-1
runs are files), with its results files."""

from __future__ import annotations

import datetime
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ...environment import record
from ...errors import B4MError
from ...files import atomic_path
from .results import make_results, write_csv, write_figures, write_html
from .saved import write_results
from .units import (
    Unit,
    failed_path,
    load_oracle,
    load_stage1,
    load_unit,
    pair_data,
    run_or_record,
    save_stage1,
    unit_done,
    unit_path,
)
from .variants import METRICS, BenchConfig
from .workers import run_units_in_workers


def run_signature(config: BenchConfig, model) -> dict:
    """What a resumed run must share with the run it continues (every setting but the list of methods)."""
    settings = {k: v for k, v in asdict(config).items() if k != "methods"}
    settings["pairs"] = [list(p) for p in config.pair_list()]
    return json.loads(json.dumps({"settings": settings, "model": model.identity}))


def run_bench(
    out: str | Path,
    config: BenchConfig | None = None,
    *,
    console=None,
    model=None,
    oracle=None,
    resume: bool = False,
    overwrite: bool = False,
    max_minutes: float = 0.0,
    keep_runs: bool = False,
    workers: int = 1,
) -> dict:
    """Run the benchmark; returns the results (also written to ``out/results.json``, ``results.csv``,
    ``report.html``).

    Args:
        out: Output folder.
        config: The protocol (default :class:`BenchConfig`).
        console: A rich console for progress lines, or None.
        model, oracle: Already loaded ones (else ``config.model`` / ``config.oracle`` are loaded).
        resume: Continue the run in ``out``: finished (method, pair) units and stage-1 runs are read back, not run
            again; the settings must be the same (the methods may differ).
        overwrite: Start again in an ``out`` that holds a bench run (its units are deleted first); without it or
            ``resume`` such a folder is refused before anything loads.
        max_minutes: Stop before starting a new unit once this much time has passed (0: no limit); the finished
            units stay in ``out`` for ``resume``. Then the return value is ``{"complete": False, ...}`` and no
            results files are written.
        keep_runs: Keep every run's folder (checkpoints) under ``out/runs``; by default each is deleted once its
            unit is saved (the stage-1 adapters stay in ``out/stage1`` for resuming).
        workers: More than 1: the units run in that many worker processes (one per GPU, see
            :func:`run_units_in_workers`), then this process reads them back and writes the results as usual.
    """
    from ...device import default_device
    from ...loading import load_model
    from ..catalog import default_catalog
    from ..model import WorldModel

    config = config or BenchConfig()
    out = Path(out)
    if not (resume or overwrite) and (out / "bench.json").exists():  # before the model loads
        again = "--resume continues it, --overwrite starts again, or choose another -o"
        raise B4MError(f"{out}: holds a bench run; {again}")
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda text: console.print(text, highlight=False, markup=False)) if console else (lambda text: None)
    t_start = time.perf_counter()
    device = default_device()
    model = model or load_model(config.model, device=device)
    if not isinstance(model, WorldModel):
        raise B4MError(
            f"b4m bench runs on a world model (its ground truth scores the images); {config.model!r} is not one. "
            "For real models, score your own images with b4m eval"
        )
    state_file = out / "bench.json"
    signature = run_signature(config, model)
    history: list[dict] = []
    if resume:
        if state_file.exists():
            state = json.loads(state_file.read_text())
            old = state["signature"]
            if old != signature:
                diff = sorted(
                    k
                    for k in set(old["settings"]) | set(signature["settings"])
                    if old["settings"].get(k) != signature["settings"].get(k)
                )
                diff += ["model"] if old["model"] != signature["model"] else []
                raise B4MError(f"{out}: --resume with other settings than the run there ({', '.join(diff)})")
            history = state.get("commands", [])
    else:
        for sub in ("units", "stage1", "runs"):
            shutil.rmtree(out / sub, ignore_errors=True)
    command = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }

    def write_state(units_run: int, finished: bool) -> None:
        entry = {**command, "seconds": round(time.perf_counter() - t_start, 1), "units_run": units_run}
        entry["finished"] = finished
        with atomic_path(state_file) as tmp:
            tmp.write_text(json.dumps({"signature": signature, "commands": [*history, entry]}, indent=1))

    write_state(0, False)
    oracle = oracle or load_oracle(config.oracle, str(model.device))
    catalog = default_catalog()
    pairs = config.pair_list()
    say(
        f"b4m bench: {len(config.methods)} methods × {len(pairs)} pairs × {config.prompts} prompts × "
        f"{config.seeds} seeds"
    )
    data = [pair_data(model, catalog, c, s, config) for c, s in pairs]
    stage1_dir = out / "stage1"
    ran = 0
    if workers > 1:
        deadline = time.time() + max_minutes * 60 - (time.perf_counter() - t_start) if max_minutes else 0.0
        ran = run_units_in_workers(out, config, workers, deadline=deadline, keep_runs=keep_runs, console=console)
        resume = True  # the loop below reads every unit back (and stops at a missing one once time is up)
    cache = load_stage1(stage1_dir) if resume else {}
    saved = set(cache)
    units: dict[str, dict[str, Unit]] = {}
    failed: dict[str, dict[str, str]] = {}
    total = len(config.methods) * len(data)
    for name in config.methods:
        units[name] = {}
        for d in data:
            path = unit_path(out, name, d.label)
            if resume and path.exists():
                units[name][d.label] = load_unit(path)
                continue
            failed_file = failed_path(out, name, d.label)
            if resume and failed_file.exists():
                failed.setdefault(name, {})[d.label] = json.loads(failed_file.read_text())["error"]
                continue
            if max_minutes and time.perf_counter() - t_start >= max_minutes * 60:
                done = sum(unit_done(out, m, e.label) for m in config.methods for e in data)
                write_state(ran, False)
                say(f"stopped after {done} of {total} units (--max-minutes {max_minutes:g}); run again with --resume")
                return {"complete": False, "units_done": done, "units_total": total, "output": str(out)}
            unit = run_or_record(name, d, model, oracle, catalog, config, cache, out)
            save_stage1(stage1_dir, cache, saved)
            if not keep_runs:
                shutil.rmtree(out / "runs" / name.replace("/", "_") / d.label, ignore_errors=True)
            ran += 1
            if isinstance(unit, str):
                failed.setdefault(name, {})[d.label] = unit
            else:
                units[name][d.label] = unit
        if name in failed:
            first = next(iter(failed[name].items()))
            say(f"{name}: diverged on {len(failed[name])} of {len(data)} pairs ({first[0]}: {first[1]}); not scored")
            del units[name]
            continue
        scores = {k: [x for u in units[name].values() for x in u.scores[k]] for k in METRICS}
        line = "  ".join(f"{k} {np.mean(scores[k]):.2f}" for k in ("content", "style", "prompt", "average"))
        seconds = sum(u.seconds["train"] + u.seconds["sample"] + u.seconds["score"] for u in units[name].values())
        say(f"{name}: {line}  ({seconds:.0f} s)")

    if not units:
        raise B4MError(f"{out}: every method diverged; nothing to score (see units/*/*.failed.json)")
    results = make_results(config, model, data, units, record(model.device))
    # Methods whose training diverged on some pair: their errors, and no scores (a mean over the pairs that did not
    # diverge would flatter them).
    results["failed"] = failed
    if workers > 1:
        results["workers"] = workers
    results["seconds"] = {"command": round(time.perf_counter() - t_start, 2)}
    results["commands"] = [*history, {**command, "seconds": results["seconds"]["command"], "units_run": ran}]
    write_results(out / "results.json", results)
    write_csv(results, out / "results.csv")
    images = {name: {label: u.images for label, u in per_pair.items()} for name, per_pair in units.items()}
    write_html(results, data, images, out / "report.html")
    write_figures(results, data, images, out)
    write_state(ran, True)
    seconds = results["seconds"]["command"]
    say(f"wrote {out / 'results.json'}, results.csv, report.html, figure.png, figure-prompts.png ({seconds:.0f} s)")
    return results
