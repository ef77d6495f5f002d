"""Issue 19's whole flow as a user meets it, measured end to end: ``b4m run`` on a full-size SDXL with random weights
(values do not change cost) at the official step counts (two stage-1 runs of 1,000 steps at 512 px, make 50 steps,
4 images at the model's 1,024 px), then a new pair from the two finished runs (``b4m make`` 50 steps and ``b4m
generate`` 4 images), each a separate process as a user types it, and the same pair as one command (``b4m make
--generate 4``: one process, one load).

The flow does not fit one 10-minute device call, so the script can stop and go on: ``--deadline-s S`` sends ``b4m
run`` SIGTERM where the script's S seconds would otherwise run out (the run writes a checkpoint and exits, as on
Ctrl-C), and the same command again continues it with ``b4m run --resume``. The report adds the calls' wall times
and lists each call, so the cost of stopping (a second process start and model load) stays visible. Building the
random model is not a user's cost and is reported apart.

    python bench/flow_pipeline.py --out runs/flow-bench --deadline-s 550   # then the same again, on the same machine
    python bench/flow_pipeline.py --tiny --out /tmp/flow-bench             # the tiny pipeline on a CPU (the test's)

Report: ``OUT/report.json`` and, where the device tool's ``OUT`` is set, ``$OUT/flow_pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

from flux_pipeline import write_report  # noqa: E402  (bench/: the report, also to $OUT)
from sdxl_pipeline import build_sdxl, build_tiny, images  # noqa: E402  (bench/: the random SDXL folder)

#: Seconds the script keeps after SIGTERM for the run's checkpoint and the report.
STOP_MARGIN_S = 45


def b4m_process(args: list, log: Path, limit_s: float | None) -> dict:
    """Run ``b4m ARGS`` (output to ``log``); past ``limit_s`` send SIGTERM and wait for the run's checkpoint."""
    start = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.Popen([sys.executable, "-m", "b4m.cli", *map(str, args)], stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=None if limit_s is None else max(1.0, limit_s))
            stopped = False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            stopped = True
    row = {"wall_s": round(time.perf_counter() - start, 1), "returncode": proc.returncode, "stopped": stopped}
    if proc.returncode and not stopped:
        row["error"] = (log.read_text().strip().splitlines() or ["?"])[-1][:500]
    return row


def run_records(folder: Path) -> dict:
    """Each run folder's timings, process age at its start and peak memory (its run.json)."""
    keys = ("timings_s", "process_age_at_start_s", "peak_memory_gib", "peak_reserved_gib")
    out = {}
    for run in sorted(folder.glob("*/run.json")):
        info = json.loads(run.read_text())
        out[run.parent.name] = {k: info.get(k) for k in keys}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/flow-bench"))
    p.add_argument("--resolution", type=int, default=512, help="training resolution")
    p.add_argument("--steps", type=int, default=1000, help="steps of each stage-1 run (the official 1,000)")
    p.add_argument("--make-steps", type=int, default=50)
    p.add_argument("--images", type=int, default=4, help="images of the flow and of the new pair")
    p.add_argument("--deadline-s", type=float, default=0, help="stop the flow where this call would run out (0: none)")
    p.add_argument("--tiny", action="store_true", help="the tiny SDXL test pipeline (checks the script on a CPU)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    report = json.loads(path.read_text()) if path.exists() else {"calls": [], "pair": None}
    report.update(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        date=time.strftime("%Y-%m-%d"),
        commit=os.environ.get("B4M_COMMIT"),  # the device machine's copy has no git history
        argv=sys.argv[1:] if argv is None else argv,
    )
    built = time.perf_counter()
    model = build_tiny(out / "model-tiny") if args.tiny else build_sdxl(out / "model")
    report.setdefault("build_s", round(time.perf_counter() - built, 1))
    size, res = (64, 32) if args.tiny else (1024, args.resolution)
    images(out / "data" / "dog", 4, size, 0)
    images(out / "data" / "yarn", 4, size, 1)
    flow = out / "flow"
    if not report.get("flow_finished"):
        command = [
            *("run", "--model", model, "--resolution", res, "--steps", args.steps),
            *("--make-steps", args.make_steps, "-n", args.images, "-o", flow),
            *("--content-images", out / "data" / "dog", "--content-prompt", "a photo of sks dog"),
            *("--style-images", out / "data" / "yarn", "--style-prompt", "a cat in zwx style"),
            *(["--rank", 4] if args.tiny else []),  # the tiny UNet is 32 wide
            *(["--resume"] if report["calls"] else []),
        ]
        left = args.deadline_s - (time.perf_counter() - t0) - STOP_MARGIN_S if args.deadline_s else None
        call = b4m_process(command, out / "flow.log", left)
        report["calls"].append(call)
        report["flow_finished"] = call["returncode"] == 0
        report["flow_wall_s"] = round(sum(c["wall_s"] for c in report["calls"]), 1)
        report["flow_stages_s"] = (
            json.loads((flow / "flow.json").read_text()).get("seconds") if report["flow_finished"] else None
        )
        report["runs"] = run_records(flow)
        write_report(report, out, "flow_pipeline.json")
        print("flow", json.dumps(call), flush=True)
    if report["flow_finished"] and report["pair"] is None:
        left = args.deadline_s - (time.perf_counter() - t0) if args.deadline_s else None
        if left is None or left > 60:
            pair = {}
            make = ["make", "--content", flow / "content", "--style", flow / "style", "-o", out / "pair"]
            pair["make"] = b4m_process([*make, "--steps", args.make_steps, "--overwrite"], out / "pair.log", None)
            gen = ["generate", out / "pair", "a sks dog in zwx style", "-n", args.images, "-o", out / "pair-images"]
            pair["generate"] = b4m_process([*gen, "--overwrite"], out / "pair.log", None)
            pair["wall_s"] = round(pair["make"]["wall_s"] + pair["generate"]["wall_s"], 1)
            pair["make_run"] = run_records(out).get("pair")
            report["pair"] = pair
            write_report(report, out, "flow_pipeline.json")
            print("pair", json.dumps(pair), flush=True)
    if report["flow_finished"] and report["pair"] is not None and report.get("pair_one_command") is None:
        left = args.deadline_s - (time.perf_counter() - t0) if args.deadline_s else None
        if left is None or left > 60:  # the same pair as one command: make --generate, one process and one load
            make = ["make", "--content", flow / "content", "--style", flow / "style", "-o", out / "pair1"]
            make += ["--steps", args.make_steps, "--generate", args.images]
            make += ["--generate-prompt", "a sks dog in zwx style", "--overwrite"]
            one = b4m_process(make, out / "pair1.log", None)
            one["make_run"] = run_records(out).get("pair1")
            report["pair_one_command"] = one
            write_report(report, out, "flow_pipeline.json")
            print("pair, one command", json.dumps(one), flush=True)
    return report


if __name__ == "__main__":
    main()
