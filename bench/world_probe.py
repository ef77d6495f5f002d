"""De-risking the world's base model on a GPU: step speed of candidate UNets, then a short pretraining run and
samples of held-in, held-out and novel-free prompts (a grid to look at; the oracle scores them when it exists).

    python bench/world_probe.py --out runs/world-probe --steps 3000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from b4m.models.base import SampleRequest
from b4m.world import Scene, caption, default_catalog
from b4m.world.model import WorldModel, WorldModelConfig, default_unet_config
from b4m.world.pretrain import PretrainConfig, holdout_combinations, pretrain


def speed(config: WorldModelConfig, batch: int, steps: int = 30) -> tuple[float, float]:
    """(steps per second, parameters in M) of one training step at ``batch``, bf16 autocast."""
    model = WorldModel(config).to("cuda")
    params = [*model.denoiser.parameters(), *model.text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    res = config.resolution
    ids = torch.randint(0, 50, (batch, 16), device="cuda")
    x = torch.randn(batch, 3, res, res, device="cuda")
    t = torch.randint(0, 1000, (batch,), device="cuda")
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.denoiser(x, t, encoder_hidden_states=model.text_encoder(ids)).sample
        loss = out.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0), sum(p.numel() for p in model.denoiser.parameters()) / 1e6


def grid(images: np.ndarray, cols: int) -> Image.Image:
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    canvas = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        canvas[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = im
    return Image.fromarray(canvas)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/world-probe"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--no-speed", action="store_true", help="skip the step-speed table")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "speed": []}
    for channels in [] if args.no_speed else [(48, 96, 192), (64, 128, 256), (96, 192, 384)]:
        for batch in (256, 512):
            unet = {**default_unet_config(args.resolution, 256), "block_out_channels": channels}
            sps, mparams = speed(WorldModelConfig(resolution=args.resolution, unet=unet), batch)
            report["speed"].append(
                {
                    "channels": channels,
                    "batch": batch,
                    "steps_per_s": round(sps, 2),
                    "unet_mparams": round(mparams, 1),
                    "images_per_s": round(sps * batch),
                }
            )
            print(report["speed"][-1], flush=True)
    config = PretrainConfig(
        resolution=args.resolution,
        steps=args.steps,
        batch_size=args.batch,
        dataset_size=100_000,
        checkpoint_every=10**9,
        log_every=250,
        warmup=200,
    )
    t0 = time.perf_counter()
    model = pretrain(config, args.out, progress=lambda s, n, loss: print(f"step {s}/{n} loss {loss:.4f}", flush=True))
    report["pretrain_seconds"] = round(time.perf_counter() - t0, 1)
    catalog = default_catalog()
    holdout = sorted(holdout_combinations(catalog, config.holdout_fraction, config.seed))
    rng = np.random.default_rng(1)
    held_in = [
        (c.name, s.name)
        for c in catalog.known_contents
        for s in catalog.known_styles
        if (c.name, s.name) not in set(holdout)
    ]
    rows = {"held-in": [held_in[i] for i in rng.choice(len(held_in), 8, replace=False)], "held-out": holdout[:8]}
    for name, pairs in rows.items():
        prompts = [
            caption(Scene(c, s, position="center", size="large", background="white"), template=0) for c, s in pairs
        ]
        images = model.sample_arrays(SampleRequest(prompts, [0, 1, 2, 3], steps=25, guidance_scale=4.0))
        grid(images, 4).save(args.out / f"samples-{name}.png")
        report[f"prompts-{name}"] = prompts
    (args.out / "probe.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
