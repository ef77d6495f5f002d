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


def one(job: tuple[dict, str, str, list[dict]]) -> list[dict]:
    """One training of the pair at ``settings``, scored under each generation setting (the first as the demo does,
    the others by :func:`b4m.world.demo.score_again` on the same made adapter): one row each."""
    import torch

    from b4m.device import default_device
    from b4m.loading import load_model
    from b4m.world.demo import DemoConfig, run_world_demo, score_again
    from b4m.world.weights import load_shipped_oracle

    settings, content, style, generations = job
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"  # rows of several calls may merge
    rows, model, oracle = [], None, None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, generation in enumerate(generations):
            config = DemoConfig(
                content=content, style=style, baseline=False, mixed_precision="no", **settings, **generation
            )
            if i == 0:
                per_image = run_world_demo(tmp, config)["per_image"]["B4M"]
            else:  # the model and the oracle loaded once for the job's further settings
                if model is None:
                    model = load_model("world", device=default_device())
                    oracle = load_shipped_oracle("a", device=default_device())
                per_image = score_again(tmp, config, model=model, oracle=oracle)
            means = {k: float(np.mean(per_image[k])) for k in KEYS}
            seconds = time.perf_counter() - t0  # the first row's includes the training
            rows.append({"settings": {**settings, **generation}, "pair": f"{content}:{style}", **means})
            rows[-1].update(seconds=seconds, device=device)
            t0 = time.perf_counter()
    return rows


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
    p.add_argument(
        "--generation",
        default="[{}]",
        help="JSON list of generation-only DemoConfig overrides (content_scale, style_scale, guidance_scale), each "
        "scored on the same training of every settings × pair: a summary row per settings × generation",
    )
    args = p.parse_args(argv)
    if args.pick:
        print(json.dumps([pick(json.loads(args.pick.read_text())["summary"])]))
        return None
    if args.out is None or args.settings is None:
        p.error("--out and --settings are required (or --pick)")
    generations = json.loads(args.generation)
    allowed = {"content_scale", "style_scale", "guidance_scale"}
    if not generations or any(set(g) - allowed for g in generations):
        p.error(f"--generation: a non-empty JSON list of objects with keys among {', '.join(sorted(allowed))}")
    settings = json.loads(args.settings)
    split = BenchConfig(split=args.split)
    pairs = (
        [tuple(x.split(":")) for x in args.pairs.split(",")]
        if args.pairs
        else list(itertools.product(split.contents, split.styles))
    )
    jobs = [(s, c, st, generations) for s in settings for c, st in pairs]
    t0 = time.perf_counter()
    partial = args.out.with_suffix(".jsonl")  # finished runs, one per line: a second call runs only the others
    rows, done = [], set()
    for line in partial.read_text().splitlines() if partial.exists() else []:  # the first row of a run counts
        row = json.loads(line)
        key = (json.dumps(row["settings"], sort_keys=True), row["pair"])
        if key not in done:
            rows.append(row)
            done.add(key)
    todo = [
        j
        for j in jobs
        if any((json.dumps({**j[0], **g}, sort_keys=True), f"{j[1]}:{j[2]}") not in done for g in generations)
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    pool = cf.ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_threads, initargs=(args.threads,))
    with pool, open(partial, "a") as log:
        for job_rows in pool.map(one, todo):
            for row in job_rows:
                rows.append(row)
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")
            log.flush()
    summary = []
    for s in [{**s, **g} for s in settings for g in generations]:
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
