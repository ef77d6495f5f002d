"""Where a stage-1 micro-step's time goes: one SDXL UNet forward+backward of a batch, with no adapter, with peft's
LoRA, and with the PLP adapter unrouted and routed (clean multi-correspondence routing).

SDXL-size UNet with random weights in bf16, autocast bf16, adapters in fp32, 77 text tokens. Median of ``--iters``
timed steps after 3 warm-ups, each step synchronised. Prints a table and writes JSON.

    python bench/step_profile.py --resolutions 512 1024 --batch 4 --json bench/results/step_profile.json

``--graphs`` replays each step as one CUDA graph (forward, loss and backward captured once), as the ``fast`` preset
runs its micro-step: the GPU's own time without the host's launch overhead. With ``--batch 16 --resolutions 512``
that is the shape of the ``fast`` stage-1 step (16 images in one pass), and the "no adapter" row is the most an
adapter of any kind could get back (its backward still runs to the inputs through every layer). Each row also gives
its FLOPs (torch's flop counter) and its share of the bf16 matrix rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from b4m.adapter.config import PLPConfig
from b4m.adapter.walker import add_plp, remove_plp, routing

ROOT = Path(__file__).resolve().parents[1]


def matmul_tflops(n: int = 8192, repeats: int = 20) -> float:
    """The bf16 matrix rate of this GPU: an n³ matmul, median of ``repeats`` timings of 10 calls."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / 10)
    return 2 * n**3 / statistics.median(times) / 1e12


def step_time(unet, latents, ctx, added, iters: int, route: int | None, graphs: bool) -> tuple[float, float, float]:
    """(seconds per step, peak GiB, FLOPs of one step)."""
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in unet.parameters() if p.requires_grad]
    t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)

    def body():
        # No autocast cache: a cached cast made during a capture would outlive its graph's memory pool.
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphs):
            if route is None:
                out = unet(latents, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
            else:
                with routing(unet, route, "up"):
                    out = unet(latents, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        out.float().pow(2).mean().backward()

    def clear():
        for p in params:
            p.grad = None
        latents.grad = None

    def eager():
        body()
        clear()

    with FlopCounterMode(display=False) as counter:
        eager()
    flops = counter.get_total_flops()
    once = eager
    if graphs:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                eager()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # the gradients are allocated inside: each replay writes them afresh
            body()
        once = graph.replay
    for _ in range(3):
        once()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        once()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30
    if graphs:
        del graph, once
        clear()
    return statistics.median(times), peak, flops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--graphs", action="store_true", help="time each step as one replayed CUDA graph")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    tflops = matmul_tflops()
    print(f"bf16 matmul 8192³: {tflops:.1f} TFLOP/s", flush=True)
    config = json.loads((ROOT / "tests" / "data" / "sdxl-unet-config.json").read_text())
    with torch.device("cuda"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")}).to(torch.bfloat16)
    unet.requires_grad_(False)
    inputs = {}
    for res in args.resolutions:
        b, s = args.batch, res // 8
        added = {
            "text_embeds": torch.randn(b, 1280, device="cuda"),
            "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * b, device="cuda", dtype=torch.float32),
        }
        inputs[res] = (torch.randn(b, 4, s, s, device="cuda"), torch.randn(b, 77, 2048, device="cuda"), added)
    rows = []

    def measure(name: str, route: int | None = None, grad_inputs: bool = False) -> None:
        for res, (latents, ctx, added) in inputs.items():
            latents.requires_grad_(grad_inputs)
            s, mem, flops = step_time(unet, latents, ctx, added, args.iters, route, args.graphs)
            row = {"resolution": res, "batch": args.batch, "variant": name, "ms": s * 1e3, "peak_gib": mem}
            row |= {"tflop": flops / 1e12, "fraction_of_matmul_rate": flops / s / 1e12 / tflops}
            rows.append(row)
            print(f"  {name}, {res} px: {s * 1e3:.1f} ms, {100 * row['fraction_of_matmul_rate']:.1f}%", flush=True)

    measure("no adapter (backward to the inputs)", grad_inputs=True)
    add_plp(unet, PLPConfig(rank=64))
    measure("PLP r64")
    measure("PLP r64, clean routing", route=max(1, args.batch // 4))  # 1 main image in 4, as in stage 1
    remove_plp(unet)
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapter weights, as in training
    measure("peft LoRA r64")
    rows.sort(key=lambda r: r["resolution"])
    print(f"{'res':>5} {'batch':>5} {'variant':<46} {'ms/step':>9} {'peak GiB':>9} {'TFLOP':>7} {'% rate':>7}")
    for r in rows:
        print(
            f"{r['resolution']:>5} {r['batch']:>5} {r['variant']:<46} {r['ms']:>9.1f} {r['peak_gib']:>9.2f} "
            f"{r['tflop']:>7.2f} {100 * r['fraction_of_matmul_rate']:>6.1f}%"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "graphs": args.graphs}
        meta |= {"matmul_tflops": tflops, "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
