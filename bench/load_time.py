"""How long a b4m process takes to load a base model (issue 19: in the whole flow, 15–20 s each time a process loaded
the SDXL folder; a new pair's make and generate spent 31.7 of their 72.9 s loading).

Each measurement is a fresh process on one source tree (``PYTHONPATH``), as a command starts, timing in turn:

- ``import_s``: ``import torch`` and b4m's loading module (diffusers, transformers);
- ``device_s``: the device's first use (CUDA's context; 0 on a CPU);
- ``load_s``: :func:`b4m.loading.load_model` onto the device at the run's dtype (bf16 on a GPU), synchronised.

With ``--before SRC`` (the ``src`` of another checkout, e.g. ``git worktree add /tmp/before COMMIT``) both trees are
measured in the same session, alternating run by run so the machine's state falls on both alike, and the medians
and their ratio are reported. The files are read once before the timed runs, so every run finds them in the page
cache (what a user meets from the second command on).

    python bench/load_time.py --before /tmp/before/src --repeats 3          # the random SDXL folder (fp16 files)
    python bench/load_time.py --model /models/sdxl --repeats 3               # any local diffusers folder
    python bench/load_time.py --tiny --repeats 1                             # the tiny SDXL in fp16 (a CPU check)

Writes ``OUT/load-time.json`` (``--json``; OUT: the device tool's ``$OUT``, else ``runs``) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: The child process: one load, its phases as JSON on the last line of stdout.
CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
from b4m.loading import load_model
t1 = time.perf_counter()
device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cuda":
    torch.zeros(1, device=device)
    torch.cuda.synchronize()
t2 = time.perf_counter()
dtype = torch.bfloat16 if device == "cuda" else None
model = load_model(sys.argv[1], device=device, dtype=dtype)
if device == "cuda":
    torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "device_s": t2 - t1, "load_s": t3 - t2, "dtype": str(model.dtype)}))
"""

PHASES = ("import_s", "device_s", "load_s")


def load_once(src: Path, model: Path) -> dict:
    """One fresh process on the tree ``src`` loading ``model``: its phases in seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(model)], env=env, capture_output=True, text=True, timeout=900
    )
    if done.returncode:
        raise SystemExit(f"{src}: loading {model} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_files(model: Path) -> None:
    """Read every weight file once, so the timed runs find them in the page cache."""
    for path in sorted(model.rglob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def tiny_fp16(path: Path) -> Path:
    """The tiny test SDXL, its UNet and text encoders saved in float16 (a GPU run casts them to bfloat16)."""
    if (path / "model_index.json").exists():
        return path
    sys.path.insert(0, str(ROOT / "tests"))
    from diffusers import StableDiffusionXLPipeline

    from tiny_pipelines import save_tiny_sdxl

    pipe = StableDiffusionXLPipeline.from_pretrained(save_tiny_sdxl(path.with_name(path.name + "-fp32")))
    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        module.half()
    pipe.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="a local diffusers folder (default: the random SDXL)")
    p.add_argument("--out", type=Path, default=Path("runs/load-bench"), help="where the random model is built")
    p.add_argument("--before", type=Path, default=None, help="the src folder of the tree to compare against")
    p.add_argument("--after", type=Path, default=ROOT / "src", help="the tree measured as 'after' (default: ours)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="the tiny SDXL in fp16 (checks the script on a CPU)")
    p.add_argument("--commit", default=os.environ.get("B4M_COMMIT"), help="the commit to record")
    p.add_argument("--json", type=Path, default=None, help="default: $OUT/load-time.json (OUT: runs)")
    args = p.parse_args(argv)
    if args.model is not None:
        model = args.model
    elif args.tiny:
        model = tiny_fp16(args.out.resolve() / "tiny-fp16")
    else:
        sys.path.insert(0, str(HERE))
        from sdxl_pipeline import build_sdxl  # bench/: the random SDXL folder, fp16 files

        model = build_sdxl(args.out.resolve() / "model")
    read_files(model)
    trees = {"after": args.after.resolve(), **({"before": args.before.resolve()} if args.before else {})}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.repeats):
        for name, src in trees.items():
            runs[name].append(load_once(src, model))
            print(name, json.dumps({k: round(v, 2) for k, v in runs[name][-1].items() if k in PHASES}), flush=True)
    medians = {name: {k: statistics.median(r[k] for r in rows) for k in PHASES} for name, rows in runs.items()}
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.node(),
        "device": _device_name(),
        "commit": args.commit,
        "model": str(model),
        "command": "python bench/load_time.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "trees": {k: str(v) for k, v in trees.items()},
        "runs": runs,
        "medians": medians,
    }
    if "before" in medians:
        report["load_ratio_before_over_after"] = medians["before"]["load_s"] / medians["after"]["load_s"]
    path = args.json or Path(os.environ.get("OUT", "runs")) / "load-time.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    print("| tree | import s | device s | load s |\n|---|---:|---:|---:|")
    for name, m in medians.items():
        print(f"| {name} | {m['import_s']:.2f} | {m['device_s']:.2f} | {m['load_s']:.2f} |")
    print(f"wrote {path}")
    return report


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t:.0f} s)")
