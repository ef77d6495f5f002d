"""One table from several bench folders run on the same items (same split, seed, pairs and evaluation scenes): their
methods' per-image scores side by side, each paired against a reference method by image, whole contents and styles
resampled (b4m.world.bench.results.intervals). For a method run later on its own (2026-12-06: B4M with 100 make steps
on the test split, beside the stored runs of every other method). The folders may differ in commit and card: the
table names each method's folder, commit and device, so a reader sees which differences are across runs.

    python bench/joined.py bench/results/world-v2/test-seed0 bench/results/world-v2/test-make100-seed0 \\
        --reference b4m-make100 --methods b4m-make100,b4m,jttrain,direct_merge,klora,ziplora,blora
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from b4m.errors import B4MError
from b4m.world.bench.results import intervals
from b4m.world.bench.saved import read_results, results_path

COLUMNS = ("average", "content", "style", "prompt", "content_leak", "style_leak")
#: Settings a method run apart may differ in (its own training); the rest (split, pairs, scenes, sampling, oracle,
#: model) must be the same for the images to pair.
OWN_SETTINGS = {"methods", "method_settings", "lr", "steps", "make_steps", "make_lr", "merge_steps", "preset"}


def joined(folders: list[Path], reference: str, methods: list[str] | None = None) -> dict:
    """The folders' per-image scores in one results-like dict (``summary``, ``differences``, ``sources``). Refused
    in one line when the folders' items differ or a method is in two of them."""
    per_image: dict[str, dict] = {}
    sources: dict[str, dict] = {}
    items = shared = None
    for folder in folders:
        try:
            path = results_path(folder)
        except B4MError as e:
            raise SystemExit(str(e)) from None
        results = read_results(path)
        settings = {k: v for k, v in results["settings"].items() if k not in OWN_SETTINGS}
        if items is None:
            items, shared = results["items"], settings
        elif results["items"] != items:
            raise SystemExit(f"{path}: its items (pairs, scenes, seeds) differ from {folders[0]}'s; nothing to pair")
        elif settings != shared:
            key = next(k for k in sorted({*settings, *shared}) if settings.get(k) != shared.get(k))
            raise SystemExit(f"{path}: {key} = {settings.get(key)!r}, {folders[0]}'s is {shared.get(key)!r}")
        for method, scores in results["per_image"].items():
            if method in per_image:
                raise SystemExit(f"{path}: method {method} is also in {sources[method]['folder']}")
            per_image[method] = scores
            sources[method] = {"folder": str(folder), "commit": results["commit"], "device": results["device"]}
    chosen = methods or list(per_image)
    missing = [m for m in [reference, *chosen] if m not in per_image]
    if missing:
        raise SystemExit(f"not in the folders: {', '.join(missing)} (they hold {', '.join(per_image)})")
    chosen = list(dict.fromkeys([reference, *chosen]))
    table = intervals({m: per_image[m] for m in chosen}, items, reference)
    return {**table, "sources": {m: sources[m] for m in chosen}, "folders": [str(f) for f in folders]}


def markdown(table: dict) -> str:
    """Means per metric, then the average's difference from the reference with its 95% interval."""
    ref = table["reference"]
    lines = [
        f"| method | {' | '.join(COLUMNS)} | average − {ref} [95%] | run (commit, device) |",
        "|---|" + "---:|" * (len(COLUMNS) + 1) + "---|",
    ]
    for method, summary in table["summary"].items():
        d = table["differences"][method]["average"]
        diff = "—" if method == ref else f"{d['mean']:+.3f} [{d['low']:+.2f}, {d['high']:+.2f}]"
        src = table["sources"][method]
        cells = " | ".join(f"{summary[k]['mean']:.{3 if k == 'average' else 2}f}" for k in COLUMNS)
        run = f"{Path(src['folder']).name} ({src['commit']}, {src['device']})"
        lines.append(f"| {method} | {cells} | {diff} | {run} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="bench output folders (each with results.json[.gz])")
    parser.add_argument("--reference", required=True, help="the method every other is paired against")
    parser.add_argument("--methods", default=None, help="comma-separated, in table order (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the joined table here")
    args = parser.parse_args(argv)
    table = joined(args.folders, args.reference, args.methods.split(",") if args.methods else None)
    print(markdown(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")
    return table


if __name__ == "__main__":
    main()
