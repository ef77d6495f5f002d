"""Does B4M's content run (PLP, stage 1) learn the content more slowly than a plain LoRA, and which part of PLP is why?

Trains content runs at the bench's settings (150 steps, lr 2e-3, rank 16, batch 2 per set, seed 0; data of
:func:`b4m.world.tasks.make_task` as :func:`b4m.world.bench.units.pair_data` builds it) and scores each run *alone*
on the demo's 16 images (4 prompts × 4 seeds) in the run's own caption context (the style word replaced by
``plain``, so the prompt reads "a large sks in plain style ..."), with oracle ``a``. Conditions (one change each
from ``b4m``):

- ``lora``: the plain LoRA of direct merge / ZipLoRA (:func:`b4m.baselines.common.plain_lora`, gaussian D init,
  routing none, main set only);
- ``b4m``: the bench's B4M content run (ratio 0.5, approx frozen init, zero learned init, clean routing, 3 aux sets);
- ``r1/8``: ratio 1/8; ``r0``: ratio 0 with kaiming D (the bench's ``b4m-d0``; clean routing still sends the main
  sets to B only and the aux sets to D only);
- ``lr4x``: the owned half (B) at 4× lr, the other half at lr (the optimizer's param groups patched here);
- ``noaux``: no auxiliary sets, routing none (the whole main loss to both halves, the bench's ``b4m-no-aux``);
- ``dkaiming``: D starts kaiming-uniform instead of zero (ratio 0.5).
- ``lora-main`` / extra combinations are listed by ``--list``.

Besides the train loss of the run's last 10 steps (for B4M runs it includes the aux sets), it reports a
*main-set loss*: the diffusion loss on the content references at fixed noise and 16 timesteps per image (same draws
for every condition), with the adapter merged: the comparable measure of how well each run fits the content.

Adapters, images and scores are cached under ``--cache`` (default ``/tmp/probe/content``). CPU only::

    OMP_NUM_THREADS=1 nice .venv/bin/python bench/content_probe.py --pair teapot:sunburst --conds lora b4m r1/8
    OMP_NUM_THREADS=1 nice .venv/bin/python bench/content_probe.py --table
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import composition_probe as cp

import b4m.training.loop as train_mod
from b4m.adapter.config import PLPConfig
from b4m.adapter.file import load_adapter, save_adapter
from b4m.baselines.common import lora_train_config, main_sets, plain_lora
from b4m.lora_files import applied
from b4m.models.base import SampleRequest
from b4m.training.config import TrainConfig
from b4m.training.runs import train_adapter
from b4m.world.oracle import predict

BIG = 10**9
SWAP = "apple"  # a known content word put in place of the placeholder for the binding check
STEPS, LR, RANK, BATCH, SEED = 150, 2e-3, 16, 2, 0


def b4m_train(**over) -> TrainConfig:
    base = dict(steps=STEPS, lr=LR, batch_size=BATCH, grad_accum=1, checkpoint_every=BIG, seed=SEED, owned="up")
    return TrainConfig(**{**base, **over})


def b4m_plp(**over) -> PLPConfig:
    return PLPConfig(**{"rank": RANK, "seed": SEED, **over})


#: name -> (plp config, train config, which sets: "all" = main + aux, "main" = main only, owned-half lr factor)
CONDITIONS = {
    "lora": (
        lambda: plain_lora(RANK, seed=SEED),
        lambda: lora_train_config(steps=STEPS, lr=LR, batch_size=BATCH, grad_accum=1, checkpoint_every=BIG, seed=SEED),
        "main",
        1.0,
    ),
    "b4m": (b4m_plp, b4m_train, "all", 1.0),
    "r1/8": (lambda: b4m_plp(ratio=1 / 8), b4m_train, "all", 1.0),
    "r0": (lambda: b4m_plp(ratio=0.0, learned_init="kaiming"), b4m_train, "all", 1.0),
    "lr4x": (b4m_plp, b4m_train, "all", 4.0),
    "noaux": (b4m_plp, lambda: b4m_train(routing="none", owned=None), "main", 1.0),
    # Rank 64 (the bench's default since 2026-11-24), against the plain LoRA at the same rank; more steps; rank 128.
    "lora-r64": (
        lambda: plain_lora(64, seed=SEED),
        lambda: lora_train_config(steps=STEPS, lr=LR, batch_size=BATCH, grad_accum=1, checkpoint_every=BIG, seed=SEED),
        "main",
        1.0,
    ),
    "b4m-r64": (lambda: b4m_plp(rank=64), b4m_train, "all", 1.0),
    "b4m-r64-s300": (lambda: b4m_plp(rank=64), lambda: b4m_train(steps=2 * STEPS), "all", 1.0),
    "b4m-r128": (lambda: b4m_plp(rank=128), b4m_train, "all", 1.0),
    "dkaiming": (lambda: b4m_plp(learned_init="kaiming"), b4m_train, "all", 1.0),
    # follow-ups
    "lr4x-r1/8": (lambda: b4m_plp(ratio=1 / 8), b4m_train, "all", 4.0),
    "lr8x": (b4m_plp, b4m_train, "all", 8.0),
    "b4m-300": (b4m_plp, lambda: b4m_train(steps=2 * STEPS), "all", 1.0),
    "lora-kaiming": (
        lambda: plain_lora(RANK, seed=SEED, learned_init="kaiming"),
        lambda: lora_train_config(steps=STEPS, lr=LR, batch_size=BATCH, grad_accum=1, checkpoint_every=BIG, seed=SEED),
        "main",
        1.0,
    ),
}


def _patched_groups(factor: float):
    """``b4m.training.loop._param_groups`` with the first group (the owned half under clean routing) at ``factor``×
    lr (read by :func:`b4m.training.loop.make_optimizer` at each call, so patching the module attribute works)."""
    original = train_mod._param_groups

    def groups(model, config, objective=None):
        out = original(model, config, objective)
        out[0] = {**out[0], "lr": out[0]["lr"] * factor}
        return out

    return original, groups


def train_condition(ctx, name: str) -> tuple:
    """The condition's adapter (cached) and its record (final train loss, loss curve, seconds)."""
    safe = name.replace("/", "_")
    path = ctx.dir / f"{safe}.b4m.safetensors"
    rec_path = ctx.dir / f"{safe}.train.json"
    if path.exists() and rec_path.exists():
        return load_adapter(path), json.loads(rec_path.read_text())
    plp_fn, train_fn, which, factor = CONDITIONS[name]
    sets = main_sets(ctx.content_sets) if which == "main" else list(ctx.content_sets)
    t0 = time.perf_counter()
    original = train_mod._param_groups
    if factor != 1.0:
        _, train_mod._param_groups = _patched_groups(factor)
    try:
        run = train_adapter(ctx.model, sets, train_fn(), ctx.dir / "runs" / safe, "content", plp=plp_fn())
    finally:
        train_mod._param_groups = original
    save_adapter(run.adapter, path)
    rec = {
        "final_loss": run.result.final_loss,
        "losses": run.result.losses,
        "seconds": round(time.perf_counter() - t0, 1),
        "sets": [(s.name, s.weight, s.main) for s in sets],
    }
    rec_path.write_text(json.dumps(rec))
    print(f"[{name}: trained in {rec['seconds']:.0f} s, final train loss {rec['final_loss']:.4f}]", flush=True)
    return load_adapter(path), rec


@torch.no_grad()
def main_loss(ctx, factors, per_image: int = 16, swap: str | None = None) -> float:
    """Diffusion loss on the main (reference) set at fixed noise and timesteps, adapter merged. With ``swap``, the
    captions say ``swap`` instead of the placeholder ``sks`` (how much of the fit is bound to the word)."""
    s = next(x for x in ctx.content_sets if x.main)
    g = torch.Generator().manual_seed(1234)
    n = len(s.latents)
    idx = torch.arange(n).repeat_interleave(per_image)
    lat = s.latents[idx]
    if swap is None:
        cond = s.cond[idx]
    else:
        caps = [c.replace(ctx.task.config.content_word, swap) for c in ctx.task.content_refs.captions]
        cond = ctx.model.encode_prompts(caps).to("cpu")[idx]
    noise = torch.randn(lat.shape, generator=g)
    t = torch.linspace(0, ctx.model.num_train_timesteps - 1, per_image).long().repeat(n)
    model = ctx.model
    model.denoiser.eval()
    noisy = model.add_noise(lat, noise, t)
    target = model.target(lat, noise, t)

    def run():
        tot = 0.0
        for i in range(0, len(lat), 16):
            pred = model.predict(noisy[i : i + 16], t[i : i + 16], cond[i : i + 16])
            tot += float(((pred.float() - target[i : i + 16].float()) ** 2).mean(dim=(1, 2, 3)).sum())
        return tot / len(lat)

    if factors is None:
        return run()
    with applied(model.denoiser, factors):
        return run()


@torch.no_grad()
def loss_by_t(ctx, factors, buckets: int = 4, per_image: int = 32) -> list[float]:
    """Main-set loss in ``buckets`` timestep ranges (low noise first), fixed noise."""
    s = next(x for x in ctx.content_sets if x.main)
    g = torch.Generator().manual_seed(4321)
    n = len(s.latents)
    idx = torch.arange(n).repeat_interleave(per_image)
    lat, cond = s.latents[idx], s.cond[idx]
    noise = torch.randn(lat.shape, generator=g)
    t = torch.linspace(0, ctx.model.num_train_timesteps - 1, per_image).long().repeat(n)
    model = ctx.model
    noisy, target = model.add_noise(lat, noise, t), model.target(lat, noise, t)
    with applied(model.denoiser, factors) if factors is not None else contextlib.nullcontext():
        per = torch.cat(
            [
                (
                    (model.predict(noisy[i : i + 16], t[i : i + 16], cond[i : i + 16]).float() - target[i : i + 16])
                    ** 2
                ).mean(dim=(1, 2, 3))
                for i in range(0, len(lat), 16)
            ]
        )
    edges = torch.linspace(0, ctx.model.num_train_timesteps, buckets + 1)
    return [round(float(per[(t >= lo) & (t < hi)].mean()), 4) for lo, hi in itertools.pairwise(edges)]


@torch.no_grad()
def ref_prompt_content(ctx, factors, seeds=(0, 1)) -> float:
    """Content accuracy when prompted with the references' own captions (the training prompts)."""
    caps = list(ctx.task.content_refs.captions)
    req = SampleRequest(caps, list(seeds), steps=ctx.cfg.sample_steps, guidance_scale=ctx.model.default_guidance)
    with applied(ctx.model.denoiser, factors) if factors is not None else contextlib.nullcontext():
        imgs = ctx.model.sample_arrays(req)
    names = predict(ctx.oracle, imgs)["content"]
    return float(np.mean([n == ctx.task.content for n in names]))


def diag(ctx, names, refs: bool) -> None:
    f = ctx.dir / "diag.json"
    out = json.loads(f.read_text()) if f.exists() else {}
    for name in names:
        factors = None if name == "base" else train_condition(ctx, name)[0].factors()
        d = out.get(name, {})
        d["loss_by_t"] = loss_by_t(ctx, factors)
        if refs and "ref_prompt_content" not in d:
            d["ref_prompt_content"] = ref_prompt_content(ctx, factors)
        out[name] = d
        f.write_text(json.dumps(out, indent=1))
        print(f"  {name}: {d}", flush=True)


def block_norms(adapter) -> dict:
    """Root-sum-square over layers of |B·C|, |B·D|, |A·D| (|up·down| for ratio 0)."""
    acc = {"BC": 0.0, "BD": 0.0, "AD": 0.0, "B": 0.0, "D": 0.0}
    for name in adapter.modules:
        t = adapter.tensors[name]
        a, b, c, d = t["up_frozen"], t["up_learned"], t["down_frozen"], t["down_learned"]
        if c.shape[1]:
            acc["BC"] += float((b @ c).pow(2).sum())
        if a.shape[0]:
            acc["AD"] += float((a @ d).pow(2).sum())
        acc["BD"] += float((b @ d).pow(2).sum())
        acc["B"] += float(b.pow(2).sum())
        acc["D"] += float(d.pow(2).sum())
    return {k: round(v**0.5, 3) for k, v in acc.items()}


def evaluate(ctx, name: str, force: bool = False) -> dict:
    adapter, rec = train_condition(ctx, name)
    factors = adapter.factors()
    label = f"{name} [plain prompts]"
    s = cp.score(ctx, label, factors, force=force)
    if "main_loss" not in s or force:
        s["main_loss"] = main_loss(ctx, factors)
        s["final_loss"] = rec["final_loss"]
        s["norms"] = block_norms(adapter)
    if "swap_loss" not in s or force:
        s["swap_loss"] = main_loss(ctx, factors, swap=SWAP)
        ctx.scores[label] = s
        ctx.save_scores()
    print(
        f"  {name}: content {s['content']:.2f} main-set loss {s['main_loss']:.4f} final train loss "
        f"{s['final_loss']:.4f} main-set loss with '{SWAP}' for sks {s['swap_loss']:.4f} norms {s['norms']}",
        flush=True,
    )
    return s


def table(cache: Path) -> None:
    rows = {}
    for f in sorted(cache.rglob("scores.json")):  # several processes of one pair use sub-caches (cache/b/...)
        for label, s in json.loads(f.read_text()).items():
            rows.setdefault(label.removesuffix(" [plain prompts]"), {})[f.parent.name.split("-")[0]] = s
    contents = sorted({c for r in rows.values() for c in r})
    nan = float("nan")
    head = "".join(f"{c + ' content':>16}{'main loss':>11}{'swap loss':>11}{'train loss':>11}" for c in contents)
    print(f"{'condition':<14}" + head)
    for name, r in rows.items():
        line = f"{name:<14}"
        for c in contents:
            s = r.get(c)
            line += (
                f"{s['content']:>16.2f}{s.get('main_loss', nan):>11.4f}{s.get('swap_loss', nan):>11.4f}"
                f"{s.get('final_loss', nan):>11.4f}"
                if s
                else " " * 49
            )
        print(line)


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--pair", default="teapot:sunburst")
    p.add_argument("--cache", type=Path, default=Path("/tmp/probe/content"))
    p.add_argument("--conds", nargs="*", default=[])
    p.add_argument("--base", action="store_true", help="also the main-set loss of the base model")
    p.add_argument("--force", action="store_true")
    p.add_argument("--diag", nargs="*", default=None, help="loss by timestep (and --refs) of cached conditions")
    p.add_argument("--refs", action="store_true", help="with --diag: content accuracy on the training prompts")
    p.add_argument("--list", action="store_true")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    if args.list:
        print("\n".join(CONDITIONS))
        return
    if args.table:
        table(args.cache)
        return
    ctx = cp.setup(args.pair, args.cache)
    ctx.cfg = dataclasses.replace(ctx.cfg, steps=STEPS, lr=LR, rank=RANK, batch_size=BATCH)
    if args.base:
        print(
            f"base model main-set loss {main_loss(ctx, None):.4f}, with '{SWAP}' for sks "
            f"{main_loss(ctx, None, swap=SWAP):.4f}",
            flush=True,
        )
    for c in args.conds:
        evaluate(ctx, c, force=args.force)
    if args.diag is not None:
        diag(ctx, args.diag, args.refs)


if __name__ == "__main__":
    main()
