"""Issue 17's GPU measurement: B4M's training step on FLUX.1-dev (or FLUX.2 [klein] 4B) against a plain diffusers +
peft LoRA step on the same transformer, side by side in one process, plus unmerged and merged generation.

A full-size transformer with random bf16 weights (values do not change cost), built on the meta device and
materialised on the GPU (``bench/flux_memory.py``'s ``build``); random conditioning of T5's ``(512, 4096)`` and CLIP's
pooled ``768`` shapes (klein: Qwen3's stacked ``(512, 7680)``) and random latents (FLUX.1 ``(16, H/8, W/8)``, klein
``(128, H/16, W/16)``): no text encoders, no VAE. A training step: one optimizer step over 16 images, 4 micro-steps of
one image from each of 4 sets (a content run's main set and 3 auxiliary ones). Rows:

- ``plain/<res>``: diffusers' ``train_dreambooth_lora_flux.py`` (klein: ``..._flux2_klein.py``) as run with
  ``--mixed_precision bf16 --rank 64 --train_batch_size 4 --gradient_accumulation_steps 4`` on cached latents and
  embeddings: peft LoRA (gaussian init) on b4m's targets, its parameters in bf16 (the script upcasts them only under
  fp16) under accelerate's bf16 autocast, the script's timesteps and sigma lookup, flow-matching loss on packed
  latents, guidance 3.5 (dev), clipping, AdamW, a loss ``.item()`` per micro-step. Out of memory, the same 16 images
  go as ``--train_batch_size 1 --gradient_accumulation_steps 16``, then as 4 × 4 with ``--gradient_checkpointing``
  (``plan`` says which ran). ``plain-fp32/512``: fp32 LoRA parameters, no autocast.
- ``b4m/fast/<res>``: ``b4m content --preset fast``'s step (:func:`b4m.training.loop.train_step`: clean routing, the
  16 images in one batch, a CUDA graph, fused AdamW); ``b4m/default/<res>``: ``b4m content``'s default
  (``speed = "auto"``: :func:`b4m.training.speed.speed_plans`, the next plan when the first step runs out of memory,
  as :func:`b4m.training.loop.train` does); ``b4m/graphs/<res>``: the fast preset unfolded (4 micro-steps of 4
  images, a CUDA graph each: the plain step's activation memory); ``b4m/eager/<res>``: that without CUDA graphs.
- ``gen/none``, ``gen/unmerged``, ``gen/merged``: one denoising step at 1024 px without gradients: no adapter, the PLP
  adapter unmerged (its no-grad path), merged into the weights (klein base: two calls, true CFG).

Each row: median ms per step of ``--repeats`` synchronised steps after ``--warmup``, their peak memory, the FLOPs of
one eager step (torch's flop counter), the fraction of the bf16 matrix rate measured in the same run, and
``speedup_vs_plain`` (plain ms ÷ this ms, same family and resolution) or ``ratio_to_none`` (gen). The JSON
(``$OUT/flux-speed.json``, OUT default ``runs``) is written after every row; ``--resume`` runs only the rows missing
from it; ``--budget-s`` starts no row after that many seconds.

    python bench/flux_speed.py --budget-s 420                # FLUX.1-dev, H200: ~6-7 min (estimated)
    python bench/flux_speed.py --family klein                # FLUX.2 [klein] 4B
    python bench/flux_speed.py --tiny --device cpu           # every row on a tiny transformer (the test's)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from diffusers import AutoencoderKL, Flux2KleinPipeline, Flux2Transformer2DModel, FluxPipeline, FluxTransformer2DModel
from diffusers import FlowMatchEulerDiscreteScheduler as Scheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from b4m.adapter.config import PLPConfig
from b4m.adapter.walker import add_plp, plp_layers, resolve_targets, set_submodule
from b4m.models.base import Conditioning
from b4m.models.diffusers_common import default_dtype
from b4m.models.flux import TRAIN_GUIDANCE, FluxModel
from b4m.models.flux2 import Flux2KleinModel
from b4m.runs.config import preset_settings
from b4m.training.config import TrainConfig, folded, resolve_precision
from b4m.training.loop import graphed_micro_step, make_optimizer, train_step
from b4m.training.sets import TrainSet
from b4m.training.speed import enable_gradient_checkpointing, speed_plans


def _sibling(name: str):
    """A module of this folder by path (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


speed = _sibling("speed")  # timing helpers: matmul_rate, count_flops, sync, reset_peak, peak_gib, git_commit, ...
flux_memory = _sibling("flux_memory")  # FLUX_DEV, TINY, build

#: FLUX.2 [klein] 4B's transformer (BFL's Klein4BParams: 5 double and 20 single blocks, 3072 wide, Qwen3-4B's
#: 3 × 2560 stacked text features, 128 patchified latent channels, no guidance embedding).
KLEIN_4B = dict(in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24)
KLEIN_4B.update(joint_attention_dim=7680, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False)
KLEIN_TINY = dict(KLEIN_4B, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2)
KLEIN_TINY.update(joint_attention_dim=32, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2))
#: FLUX.1-dev's scheduler config (klein's differs only in sampling shifts, which training does not use).
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
GRAD_ACCUM = speed.GRAD_ACCUM  # micro-steps per optimizer step (4)
N_SETS = 1 + speed.N_AUX  # main + 3 auxiliary sets: one image of each per micro-step
IMAGES = GRAD_ACCUM * N_SETS


#: Every row of a family, most important first: a 10-minute call that stops early keeps what matters.
ROWS = ["plain/512", "b4m/fast/512", "b4m/default/512", "b4m/eager/512", "plain/1024", "b4m/fast/1024", "gen/none"]
ROWS += ["gen/unmerged", "gen/merged", "b4m/default/1024", "b4m/graphs/512", "plain-fp32/512", "b4m/eager/1024"]
ROWS += ["b4m/graphs/1024"]


def reset_peak(device: torch.device) -> None:
    """bench/speed.py's, on a GPU only (on a CPU the peak is the process's; a full collection costs 0.5 s there)."""
    if device.type == "cuda":
        speed.reset_peak(device)


def no_text_model(cls: type[FluxModel], transformer, resolution: int) -> FluxModel:
    """b4m's FLUX (or klein) model without text encoders: conditioning comes as random tensors; training goes through
    its own ``add_noise``, ``target`` and ``predict``. Its toy VAE only gives the latent factor 8."""
    model = cls.__new__(cls)
    blocks = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    vae = AutoencoderKL(**blocks, block_out_channels=[8] * 4, norm_num_groups=4, latent_channels=16)
    model._hold(vae, transformer, Scheduler(**SCHEDULER), "random", resolution, TRAIN_GUIDANCE)
    return model


def oom_error(error: BaseException, phase: str) -> dict:
    """Where a plan ran out of memory: the row's phase, the error's first line (what it tried to allocate, what was
    free) and the innermost frames of its traceback."""
    frames = traceback.extract_tb(error.__traceback__)[-4:]
    return {
        "phase": phase,
        "message": (str(error).strip().splitlines() or [type(error).__name__])[0][:400],
        "where": [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames],
    }


class Bench:
    """One transformer per family; each row attaches what it needs (nothing, peft LoRA or PLP) and times."""

    def __init__(self, args: argparse.Namespace, family: str) -> None:
        self.args, self.family, self.device = args, family, torch.device(args.device)
        self.dtype = default_dtype(self.device)  # bf16 on a GPU, fp32 on a CPU: as the library loads models
        klein = family == "klein"
        configs = (KLEIN_TINY, KLEIN_4B) if klein else (flux_memory.TINY, flux_memory.FLUX_DEV)
        self.config = configs[0] if args.tiny else configs[1]
        cls = Flux2Transformer2DModel if klein else FluxTransformer2DModel
        t0 = time.perf_counter()
        with mock.patch.object(flux_memory, "FluxTransformer2DModel", cls):  # its build, for either class
            self.denoiser = flux_memory.build(self.config, self.device)
        self.denoiser.to(self.dtype).requires_grad_(False).eval()
        self.build_s = time.perf_counter() - t0
        self.model = no_text_model(Flux2KleinModel if klein else FluxModel, self.denoiser, args.high)
        self.precision = resolve_precision("auto", self.device)
        self.targets = resolve_targets(self.denoiser, PLPConfig()).targets
        self.phase = "set-up"  # where a row is: set-up, FLOP count, warm-up or timed (an out-of-memory error says)
        self.adapter, self.plp, self.lora_dtype = "none", None, None

    def use(self, kind: str, lora_dtype: torch.dtype | None = None) -> None:
        """Switch to ``none``, ``plp`` (built once, then swapped in and out) or ``peft`` (params in ``lora_dtype``)."""
        if kind == self.adapter and (kind != "peft" or lora_dtype == self.lora_dtype):
            return
        den = self.denoiser
        if self.adapter == "plp":
            for name, layer in self.plp.items():
                set_submodule(den, name, layer.base_layer)
        elif self.adapter == "peft":
            den.unload_lora()
        if kind == "plp" and self.plp is None:
            add_plp(den, PLPConfig(rank=self.args.rank, base_model="random"))
            self.plp = plp_layers(den)
            with torch.no_grad():  # both learned halves non-zero: a trained adapter
                g = torch.Generator(self.device).manual_seed(1)
                for layer in self.plp.values():
                    for p in (layer.up_learned, layer.down_learned):
                        p.copy_(torch.randn(p.shape, generator=g, device=self.device) * 0.01)
        elif kind == "plp":
            for name, layer in self.plp.items():
                set_submodule(den, name, layer)
        elif kind == "peft":
            from peft import LoraConfig

            r = self.args.rank
            den.add_adapter(LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian", target_modules=self.targets))
            for p in den.parameters():
                if p.requires_grad:
                    p.data = p.data.to(lora_dtype)
        self.adapter, self.lora_dtype = kind, lora_dtype

    def sets(self, res: int) -> list[TrainSet]:
        """4 sets of 4 random images, cached as a content run caches them (float32 latents, embeddings in bf16)."""
        klein, n, dev = self.family == "klein", 4, self.device
        g = torch.Generator(dev).manual_seed(res)
        shape = (n, 128, res // 16, res // 16) if klein else (n, 16, res // 8, res // 8)

        def rand(*s, dtype=self.dtype):
            return torch.randn(*s, generator=g, device=dev, dtype=dtype)

        out = []
        for i in range(N_SETS):
            extra = {} if klein else {"pooled": rand(n, self.config["pooled_projection_dim"])}
            cond = Conditioning(rand(n, self.args.text_tokens, self.config["joint_attention_dim"]), extra)
            main = i == 0
            out.append(TrainSet(f"set{i}", rand(*shape, dtype=torch.float32), cond, 1.0 if main else 1 / 3, main))
        return out

    def time_step(self, step: Callable[[], object], eager: Callable[[], object] | None = None) -> dict:
        """FLOPs of one eager call (``eager`` or ``step``), the warm-up, then ``--repeats`` timed calls."""
        dev, args = self.device, self.args
        self.phase = "FLOP count"
        flops = speed.count_flops(eager or step)
        self.phase = "warm-up"
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        speed.sync(dev)
        first = time.perf_counter() - t0
        reset_peak(dev)
        self.phase = "timed"
        ms = []
        for _ in range(args.repeats):
            speed.sync(dev)
            t0 = time.perf_counter()
            step()
            speed.sync(dev)
            ms.append((time.perf_counter() - t0) * 1e3)
        peak = {"peak_gib": speed.peak_gib(dev), "peak_reserved_gib": speed.peak_reserved_gib(dev)}
        return {"ms_all": ms, **peak, "flops": flops, "warmup_s": first}

    def attempt(self, plans: list[tuple[str, Callable[[], dict]]]) -> dict:
        """The first plan that fits in memory, with ``train()``'s fallback (a failed plan's gradients dropped, then a
        full collection and the CUDA cache emptied, in :func:`reset_peak`); the ones that ran out are listed, and the
        GPU memory allocated and reserved (GiB) when each plan started and, after a failed one, before the release:
        memory a failed plan left behind, and what the release gave back, show there."""
        oom, held, left, errors = [], [], [], []

        def gib() -> list[float]:
            return [torch.cuda.memory_allocated() / 2**30, torch.cuda.memory_reserved() / 2**30]

        for label, run in plans:
            if self.device.type == "cuda":
                held.append(gib())
            try:
                row = {
                    "plan": label,
                    "out_of_memory": oom,
                    "out_of_memory_errors": errors,
                    "held_gib_at_plans": held,
                    "held_gib_after_failed_plans": left,
                }
                self.phase = "set-up"
                return {**run(), **row}
            except Exception as e:  # CUDA graph capture wraps it in a B4MError
                if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
                    raise
                oom.append(label)
                errors.append(oom_error(e, self.phase))
            finally:
                for p in self.denoiser.parameters():
                    p.grad = None
            if self.device.type == "cuda":
                left.append(gib())
            reset_peak(self.device)
        return {
            "plan": None,
            "out_of_memory": oom,
            "out_of_memory_errors": errors,
            "error": "out of memory with every plan",
            "held_gib_at_plans": held,
            "held_gib_after_failed_plans": left,
        }

    def plain(self, res: int, fp32: bool) -> dict:
        """diffusers' DreamBooth LoRA script's loop (see the module docstring)."""
        self.use("peft", torch.float32 if fp32 or self.dtype == torch.float32 else self.dtype)
        from peft.tuners.lora import LoraLayer

        den, dev, dtype, klein = self.denoiser, self.device, self.dtype, self.family == "klein"
        sets = self.sets(res)
        sched = Scheduler(**SCHEDULER)  # the script's noise_scheduler_copy
        amp = self.precision != "no" and not fp32
        g = torch.Generator().manual_seed(0)

        def get_sigmas(timesteps, n_dim):  # the script's own lookup (one host sync per image)
            sigmas = sched.sigmas.to(device=dev, dtype=dtype)
            schedule = sched.timesteps.to(dev)
            idx = [(schedule == t).nonzero().item() for t in timesteps.to(dev)]
            return sigmas[idx].flatten().view(-1, *([1] * (n_dim - 1)))

        def micro(drawn: list[TrainSet], accumulation: int) -> torch.Tensor:  # one image of each drawn set
            pick = [int(torch.randint(0, len(s.latents), (1,), generator=g)) for s in drawn]
            x = torch.cat([s.latents[i : i + 1] for s, i in zip(drawn, pick, strict=True)]).to(dtype)
            cond = Conditioning.cat([s.cond[i] for s, i in zip(drawn, pick, strict=True)])
            noise = torch.randn_like(x)
            u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=len(x))
            timesteps = sched.timesteps[(u * sched.config.num_train_timesteps).long()].to(dev)
            sigmas = get_sigmas(timesteps, x.ndim)
            noisy = (1.0 - sigmas) * x + sigmas * noise
            b, c, h, w = x.shape
            if klein:
                ids = Flux2KleinPipeline._prepare_latent_ids(x).to(dev)
                packed = Flux2KleinPipeline._pack_latents(noisy)
                txt_ids = Flux2KleinPipeline._prepare_text_ids(cond.hidden).to(dev)
                kwargs = dict(img_ids=ids, txt_ids=txt_ids, guidance=None, return_dict=False)
            else:
                packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
                img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, dev, dtype)
                txt_ids = torch.zeros(cond.hidden.shape[1], 3, device=dev, dtype=dtype)
                guidance = torch.tensor([TRAIN_GUIDANCE], device=dev).expand(b)
                kwargs = dict(img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)
                kwargs["pooled_projections"] = cond.extra["pooled"]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):  # accelerate's bf16 mixed precision
                pred = den(
                    hidden_states=packed, timestep=timesteps / 1000, encoder_hidden_states=cond.hidden, **kwargs
                )
            pred = pred[0].float()  # accelerate's convert_outputs_to_fp32
            if klein:
                pred = torch.stack(list(Flux2KleinPipeline._unpack_latents_with_ids(pred[:, : packed.size(1)], ids)))
            else:
                pred = FluxPipeline._unpack_latents(pred, h * 8, w * 8, 8)
            target = noise - x
            loss = torch.mean(((pred.float() - target.float()) ** 2).reshape(b, -1), 1).mean()
            (loss / accumulation).backward()  # accelerator.backward under gradient accumulation
            return loss

        def run(checkpointing: bool, batch: int) -> dict:
            """``batch`` images per micro-step (one of each of ``batch`` sets), the step's 16 images in all."""
            accumulation = IMAGES // batch
            if checkpointing:
                den.enable_gradient_checkpointing()
            den.train()
            params = [p for p in den.parameters() if p.requires_grad]  # the LoRA layers
            opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)

            def step() -> None:
                for k in range(accumulation):
                    loss = micro([sets[(k * batch + j) % N_SETS] for j in range(batch)], accumulation)
                    if k == accumulation - 1:  # accelerator.sync_gradients: clip, step, zero
                        torch.nn.utils.clip_grad_norm_(den.parameters(), 1.0)
                        opt.step()
                        opt.zero_grad()
                    loss.detach().item()  # the progress bar's loss

            settings = dict(gradient_checkpointing=checkpointing, train_batch_size=batch, accumulation=accumulation)
            settings.update(lora_dtype=str(self.lora_dtype).removeprefix("torch."), autocast=amp)
            settings["adapted_layers"] = sum(isinstance(m, LoraLayer) for m in den.modules())
            try:
                return {**self.time_step(step), "settings": settings}
            finally:
                den.disable_gradient_checkpointing()
                den.eval()

        plans = [("batch 4 × 4", lambda: run(False, N_SETS)), ("batch 1 × 16", lambda: run(False, 1))]
        row = self.attempt([*plans, ("batch 4 × 4, --gradient_checkpointing", lambda: run(True, N_SETS))])
        lora = "fp32, no autocast" if fp32 else f"{str(self.lora_dtype).removeprefix('torch.')}, autocast {amp}"
        return {**row, "description": f"diffusers script + peft LoRA rank {self.args.rank} ({lora})"}

    def b4m(self, res: int, variant: str) -> dict:
        """b4m content's step with the fast preset or its default settings (see the module docstring)."""
        self.use("plp")
        owned = PLPConfig().half_of("content")
        base = dict(owned=owned, batch_size=1, grad_accum=GRAD_ACCUM, mixed_precision=self.precision)
        fast = preset_settings("fast")["train"]
        if variant == "fast":
            plans = [("preset fast", TrainConfig(**base, **fast))]
        elif variant in ("graphs", "eager"):  # not folded: 4 micro-steps of 4 images, as the plain step
            unfolded = {**fast, "fold_accumulation": False, "cuda_graphs": variant == "graphs"}
            label = "preset fast, not folded" + ", no CUDA graphs" * (variant == "eager")
            plans = [(label, TrainConfig(**base, **unfolded))]
        else:
            plans = speed_plans(TrainConfig(**base), self.device)
        sets, model, den = self.sets(res), self.model, self.denoiser

        def run(config: TrainConfig) -> dict:
            draws = config.grad_accum if config.fold_accumulation else 1
            config = folded(config)
            if config.gradient_checkpointing:
                enable_gradient_checkpointing(model)
            den.train()
            optimizer = make_optimizer(model, config)
            g = torch.Generator().manual_seed(0)
            precision = resolve_precision(config.mixed_precision, self.device)
            graphed = graphed_micro_step(model, config, optimizer, precision)

            def step(graph=graphed) -> None:
                train_step(model, sets, config, optimizer, g, precision=precision, graphed=graph, draws=draws)

            keys = ("gradient_checkpointing", "fused_optimizer", "fold_accumulation", "batch_size", "grad_accum")
            settings = {k: getattr(config, k) for k in keys}
            settings.update(cuda_graphs=graphed is not None, precision=precision, adapted_layers=len(self.plp))
            try:
                return {**self.time_step(step, eager=lambda: step(None)), "settings": settings}
            finally:
                del graphed
                den.disable_gradient_checkpointing()
                den.eval()

        row = self.attempt([(label, lambda c=c: run(c)) for label, c in plans])
        return {**row, "description": f"b4m content, PLP rank {self.args.rank}, {variant} settings"}

    def gen(self, variant: str) -> dict:
        """One denoising step at the high resolution without gradients (klein base: two calls, true CFG)."""
        res = self.args.high
        self.use("none" if variant == "none" else "plp")
        merged = []
        if variant == "merged":  # as merge_plp, reversibly
            for name, layer in self.plp.items():
                layer.merge()
                set_submodule(self.denoiser, name, layer.base_layer)
                merged.append((name, layer))
        s = self.sets(res)[0]
        noisy = s.latents[:1].to(self.dtype)
        t = torch.tensor([500], device=self.device)
        conds = [s.cond[0:1], s.cond[1:2]][: 2 if self.family == "klein" else 1]

        def step() -> None:
            with torch.no_grad():
                for cond in conds:
                    self.model.predict(noisy, t, cond)

        try:
            row = self.time_step(step)
        finally:
            for name, layer in merged:
                set_submodule(self.denoiser, name, layer)
                layer.unmerge()
        what = {"none": "no adapter", "unmerged": "PLP attached, unmerged", "merged": "PLP merged into the weights"}
        calls = f"{len(conds)} transformer call{'s' * (len(conds) > 1)}"
        return {**row, "plan": variant, "description": f"one denoising step at {res} px, {what[variant]}, {calls}"}

    def row(self, row_id: str) -> dict:
        kind, *rest = row_id.split("/")
        res = self.args.high if rest[-1] == "1024" or kind == "gen" else self.args.low
        if kind == "gen":
            out = self.gen(rest[0])
        else:
            out = self.b4m(res, rest[0]) if kind == "b4m" else self.plain(res, fp32=kind == "plain-fp32")
        images = 1 if kind == "gen" else IMAGES  # gen: images_per_s counts denoising steps
        return {"family": self.family, "id": row_id, "resolution": res, "images_per_step": images, **out}


# -- report ----------------------------------------------------------------------------------------------------------


def finish(row: dict, rate: float) -> dict:
    """Medians, rates and the fraction of the matrix rate of a measured row."""
    if "ms_all" not in row:
        return row
    ms = statistics.median(row["ms_all"])
    achieved = row["flops"] / 1e12 / (ms / 1e3)
    row.update(ms_per_step=ms, images_per_s=row["images_per_step"] / (ms / 1e3), tflop_per_step=row["flops"] / 1e12)
    row.update(achieved_tflops=achieved, fraction_of_matmul_rate=achieved / rate if rate else 0.0, matmul_tflops=rate)
    return row


def ratios(rows: list[dict]) -> None:
    """``speedup_vs_plain`` (b4m rows: plain ms ÷ this ms, same family and resolution; ``…_fp32`` against
    ``plain-fp32``) and ``ratio_to_none`` (gen rows: this ms ÷ gen/none's ms)."""
    ms = {(r["family"], r["id"]): r.get("ms_per_step") for r in rows}
    for r in rows:
        if r.get("ms_per_step") is None:
            continue
        fam, res = r["family"], r["id"].split("/")[-1]
        if r["id"].startswith("b4m/"):
            for key, ref in (("speedup_vs_plain", f"plain/{res}"), ("speedup_vs_plain_fp32", f"plain-fp32/{res}")):
                if ms.get((fam, ref)):
                    r[key] = ms[(fam, ref)] / r["ms_per_step"]
        elif r["id"].startswith("gen/") and ms.get((fam, "gen/none")):
            r["ratio_to_none"] = r["ms_per_step"] / ms[(fam, "gen/none")]


def table(rows: list[dict]) -> str:
    columns = ["family", "row", "px", "plan", "ms/step", "img/s", "peak GiB", "reserved GiB", "TFLOP/step"]
    columns += ["% matmul", "vs plain", "vs none"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        if r.get("ms_per_step") is None:
            lines.append(f"| {r['family']} | {r['id']} | {r['resolution']} | {r.get('error')} ||||||||")
            continue
        vs_plain, vs_none = (format(r[k], ".2f") if k in r else "" for k in ("speedup_vs_plain", "ratio_to_none"))
        lines.append(
            f"| {r['family']} | {r['id']} | {r['resolution']} | {r['plan']} | {r['ms_per_step']:.1f} | "
            f"{r['images_per_s']:.2f} | {r['peak_gib']:.2f} | {r.get('peak_reserved_gib', 0):.2f} | "
            f"{r['tflop_per_step']:.3f} | "
            f"{100 * r['fraction_of_matmul_rate']:.1f} | {vs_plain} | {vs_none} |"
        )
    return "\n".join(lines)


def write(path: Path, report: dict) -> None:
    ratios(report["rows"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["flux", "klein", "both"], default="flux")
    parser.add_argument("--rows", default="", help="comma-separated row ids (default: all, in priority order)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after the FLOP count's (1; tiny 0)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per row (3; tiny 1)")
    parser.add_argument("--rank", type=int, default=None, help="LoRA / PLP rank (64; tiny 4)")
    parser.add_argument("--text-tokens", type=int, default=None, help="text tokens (512; tiny 8)")
    parser.add_argument("--matmul-size", type=int, default=None, help="n of the n³ bf16 matmul (8192; tiny 256)")
    parser.add_argument("--budget-s", type=float, default=0, help="start no row after this many seconds (0: none)")
    parser.add_argument(
        "--cudnn-attention",
        choices=["on", "off"],
        default="off",
        help="cuDNN's attention kernel for every row (off: as b4m trains FLUX; bench/attention_probe.py says why)",
    )
    parser.add_argument("--resume", action="store_true", help="keep the measured rows of the JSON; run the rest")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny transformer at 32 and 64 px: every row on a CPU")
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse --short HEAD)")
    parser.add_argument("--json", type=Path, default=None, help="default: $OUT/flux-speed.json (OUT: runs)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.rank = args.rank or (4 if tiny else 64)
    args.repeats = args.repeats or (1 if tiny else 3)
    args.warmup = (0 if tiny else 1) if args.warmup is None else args.warmup
    args.text_tokens = args.text_tokens or (8 if tiny else 512)
    args.matmul_size = args.matmul_size or (256 if tiny else 8192)
    args.low, args.high = (32, 64) if tiny else (512, 1024)
    args.json = args.json or Path(os.environ.get("OUT") or "runs") / "flux-speed.json"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: the full-size run needs one (--tiny --device cpu runs on the CPU)")
    threads = torch.get_num_threads()
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(1)  # as bench/speed.py: toy timings mean nothing; waiting OpenMP peers are slow
    try:
        return run(args, argv)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    import diffusers
    import peft

    t_start, device = time.perf_counter(), torch.device(args.device)
    families = ["flux", "klein"] if args.family == "both" else [args.family]
    old = json.loads(args.json.read_text()) if args.resume and args.json.exists() else {}
    done = {(r["family"], r["id"]) for r in old.get("rows", []) if r.get("ms_per_step") is not None}
    if device.type == "cuda":  # every row alike, plain and b4m (b4m.device.avoid_cudnn_attention)
        torch.backends.cuda.enable_cudnn_sdp(args.cudnn_attention == "on")
    rate = speed.matmul_rate(device, args.matmul_size, repeats=20 if device.type == "cuda" else 3)
    print(f"{speed.device_name(device)}: bf16 matmul {args.matmul_size}³ {rate['tflops']:.1f} TFLOP/s", flush=True)
    command = "python bench/flux_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        **dict(device=speed.device_name(device), date=datetime.date.today().isoformat(), command=command),
        **dict(commit=args.commit or speed.git_commit(), torch=torch.__version__, diffusers=diffusers.__version__),
        **dict(peft=peft.__version__, python=platform.python_version()),
        "transformers": {"flux": "tiny" if args.tiny else "FLUX.1-dev", "klein": "tiny" if args.tiny else "klein 4B"},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "matmul": rate,
        "runs": [*old.get("runs", []), {"command": command, "matmul": rate}],
        "notes": "training step: one optimizer step, 16 images; gen: one denoising step. ms_per_step: median of "
        "the timed steps; peak_gib: max allocated over them; peak_reserved_gib: max reserved over them (CUDA "
        "graphs' pools included); speedup_vs_plain: plain ms / this ms",
        "rows": [r for r in old.get("rows", []) if (r["family"], r["id"]) in done],
    }
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    for family in families:
        rows = [r for r in ROWS if (not wanted or r in wanted) and (family, r) not in done]
        if not rows:
            continue
        bench = Bench(args, family)
        print(f"{family}: transformer built in {bench.build_s:.1f} s; rows {', '.join(rows)}", flush=True)
        for row_id in rows:
            if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: {family}/{row_id} and later rows not run", flush=True)
                report["stopped_before"] = f"{family}/{row_id}"
                break
            t0 = time.perf_counter()
            try:
                row = finish(bench.row(row_id), rate["tflops"])
            except Exception as e:  # one broken row must not cost the others
                traceback.print_exc()
                row = {"family": family, "id": row_id, "resolution": None, "error": f"{type(e).__name__}: {e}"}
                if "illegal memory access" in str(e):  # the process's CUDA context is spoilt: no later row can run
                    report["stopped_before"] = f"{family}/{row_id} (a CUDA error spoilt the process)"
            row["row_s"] = time.perf_counter() - t0
            report["rows"].append(row)
            report["seconds"] = time.perf_counter() - t_start
            write(args.json, report)
            print(table([row]).splitlines()[-1], f"({row['row_s']:.0f} s)", flush=True)
            if "stopped_before" in report:
                break
        del bench
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if "stopped_before" in report:
            break
    write(args.json, report)
    print(table(report["rows"]))
    print(f"wrote {args.json} ({time.perf_counter() - t_start:.0f} s)")
    return report


if __name__ == "__main__":
    main()
