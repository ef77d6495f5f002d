"""ZipLoRA (Shah et al. 2024): merge two independently trained LoRAs with learned per-column coefficients.

For every adapted linear layer (out ``m``, in ``n``) ZipLoRA learns two merger vectors ``m_c, m_s ∈ R^n`` and uses

    ΔW = ΔWc · diag(m_c) + ΔWs · diag(m_s)        (column j of each ΔW scaled by its coefficient)

fitted so that the merged model reproduces each LoRA on its own data, while the two vectors are pushed apart::

    L = ‖ε_merged(x_c, p_c) − ε_content(x_c, p_c)‖² + ‖ε_merged(x_s, p_s) − ε_style(x_s, p_s)‖²
        + λ · Σ_layers sim(m_c, m_s)

``x_c``, ``x_s`` are noisy latents of the content and style images, ``ε_content`` / ``ε_style`` the predictions of
the base model with only that LoRA (the teachers, no gradient). Both LoRA factors stay as they are (buffers); only
the mergers train, on the one loop of :mod:`b4m.training` through its :class:`~b4m.training.objective.Objective`
hook. Because ``ΔWc · diag(m_c) = Uc · (Dc · diag(m_c))``, the result is exported exactly as a plain LoRA of rank
``rc + rs``: ``up = [Uc, Us]``, ``down = [Dc·diag(m_c); Ds·diag(m_s)]``.

The similarity term ``sim`` (``ZipLoRAConfig.similarity``): the paper's text calls it a cosine similarity, its
eq. 3 writes the absolute dot product ``|m_c · m_s|``.

- ``dot`` (default): ``|m_c · m_s| / n`` per layer, the paper's dot product divided by the layer's width so that
  λ means the same for 320- and 1280-wide layers (at the all-ones init every layer contributes 1).
- ``elementwise``: ``mean_j |m_c,j · m_s,j|``, what the public implementation computes since its PR #12.
- ``cosine``: ``|cos(m_c, m_s)|``, what it computed before. Its gradient is zero whenever ``m_c ∥ m_s``, so from the
  all-ones init the term never acts (issues #9/#10 there); kept only to reproduce that behaviour.

Bugs of the public implementation (mkshing/ziplora-pytorch) avoided here, and how:

1. **Cosine similarity with a vanishing gradient** (issues #9, #10): the default is the dot product (above); a test
   checks that its gradient at the all-ones init is non-zero and the cosine's is zero.
2. **Merger init needing hand-tuning, lr too small to move it** (issues #7, #20; README TODO "investigate initial
   values"): the mergers start at 1 (``init_content``/``init_style``, so step 0 is the direct merge of eq. 3), the
   merge runs at ``lr = 1e-2`` without weight decay (the README's 5e-5 moves an O(1) coefficient by at most
   100 · 5e-5 = 0.005 in its 100 Adam steps, and AdamW's default decay would pull the coefficients towards 0, which
   is not neutral for a coefficient whose neutral value is 1).
3. **Format lock-in** (KeyError on LoRAs that do not adapt exactly q/k/v/out of every attention, hard-coded
   ``unet.unet.`` keys, the LoRA's ``alpha/rank`` ignored when densifying): any :data:`~b4m.lora_files.Factors` merge,
   e.g. from :func:`b4m.lora_files.load_lora` (which folds alpha/rank into ``up``) of diffusers, peft or kohya files; a
   module that only one LoRA adapts keeps that LoRA with its own merger and no similarity term.
4. **Dense ΔW and a custom loader** (the public output is ``unet.*.lora.weight`` dense matrices, ~3.8 GB for SDXL in
   fp32, loadable only with its ``insert_ziplora_to_unet``): the result is exported as a plain rank ``rc + rs`` LoRA
   that reproduces ΔW exactly (tested) and loads with ``pipe.load_lora_weights``; ΔW is never materialised in
   training either (``x·(Dc·diag(m_c))ᵀ·Ucᵀ``).
5. **Breaks on current diffusers** (built on the removed ``set_lora_layer``/``LoRALinearLayer``): the layers here
   wrap ``nn.Linear`` modules directly and work with any module tree.
6. **One noise draw and one timestep shared by the content and the style batch**: every sample has its own noise
   and timestep (the loop draws them per sample); the two teachers run in one batched forward (per-row selection)
   instead of two, so a step costs 2 UNet passes instead of 4.
7. **No resume** (``--resume_from_checkpoint`` raises ``NotImplementedError``): the loop's checkpoints hold the
   mergers and the optimizer, and resuming continues exactly.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter.config import PLPConfig
from ..adapter.layer import LinearAdapter
from ..adapter.walker import set_submodule, wrap_linears
from ..errors import B4MError
from ..lora_files import Factors
from ..models.base import Conditioning, DiffusionModel
from ..training.config import TrainConfig
from ..training.loop import train
from ..training.runs import pair_info
from ..training.sets import TrainSet
from .common import MethodResult, joint_sets, lora_train_config, main_sets, plain_lora
from .direct_merge import lora_stage1

SIMILARITIES = ("dot", "elementwise", "cosine")


def merge_train_config(**overrides) -> TrainConfig:
    """The merge's default settings: 100 steps of one content and one style image (the public script's protocol),
    lr 1e-2, no weight decay (see the module docstring, point 2)."""
    base = dict(
        steps=100, lr=1e-2, weight_decay=0.0, routing="none", grad_accum=1, checkpoint_every=100, max_grad_norm=1.0
    )
    return TrainConfig(**{**base, **overrides})


@dataclass
class ZipLoRAConfig:
    """ZipLoRA's settings: the two stage-1 LoRAs (shared with direct merge) and the merge."""

    lora: PLPConfig = field(default_factory=plain_lora)
    train: TrainConfig = field(default_factory=lora_train_config)
    merge: TrainConfig = field(default_factory=merge_train_config)
    similarity: str = "dot"
    similarity_weight: float = 0.01  # λ; the public implementation's default
    init_content: float = 1.0
    init_style: float = 1.0

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise B4MError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.merge.precondition:
            raise B4MError("the ZipLoRA merge trains merger vectors, not PLP halves: precondition must be false")


# --------------------------------------------------------------------------------------------------------------------
# The layer


class ZipLoRALinear(LinearAdapter):
    """Two LoRAs on one ``nn.Linear`` (kept as ``base_layer``) with per-column merger coefficients.

    ``y = W0·x + Uc·(Dc·diag(m_c))·x + Us·(Ds·diag(m_s))·x``. The factors are buffers; ``merger_content`` and
    ``merger_style`` (length ``n``) are the only parameters. A LoRA that does not adapt this module is a rank-0 pair.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        name: str,
        content: tuple[torch.Tensor, torch.Tensor] | None,
        style: tuple[torch.Tensor, torch.Tensor] | None,
        init_content: float = 1.0,
        init_style: float = 1.0,
    ) -> None:
        super().__init__(base_layer, name)
        m, n = base_layer.out_features, base_layer.in_features
        device = base_layer.weight.device
        for role, pair in (("content", content), ("style", style)):
            up, down = pair if pair is not None else (torch.zeros(m, 0), torch.zeros(0, n))
            if up.shape[0] != m or down.shape[1] != n or up.shape[1] != down.shape[0]:
                raise B4MError(
                    f"{name}: {role} LoRA up {tuple(up.shape)} / down {tuple(down.shape)} does not fit the "
                    f"{n}→{m} layer"
                )
            self.register_buffer(f"{role}_up", up.detach().float().to(device).contiguous())
            self.register_buffer(f"{role}_down", down.detach().float().to(device).contiguous())
        self.merger_content = nn.Parameter(torch.full((n,), float(init_content), device=device))
        self.merger_style = nn.Parameter(torch.full((n,), float(init_style), device=device))
        self.has_both = content is not None and style is not None
        # Set by `teacher_mode`: a bool per batch row, True = the content LoRA alone, False = the style LoRA alone.
        self.teacher: torch.Tensor | None = None

    def _lora(self, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, down), up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.content_down.dtype)
        if self.teacher is not None:
            content = self._lora(x, self.content_up, self.content_down)
            style = self._lora(x, self.style_up, self.style_down)
            mask = self.teacher.view(-1, *([1] * (x.ndim - 1)))
            delta = torch.where(mask, content, style)
        else:
            delta = self._lora(x, self.content_up, self.content_down * self.merger_content) + self._lora(
                x, self.style_up, self.style_down * self.merger_style
            )
        return y + delta.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = ΔWc·diag(m_c) + ΔWs·diag(m_s) (m × n)."""
        return (self.content_up @ self.content_down) * self.merger_content + (
            self.style_up @ self.style_down
        ) * self.merger_style

    @torch.no_grad()
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain LoRA factors of rank ``rc + rs`` with ``up @ down = ΔW``, float32 on the CPU."""
        up = torch.cat([self.content_up, self.style_up], dim=1)
        down = torch.cat([self.content_down * self.merger_content, self.style_down * self.merger_style], dim=0)
        return up.float().cpu().contiguous(), down.float().cpu().contiguous()

    def extra_repr(self) -> str:
        rc, rs = self.content_down.shape[0], self.style_down.shape[0]
        return f"in={self.in_features}, out={self.out_features}, rank_content={rc}, rank_style={rs}"


def add_ziplora(
    denoiser: nn.Module,
    content: Factors,
    style: Factors,
    *,
    init_content: float = 1.0,
    init_style: float = 1.0,
) -> dict[str, ZipLoRALinear]:
    """Wrap every module either LoRA adapts in a :class:`ZipLoRALinear`; the base model's parameters are frozen."""
    names = sorted(set(content) | set(style))
    if not names:
        raise B4MError("ZipLoRA needs two LoRAs; both are empty")

    def make(linear: nn.Linear, name: str) -> ZipLoRALinear:
        return ZipLoRALinear(linear, name, content.get(name), style.get(name), init_content, init_style)

    return wrap_linears(denoiser, names, make)


def ziplora_layers(denoiser: nn.Module) -> dict[str, ZipLoRALinear]:
    return {m.name: m for m in denoiser.modules() if isinstance(m, ZipLoRALinear)}


def remove_ziplora(denoiser: nn.Module) -> None:
    """Put the original linear layers back."""
    for name, layer in ziplora_layers(denoiser).items():
        set_submodule(denoiser, name, layer.base_layer)


def merged_factors(layers: dict[str, ZipLoRALinear]) -> Factors:
    """The merged adapter as plain LoRA factors (rank ``rc + rs`` per module)."""
    return {name: layer.factors() for name, layer in layers.items()}


def mergers(layers: dict[str, ZipLoRALinear]) -> dict[str, torch.Tensor]:
    """``{"<module>.merger_content": m_c, "<module>.merger_style": m_s}`` (detached float32 CPU copies)."""
    out = {}
    for name, layer in layers.items():
        out[f"{name}.merger_content"] = layer.merger_content.detach().float().cpu().clone()
        out[f"{name}.merger_style"] = layer.merger_style.detach().float().cpu().clone()
    return out


@torch.no_grad()
def load_mergers(layers: dict[str, ZipLoRALinear], state: dict[str, torch.Tensor]) -> None:
    for name, layer in layers.items():
        layer.merger_content.copy_(state[f"{name}.merger_content"])
        layer.merger_style.copy_(state[f"{name}.merger_style"])


@contextlib.contextmanager
def teacher_mode(layers: dict[str, ZipLoRALinear], content_rows: torch.Tensor) -> Iterator[None]:
    """Inside the block, row ``i`` of every batch runs with the content LoRA alone if ``content_rows[i]``, else with
    the style LoRA alone (unmerged, no mergers): both teachers in one forward."""
    for layer in layers.values():
        layer.teacher = content_rows
    try:
        yield
    finally:
        for layer in layers.values():
            layer.teacher = None


def similarity(layers: dict[str, ZipLoRALinear], kind: str = "dot") -> torch.Tensor:
    """``Σ_layers sim(m_c, m_s)`` over the layers both LoRAs adapt (see the module docstring for ``kind``)."""
    if kind not in SIMILARITIES:
        raise B4MError(f"similarity must be one of {SIMILARITIES}, got {kind!r}")
    terms = []
    for layer in layers.values():
        if not layer.has_both:
            continue
        mc, ms = layer.merger_content, layer.merger_style
        if kind == "dot":
            terms.append((mc * ms).sum().abs() / mc.numel())
        elif kind == "elementwise":
            terms.append((mc * ms).abs().mean())
        else:
            terms.append(F.cosine_similarity(mc, ms, dim=0).abs())
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


class ZipLoRAObjective:
    """The merge as a :class:`~b4m.training.objective.Objective`: mergers train; each row's target is its teacher's
    prediction."""

    def __init__(
        self, layers: dict[str, ZipLoRALinear], content_sources: set[int], kind: str = "dot", weight: float = 0.01
    ) -> None:
        self.layers = layers
        self.content_sources = set(content_sources)
        self.kind = kind
        self.weight = float(weight)
        self.name = f"ziplora(similarity={kind}, weight={self.weight})"

    def param_groups(self, config: TrainConfig) -> list[dict]:
        params = [p for layer in self.layers.values() for p in (layer.merger_content, layer.merger_style)]
        return [{"params": params, "lr": config.lr}]

    def target(
        self, model: DiffusionModel, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, sources
    ) -> torch.Tensor:
        rows = torch.tensor([s in self.content_sources for s in sources], device=noisy.device)
        with teacher_mode(self.layers, rows):
            return model.predict(noisy, timesteps, cond)

    def penalty(self) -> torch.Tensor:
        return self.weight * similarity(self.layers, self.kind)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return mergers(self.layers)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_mergers(self.layers, state)


# --------------------------------------------------------------------------------------------------------------------
# The method


def ziplora_merge(
    model: DiffusionModel,
    content: Factors,
    style: Factors,
    content_sets: Sequence[TrainSet],
    style_sets: Sequence[TrainSet],
    config: ZipLoRAConfig,
    out: str | Path,
    *,
    resume: bool = False,
):
    """Learn the mergers of two LoRAs on the content and style main sets; the model is left as it was given.

    Returns ``(factors, mergers, train_result)``: the merged adapter as rank ``rc + rs`` factors, the merger
    vectors by ``"<module>.merger_content"`` / ``".merger_style"``, and the loop's result (``None`` for 0 steps).
    """
    layers = add_ziplora(
        model.denoiser, content, style, init_content=config.init_content, init_style=config.init_style
    )
    try:
        sets = joint_sets(content_sets, style_sets)
        content_rows = set(range(len(main_sets(content_sets))))  # joint_sets: the content's sets come first
        objective = ZipLoRAObjective(layers, content_rows, config.similarity, config.similarity_weight)
        result = None
        if config.merge.steps > 0:
            merge = config.merge
            result = train(model, None, sets, merge, Path(out), role="fused", resume=resume, objective=objective)
        return merged_factors(layers), mergers(layers), result
    finally:
        remove_ziplora(model.denoiser)


def run(
    content_sets: Sequence[TrainSet],
    style_sets: Sequence[TrainSet],
    model: DiffusionModel,
    config: ZipLoRAConfig,
    out: str | Path,
    cache: dict | None = None,
) -> MethodResult:
    t0 = time.perf_counter()
    content, c_reused = lora_stage1("content", content_sets, model, config.lora, config.train, out, cache)
    style, s_reused = lora_stage1("style", style_sets, model, config.lora, config.train, out, cache)
    t1 = time.perf_counter()
    factors, merger_state, result = ziplora_merge(
        model,
        content.adapter.factors(),
        style.adapter.factors(),
        content_sets,
        style_sets,
        config,
        Path(out) / "ziplora-merge",
    )
    merge = {
        "seconds": round(time.perf_counter() - t1, 3),
        "steps": result.steps if result else 0,
        "images": result.images if result else 0,
        "final_loss": result.final_loss if result else None,
        "losses": result.losses if result else [],
    }
    info = pair_info(config, t0, (content, c_reused), (style, s_reused), merge=merge)
    parts = {"content": content.adapter, "style": style.adapter, "mergers": merger_state}
    return MethodResult("ziplora", factors, info, parts=parts)
