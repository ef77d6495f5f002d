"""Where a stage-1 micro-step's time goes: one SDXL UNet forward+backward of a batch, with no adapter, with peft's
LoRA, and with the PLP adapter unrouted and routed (clean multi-correspondence routing).

SDXL-size UNet with random weights in bf16, autocast bf16, adapters in fp32, 77 text tokens. Median of ``--iters``
timed steps after 3 warm-ups, each step synchronised. Prints a table and writes JSON.

    python bench/step_profile.py --resolutions 512 1024 --batch 4 --json bench/results/step_profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from b4m.adapter.config import PLPConfig
from b4m.adapter.walker import add_plp, remove_plp, routing

ROOT = Path(__file__).resolve().parents[1]


def step_time(unet, latents, ctx, added, iters: int, route: int | None) -> tuple[float, float]:
    params = [p for p in unet.parameters() if p.requires_grad]
    t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)

    def once():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if route is None:
                out = unet(latents, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
            else:
                with routing(unet, route, "up"):
                    out = unet(latents, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        out.float().pow(2).mean().backward()
        for p in params:
            p.grad = None

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
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
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
            ms, mem = step_time(unet, latents, ctx, added, args.iters, route)
            rows.append({"resolution": res, "batch": args.batch, "variant": name, "ms": ms * 1e3, "peak_gib": mem})

    measure("no adapter (backward to the inputs)", grad_inputs=True)
    add_plp(unet, PLPConfig(rank=64))
    measure("PLP r64")
    measure("PLP r64, clean routing", route=1)
    remove_plp(unet)
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapter weights, as in training
    measure("peft LoRA r64")
    rows.sort(key=lambda r: r["resolution"])
    print(f"{'res':>5} {'batch':>5} {'variant':<46} {'ms/step':>9} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['resolution']:>5} {r['batch']:>5} {r['variant']:<46} {r['ms']:>9.1f} {r['peak_gib']:>9.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
