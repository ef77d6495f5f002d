"""Oracle accuracy on fresh renders of the novel concepts, per split (issue 16: check the oracles again).

Usage: ``python bench/oracle_novel_accuracy.py`` (CPU, about a minute); writes
``bench/results/world-v2/oracle-novel-accuracy.json``. Each row: 2,000 scenes at new seeds, either the split's
contents in every style or every content in the split's styles.
"""

import json
from pathlib import Path

import numpy as np
import torch

from b4m.world.catalog import default_catalog
from b4m.world.oracle import evaluate
from b4m.world.render import random_scene, render_batch
from b4m.world.weights import load_shipped_oracle

OUT = Path("bench/results/world-v2/oracle-novel-accuracy.json")


def main() -> None:
    torch.set_num_threads(1)
    cat = default_catalog()
    out = {}
    for name in ("a", "b"):
        oracle = load_shipped_oracle(name)
        for split in ("dev", "test"):
            contents = [c.name for c in cat.novel_contents_of(split)]
            styles = [s.name for s in cat.novel_styles_of(split)]
            rng = np.random.default_rng(2026)
            for what, kw in (("contents", {"contents": contents}), ("styles", {"styles": styles})):
                scenes = [random_scene(rng, cat, **kw) for _ in range(2000)]
                acc = evaluate(oracle, render_batch(scenes, cat, 32), scenes)
                out[f"{name}/{split}/{what}"] = {k: round(v, 4) for k, v in acc.items()}
                print(name, split, what, out[f"{name}/{split}/{what}"], flush=True)
    OUT.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
