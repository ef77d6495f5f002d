"""Why does composing B4M's halves lose the content? Block-level ablations of the demo's adapters, on a CPU.

Trains the demo's content run and style run once (cached under ``--cache``), then scores conditions on the demo's 16
images (4 prompts × 4 seeds, oracle ``a``). A condition is a per-module ΔW built from the four blocks of the PLP
product::

    ΔW = [[a_c·A·C, a_d·A·D],
          [b_c·B·C, b_d·B·D]]

written as rank-2r plain-LoRA factors ``up = [[A, 0], [0, B]]``, ``down = [[a_c·C, a_d·D], [b_c·C, b_d·D]]`` and merged
with :func:`b4m.lora_files.applied`, so any block can be scaled or dropped per layer kind.

    OMP_NUM_THREADS=1 nice .venv/bin/python bench/composition_probe.py --pair teapot:sunburst --conds content fused
    OMP_NUM_THREADS=1 nice .venv/bin/python bench/composition_probe.py --norms
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from b4m.adapter.file import AdapterFile, fuse, load_adapter, save_adapter
from b4m.loading import load_model
from b4m.lora_files import applied
from b4m.method import break_run
from b4m.models.base import SampleRequest
from b4m.training.runs import train_adapter
from b4m.training.sets import TrainSet, encode_sets
from b4m.world.catalog import default_catalog
from b4m.world.demo import DemoConfig
from b4m.world.oracle import predict
from b4m.world.tasks import TaskConfig, make_task, score_images
from b4m.world.weights import load_shipped_oracle

KINDS = ("attn1", "attn2.kv", "attn2.qo")
BLOCKS = ("AC", "AD", "BC", "BD")


def kind_of(name: str) -> str:
    if ".attn1." in name:
        return "attn1"
    if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
        return "attn2.kv"
    return "attn2.qo"


# --------------------------------------------------------------------------------------------------------------------
# Setup


@dataclasses.dataclass
class Ctx:
    model: object
    oracle: object
    task: object
    cfg: DemoConfig
    content_sets: list
    style_sets: list
    dir: Path
    scores: dict

    def save_scores(self) -> None:
        (self.dir / "scores.json").write_text(json.dumps(self.scores, indent=1))


def setup(pair: str, cache: Path) -> Ctx:
    content, style = pair.split(":")
    cfg = DemoConfig(content=content, style=style)
    model = load_model("world", device="cpu")
    oracle = load_shipped_oracle("a", device="cpu")
    task = make_task(
        default_catalog(), content, style, model.resolution, TaskConfig(prompts=cfg.prompts, seed=cfg.seed)
    )
    with torch.no_grad():
        cs = encode_sets(model, task.content_refs, task.content_aux)
        ss = encode_sets(model, task.style_refs, task.style_aux)
    d = cache / f"{content}-{style}"
    d.mkdir(parents=True, exist_ok=True)
    f = d / "scores.json"
    scores = json.loads(f.read_text()) if f.exists() else {}
    return Ctx(model, oracle, task, cfg, cs, ss, d, scores)


def stage1(ctx: Ctx, role: str, steps: int | None = None) -> AdapterFile:
    path = ctx.dir / f"{role}{steps or ''}.b4m.safetensors"
    if path.exists():
        return load_adapter(path)
    t0 = time.perf_counter()
    sets = ctx.content_sets if role == "content" else ctx.style_sets
    cfg = dataclasses.replace(ctx.cfg, steps=steps or ctx.cfg.steps).b4m_config()
    run = break_run(role, sets, ctx.model, cfg.adapter, cfg.train, ctx.dir / "runs" / f"b4m-{role}")
    save_adapter(run.adapter, path)
    print(f"[{role} run: {time.perf_counter() - t0:.0f} s]", flush=True)
    return load_adapter(path)


def make_run(ctx: Ctx, name: str, start: AdapterFile, content_w=1.0, style_w=1.0, steps=None, **train_over):
    """Make from ``start`` on the two main sets with the given weights (cached as ``name``)."""
    path = ctx.dir / f"make-{name}.b4m.safetensors"
    if path.exists():
        return load_adapter(path)
    t0 = time.perf_counter()
    cfg = ctx.cfg.b4m_config()
    mk = dataclasses.replace(cfg.make, steps=steps if steps is not None else ctx.cfg.make_steps, **train_over)
    # clean routing in make: content rows (main) train the content half, style rows (as aux) the style half
    main = mk.routing != "clean"
    sets = [TrainSet(f"content:{s.name}", s.latents, s.cond, content_w, True) for s in ctx.content_sets if s.main]
    sets += [TrainSet(f"style:{s.name}", s.latents, s.cond, style_w, main) for s in ctx.style_sets if s.main]
    # make's loop settings (MakeConfig less style_weight: the weights here are content_w and style_w)
    run = train_adapter(ctx.model, sets, mk.loop_config(), ctx.dir / "runs" / f"make-{name}", "fused", start=start)
    save_adapter(run.adapter, path)
    print(f"[make {name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    return load_adapter(path)


# --------------------------------------------------------------------------------------------------------------------
# Block factors


def block_factors(adapter: AdapterFile, coef=None, *, b_from: AdapterFile | None = None, d_from=None) -> dict:
    """Rank-2r factors of ``Σ coef[block] · block`` per module. ``coef(name) -> {AC, AD, BC, BD}`` (default all 1);
    ``b_from`` / ``d_from`` take B / D from another adapter (same frozen parts)."""
    out = {}
    for name in adapter.modules:
        t = adapter.tensors[name]
        a, c = t["up_frozen"], t["down_frozen"]
        b = (b_from or adapter).tensors[name]["up_learned"]
        d = (d_from or adapter).tensors[name]["down_learned"]
        k = {"AC": 1.0, "AD": 1.0, "BC": 1.0, "BD": 1.0, **(coef(name) if coef else {})}
        r = a.shape[1]
        up = torch.zeros(a.shape[0] + b.shape[0], 2 * r)
        up[: a.shape[0], :r] = a
        up[a.shape[0] :, r:] = b
        down = torch.cat(
            [
                torch.cat([k["AC"] * c, k["AD"] * d], dim=1),
                torch.cat([k["BC"] * c, k["BD"] * d], dim=1),
            ],
            dim=0,
        )
        out[name] = (up.float(), down.float())
    return out


def block_norms(adapter: AdapterFile) -> dict:
    """Frobenius norms of the four blocks, root-sum-squared over the layers of each kind; and of the base weights."""
    acc = {k: dict.fromkeys(BLOCKS, 0.0) for k in KINDS}
    for name in adapter.modules:
        t = adapter.tensors[name]
        a, b, c, d = t["up_frozen"], t["up_learned"], t["down_frozen"], t["down_learned"]
        for blk, (u, v) in {"AC": (a, c), "AD": (a, d), "BC": (b, c), "BD": (b, d)}.items():
            acc[kind_of(name)][blk] += float((u @ v).pow(2).sum())
    return {k: {blk: v**0.5 for blk, v in d.items()} for k, d in acc.items()}


# --------------------------------------------------------------------------------------------------------------------
# Scoring


def score(ctx: Ctx, label: str, factors: dict | None, force=False) -> dict:
    if label in ctx.scores and not force:
        s = ctx.scores[label]
        print(f"{label:<44} content {s['content']:.2f} style {s['style']:.2f} prompt {s['prompt']:.2f} (cached)")
        return s
    t0 = time.perf_counter()
    cfg = ctx.cfg
    prompts = ctx.task.prompts
    if label.endswith("[plain prompts]"):  # the content run's own caption context: "sks in plain style"
        prompts = [q.replace(f"{ctx.task.config.style_word} style", "plain style") for q in prompts]
    req = SampleRequest(prompts, list(cfg.seeds), steps=cfg.sample_steps, guidance_scale=ctx.model.default_guidance)
    if factors is None:
        imgs = ctx.model.sample_arrays(req)
    else:
        with applied(ctx.model.denoiser, factors):
            imgs = ctx.model.sample_arrays(req)
    scenes = [s for s in ctx.task.scenes for _ in cfg.seeds]
    per = score_images(ctx.oracle, imgs, scenes, ctx.task)
    s = {k: float(np.mean(v)) for k, v in per.items()}
    s["per_image_content"] = per["content"]
    names = predict(ctx.oracle, imgs)
    s["pred_content"] = dict(Counter(names["content"]).most_common(4))
    s["pred_style"] = dict(Counter(names["style"]).most_common(4))
    np.save(ctx.dir / f"img-{label.replace(' ', '_').replace('/', '_')}.npy", imgs)
    ctx.scores[label] = s
    ctx.save_scores()
    print(
        f"{label:<44} content {s['content']:.2f} style {s['style']:.2f} prompt {s['prompt']:.2f} "
        f"c_leak {s['content_leak']:.2f} s_leak {s['style_leak']:.2f} ({time.perf_counter() - t0:.0f} s) "
        f"{s['pred_content']} {s['pred_style']}",
        flush=True,
    )
    return s


def only(kinds, blocks, value=0.0):
    """coef: ``value`` for ``blocks`` in layers of ``kinds``, 1 elsewhere."""
    return lambda name: {b: value for b in blocks} if kind_of(name) in kinds else {}


def conditions(ctx: Ctx) -> dict:
    """name -> thunk returning factors (trains lazily)."""
    C = lambda: stage1(ctx, "content")  # noqa: E731
    S = lambda: stage1(ctx, "style")  # noqa: E731
    F = lambda: fuse(C(), S())  # noqa: E731
    conds = {
        "base": lambda: None,
        # (a), (b), (f)
        "content": lambda: block_factors(C()),
        "content150": lambda: block_factors(stage1(ctx, "content", 150)),
        "content -D (AC+BC)": lambda: block_factors(C(), lambda n: {"AD": 0, "BD": 0}),
        "content -BD": lambda: block_factors(C(), lambda n: {"BD": 0}),
        "content -AD": lambda: block_factors(C(), lambda n: {"AD": 0}),
        "content -BC": lambda: block_factors(C(), lambda n: {"BC": 0}),
        "content -BC in attn2.kv": lambda: block_factors(C(), only({"attn2.kv"}, ["BC"])),
        "content -BC in attn1": lambda: block_factors(C(), only({"attn1"}, ["BC"])),
        "content -BC in attn2.qo": lambda: block_factors(C(), only({"attn2.qo"}, ["BC"])),
        "content BC only in attn2.kv": lambda: block_factors(
            C(), lambda n: {"AD": 0, "BD": 0} if kind_of(n) == "attn2.kv" else {"AD": 0, "BD": 0, "BC": 0}
        ),
        "AC only": lambda: block_factors(C(), lambda n: {"AD": 0, "BC": 0, "BD": 0}),
        "style": lambda: block_factors(S()),
        "style -B (AC+AD)": lambda: block_factors(S(), lambda n: {"BC": 0, "BD": 0}),
        # (c), (d), (e)
        "fused": lambda: block_factors(F()),
        "fused -BD": lambda: block_factors(F(), lambda n: {"BD": 0}),
        "fused style x0.5": lambda: block_factors(F(), lambda n: {"AD": 0.5, "BD": 0.5}),
        "fused -AD": lambda: block_factors(F(), lambda n: {"AD": 0}),
        "fused -AD in attn2.kv": lambda: block_factors(F(), only({"attn2.kv"}, ["AD"])),
        "fused -BD -AD in attn2.kv": lambda: block_factors(
            F(), lambda n: {"BD": 0, **({"AD": 0} if kind_of(n) == "attn2.kv" else {})}
        ),
        # make variants
        "make40": lambda: block_factors(make_run(ctx, "40", F())),
        "make40 -BD": lambda: block_factors(make_run(ctx, "40", F()), lambda n: {"BD": 0}),
        "make40 cw2": lambda: block_factors(make_run(ctx, "40-cw2", F(), content_w=2.0)),
        "make40 cw3": lambda: block_factors(make_run(ctx, "40-cw3", F(), content_w=3.0)),
        "make40 cw3 clean": lambda: block_factors(
            make_run(ctx, "40-cw3-clean", F(), content_w=3.0, routing="clean", owned="up")
        ),
        "make40 clean": lambda: block_factors(make_run(ctx, "40-clean", F(), routing="clean", owned="up")),
    }

    def fused_plus_content_bd():
        c, f = C(), F()
        base = block_factors(f, lambda n: {"BD": 0})
        extra = block_factors(c, lambda n: {"AC": 0, "AD": 0, "BC": 0})
        return {n: (torch.cat([base[n][0], extra[n][0]], 1), torch.cat([base[n][1], extra[n][1]], 0)) for n in base}

    conds["fused + content's BD"] = fused_plus_content_bd
    return conds


def print_norms(ctx: Ctx) -> None:
    c, s = stage1(ctx, "content"), stage1(ctx, "style")
    f = fuse(c, s)
    base = {k: 0.0 for k in KINDS}
    for name in c.modules:
        w = ctx.model.denoiser.get_submodule(name).weight
        base[kind_of(name)] += float(w.float().pow(2).sum())
    print(
        "Frobenius norms (root-sum-square over layers of a kind); base |W| per kind:",
        {k: round(v**0.5, 2) for k, v in base.items()},
    )
    for label, ad in (("content run", c), ("style run", s), ("fused", f)):
        n = block_norms(ad)
        print(f"  {label}")
        for k in KINDS:
            print(f"    {k:<9} " + "  ".join(f"{blk} {n[k][blk]:7.3f}" for blk in BLOCKS))
    for label, ad in (("content", c), ("style", s)):
        b = sum(float(ad.tensors[n]["up_learned"].pow(2).sum()) for n in ad.modules) ** 0.5
        d = sum(float(ad.tensors[n]["down_learned"].pow(2).sum()) for n in ad.modules) ** 0.5
        print(f"  {label} run: |B| {b:.3f} |D| {d:.3f}")


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--pair", default="teapot:sunburst")
    p.add_argument("--cache", type=Path, default=Path("/tmp/probe/comp"))
    p.add_argument("--conds", nargs="*", default=[])
    p.add_argument("--norms", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    ctx = setup(args.pair, args.cache)
    conds = conditions(ctx)
    if args.list:
        print("\n".join(conds))
        for k, s in ctx.scores.items():
            print(
                f"{k:<44} content {s['content']:.2f} style {s['style']:.2f} prompt {s['prompt']:.2f} "
                f"c_leak {s['content_leak']:.2f} s_leak {s['style_leak']:.2f}"
            )
        return
    if args.norms:
        print_norms(ctx)
    for c in args.conds:
        key = c.removesuffix(" [plain prompts]")
        score(ctx, c, conds[key](), force=args.force)


if __name__ == "__main__":
    main()
