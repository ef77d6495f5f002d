"""K-LoRA (Ouyang, Li, Hou, CVPR 2025, arXiv 2502.18461): a content LoRA and a style LoRA fused without training, by
choosing one of them per layer and per sampling step. Torch only; testable on ``nn.Linear``.

Per layer that both LoRAs adapt, with ``ΔWc = Uc·Dc`` and ``ΔWs = Us·Ds`` (every scale folded into ``U``)::

    Sc = Σ Top-K(|ΔWc|),   Ss = Σ Top-K(|ΔWs|)      the sums of the K largest absolute entries
    content  if  Sc / γ  >  Ss · S(f),  else style    the layer then adds that LoRA's ΔW alone

``f`` is the fraction of the sampling done when a step begins: ``f = i / N`` at step ``i`` of ``N`` (0 at the first,
noisiest step), which the sampler announces (:mod:`b4m.models.steps`; :meth:`KLoRA.begin_step`).

Constants, and where each comes from (paper: the method section; code: github.com/HVision-NKU/K-LoRA, ``klora.py``,
``utils.py``, ``inference_sd.py``, ``inference_gradio.py``):

- **K = rc·rs**, the product of the two LoRAs' ranks at that layer: the public code (``k = rank_1 · rank_2``, commit
  1adb7d0 "Correct the accuracy of k"; before it K was 64, i.e. 8·8 for the rank-8 LoRAs its README trains), capped
  at the layer's size. :attr:`KLoRASettings.top_k` overrides it (ours).
- **S(f)**, schedule ``"s"`` (our default): ``S = α·f + β`` with ``α = 1.5``, ``β = 0.5``, the paper's scaling
  factor with the public scripts' values (``inference_gradio.py``; ``inference_sd.py`` with pattern ``s``). It grows
  over sampling, so the content LoRA wins more layers early (high noise, where layout and subject form) and the
  style LoRA more late (detail and texture).
- schedule ``"s*"``: ``S = (α·f + β) mod α`` with ``β = 0.85·α``: the README's "another scale s*" from the
  supplementary (``inference_sd.py``'s default pattern). It starts near ``α``, drops to 0 at ``f = 0.15`` and grows
  again; the README recommends it for more style, ``s`` for more texture detail.
- **γ**, the balance: per layer both adapt, ``Σ|ΔWc| / Σ|ΔWs|`` (all entries, not the Top-K); the mean over layers,
  then the mean again without the layers at or above 3× that mean (``get_ratio_between_content_and_style``).
  A content LoRA twice as strong overall gets its scores halved. :attr:`KLoRASettings.gamma` fixes it instead.
- A tie goes to the style LoRA (the public code takes content when ``(Sc/γ) / (Ss·S) > 1``).

Ours, on purpose:

- **The step fraction comes from the sampler.** The public code counts calls of its LoRA layers modulo a constant
  (``sum_timesteps = 28000`` = 50 steps × 560 layers of SDXL), which is right only for SDXL at 50 steps with batched
  guidance, and which also drifts within a step (a layer late in the UNet sees a later ``f`` than an early one).
  Here every layer of step ``i`` sees ``f = i / N``, for any model, step count and sampler. We take the step index,
  not ``1 − t / num_train_timesteps``: the index is what the public count measures (calls so far / calls in 50
  steps), and a timestep depends on the sampler's spacing (DDIM's "leading" spacing starts 10 steps at t = 900, so
  the first step would already be f = 0.1), so the same α and β would mean different things on different samplers.
- The scores do not depend on the step, so they are computed once when the layers are attached; each step only
  compares them with the moving threshold. (The public code recomputes ΔW and its Top-K at every call: the same
  choices.)
- Every layer either LoRA adapts is wrapped (linear layers and 1×1 convolutions), not only the attention's
  ``to_q``/``to_k``/``to_v``/``to_out.0``; a layer that only one LoRA adapts adds that LoRA at every step.
- γ pairs layers by module name (the public code pairs them by their position in the two files).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import B4MError
from .walker import set_submodule

SCHEDULES = ("s", "s*")
Pair = tuple[torch.Tensor, torch.Tensor]  # (up m×r, down r×n)


@dataclass
class KLoRASettings:
    """K-LoRA's constants (see the module docstring for where each comes from).

    ``schedule``: ``"s"`` (``S = α·f + β``) or ``"s*"`` (``S = (α·f + β) mod α``). ``alpha``: α. ``beta``: β, or
    None for the schedule's own (0.5 for ``s``, 0.85·α for ``s*``). ``top_k``: K, or None for ``rc·rs`` per layer.
    ``gamma``: γ, or None to compute it from the two LoRAs.
    """

    schedule: str = "s"
    alpha: float = 1.5
    beta: float | None = None
    top_k: int | None = None
    gamma: float | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise B4MError(f"K-LoRA schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not self.alpha > 0:
            raise B4MError(f"K-LoRA alpha must be above 0, got {self.alpha}")
        if self.beta is not None and self.beta < 0:
            raise B4MError(f"K-LoRA beta must be at least 0, got {self.beta}")
        if self.top_k is not None and self.top_k < 1:
            raise B4MError(f"K-LoRA top_k must be at least 1, got {self.top_k}")
        if self.gamma is not None and not self.gamma > 0:
            raise B4MError(f"K-LoRA gamma must be above 0, got {self.gamma}")

    @property
    def beta_value(self) -> float:
        if self.beta is not None:
            return self.beta
        return 0.5 if self.schedule == "s" else 0.85 * self.alpha


def style_factor(fraction: float, settings: KLoRASettings) -> float:
    """``S(f)``, the factor of the style LoRA's score at sampling fraction ``f`` in [0, 1)."""
    s = settings.alpha * fraction + settings.beta_value
    return s % settings.alpha if settings.schedule == "s*" else s


def topk_sum(delta: torch.Tensor, k: int) -> float:
    """The sum of the ``k`` largest absolute entries of ``delta`` (all of them where it has fewer)."""
    flat = delta.detach().abs().flatten()
    return float(torch.topk(flat, min(k, flat.numel())).values.sum()) if flat.numel() else 0.0


def balance(sums: Iterable[tuple[float, float]], outlier: float = 3.0) -> float:
    """γ from each shared layer's ``(Σ|ΔWc|, Σ|ΔWs|)``: the mean of the ratios, then the mean of those below
    ``outlier`` × that mean (the public code's rule). Layers whose style ΔW is zero have no ratio; with no ratio at
    all, γ = 1."""
    ratios = [c / s for c, s in sums if s > 0]
    if not ratios:
        return 1.0
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < outlier * mean]
    return sum(kept) / len(kept) if kept else mean


def _features(layer: nn.Module, name: str) -> tuple[int, int]:
    """``(out, in)`` of an ``nn.Linear`` or a 1×1 ``nn.Conv2d``; an error naming the module for anything else."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1:
        return layer.out_channels, layer.in_channels
    raise B4MError(
        f"module {name} is a {type(layer).__name__}, not a linear layer or 1×1 convolution: K-LoRA wraps none"
    )


class KLoRALinear(nn.Module):
    """A linear layer (or 1×1 convolution, kept as ``base_layer``) with a content and a style LoRA, one on at a time.

    ``y = base(x) + U·(mask ⊙ D·x)`` with ``U = [Uc, Us]`` and ``D = [Dc; Ds]``: ``mask`` is 1 on the rank of the
    chosen LoRA and 0 on the other's, so ``y = base(x) + ΔWc·x`` or ``base(x) + ΔWs·x``. The mask is a buffer changed
    in place (:meth:`choose`), so a CUDA graph of the denoiser captured once (:mod:`b4m.cuda_graphs`) follows every
    choice. A LoRA that does not adapt the layer is a rank-0 pair, and the other one is on at every step.
    """

    def __init__(
        self, base_layer: nn.Module, name: str, content: Pair | None, style: Pair | None, top_k: int | None = None
    ) -> None:
        super().__init__()
        m, n = _features(base_layer, name)
        self.base_layer, self.name = base_layer, name
        device = base_layer.weight.device
        parts = []
        for role, pair in (("content", content), ("style", style)):
            up, down = pair if pair is not None else (torch.zeros(m, 0), torch.zeros(0, n))
            if up.ndim != 2 or down.ndim != 2 or up.shape != (m, down.shape[0]) or down.shape[1] != n:
                raise B4MError(
                    f"{name}: {role} LoRA up {tuple(up.shape)} / down {tuple(down.shape)} does not fit the "
                    f"{n}→{m} layer"
                )
            parts.append((up.detach().float().to(device), down.detach().float().to(device)))
        (uc, dc), (us, ds) = parts
        self.rank_content, self.rank_style = dc.shape[0], ds.shape[0]
        self.register_buffer("up", torch.cat([uc, us], dim=1).contiguous(), persistent=False)
        self.register_buffer("down", torch.cat([dc, ds], dim=0).contiguous(), persistent=False)
        ones_c, ones_s = torch.ones(self.rank_content, device=device), torch.ones(self.rank_style, device=device)
        self.register_buffer("mask_content", torch.cat([ones_c, 0 * ones_s]), persistent=False)
        self.register_buffer("mask_style", torch.cat([0 * ones_c, ones_s]), persistent=False)
        self.register_buffer("mask", torch.zeros_like(self.mask_content), persistent=False)
        self.fixed = None if content is not None and style is not None else ("style" if content is None else "content")
        self.choice: str | None = None  # set by choose(); None until the sampler announced a step
        # Scores (Sc, Ss) and the balance sums (Σ|ΔWc|, Σ|ΔWs|): constant, so computed once.
        self.scores = self.sums = (0.0, 0.0)
        if self.fixed is None:
            with torch.no_grad():
                delta_c, delta_s = uc @ dc, us @ ds
                k = top_k or self.rank_content * self.rank_style
                self.scores = (topk_sum(delta_c, k), topk_sum(delta_s, k))
                self.sums = (float(delta_c.abs().sum()), float(delta_s.abs().sum()))

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    def prefers_content(self, gamma: float, factor: float) -> bool:
        """``Sc / γ > Ss · S`` (written as ``Sc > γ·Ss·S``, so γ = 0 or Ss = 0 divide nothing); fixed where only one
        LoRA adapts the layer."""
        if self.fixed is not None:
            return self.fixed == "content"
        return self.scores[0] > gamma * self.scores[1] * factor

    @torch.no_grad()
    def choose(self, content: bool) -> None:
        choice = "content" if content else "style"
        if choice != self.choice:
            self.mask.copy_(self.mask_content if content else self.mask_style)
            self.choice = choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.choice is None:
            raise B4MError(
                f"{self.name}: K-LoRA has no sampling step yet (the sampler announces its steps: b4m.models.steps; "
                "or call KLoRA.begin_step)"
            )
        y = self.base_layer(x)
        h = x.movedim(1, -1) if self.is_conv else x
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.down.dtype)
        delta = F.linear(F.linear(h, self.down) * self.mask, self.up)
        if self.is_conv:
            delta = delta.movedim(-1, 1)
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank_content={self.rank_content}, rank_style={self.rank_style}, choice={self.choice}"


class KLoRA:
    """The K-LoRA layers of one model and their settings; :meth:`begin_step` makes every layer choose for a step."""

    def __init__(self, layers: Mapping[str, KLoRALinear], settings: KLoRASettings) -> None:
        self.layers = dict(layers)
        self.settings = settings
        shared = [layer.sums for layer in self.layers.values() if layer.fixed is None]
        self.gamma = settings.gamma if settings.gamma is not None else balance(shared)
        self.fraction: float | None = None

    def begin_step(self, index: int, steps: int) -> None:
        """Step ``index`` (0-based) of ``steps`` begins: choose at ``f = index / steps``."""
        if steps < 1 or not 0 <= index < steps:
            raise B4MError(f"K-LoRA: step {index} of {steps} is not a sampling step")
        self.set_fraction(index / steps)

    def set_fraction(self, fraction: float) -> None:
        """Every layer takes the LoRA that wins at sampling fraction ``fraction``."""
        s = style_factor(fraction, self.settings)
        for layer in self.layers.values():
            layer.choose(layer.prefers_content(self.gamma, s))
        self.fraction = fraction

    def choices(self) -> dict[str, str]:
        """``{module: "content" | "style"}`` as chosen for the current step."""
        return {name: layer.choice for name, layer in self.layers.items()}


def add_klora(
    model: nn.Module, content: Mapping[str, Pair], style: Mapping[str, Pair], settings: KLoRASettings | None = None
) -> KLoRA:
    """Wrap every module either LoRA adapts (``{module: (up, down)}``, scales folded in) in a :class:`KLoRALinear`.

    Every module is checked before anything changes; the base model's weights are never touched.
    """
    settings = settings or KLoRASettings()
    names = sorted(set(content) | set(style))
    if not names:
        raise B4MError("K-LoRA needs two LoRAs; both are empty")
    found = {}
    for name in names:
        try:
            found[name] = model.get_submodule(name)
        except AttributeError:
            raise B4MError(f"module {name} does not exist in the model (a LoRA of another base model?)") from None
        _features(found[name], name)
    layers = {n: KLoRALinear(m, n, content.get(n), style.get(n), settings.top_k) for n, m in found.items()}
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    return KLoRA(layers, settings)


def klora_layers(model: nn.Module) -> dict[str, KLoRALinear]:
    return {m.name: m for m in model.modules() if isinstance(m, KLoRALinear)}


def remove_klora(model: nn.Module) -> None:
    """Put the original layers back."""
    for name, layer in klora_layers(model).items():
        set_submodule(model, name, layer.base_layer)


@contextlib.contextmanager
def klora_attached(
    model: nn.Module, content: Mapping[str, Pair], style: Mapping[str, Pair], settings: KLoRASettings | None = None
) -> Iterator[KLoRA]:
    """:func:`add_klora` for the duration of the block, :func:`remove_klora` after."""
    klora = add_klora(model, content, style, settings)
    try:
        yield klora
    finally:
        remove_klora(model)
