"""Graph breaks that torch.compile meets in b4m's training forward: the tiny SDXL-layout UNet of bench/speed.py
with a PLP adapter, under autocast on ``--device`` (cuda: bf16), traced by ``torch._dynamo.explain``.

    python bench/dynamo_probe.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).parent))
import speed

from b4m.adapter.config import PLPConfig
from b4m.adapter.walker import add_plp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="SDXL's UNet config instead of the tiny one")
    args = parser.parse_args()
    cfg = speed.unet_config(not args.full)
    unet = UNet2DConditionModel(**cfg).to(args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)
    add_plp(unet, PLPConfig(rank=4))
    for _, p in unet.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    unet.train()
    b, res = 2, 16
    dev = args.device
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    x = torch.randn(b, 4, res, res, device=dev)
    ctx = torch.randn(b, 77, cfg["cross_attention_dim"], device=dev)
    added = {"text_embeds": torch.randn(b, pooled, device=dev), "time_ids": torch.randn(b, 6, device=dev)}
    t = torch.tensor([10, 20], device=dev)

    def forward(x):
        return unet(x, t, ctx, added_cond_kwargs=added).sample

    with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
        ex = torch._dynamo.explain(forward)(x)
    print(f"torch {torch.__version__} on {dev}: graphs {ex.graph_count}, graph breaks {ex.graph_break_count}")
    for r in ex.break_reasons:
        where = r.user_stack[-1] if r.user_stack else None
        print(" -", r.reason.splitlines()[0][:300], "|", f"{where.filename}:{where.lineno}" if where else "")


if __name__ == "__main__":
    main()
