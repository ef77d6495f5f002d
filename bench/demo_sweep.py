"""Which ``b4m demo`` settings make B4M learn its pair, over many pairs? (The demo's step counts are fixed by its
5-minute CPU budget; this sweeps what else the demo sets: rank, lr, the up half's lr ratio.)

Runs :func:`b4m.world.demo.run_world_demo` for every (settings, pair) in worker processes (several share one GPU
well: the world model is small), in fp32 (``mixed_precision = "no"``, as the demo runs on a CPU), without the
base-model baseline, and writes one JSON with B4M's content, style, prompt and leak means per run, and per settings
the mean over pairs and how many pairs pass the demo's bars::

    python bench/demo_sweep.py --out OUT/demo-sweep.json --workers 4 \\
        --settings '[{"rank": 16}, {"rank": 64}, {"rank": 16, "up_lr_ratio": 4}]'

``--split test`` runs the test split's 36 pairs (only with settings chosen on dev); ``--pick DEV_JSON`` prints the
settings a dev sweep chose (:func:`pick`) as the JSON list ``--settings`` takes, and runs nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import itertools
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np

from b4m.world.bench.variants import BenchConfig
from b4m.world.demo import BARS

KEYS = ("content", "style", "prompt", "content_leak", "style_leak")


def one(job: tuple[dict, str, str]) -> dict:
    import torch

    from b4m.world.demo import DemoConfig, run_world_demo

    settings, content, style = job
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        config = DemoConfig(content=content, style=style, baseline=False, mixed_precision="no", **settings)
        report = run_world_demo(tmp, config)
    means = {k: report["metrics"]["B4M"][k]["mean"] for k in KEYS}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"  # rows of several calls may merge
    return {
        "settings": settings,
        "pair": f"{content}:{style}",
        **means,
        "seconds": time.perf_counter() - t0,
        "device": device,
    }


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def average(row: dict) -> float:
    return (row["content"] + row["style"] + row["prompt"]) / 3


def pick(summary: list[dict]) -> dict:
    """The demo's settings from a dev sweep's summary (rule written 2026-12-04, before the sweep ran): the most dev
    pairs passing the demo's bars, then the highest mean of content, style and prompt, then the earlier entry."""
    best = max(range(len(summary)), key=lambda i: (summary[i]["passed"], round(average(summary[i]), 6), -i))
    return summary[best]["settings"]


def main(argv=None) -> Path | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--settings", help="JSON list of DemoConfig overrides")
    p.add_argument("--pairs", default="", help="content:style,... (default: the split's novel pairs)")
    p.add_argument("--split", default="dev", help="dev (16 pairs, default) or test (36; settings chosen on dev only)")
    p.add_argument("--pick", type=Path, help="a dev sweep's JSON: print the settings it chose, run nothing")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each worker")
    args = p.parse_args(argv)
    if args.pick:
        print(json.dumps([pick(json.loads(args.pick.read_text())["summary"])]))
        return None
    if args.out is None or args.settings is None:
        p.error("--out and --settings are required (or --pick)")
    settings = json.loads(args.settings)
    split = BenchConfig(split=args.split)
    pairs = (
        [tuple(x.split(":")) for x in args.pairs.split(",")]
        if args.pairs
        else list(itertools.product(split.contents, split.styles))
    )
    jobs = [(s, c, st) for s in settings for c, st in pairs]
    t0 = time.perf_counter()
    partial = args.out.with_suffix(".jsonl")  # finished runs, one per line: a second call runs only the others
    rows, done = [], set()
    for line in partial.read_text().splitlines() if partial.exists() else []:  # the first row of a run counts
        row = json.loads(line)
        key = (json.dumps(row["settings"], sort_keys=True), row["pair"])
        if key not in done:
            rows.append(row)
            done.add(key)
    todo = [j for j in jobs if (json.dumps(j[0], sort_keys=True), f"{j[1]}:{j[2]}") not in done]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    pool = cf.ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_threads, initargs=(args.threads,))
    with pool, open(partial, "a") as log:
        for row in pool.map(one, todo):
            rows.append(row)
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()
    summary = []
    for s in settings:
        mine = [r for r in rows if r["settings"] == s]
        passed = sum(all(r[k] >= v for k, v in BARS.items()) for r in mine)
        summary.append(
            {
                "settings": s,
                "pairs": len(mine),
                "passed": passed,
                **{k: float(np.mean([r[k] for r in mine])) for k in KEYS},
            }
        )
        print(json.dumps(summary[-1]), flush=True)
    import torch

    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "seconds": round(time.perf_counter() - t0, 1),
        "split": args.split,
        "bars": BARS,
        "summary": summary,
        "runs": rows,
    }
    args.out.write_text(json.dumps(out, indent=1))
    return args.out


if __name__ == "__main__":
    main()
