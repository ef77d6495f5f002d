"""What 8-bit base weights save and cost when training B4M on FLUX.1-dev (issue 17): peak GPU memory and step time of
PLP training steps on a FLUX.1-dev-sized transformer with its linear weights in bf16, int8 or float8
(``base_weights``, :mod:`b4m.models.quantize`).

FLUX.1-dev's transformer config (19 double and 38 single blocks, 3072 wide, 24 heads of 128) with random bf16 weights,
built on the meta device and materialised on the GPU (no CPU copy); quantized there with b4m's own
``quantize_weights``; the default PLP adapter (FLUX.1's targets, rank 64, float32) attached; autocast bf16, AdamW on
the learned halves, gradient checkpointing (diffusers' per block) unless ``--checkpointing off``. One image a step at
1024 px: latent 128×128 packed 2×2 into 4096 tokens, 512 T5 tokens. Median step time of ``--steps`` timed steps after
``--warmup`` ones, each synchronised; peak memory over the timed steps (``torch.cuda.max_memory_allocated``), and the
memory held before the first step (weights, adapter).

    python bench/flux_memory.py                          # bf16, int8 and float8, JSON to $OUT/flux_memory.json
    python bench/flux_memory.py --base-weights bf16 int8 --checkpointing both
    python bench/flux_memory.py --tiny                   # a tiny transformer on the CPU (the test's)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from b4m.adapter.config import PLPConfig
from b4m.adapter.walker import add_plp, plp_layers
from b4m.device import avoid_cudnn_attention
from b4m.environment import record
from b4m.models.quantize import linear_weight_bytes, quantize_weights

#: FLUX.1-dev's transformer/config.json.
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
#: A transformer of the same layout small enough for the CPU (--tiny).
TINY = dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2)
TINY.update(joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(2, 2, 4))

GIB = 2**30
BASE_WEIGHTS = ["bf16", "int8", "float8"]


@torch.no_grad()
def build(config: dict, device: torch.device) -> FluxTransformer2DModel:
    """The transformer on ``device`` in bf16 with random weights: built on the meta device, then materialised."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config).to(torch.bfloat16)
    model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    for name, p in model.named_parameters():
        if p.ndim >= 2:  # linear and embedding weights: N(0, 1/fan_in)
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
        elif name.endswith("bias"):
            p.zero_()
        else:  # norm scales
            p.fill_(1.0)
    for b in model.buffers():
        b.zero_()
    return model


def inputs(config: dict, resolution: int, text_tokens: int, device: torch.device) -> dict:
    """One image's transformer call as FluxPipeline makes it: packed latents, T5 and CLIP embeddings, ids."""
    side = resolution // 16  # VAE ×8, packed 2×2
    g = torch.Generator(device).manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)

    img_ids = torch.zeros(side, side, 3, device=device)
    img_ids[..., 1] = torch.arange(side, device=device)[:, None]
    img_ids[..., 2] = torch.arange(side, device=device)[None, :]
    return dict(
        hidden_states=rand(1, side * side, config["in_channels"]),
        encoder_hidden_states=rand(1, text_tokens, config["joint_attention_dim"]),
        pooled_projections=rand(1, config["pooled_projection_dim"]),
        timestep=torch.tensor([0.5], device=device),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_tokens, 3, device=device),
        guidance=torch.tensor([3.5], device=device),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, base_weights: str, checkpointing: bool, device: torch.device) -> dict:
    """One row: build, quantize (unless bf16), attach PLP, train; peak memory and step times."""
    config = TINY if args.tiny else FLUX_DEV
    model = build(config, device)
    n_quantized = 0 if base_weights == "bf16" else quantize_weights(model, base_weights)
    linear_bytes = linear_weight_bytes(model)
    model.requires_grad_(False)
    add_plp(model, PLPConfig(rank=args.rank, base_model="bench"))
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    learned = [p for layer in plp_layers(model).values() for p in (layer.up_learned, layer.down_learned)]
    trainable = sum(p.numel() for p in learned)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(learned, lr=1e-4)
    batch = inputs(config, args.resolution, args.text_tokens, device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    else:
        held = 0
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(**batch, return_dict=False)[0]
        loss = out.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    row = {
        "base_weights": base_weights,
        "gradient_checkpointing": checkpointing,
        "linears_quantized": n_quantized,
        "linear_weight_bytes": linear_bytes,
        "linear_weight_gib": round(linear_bytes / GIB, 3),
        "held_before_training_gib": round(held / GIB, 3),
        "peak_training_gib": round(peak / GIB, 3),
        "step_s_median": round(statistics.median(times), 4),
        "step_s": [round(t, 4) for t in times],
        "losses": losses,
        "trainable_params": trainable,
    }
    del model, opt, batch, out, loss, learned
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-weights", nargs="+", default=BASE_WEIGHTS, choices=BASE_WEIGHTS)
    parser.add_argument("--checkpointing", choices=["on", "off", "both"], default="on")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a tiny transformer at 32 px on the CPU, 1 step")
    parser.add_argument("--json", type=Path, default=None, help="default: $OUT/flux_memory.json where $OUT is set")
    args = parser.parse_args(argv)
    if args.tiny:
        args.resolution, args.text_tokens, args.rank, args.steps, args.warmup = 32, 8, 4, 1, 0
    if args.json is None and os.environ.get("OUT"):
        args.json = Path(os.environ["OUT"]) / "flux_memory.json"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("no CUDA GPU: the FLUX.1-dev-sized run needs one (--tiny runs on the CPU)")
    avoid_cudnn_attention(device)  # as b4m trains FLUX (its FluxModel.to): cuDNN's attention backward fails there
    ckpts = {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]
    rows = []
    for ckpt in ckpts:
        for bw in args.base_weights:
            try:
                rows.append(measure(args, bw, ckpt, device))
            except torch.OutOfMemoryError as e:  # a row that does not fit is a result too
                rows.append({"base_weights": bw, "gradient_checkpointing": ckpt, "error": str(e).splitlines()[0]})
                gc.collect()
                torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
    try:
        import torchao

        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = None
    result = {
        **record(device),  # device, date, commit (B4M_COMMIT on the GPU machine), command, versions
        "torch": torch.__version__,
        "torchao": torchao_version,
        "transformer": "tiny" if args.tiny else "FLUX.1-dev",
        "resolution": args.resolution,
        "text_tokens": args.text_tokens,
        "rank": args.rank,
        "rows": rows,
    }
    print(f"{'base':<7} {'ckpt':<5} {'linears GiB':>11} {'held GiB':>9} {'peak GiB':>9} {'step s':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['base_weights']:<7} {r['gradient_checkpointing']!s:<5} {r['error']}")
            continue
        print(
            f"{r['base_weights']:<7} {r['gradient_checkpointing']!s:<5} {r['linear_weight_gib']:>11.2f} "
            f"{r['held_before_training_gib']:>9.2f} {r['peak_training_gib']:>9.2f} {r['step_s_median']:>8.3f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
