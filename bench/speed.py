"""Speed of the B4M pipeline at SDXL size, side by side in one run: the official-shaped loop against ours.

Builds SDXL's UNet from its config (tests/data/sdxl-unet-config.json) with random weights (values do not change
cost) and replaces the text encoders by random conditioning of the right shapes (context ``(B, 77, 2048)``, pooled
``text_embeds`` ``(B, 1280)``, ``time_ids`` ``(B, 6)``). Weights bf16, adapters fp32 rank 64 on the 560 attention
projections, autocast bf16 (on a CPU: the library's CPU defaults, fp32 and no autocast). Cases:

- ``naive``: shaped like the official code: peft LoRA, one UNet forward per image, four per micro-step (main + 3
  auxiliary), a backward for the main loss and one for the mean auxiliary loss, gradient masks on the frozen
  halves, two AdamW optimizers with clipping, a loss ``.item()`` per micro-step (its progress-bar log); the VAE
  encode of every image is left out (ours caches latents). ``naive/batched``: the same with the 4 images in one
  forward and one backward.
- ``stage1``: our content-run step: b4m's PLP adapter, clean routing, the 4 images of a micro-step in one batch
  (:func:`b4m.training.loop.train_step`), plus one row per option: the ``fast`` and ``low-memory`` presets, SDPA
  off, 1024 px. Rows to be read against their baseline within one run: ``graphs-1x16-fused`` (the base layer inside
  the adapter's autograd node) and ``graphs-1x16-cl`` (channels-last convolution weights) against ``graphs-1x16``,
  ``graphs-1x16-run10-async`` (the batch copied without a host sync) against ``graphs-1x16-run10`` (10 steps per
  timed call, as the loop runs between its loss reads).
- ``make``: our make step (routing none, Riemannian preconditioner, content + style image per micro-step).
- ``gen``: one 1024-px image, 25 Euler steps with CFG (batch 2 per step), UNet loop only: no adapter, the fused
  adapter unmerged (the no-grad path: the base layer and two skinny matmuls, the cast factors cached in the UNet
  dtype; up to commit ``f088a8b``, tag ``stacked-sampling``: ``W_down`` stacked under a copy of the base weight) and
  merged (plain linear layers, as ``b4m generate --merge``); ``-graphs`` rows replay CUDA graphs of the UNet calls;
  the VAE decode timed apart.

The ``-legacy`` rows (``stage1/fast-1x16-legacy``, ``stage1/graphs-1x16-legacy``, ``make/graphs-1x8-legacy``: the
earlier PLP training path; ``gen/unmerged-legacy``, ``gen/unmerged-graphs-legacy``: the earlier no-grad path) are
gone with those paths. Their code is kept at commit ``19f56a8`` (tag ``legacy-speed-paths``, the last commit with
those paths), where ``python bench/speed.py --cases stage1/graphs-1x16-legacy,gen/unmerged-legacy`` (any
``...-legacy`` row) still reproduces them.

``--compile`` adds torch.compile rows (``stage1/fast-1x16-compile``: the eager ``fast-1x16`` row compiled). One
training step is one optimizer step (4 micro-steps); a generation step is one denoising step. Each row: median of
``--repeats`` synchronised steps after ``--warmup`` steps, peak memory of those steps
(``torch.cuda.max_memory_allocated``, reset per row), FLOPs of one step counted once with torch's flop counter
(eagerly, not timed), and the fraction of the bf16 matrix rate measured in the same run (an ``--matmul-size``³ matmul).
Prints a table and writes (merging rows of earlier runs of the same day and device) ``OUT/speed-<device>-<date>.json``.

    python bench/speed.py                                   # every case, training at 512 px (H100: ~6 min, estimated)
    python bench/speed.py --cases stage1,make --compile     # add torch.compile rows
    python bench/speed.py --cases gen/merged,gen/none       # single rows
    python bench/speed.py --tiny --device cpu --out /tmp/x  # a tiny UNet: checks every code path on a CPU
    python bench/speed.py --merge a/speed-*.json b/speed-*.json --out bench/results   # one file from several runs
    python bench/speed.py --cases stage1/fast-1x16 --profile stage1/fast-1x16  # kernels ranked by device time
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from b4m import environment
from b4m.adapter.config import PLPConfig
from b4m.adapter.lowrank import fused_base
from b4m.adapter.walker import add_plp, plp_layers, remove_plp, set_submodule
from b4m.cuda_graphs import graphed_sampling
from b4m.device import async_copies
from b4m.models.base import Conditioning
from b4m.models.diffusers_common import DiffusersModel, default_dtype
from b4m.runs.config import STAGE_DEFAULTS, preset_settings
from b4m.training.config import TrainConfig, folded, resolve_precision
from b4m.training.loop import graphed_micro_step, make_optimizer, train_step
from b4m.training.sets import TrainSet
from b4m.training.speed import enable_gradient_checkpointing

ROOT = Path(__file__).resolve().parents[1]
SDXL_UNET = ROOT / "tests" / "data" / "sdxl-unet-config.json"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 64
TOKENS = 77
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
CASES = ("naive", "stage1", "make", "gen")
N_AUX = 3  # auxiliary sets of a content run (the official code's three)
GRAD_ACCUM = 4
GRAPHS = {"cuda_graphs": True}
ONE_PASS = {"batch_size": GRAD_ACCUM, "grad_accum": 1}  # a step's images in one forward and backward

# The tiny UNet keeps SDXL's layout (no attention at the first level, text_time conditioning) at toy widths.
TINY_UNET = dict(
    block_out_channels=[32, 64, 64],
    attention_head_dim=[2, 2, 4],
    transformer_layers_per_block=[1, 1, 2],
    layers_per_block=1,
    cross_attention_dim=64,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
    sample_size=8,
)


# --------------------------------------------------------------------------------------------------------------------
# Device helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_reserved_gib(device: torch.device) -> float:
    """Peak memory the CUDA caching allocator held since the last reset: unlike :func:`peak_gib`, it counts a CUDA
    graph's private pool, where a replayed step's activations live (0 on a CPU)."""
    return torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else 0.0


def peak_gib(device: torch.device) -> float:
    """Peak allocated memory since the last reset (CUDA); on a CPU the process's peak RSS (never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_commit() -> str:
    """The commit (``B4M_COMMIT`` on a GPU machine's copy without history), ``+dirty`` with uncommitted changes."""
    commit, dirty = environment.git_commit(__file__)
    return (commit or "unknown") + ("+dirty" if dirty else "")


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (torch's flop counter: matmuls, convolutions and attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(device: torch.device, n: int, repeats: int) -> dict:
    """The measured bf16 matrix rate: an n³ matmul, median of ``repeats`` timings of 10 (CUDA) or 1 (CPU) calls."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    inner = 10 if device.type == "cuda" else 1
    for _ in range(3):
        torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        sync(device)
        times.append((time.perf_counter() - t0) / inner)
    seconds = statistics.median(times)
    return {"n": n, "repeats": repeats, "ms": seconds * 1e3, "tflops": 2 * n**3 / seconds / 1e12}


# --------------------------------------------------------------------------------------------------------------------
# The model


class BenchModel(DiffusersModel):
    """The library's SDXL model adapter without text encoders: conditioning comes as random tensors of the right
    shapes, so training goes through the library's own ``predict``, ``add_noise`` and ``target``."""

    family = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    components = ("vae", "unet")

    def text_encoders(self) -> list[torch.nn.Module]:
        return []

    def _pipeline_extras(self) -> dict[str, Any]:
        return {}

    def _fallback_resolution(self) -> int:
        return 1024

    def encode_prompts(self, prompts, size=None) -> Conditioning:
        raise NotImplementedError("bench/speed.py: conditioning is random")


def vae(tiny: bool) -> AutoencoderKL:
    """SDXL's VAE architecture (or a toy one with the same factor 8)."""
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32] * 4 if tiny else [128, 256, 512, 512],
        layers_per_block=1 if tiny else 2,
        latent_channels=4,
        sample_size=64 if tiny else 1024,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def unet_config(tiny: bool) -> dict:
    config = {k: v for k, v in json.loads(SDXL_UNET.read_text()).items() if not k.startswith("_")}
    if tiny:
        config.update(TINY_UNET)
    return config


@dataclass
class Dims:
    context: int  # cross-attention width (2048)
    pooled: int  # pooled text embedding (1280)

    @classmethod
    def of(cls, config: dict) -> Dims:
        return cls(
            config["cross_attention_dim"],
            config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"],
        )


# --------------------------------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row:
    id: str  # "case/variant"
    description: str
    resolution: int
    images_per_step: float  # images one step produces (training) or a fraction of one (a denoising step)
    unet_images_per_step: int  # images through the UNet per step (training passes, or the CFG batch)
    settings: dict = field(default_factory=dict)
    ms: list[float] = field(default_factory=list)
    first_call_s: float = 0.0  # the first warm-up call: a training step or a whole image (compilation included)
    peak_gib: float = 0.0
    peak_reserved_gib: float = 0.0
    flops: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def case(self) -> str:
        return self.id.split("/")[0]

    def report(self, rate_tflops: float) -> dict:
        ms = statistics.median(self.ms)
        tflop = self.flops / 1e12
        achieved = tflop / (ms / 1e3) if ms > 0 else 0.0
        return {
            "id": self.id,
            "case": self.case,
            "description": self.description,
            "resolution": self.resolution,
            "images_per_step": self.images_per_step,
            "unet_images_per_step": self.unet_images_per_step,
            "ms_per_step": ms,
            "ms_per_step_all": self.ms,
            "images_per_s": self.images_per_step / (ms / 1e3) if ms > 0 else 0.0,
            "peak_gib": self.peak_gib,
            "peak_reserved_gib": self.peak_reserved_gib,
            "tflop_per_step": tflop,
            "achieved_tflops": achieved,
            "fraction_of_matmul_rate": achieved / rate_tflops if rate_tflops > 0 else 0.0,
            "matmul_tflops": rate_tflops,
            "first_call_s": self.first_call_s,
            "settings": self.settings,
            **self.extra,
        }


class Bench:
    """One UNet for the whole run; each row attaches what it needs (no adapter, PLP or peft LoRA) and times."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.tiny = args.tiny
        self.dtype = default_dtype(self.device)  # bf16 on a GPU, fp32 on a CPU: as the library loads models
        self.precision = resolve_precision("auto", self.device)
        config = unet_config(args.tiny)
        self.dims = Dims.of(config)
        with torch.device(self.device):
            torch.manual_seed(0)
            self.unet = UNet2DConditionModel(**config)
        if self.dtype != torch.float32:
            self.unet.to(self.dtype)
        self.unet.requires_grad_(False)
        self.model = BenchModel(
            vae=vae(tiny=True),  # only its scale factor is used: the decode row builds the real one
            unet=self.unet,
            scheduler=EulerDiscreteScheduler(**BETAS, steps_offset=1, timestep_spacing="leading"),
            identity="sdxl-random",
            resolution=1024,
        )
        self.adapter = "none"
        self.rows: list[Row] = []
        self.rate = {"tflops": 0.0}  # the measured matmul rate (main sets it before the first row)

    # ----------------------------------------------------------------------------------------------------------------
    # Adapters

    def use_adapter(self, kind: str) -> None:
        """Switch the UNet to ``none``, ``plp`` (a fused adapter: both learned halves non-zero) or ``peft``."""
        if kind == self.adapter:
            return
        if self.adapter == "plp":
            remove_plp(self.unet)
        elif self.adapter == "peft":
            self.unet.unload_lora()
        if kind == "plp":
            add_plp(self.unet, PLPConfig(rank=RANK, base_model="sdxl-random"))
            with torch.no_grad():
                g = torch.Generator(device=self.device).manual_seed(1)
                for layer in plp_layers(self.unet).values():
                    for p in (layer.up_learned, layer.down_learned):
                        p.copy_(torch.randn(p.shape, generator=g, device=self.device) * 0.01)
        elif kind == "peft":
            from peft import LoraConfig

            self.unet.add_adapter(
                LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS)
            )
            for p in self.unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # fp32 adapter weights, as in training
        self.adapter = kind
        reset_peak(self.device)

    # ----------------------------------------------------------------------------------------------------------------
    # Data

    def cond(self, n: int, res: int) -> Conditioning:
        d, dev = self.dims, self.device
        return Conditioning(
            torch.randn(n, TOKENS, d.context, device=dev, dtype=self.dtype),
            {
                "text_embeds": torch.randn(n, d.pooled, device=dev, dtype=self.dtype),
                "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * n, device=dev, dtype=torch.float32),
            },
        )

    def train_set(self, name: str, n: int, res: int, weight: float, main: bool) -> TrainSet:
        s = res // 8
        latents = torch.randn(n, 4, s, s, device=self.device)  # cached latents are float32
        return TrainSet(name, latents, self.cond(n, res), weight, main)

    def stage1_sets(self, res: int) -> list[TrainSet]:
        sets = [self.train_set("main", 4, res, 1.0, True)]
        return sets + [self.train_set(f"aux{i}", 4, res, 1.0 / N_AUX, False) for i in range(N_AUX)]

    # ----------------------------------------------------------------------------------------------------------------
    # Timing

    def run(
        self,
        row: Row,
        step: Callable[[], Any],
        *,
        warmup: int,
        repeats: int,
        flops: Callable[[], Any] | None = None,
        before_timing: Callable[[], None] | None = None,
        steps_per_call: int = 1,
    ) -> None:
        """Count the FLOPs of one step (``flops`` or ``step``, eagerly), then ``before_timing`` (e.g. swap in the
        compiled UNet), warm up, reset the peak memory, and time ``repeats`` synchronised calls of ``step``, each
        ``steps_per_call`` steps (a generated image is 25 denoising steps)."""
        dev = self.device
        row.flops = count_flops(flops or step)
        if before_timing is not None:
            before_timing()
        for i in range(max(warmup, 1)):
            sync(dev)
            t0 = time.perf_counter()
            step()
            sync(dev)
            if i == 0:
                row.first_call_s = time.perf_counter() - t0
        reset_peak(dev)
        for _ in range(repeats):
            sync(dev)
            t0 = time.perf_counter()
            step()
            sync(dev)
            row.ms.append((time.perf_counter() - t0) * 1e3 / steps_per_call)
        row.peak_gib, row.peak_reserved_gib = peak_gib(dev), peak_reserved_gib(dev)
        if row.id in self.args.profile:
            self.profile(row, step)
        self.rows.append(row)
        r = row.report(self.rate["tflops"])
        print(
            f"  {row.id:<30} {r['ms_per_step']:>10.1f} ms/step {r['images_per_s']:>8.2f} img/s "
            f"{r['peak_gib']:>6.2f} GiB {100 * r['fraction_of_matmul_rate']:>5.1f}% "
            f"(first call {row.first_call_s:.1f} s)",
            flush=True,
        )

    @contextlib.contextmanager
    def compiled(self, enabled: bool):
        """Yields the UNet to call: torch.compile'd when ``enabled`` (dynamo's caches are reset afterwards)."""
        if not enabled:
            yield self.unet
            return
        compiled = torch.compile(self.unet, mode=self.args.compile_mode, backend=self.args.compile_backend)
        try:
            yield compiled
        finally:
            del compiled
            torch._dynamo.reset()

    # ----------------------------------------------------------------------------------------------------------------
    # naive

    def naive(self, variant: str) -> None:
        """The official code's loop shape (content run): see the module docstring."""
        batched = variant == "batched"
        res = self.args.resolution
        self.use_adapter("peft")
        from peft.tuners.lora import LoraLayer

        unet, model, dev, dtype = self.unet, self.model, self.device, self.dtype
        unet.train()
        downs, ups, hooks = [], [], []
        for module in unet.modules():
            if isinstance(module, LoraLayer):
                down, up = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, in), (out, r)
                col = torch.zeros(1, down.shape[1], device=dev)
                col[:, down.shape[1] // 2 :] = 1  # C frozen, D trained: a gradient mask, as the official code does
                row = torch.zeros(up.shape[0], 1, device=dev)
                row[up.shape[0] // 2 :] = 1
                hooks += [down.register_hook(lambda g, m=col: g * m), up.register_hook(lambda g, m=row: g * m)]
                downs.append(down)
                ups.append(up)
        # Content run: the owned (down) projection at lr 1e-4, the other at 1e-5; AdamW's defaults otherwise.
        opt_down = torch.optim.AdamW(downs, lr=1e-4, weight_decay=1e-2)
        opt_up = torch.optim.AdamW(ups, lr=1e-5, weight_decay=1e-2)
        sets = self.stage1_sets(res)
        g = torch.Generator().manual_seed(0)
        use_amp = self.precision != "no"

        def forward(latents, noise, t, cond):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                noisy = model.add_noise(latents, noise, t)
                pred = unet(
                    noisy.to(dtype),
                    t,
                    encoder_hidden_states=cond.hidden,
                    added_cond_kwargs=cond.extra,
                    return_dict=False,
                )[0]
            return F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))

        def step() -> None:
            for micro in range(GRAD_ACCUM):
                synced = micro == GRAD_ACCUM - 1
                picks = [int(torch.randint(0, len(s.latents), (1,), generator=g)) for s in sets]
                latents = [s.latents[i : i + 1] for s, i in zip(sets, picks, strict=True)]
                conds = [s.cond[i] for s, i in zip(sets, picks, strict=True)]
                noise = torch.randn(latents[0].shape, generator=g).to(dev)  # one noise and timestep for all four
                t = torch.randint(0, 1000, (1,), generator=g).to(dev)
                if batched:
                    per = forward(
                        torch.cat(latents), noise.expand(4, -1, -1, -1), t.expand(4), Conditioning.cat(conds)
                    )
                    loss_1, loss_2 = per[0], per[1:].mean()
                    (loss_1 + loss_2).backward()
                    if synced:
                        for params, opt in ((downs, opt_down), (ups, opt_up)):
                            torch.nn.utils.clip_grad_norm_(params, 1.0)
                            opt.step()
                            opt.zero_grad(set_to_none=True)
                else:
                    loss_1 = forward(latents[0], noise, t, conds[0]).mean()
                    loss_1.backward()
                    if synced:
                        torch.nn.utils.clip_grad_norm_(downs, 1.0)
                        opt_down.step()
                        opt_down.zero_grad(set_to_none=True)
                    aux = [forward(latents[k], noise, t, conds[k]).mean() for k in range(1, 1 + N_AUX)]
                    loss_2 = sum(aux) / N_AUX
                    loss_2.backward()
                    if synced:
                        torch.nn.utils.clip_grad_norm_(ups, 1.0)
                        opt_up.step()
                        opt_up.zero_grad(set_to_none=True)
                _ = (loss_1 + loss_2).detach().item()  # the official loop logs the loss every iteration

        description = (
            "peft LoRA, 4 images in one forward + one backward per micro-step, masks, 2 AdamW, .item() per micro-step"
            if batched
            else "official shape: peft LoRA, 1 forward per image (4 per micro-step), 2 backwards, masks, 2 AdamW, "
            ".item() per micro-step"
        )
        row = Row(f"naive/{variant}", description, res, GRAD_ACCUM * 4, GRAD_ACCUM * 4)
        try:
            self.run(row, step, warmup=self.args.warmup, repeats=self.args.repeats)
        finally:
            for h in hooks:
                h.remove()
            unet.eval()

    # ----------------------------------------------------------------------------------------------------------------
    # stage1 and make

    def train_row(
        self,
        row: Row,
        config: TrainConfig,
        sets: list[TrainSet],
        *,
        compile: bool = False,
        sdpa: bool = True,
        steps: int = 1,
        fused: bool = False,
        nonblocking: bool = False,
        channels_last: bool = False,
    ) -> None:
        """Time :func:`b4m.training.loop.train_step` with ``config`` on the PLP adapter: ``steps`` steps per timed
        call with no sync between them (the loop syncs only to read the loss), ``fused``: the base layers' GEMMs inside
        the adapter's node (:func:`b4m.adapter.lowrank.fused_base`), ``nonblocking``: the batch's copies without a
        host sync (:func:`b4m.device.async_copies`; on by default since 2026-12-07, off in every row but
        ``-run10-async`` so that the rows time what they timed before); ``channels_last``: the
        UNet's convolution weights in channels-last memory format (cuDNN's NHWC kernels; a convolution's output
        follows)."""
        self.use_adapter("plp")
        config = folded(config)  # as b4m.training.loop.train runs it
        model, unet = self.model, self.unet
        processors = unet.attn_processors
        if not sdpa:
            unet.set_attn_processor(AttnProcessor())  # attention as explicit matmuls + softmax
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        unet.train()
        optimizer = make_optimizer(model, config)
        g = torch.Generator().manual_seed(0)
        precision = resolve_precision(config.mixed_precision, self.device)
        row.settings = {
            k: v
            for k, v in vars(config).items()
            if k
            in (
                "routing",
                "owned",
                "precondition",
                "gradient_checkpointing",
                "fused_optimizer",
                "cuda_graphs",
                "batch_size",
                "grad_accum",
            )
        }
        row.settings.update(sdpa=sdpa, compile=compile, precision=precision)
        row.settings.update(steps_per_timing=steps, fused_base=fused, async_copies=nonblocking)
        row.settings.update(channels_last=channels_last)
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        if compile:
            row.settings["compile_mode"] = self.args.compile_mode

        graphed = graphed_micro_step(model, config, optimizer, precision)  # None unless config.cuda_graphs

        def step() -> None:  # the switches around every call: a graph is captured in the first
            with fused_base(fused), async_copies(nonblocking):
                for _ in range(steps):
                    train_step(model, sets, config, optimizer, g, precision=precision, graphed=graphed)

        def eager_step() -> None:  # FLOPs: a graph's capture runs its warm-up passes through the dispatcher too
            with fused_base(fused), async_copies(nonblocking):
                train_step(model, sets, config, optimizer, g, precision=precision)

        try:
            with self.compiled(compile) as denoiser:

                def swap() -> None:
                    model.denoiser = denoiser

                self.run(
                    row,
                    step,
                    warmup=self.args.warmup,
                    repeats=self.args.repeats,
                    flops=eager_step,
                    before_timing=swap,
                    steps_per_call=steps,
                )
        finally:
            model.denoiser = unet
            if channels_last:
                unet.to(memory_format=torch.contiguous_format)
            if config.gradient_checkpointing:
                unet.disable_gradient_checkpointing()
            unet.set_attn_processor(processors)
            unet.eval()

    def stage1_config(self, **changes) -> TrainConfig:
        owned = PLPConfig().half_of("content")
        settings = dict(owned=owned, batch_size=1, grad_accum=GRAD_ACCUM, mixed_precision=self.precision)
        return TrainConfig(**{**settings, **changes})

    def stage1(self, variant: str) -> None:
        res, high = self.args.resolution, high_resolution(self.args)
        fast = preset_settings("fast")["train"]
        low = preset_settings("low-memory")["train"]
        spec = {
            "default": ("defaults: clean routing, AdamW (foreach), SDPA", res, {}, {}),
            "fast": ("preset fast (" + _kv(fast) + ")", res, fast, {}),
            "sdpa-off": ("defaults, attention as plain matmuls + softmax (no SDPA)", res, {}, {"sdpa": False}),
            "low-memory": ("preset low-memory (" + _kv(low) + ")", res, low, {}),
            "1024": (f"defaults at {high} px", high, {}, {}),
            "1024-low-memory": (f"preset low-memory at {high} px", high, low, {}),
            "compile": (f"defaults, torch.compile(mode={self.args.compile_mode})", res, {}, {"compile": True}),
            "graphs": (
                "preset fast with 4 micro-steps (no folding): CUDA graph per micro-step",
                res,
                {**fast, **GRAPHS, "fold_accumulation": False},
                {},
            ),
            "fast-1x16": (
                "preset fast without CUDA graphs, the 16 images in one micro-step",
                res,
                {**fast, **ONE_PASS, "cuda_graphs": False},
                {},
            ),
            "graphs-1x16": (
                "preset fast + CUDA graphs, the 16 images in one micro-step",
                res,
                {**fast, **GRAPHS, **ONE_PASS},
                {},
            ),
            "graphs-1x16-fused": (
                "as graphs-1x16 with the base layers' GEMMs inside the adapter's autograd node "
                "(b4m.adapter.lowrank.fused_base, linear_low_rank): against graphs-1x16, same run",
                res,
                {**fast, **GRAPHS, **ONE_PASS},
                {"fused": True},
            ),
            "graphs-1x16-run10": (
                "as graphs-1x16, 10 steps per timed call with no sync between them (the loop syncs only to read the "
                "loss, every 10 steps): the baseline of graphs-1x16-run10-async, same run",
                res,
                {**fast, **GRAPHS, **ONE_PASS},
                {"steps": 10},
            ),
            "graphs-1x16-run10-async": (
                "as graphs-1x16-run10 with the batch's copies through pinned memory without a host sync "
                "(b4m.device.async_copies, to_device_async): against graphs-1x16-run10, same run",
                res,
                {**fast, **GRAPHS, **ONE_PASS},
                {"steps": 10, "nonblocking": True},
            ),
            "graphs-1x16-cl": (
                "as graphs-1x16 with the UNet's convolution weights in channels-last memory format (cuDNN's NHWC "
                "kernels): against graphs-1x16, same run",
                res,
                {**fast, **GRAPHS, **ONE_PASS},
                {"channels_last": True},
            ),
            "graphs-1x32": (
                "as graphs-1x16 with 32 images (two per set): what one pass over the content and the style run's "
                "rows would cost at most (issue 19: pays only if well under two graphs-1x16 steps)",
                res,
                {**fast, **GRAPHS, **ONE_PASS, "batch_size": 2 * GRAD_ACCUM},
                {},
            ),
            "fast-1x16-compile": (
                f"as fast-1x16, the UNet torch.compile'd (mode={self.args.compile_mode})",
                res,
                {**fast, **ONE_PASS, "cuda_graphs": False},
                {"compile": True},
            ),
        }
        description, row_res, changes, options = spec[variant]
        n = GRAD_ACCUM * (1 + N_AUX) * (2 if variant == "graphs-1x32" else 1)
        row = Row(f"stage1/{variant}", "PLP, " + description, row_res, n, n)
        self.train_row(row, self.stage1_config(**changes), self.stage1_sets(row_res), **options)

    def make(self, variant: str) -> None:
        res = self.args.resolution
        base = {k: v for k, v in STAGE_DEFAULTS["make"]["train"].items() if k in ("routing", "precondition")}
        fast = preset_settings("fast")["train"]
        spec = {
            "default": ("defaults: routing none, Riemannian preconditioner, AdamW (foreach)", {}, {}),
            "fast": ("preset fast (" + _kv(fast) + ")", fast, {}),
            "no-precondition": ("defaults without the preconditioner", {"precondition": False}, {}),
            "compile": (f"defaults, torch.compile(mode={self.args.compile_mode})", {}, {"compile": True}),
            "graphs": (
                "preset fast with 4 micro-steps (no folding): CUDA graph per micro-step",
                {**fast, **GRAPHS, "fold_accumulation": False},
                {},
            ),
            "graphs-1x8": (
                "preset fast + CUDA graphs, the 8 images in one micro-step",
                {**fast, **GRAPHS, **ONE_PASS},
                {},
            ),
        }
        description, changes, options = spec[variant]
        config = TrainConfig(
            **{"batch_size": 1, "grad_accum": GRAD_ACCUM, "mixed_precision": self.precision, **base, **changes}
        )
        sets = [self.train_set("content", 4, res, 1.0, True), self.train_set("style", 4, res, 1.0, True)]
        row = Row(f"make/{variant}", "PLP, " + description, res, GRAD_ACCUM * 2, GRAD_ACCUM * 2)
        self.train_row(row, config, sets, **options)

    # ----------------------------------------------------------------------------------------------------------------
    # gen

    def gen(self, variant: str) -> None:
        args, dev, dtype = self.args, self.device, self.dtype
        res, steps = args.gen_resolution, args.gen_steps
        if variant == "vae-decode":
            self.vae_decode(res)
            return
        adapter = "none" if variant.startswith("none") else "plp"
        compile = variant.endswith("-compile")
        graphs = variant.endswith("-graphs")
        self.use_adapter(adapter)
        named = plp_layers(self.unet)
        if variant.startswith("merged"):  # as b4m generate --merge does (merge_plp): plain linear layers
            for name, layer in named.items():
                layer.merge()
                set_submodule(self.unet, name, layer.base_layer)
        descriptions = {
            "none": "no adapter",
            "unmerged": "fused PLP adapter, unmerged (PLPLinear's no-grad path: the base layer and two skinny "
            "matmuls, the factors cached in the UNet's dtype)",
            "merged": "fused PLP adapter merged into the weights (b4m.adapter.walker.merge_plp)",
            "none-compile": f"no adapter, torch.compile(mode={args.compile_mode})",
            "none-graphs": "no adapter, CUDA graphs of the UNet calls (b4m.cuda_graphs.graphed_sampling)",
            "unmerged-graphs": "fused PLP adapter, unmerged, CUDA graphs of the UNet calls",
            "merged-graphs": "merged, CUDA graphs of the UNet calls",
            "merged-compile": f"merged, torch.compile(mode={args.compile_mode})",
            "unmerged-compile": f"fused PLP adapter, unmerged, torch.compile(mode={args.compile_mode}) (the "
            "adapter's two matmuls after the base GEMM: the stack is Python state, not traced)",
        }
        row = Row(
            f"gen/{variant}",
            f"{descriptions[variant]}; {steps} Euler steps, CFG 5",
            res,
            1 / steps,
            2,
            settings={"steps": steps, "guidance_scale": 5.0, "compile": compile, "cuda_graphs": graphs},
        )
        if compile:
            row.settings["compile_mode"] = args.compile_mode
        scheduler = EulerDiscreteScheduler(**BETAS, steps_offset=1, timestep_spacing="leading")
        cond = Conditioning.cat([self.cond(1, res), self.cond(1, res)])  # (negative, prompt)
        s = res // 8
        self.unet.eval()
        try:
            graphed = contextlib.ExitStack()  # entered after the FLOP count (eager), before the warm-up
            with self.compiled(compile) as compiled, torch.no_grad(), graphed:

                def denoise(unet, latents: torch.Tensor, t) -> torch.Tensor:
                    x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                    eps = unet(
                        x, t, encoder_hidden_states=cond.hidden, added_cond_kwargs=cond.extra, return_dict=False
                    )[0]
                    uncond, text = eps.chunk(2)
                    return scheduler.step(uncond + 5.0 * (text - uncond), t, latents, return_dict=False)[0]

                def image() -> None:
                    scheduler.set_timesteps(steps, device=dev)
                    latents = torch.randn(1, 4, s, s, device=dev, dtype=dtype) * scheduler.init_noise_sigma
                    for t in scheduler.timesteps:
                        latents = denoise(compiled, latents, t)

                def one_step() -> None:  # what the flop counter counts (eagerly): one denoising step
                    scheduler.set_timesteps(steps, device=dev)
                    denoise(self.unet, torch.randn(1, 4, s, s, device=dev, dtype=dtype), scheduler.timesteps[0])

                def start_graphs() -> None:
                    if graphs:
                        graphed.enter_context(graphed_sampling(self.unet))

                self.run(
                    row,
                    image,
                    warmup=args.gen_warmup,
                    repeats=args.gen_repeats,
                    flops=one_step,
                    before_timing=start_graphs,
                    steps_per_call=steps,
                )
        finally:
            if variant.startswith("merged"):
                for name, layer in named.items():
                    set_submodule(self.unet, name, layer)
                    layer.unmerge()
        row.extra["ms_per_image"] = statistics.median(row.ms) * steps

    def profile(self, row: Row, step: Callable[[], Any]) -> None:
        """One more call of ``step`` under torch.profiler; writes the operators and kernels ranked by device time
        (CPU time on a CPU) to ``OUT/profile-<row>.txt``."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        sync(self.device)
        with profile(activities=activities) as prof:
            step()
            sync(self.device)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=40)
        path = self.args.out / f"profile-{slug(row.id)}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{row.id}: {row.description}, {row.resolution} px, one call\n{table}\n")
        print(f"  profile of {row.id}: {path}", flush=True)

    def vae_decode(self, res: int) -> None:
        """The VAE decode of one image (SDXL's VAE, fp32 as the library decodes), timed apart from the UNet loop."""
        torch.manual_seed(0)
        decoder = vae(self.tiny).to(self.device).eval().requires_grad_(False)
        latents = torch.randn(1, 4, res // 8, res // 8, device=self.device)
        row = Row("gen/vae-decode", "SDXL VAE decode of one image, fp32", res, 1, 1, settings={"dtype": "fp32"})

        def step() -> None:
            with torch.no_grad():
                decoder.decode(latents, return_dict=False)

        self.run(row, step, warmup=self.args.gen_warmup, repeats=self.args.gen_repeats)


def _kv(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


# --------------------------------------------------------------------------------------------------------------------
# Selection and output

#: Every row by case, in run order within the case; "compile" rows run only with --compile or when named.
VARIANTS = {
    "naive": ["loop", "batched"],
    "stage1": [
        "default",
        "fast",
        "sdpa-off",
        "low-memory",
        "1024",
        "1024-low-memory",
        "compile",
        "graphs",
        "fast-1x16",
        "graphs-1x16",
        "graphs-1x16-fused",
        "graphs-1x16-run10",
        "graphs-1x16-run10-async",
        "graphs-1x16-cl",
        "graphs-1x32",
        "fast-1x16-compile",
    ],
    "make": ["default", "fast", "no-precondition", "compile", "graphs", "graphs-1x8"],
    "gen": [
        "none",
        "none-compile",
        "none-graphs",
        "vae-decode",
        "unmerged",
        "unmerged-graphs",
        "unmerged-compile",
        "merged",
        "merged-graphs",
        "merged-compile",
    ],
}
# Run order across cases: fewest adapter switches (none -> PLP -> peft).
_FIRST = ["gen/none", "gen/none-compile", "gen/none-graphs", "gen/vae-decode"]
RUN_ORDER = _FIRST + [
    f"{c}/{v}" for c in ("gen", "stage1", "make", "naive") for v in VARIANTS[c] if f"{c}/{v}" not in _FIRST
]


def high_resolution(args: argparse.Namespace) -> int:
    """The resolution of the "1024" rows: 1024 px, or twice the training resolution for the toy UNet."""
    return 2 * args.resolution if args.tiny else 1024


def select_rows(cases: str, compile: bool, resolution: int, high: int) -> list[str]:
    wanted: list[str] = []
    for item in (c.strip() for c in cases.split(",") if c.strip()):
        if "/" in item:
            case, variant = item.split("/", 1)
            if case not in VARIANTS or variant not in VARIANTS[case]:
                raise SystemExit(f"unknown row {item!r}; rows: {', '.join(RUN_ORDER)}")
            wanted.append(item)
        elif item in VARIANTS:
            wanted += [f"{item}/{v}" for v in VARIANTS[item] if compile or "compile" not in v]
        else:
            raise SystemExit(f"unknown case {item!r}; cases: {', '.join(CASES)} (or rows such as stage1/fast)")
    if resolution == high:  # the row would repeat stage1/default
        wanted = [w for w in wanted if w != "stage1/1024"]
    return [r for r in RUN_ORDER if r in wanted]


def table(rows: list[dict]) -> str:
    head = (
        f"{'row':<30} {'res':>5} {'img/step':>8} {'ms/step':>10} {'img/s':>8} {'peak GiB':>9} "
        f"{'TFLOP/step':>10} {'TFLOP/s':>8} {'% matmul':>8} {'1st call s':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (CASES.index(r["case"]), RUN_ORDER.index(r["id"]))):
        lines.append(
            f"{r['id']:<30} {r['resolution']:>5} {r['images_per_step']:>8.3g} {r['ms_per_step']:>10.1f} "
            f"{r['images_per_s']:>8.2f} {r['peak_gib']:>9.2f} {r['tflop_per_step']:>10.3f} "
            f"{r['achieved_tflops']:>8.1f} {100 * r['fraction_of_matmul_rate']:>7.1f}% {r['first_call_s']:>10.2f}"
        )
    return "\n".join(lines)


def write_json(out: Path, report: dict) -> Path:
    """``out/speed-<device>-<date>.json``; rows of an earlier run of the same day and device are kept unless this
    run measured them again at the same resolution and compile mode (so a run split into several commands ends in
    one file)."""
    meta = {k: v for k, v in report.items() if k not in ("run", "rows")}
    return _merge(out, meta, [report["run"]], [{**r, "run": 0} for r in report["rows"]])


def merge_files(files: list[Path], out: Path) -> Path:
    """Merge result files (e.g. one per command, fetched from separate machines) into ``out`` as :func:`write_json`
    would have, in the order given."""
    path = out
    for f in files:
        data = json.loads(Path(f).read_text())
        meta = {k: v for k, v in data.items() if k not in ("runs", "rows")}
        target = out / f"speed-{slug(data['device'])}-{data['date']}.json"
        if target.exists() and target.resolve() == Path(f).resolve():
            continue  # already there
        path = _merge(out, meta, data["runs"], data["rows"])
    return path


def _key(r: dict) -> tuple:
    return r["id"], r["resolution"], r["settings"].get("compile_mode")


def _merge(out: Path, meta: dict, runs: list[dict], rows: list[dict]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"speed-{slug(meta['device'])}-{meta['date']}.json"
    old_runs, old_rows = [], []
    if path.exists():
        old = json.loads(path.read_text())
        old_runs, old_rows = old.get("runs", []), old.get("rows", [])
    rows = [{**r, "run": r["run"] + len(old_runs)} for r in rows]
    new = {_key(r) for r in rows}
    data = {**meta, "runs": old_runs + runs, "rows": [r for r in old_rows if _key(r) not in new] + rows}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="cases (naive,stage1,make,gen) or rows (stage1/fast)")
    parser.add_argument("--resolution", type=int, default=None, help="training resolution (default 512; tiny 64)")
    parser.add_argument("--gen-resolution", type=int, default=None, help="generation resolution (1024; tiny 64)")
    parser.add_argument("--gen-steps", type=int, default=None, help="denoising steps per image (25; tiny 3)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed training calls per row (3; tiny 1): a step, 10 in -run10"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed training calls per row (5; tiny 1): a step, 10 in -run10"
    )
    parser.add_argument("--gen-warmup", type=int, default=1, help="untimed images per generation row")
    parser.add_argument("--gen-repeats", type=int, default=None, help="timed images per generation row (3; tiny 1)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile rows of the chosen cases")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (default, reduce-overhead, …)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; tiny aot_eager)")
    parser.add_argument(
        "--profile",
        type=lambda text: [r.strip() for r in text.split(",") if r.strip()],
        default=[],
        help="rows to profile after timing (comma-separated ids): one step under torch.profiler, the kernels ranked "
        "by device time in OUT/profile-<row>.txt (profile an eager row: a CUDA graph hides its kernels)",
    )
    parser.add_argument("--matmul-size", type=int, default=None, help="n of the n³ bf16 matmul (8192; tiny 256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a toy UNet at 64 px: checks every code path on a CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for the JSON")
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse --short HEAD)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="only merge these result files into --out")
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = {
        "resolution": 64 if tiny else 512,
        "gen_resolution": 64 if tiny else 1024,
        "gen_steps": 3 if tiny else 25,
        "warmup": 1 if tiny else 3,
        "repeats": 1 if tiny else 5,
        "gen_repeats": 1 if tiny else 3,
        "compile_backend": "aot_eager" if tiny else "inductor",
        "matmul_size": 256 if tiny else 8192,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.merge:
        path = merge_files(args.merge, args.out)
        print(f"merged {len(args.merge)} file(s) into {path}")
        return path
    threads = torch.get_num_threads()
    if args.tiny and args.device == "cpu":
        # One thread: on a small shared machine, OpenMP threads that wait for a descheduled peer made single steps
        # 100x slower at random. The toy's timings mean nothing anyway.
        torch.set_num_threads(1)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, argv: list[str] | None) -> Path:
    rows = select_rows(args.cases, args.compile, args.resolution, high_resolution(args))
    device = torch.device(args.device)
    t_start = time.perf_counter()
    bench = Bench(args)
    name = device_name(device)
    print(f"{name}, torch {torch.__version__}, rows: {', '.join(rows)}", flush=True)
    bench.rate = matmul_rate(device, args.matmul_size, repeats=20 if device.type == "cuda" else 3)
    print(f"  bf16 matmul {args.matmul_size}³: {bench.rate['tflops']:.1f} TFLOP/s", flush=True)
    for row_id in rows:
        case, variant = row_id.split("/", 1)
        getattr(bench, case)(variant)
    import diffusers
    import peft

    report = {
        "device": name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "notes": {
            "step": "training: one optimizer step (4 micro-steps); gen: one denoising step (CFG batch 2)",
            "ms_per_step": "median of the timed repeats, synchronised, after the warm-up calls",
            "peak_gib": "torch.cuda.max_memory_allocated over the timed repeats (reset per row)",
            "peak_reserved_gib": "torch.cuda.max_memory_reserved over them: CUDA graphs' pools included",
            "tflop_per_step": "torch.utils.flop_counter of one eager step (checkpointing: recompute included)",
            "fraction_of_matmul_rate": "achieved TFLOP/s over the run's bf16 matmul rate (runs[row.run].matmul)",
        },
        "run": {
            "commit": args.commit or git_commit(),
            "command": "python bench/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
            "matmul": bench.rate,
            "seconds": round(time.perf_counter() - t_start, 1),
            "settings": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "commit")
            },
            "model": "tiny SDXL-layout UNet" if args.tiny else "SDXL base 1.0 UNet config, random weights",
            "weights": str(bench.dtype).removeprefix("torch."),
            "precision": bench.precision,
        },
        "rows": [r.report(bench.rate["tflops"]) for r in bench.rows],
    }
    print(table(report["rows"]))
    path = write_json(args.out, report)
    print(f"wrote {path} ({report['run']['seconds']} s)")
    return path


if __name__ == "__main__":
    main()
