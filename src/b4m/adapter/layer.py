"""``PLPLinear``: the Partly Learnable Projection (PLP) adapter of one linear layer (paper section 4.1).

A PLP adapter on a linear layer ``W0`` (out ``m``, in ``n``) adds ``ΔW = W_up · W_down`` with rank ``r``::

    W_up   = [A; B]    (m × r)   rows [0, d_out) are A (frozen), rows [d_out, m) are B (learned)
    W_down = [C, D]    (r × n)   cols [0, d_in)  are C (frozen), cols [d_in, n)  are D (learned)

    ΔW = [[A·C, A·D],
          [B·C, B·D]]

with ``d_out = floor(ratio·m)`` and ``d_in = floor(ratio·n)``. ``A`` and ``C`` are buffers, not parameters, so no
optimizer (weight decay included) can ever move them. ``B`` and ``D`` start at zero (unless
:attr:`PLPConfig.learned_init` says otherwise: :mod:`b4m.adapter.init`). Which learned half holds the content and
which the style is a setting (:attr:`PLPConfig.assignment`): ``paper`` gives content to ``B`` (the up projection,
eq. 14) and style to ``D`` (the down projection, eq. 13); ``official`` is the swap in the authors' code.

The tensors are named for what they are, as in peft: ``up_frozen`` (the paper's A), ``up_learned`` (B),
``down_frozen`` (C), ``down_learned`` (D). Note that the exported ``lora_A.weight`` of a plain LoRA file is the
*down* projection (peft's naming), not the paper's A.

Forward: training runs one autograd node for the whole adapter and its add (:mod:`b4m.adapter.lowrank`; the base
layer's GEMM inside it too where the base is a plain frozen ``nn.Linear``), so ΔW is
never materialised; sampling (no grad) adds two skinny matmuls to the base layer's output and keeps no copy of the
base weight (:meth:`PLPLinear._infer`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..device import is_plain
from ..errors import B4MError
from .config import PLPConfig
from .init import frozen_rng, learned_rng, make_frozen, make_learned_down
from .lowrank import autocast_input, linear_low_rank, low_rank_add, runs_fused


@torch.no_grad()
def add_to_weight(weight: torch.Tensor, delta: torch.Tensor, what: str) -> None:
    """``weight += delta``, summed in float32 and written back in the weight's dtype; a non-finite result is
    refused (nothing is changed) with an error naming ``what``, and so is a weight stored otherwise than as a plain
    tensor (8-bit: ΔW would be rounded to 8 bits; sample with the adapter unmerged). The one merge every path uses."""
    if not is_plain(weight):
        raise B4MError(f"{what}: the base weight is stored as {type(weight).__name__} (8-bit); not merged")
    merged = weight.float() + delta.float().to(weight.device).reshape(weight.shape)
    if not torch.isfinite(merged).all():
        raise B4MError(f"{what}: merging the adapter gives non-finite weights; not merged")
    weight.copy_(merged.to(weight.dtype))


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _at_least_fp32(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` (``old`` moved or cast), unless the cast rounded a wider float to half precision: then ``old`` on
    ``new``'s device."""
    if new.dtype in _HALF_DTYPES and old.is_floating_point() and old.dtype not in _HALF_DTYPES:
        return old.to(new.device)
    return new


class LinearAdapter(nn.Module):
    """What an adapter of one linear layer is: a module that wraps the layer (kept as ``base_layer``, peft's name)
    under the layer's module name, and answers for its shape."""

    def __init__(self, base_layer: nn.Linear, name: str) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise B4MError(f"{name}: {type(self).__name__} adapts nn.Linear only, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.name = name

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features


class PLPLinear(LinearAdapter):
    """A PLP adapter around one ``nn.Linear`` (kept as ``base_layer``, never modified unless merged).

    The adapter's own tensors stay float32 when the model is cast to half precision (:meth:`_apply`, peft's
    ``autocast_adapter_dtype``); under autocast the low-rank product runs in the autocast dtype.
    """

    def __init__(self, base_layer: nn.Linear, config: PLPConfig, name: str) -> None:
        super().__init__(base_layer, name)
        self.rank = config.rank
        m, n = base_layer.out_features, base_layer.in_features
        self.d_out, self.d_in = config.frozen_dims(m, n)
        if config.ratio > 0 and (self.d_out == 0 or self.d_in == 0):
            raise B4MError(f"{name}: ratio {config.ratio} leaves no frozen rows/columns for a {m}×{n} layer")
        a, c = make_frozen(config.init, config.rank, self.d_out, self.d_in, frozen_rng(config.seed, name))
        d = make_learned_down(config.learned_init, n, config.rank, self.d_in, learned_rng(config.seed, name))
        device = base_layer.weight.device
        a, c, d = (torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32)).to(device) for t in (a, c, d))
        self.register_buffer("up_frozen", a)  # A: d_out × r
        self.register_buffer("down_frozen", c)  # C: r × d_in
        self.up_learned = nn.Parameter(torch.zeros(m - self.d_out, config.rank, device=device))  # B
        self.down_learned = nn.Parameter(d)  # D
        # Multipliers of the learned halves and of the whole ΔW (generation-time knobs, not saved).
        self.up_scale = 1.0
        self.down_scale = 1.0
        self.scale = 1.0
        self.merged = False
        # Set by the trainer (see `b4m.adapter.walker.routing`): (k, owned) = the first k samples of the batch
        # train only the `owned` half ("up" or "down"), the others only the other half.
        self.route: tuple[int, str] | None = None

    def up(self) -> torch.Tensor:
        """W_up = [A; up_scale·B] (m × r)."""
        b = self.up_learned if self.up_scale == 1.0 else self.up_learned * self.up_scale
        return torch.cat([self.up_frozen, b], dim=0)

    def down(self) -> torch.Tensor:
        """W_down = [C, down_scale·D] (r × n)."""
        d = self.down_learned if self.down_scale == 1.0 else self.down_learned * self.down_scale
        return torch.cat([self.down_frozen, d], dim=1)

    def _scaled_up(self) -> torch.Tensor:
        """scale · W_up (what the no-grad paths multiply by)."""
        return self.up() * self.scale if self.scale != 1.0 else self.up()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · W_up · W_down (m × n), in the adapter's dtype."""
        return self.scale * (self.up() @ self.down())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            self._drop_cache()  # factors this layer no longer uses
            return self.base_layer(x)
        if not torch.is_grad_enabled():
            return self._infer(x)
        self._drop_cache()  # training moves B and D: the cast factors would be stale anyway
        # One autograd node for the whole adapter and its add (b4m.adapter.lowrank); ΔW is never materialised.
        x = autocast_input(x)
        adapter = (self.up_frozen, self.up_learned, self.down_frozen, self.down_learned)
        knobs = (self.up_scale, self.down_scale, self.scale, self.route)
        base = self.base_layer
        if runs_fused(base, x, self.up_learned.dtype):  # a plain frozen nn.Linear: its GEMM inside the same node
            return linear_low_rank(x, base.weight, base.bias, *adapter, *knobs)
        y = base(x.reshape(-1, x.shape[-1]))  # 2-D: the adapter adds into it in place
        return low_rank_add(y, x, *adapter, *knobs)

    # -- sampling ---------------------------------------------------------------------------------------------------

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        """The no-grad forward: the base layer as it is (hooked, offloaded, 8-bit or compiled alike), then
        ``y += (x · W_downᵀ) · (scale · W_up)ᵀ`` in the output's dtype: two skinny matmuls, the add fused into the
        second. Only the cast factors are cached (``(m + n) · r`` numbers a layer), until a factor or a scale changes
        (data pointers, versions, scales); never a copy of the base weight: the stacked ``[W0; W_down]`` GEMM that this
        replaced saved one skinny matmul a layer but kept a copy of every adapted weight while sampling unmerged
        (1.9 GiB on SDXL, 11.0 GiB on FLUX.1-dev; docs/benchmarks.md). Inside torch.compile nothing is cached (the
        compiler folds the casts into the graph)."""
        y = self.base_layer(x)
        if torch.compiler.is_compiling():
            h = F.linear(x.to(y.dtype), self.down().to(y.dtype))
            return y + F.linear(h, self._scaled_up().to(y.dtype))
        key = (
            y.dtype,
            y.device,
            self.scale,
            self.up_scale,
            self.down_scale,
            *(
                (t.data_ptr(), t._version)
                for t in (self.up_frozen, self.up_learned, self.down_frozen, self.down_learned)
            ),
        )
        if getattr(self, "_factor_cache", (None,))[0] != key:
            up = self._scaled_up().to(y.dtype)
            self._factor_cache = (key, up.T.contiguous(), self.down().to(y.dtype))
        _, up_t, down = self._factor_cache
        h = F.linear(x.to(y.dtype), down)
        return y.reshape(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up_t).view(y.shape)

    def _drop_cache(self) -> None:
        """Free the sampling cache (the cast factors). Not inside torch.compile, where a ``__dict__`` pop breaks the
        graph: a stale cache only holds memory, since every use checks its key first."""
        if not torch.compiler.is_compiling():
            self.__dict__.pop("_factor_cache", None)

    # -- merging ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the base weight (sampling then costs what the base layer costs). A non-finite result is
        refused; merging a merged layer warns and does nothing."""
        if self.merged:
            warnings.warn(f"{self.name}: the adapter is already merged", stacklevel=2)
            return
        add_to_weight(self.base_layer.weight, self.delta_weight(), self.name)
        self.merged = True
        self._drop_cache()  # merged sampling needs no factors

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW again, recomputed from the factors (as peft does: no copy of ΔW is kept while merged), so the
        base weight comes back up to the rounding of its dtype."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight().float()).to(w.dtype))
        self.merged = False

    # -- placement --------------------------------------------------------------------------------------------------

    def _apply(self, fn, recurse: bool = True):
        """``module.to(...)``, ``.half()``, ``.cuda()`` …: the base layer follows ``fn``; the adapter's own tensors
        follow every move and every cast except one that would round them below float32, so casting a model to bf16
        for training or inference leaves its adapters in float32 (peft's ``autocast_adapter_dtype``). Parameters
        are changed in place (``.data``), so optimizers keep their references."""
        if recurse:
            self.base_layer._apply(fn)
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = _at_least_fp32(buf, fn(buf))
        for param in self._parameters.values():
            if param is not None:
                param.data = _at_least_fp32(param.data, fn(param.data))
                if param.grad is not None:
                    param.grad = _at_least_fp32(param.grad, fn(param.grad))
        return self

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, d_out={self.d_out}, d_in={self.d_in}"
        )
