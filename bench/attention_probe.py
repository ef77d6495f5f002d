"""Which of torch's attention kernels run FLUX's training attention (forward and backward) on this GPU?

Found 2026-12-04 on an H200 (torch 2.11.0+cu130): FLUX.1-dev training steps at full size failed in the attention
backward with ``mha_graph.execute(...).is_good()`` and then "an illegal memory access" (cuDNN's kernel), in a plain
diffusers + peft step as much as in b4m's (``b4m.device.avoid_cudnn_attention``). This runs one bf16
``scaled_dot_product_attention`` forward and backward at FLUX's shapes (24 heads of 128; 1,024 or 4,096 image
tokens + 512 text tokens) once per kernel and layout, each in a fresh process (an illegal memory access spoils the
process), and prints one JSON line per (kernel, shape, layout): ok or the error, and ms. Layouts: ``bhsd``
contiguous (B, heads, tokens, 128); ``bshd`` a (B, tokens, heads, 128) tensor transposed, as diffusers' attention
dispatch hands FLUX's projections to torch (the first run, 2026-12-04, had only ``bhsd``: every kernel ran).

    python bench/attention_probe.py                # every kernel, both shapes
    python bench/attention_probe.py --json OUT.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time

KERNELS = ["default", "cudnn", "flash", "efficient", "math"]
LAYOUTS = ["bhsd", "bshd"]
SHAPES = {"512px-batch4": (4, 24, 1024 + 512, 128), "1024px-batch4": (4, 24, 4096 + 512, 128)}


def one(kernel: str, shape: tuple[int, ...], layout: str) -> dict:
    """Forward and backward once to warm up, then timed (median of 5), in this process."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    b, h, s, d = shape
    if layout == "bhsd":
        leaves = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        q, k, v = leaves
    else:
        leaves = [torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        q, k, v = (t.transpose(1, 2) for t in leaves)
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    backends |= {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if kernel == "default":
            sdpa(q, k, v).float().square().mean().backward()
        else:
            with sdpa_kernel([backends[kernel]]):
                sdpa(q, k, v).float().square().mean().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"ms": round(sorted(times[1:])[2] * 1e3, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", nargs=3, metavar=("KERNEL", "SHAPE", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], SHAPES[args.one[1]], args.one[2])))
        return
    import torch

    rows = []
    for shape, kernel, layout in itertools.product(SHAPES, KERNELS, LAYOUTS):
        cmd = [sys.executable, __file__, "--one", kernel, shape, layout]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        row = {"kernel": kernel, "shape": shape, "layout": layout, "dims": SHAPES[shape]}
        if p.returncode == 0:
            row |= {"ok": True, **json.loads(p.stdout.strip().splitlines()[-1])}
        else:
            errors = [line for line in p.stderr.splitlines() if "Error" in line]
            row |= {"ok": False, "error": errors[0][:300] if errors else p.stderr[-300:]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        meta["cudnn"] = torch.backends.cudnn.version()
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
