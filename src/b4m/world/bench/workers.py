"""The benchmark's units in several worker processes (one per GPU), through :mod:`b4m.sweep`.

A worker is this module run as a program: ``python -m b4m.world.bench.workers SPEC.json``. Past its deadline it exits
before importing torch (seconds saved per worker).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the worker program imports torch only once it knows it runs (see main)
    from .variants import BenchConfig


def default_workers() -> int:
    """One worker per GPU when there are several (``CUDA_VISIBLE_DEVICES`` respected), else 1 (one process)."""
    from ...sweep import visible_gpus

    return max(1, len(visible_gpus()))


def waves(pairs: Sequence[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The pairs in waves for parallel workers. Every wave but the last holds pairs with distinct contents and
    distinct styles, each bringing a content or a style no earlier wave had: the workers of a wave never train the
    same stage-1 run, and by the last wave (all other pairs) every content's and style's runs are in ``stage1/``.
    A 4 × 4 grid is its diagonal, then the 12 other pairs."""
    left, seen_c, seen_s, out = list(pairs), set(), set(), []
    while True:
        wave, used_c, used_s = [], set(), set()
        for c, s in left:
            if (c not in seen_c or s not in seen_s) and c not in used_c and s not in used_s:
                wave.append((c, s))
                used_c.add(c)
                used_s.add(s)
        if not wave:
            break
        out.append(wave)
        seen_c |= used_c
        seen_s |= used_s
        left = [p for p in left if p not in wave]
    return out + ([left] if left else [])


def run_units_in_workers(
    out: Path, config: BenchConfig, workers: int, *, deadline: float = 0.0, keep_runs: bool = False, console=None
) -> int:
    """Run the benchmark's missing (method, pair) units in ``workers`` processes through :mod:`b4m.sweep` (one per
    GPU, ``CUDA_VISIBLE_DEVICES`` set; more workers than GPUs share them; CPU processes without a GPU), wave by wave
    (:func:`waves`). A wave's pairs go whole to its workers (a pair's methods share stage-1 runs: direct merge and
    ZipLoRA the same LoRAs); the last wave's units are dealt out one by one. Each worker writes its units to
    ``units/`` and its stage-1 runs to ``stage1/``, reading those the others saved before each unit. Returns the
    number of units run.

    Raises:
        B4MError: A worker failed twice (its log is named; the finished units stay for ``--resume``).
    """
    from ...errors import B4MError
    from ...sweep import Job, make_slots, run_jobs, visible_gpus
    from .units import unit_done

    gpus = visible_gpus()
    slots = make_slots(workers, jobs_per_gpu=-(-workers // len(gpus)) if gpus else 1)
    n = len(slots)
    folder = out / "workers"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    missing = [(m, f"{c}-{s}") for m in config.methods for c, s in config.pair_list()]
    missing = [u for u in missing if not unit_done(out, *u)]
    todo = set(missing)
    jobs: list[Job] = []
    previous: list[str] = []
    all_waves = waves(config.pair_list())
    for k, wave in enumerate(all_waves):
        labels = [f"{c}-{s}" for c, s in wave]
        if k < len(all_waves) - 1:  # whole pairs per worker
            parts = [[(m, label) for label in labels[i::n] for m in config.methods] for i in range(n)]
        else:  # unit by unit, method-major as one process runs them
            units = [(m, label) for m in config.methods for label in labels]
            parts = [units[i::n] for i in range(n)]
        names = []
        for i, part in enumerate(p for p in parts if any(u in todo for u in p)):
            name = f"wave{k + 1}-{i + 1}"
            spec = {"out": str(out), "config": asdict(config), "units": part, "deadline": deadline}
            spec["keep_runs"] = keep_runs
            (folder / f"{name}.json").write_text(json.dumps(spec))
            command = [sys.executable, "-m", "b4m.world.bench.workers", str(folder / f"{name}.json")]
            jobs.append(Job(name, command, list(previous)))
            names.append(name)
        previous = names or previous
    if console is not None:
        console.print(
            f"{len(missing)} units in {len(jobs)} worker jobs over {len(all_waves)} waves on {n} slots "
            f"({', '.join(s.name for s in slots)}); logs in {folder / 'logs'}",
            highlight=False,
            markup=False,
        )
    summary = run_jobs(jobs, folder, slots=slots, retries=1, console=console)
    failed = [r for r in summary["jobs"] if r["status"] == "failed"]
    if failed:
        r = failed[0]
        raise B4MError(f"bench worker {r['name']} failed ({r['note']}); log: {r['log']}; finished units are kept")
    return sum(unit_done(out, *u) for u in missing)


# A worker's command: past the deadline it exits before importing torch (seconds saved per worker).


def work(spec_file: str) -> None:
    """A bench worker process (started by :func:`run_units_in_workers`): run the spec's units that are not done yet,
    until its deadline."""
    from ...device import default_device
    from ...errors import B4MError
    from ...loading import load_model
    from ..catalog import default_catalog
    from .units import load_oracle, load_stage1, pair_data, run_or_record, save_stage1, unit_done
    from .variants import BenchConfig

    try:
        spec = json.loads(Path(spec_file).read_text())
        out, config = Path(spec["out"]), BenchConfig(**spec["config"])
        units = [(m, label) for m, label in spec["units"] if not unit_done(out, m, label)]
        if not units or (spec["deadline"] and time.time() >= spec["deadline"]):
            return
        model = load_model(config.model, device=default_device())
        oracle = load_oracle(config.oracle, str(model.device))
        catalog = default_catalog()
        labels = {label for _, label in units}
        data = {
            f"{c}-{s}": pair_data(model, catalog, c, s, config) for c, s in config.pair_list() if f"{c}-{s}" in labels
        }
        stage1_dir = out / "stage1"
        cache: dict = {}
        saved: set[str] = set()
        for name, label in units:
            if spec["deadline"] and time.time() >= spec["deadline"]:
                print(f"deadline reached before {name} on {label}", flush=True)
                return
            fresh = {k: v for k, v in load_stage1(stage1_dir).items() if k not in cache}  # other workers' runs
            cache.update(fresh)
            saved |= set(fresh)
            t0 = time.perf_counter()
            unit = run_or_record(name, data[label], model, oracle, catalog, config, cache, out)
            save_stage1(stage1_dir, cache, saved)
            if not spec["keep_runs"]:
                shutil.rmtree(out / "runs" / name.replace("/", "_") / label, ignore_errors=True)
            status = f"failed: {unit}" if isinstance(unit, str) else "done"
            print(f"{name} on {label}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
    except B4MError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """``python -m b4m.world.bench.workers SPEC.json``: past the spec's deadline, exit at once (before torch loads)."""
    spec_file = sys.argv[1]
    deadline = json.loads(Path(spec_file).read_text())["deadline"]
    if not deadline or time.time() < deadline:
        work(spec_file)


if __name__ == "__main__":
    main()
