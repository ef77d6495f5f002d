"""Compare two output folders of ``b4m bench`` or ``b4m demo`` tensor for tensor (the "same results before and after"
check of a refactor).

    OMP_NUM_THREADS=1 PYTHONPATH=<old checkout>/src python -m b4m.cli bench --quick --keep-runs -o before/bench
    OMP_NUM_THREADS=1 python -m b4m.cli bench --quick --keep-runs -o after/bench
    python bench/parity.py before/bench after/bench

What is compared, by path relative to each folder: every ``.safetensors`` file (adapters, checkpoints, stage-1
runs, exports), every ``.npz`` (the bench's units: images and per-image scores), the ``per_image`` scores of
``results.json`` / ``report.json``, and the images embedded in ``report.html``. A tensor is "equal" when bit-equal;
otherwise the largest absolute difference is printed. Exit status 0 only when everything present in both is
bit-equal and no file is missing on either side (``--map OLD=NEW`` renames path parts of the first folder).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file


def _files(root: Path, suffixes: tuple[str, ...], mapping: list[tuple[str, str]]) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name.endswith(suffixes) and not path.name.startswith("."):
            key = str(path.relative_to(root))
            for old, new in mapping:
                key = key.replace(old, new)
            out[key] = path
    return out


def _arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k != "meta"}
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        per_image = data.get("per_image", {})
        out = {}
        for method, scores in per_image.items():
            for metric, values in scores.items():
                out[f"{method}/{metric}"] = np.asarray(values, np.float64)
        return out
    if path.suffix == ".html":
        urls = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", path.read_text())
        return {f"image{i}": np.asarray(Image.open(io.BytesIO(base64.b64decode(u)))) for i, u in enumerate(urls)}
    raise ValueError(path)


def compare(a: Path, b: Path, mapping: list[tuple[str, str]]) -> bool:
    suffixes = (".safetensors", ".npz", "results.json", "report.json", ".html")
    fa, fb = _files(a, suffixes, mapping), _files(b, suffixes, [])
    ok = True
    for key in sorted(set(fa) - set(fb)):
        print(f"only in {a}: {key}")
        ok = False
    for key in sorted(set(fb) - set(fa)):
        print(f"only in {b}: {key}")
        ok = False
    equal = 0
    for key in sorted(set(fa) & set(fb)):
        xa, xb = _arrays(fa[key]), _arrays(fb[key])
        if set(xa) != set(xb):
            print(f"{key}: different tensors ({len(set(xa) ^ set(xb))} names differ)")
            ok = False
            continue
        worst = 0.0
        for name in xa:
            u, v = xa[name], xb[name]
            if u.shape != v.shape:
                print(f"{key}: {name}: shape {u.shape} vs {v.shape}")
                ok = False
                continue
            if not np.array_equal(u, v):
                worst = max(worst, float(np.abs(u.astype(np.float64) - v.astype(np.float64)).max()))
        if worst:
            print(f"{key}: max |difference| {worst:.3g}")
            ok = False
        else:
            equal += 1
    print(f"{equal} of {len(set(fa) & set(fb))} common files bit-equal")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--map", action="append", default=[], help="OLD=NEW: rename a path part of the first folder")
    args = parser.parse_args()
    mapping = [tuple(m.split("=", 1)) for m in args.map]
    sys.exit(0 if compare(args.before, args.after, mapping) else 1)


if __name__ == "__main__":
    main()
