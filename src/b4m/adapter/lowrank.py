"""The PLP product ``(x · W_downᵀ) · W_upᵀ`` as one autograd node, with optional per-sample gradient routing.

One node instead of five (two concatenations, two matmuls and a scale) keeps the per-layer Python and autograd
overhead low, which dominates SDXL training at small batches (docs/benchmarks.md). Routing is free: the backward
pass sums the learned halves' weight gradients over a subset of the batch instead of running two half-batch paths.

Backward, with ``g`` the gradient of the output, ``h = x · W_downᵀ`` (saved, only ``r`` wide)::

    g_h = g · W_up          g_x = g_h · W_down
    g_B = up_scale · Σ_rows(B)  g[:, d_out:]ᵀ · h        (rows of the batch that train B)
    g_D = down_scale · Σ_rows(D) g_hᵀ · x[:, d_in:]      (rows of the batch that train D)

:class:`LowRankAdd` is the training node :class:`~b4m.adapter.layer.PLPLinear` uses: the same product times
``scale``, added to the base layer's output ``y`` inside the second matmul (``addmm_``), so the add costs no kernel
of its own. Its backward passes ``g`` on to ``y`` and runs the formulas above with ``scale · g`` (the ``scale`` folded
into ``W_up`` and the weight-gradient multipliers, small tensors, rather than into ``g``).

:func:`linear_low_rank` also takes the base layer into the node, where it is a plain frozen ``nn.Linear``
(:func:`fusable_base`): ``y = x · W0ᵀ (+ bias)`` is computed inside, and the input's gradient comes from one GEMM,
``g_x = g · W0`` with ``g_h · W_down`` added in its epilogue (``addmm_``), where autograd would run the base layer's
GEMM and the adapter's as two nodes and add their results with an elementwise kernel over the activations. The
forward is the same computation; the input's gradient is rounded once instead of twice (in bf16: not bit for bit
the separate nodes'). Off by default: measured on an H100, its gain was within the step's spread (docs/benchmarks.md,
"Two changes to the stage-1 step"); :data:`fused_base` turns it on.

:func:`autocast_input` gives the base layer and the adapter one cast of an autocast input, shared by the layers fed
the very same tensor (``to_q``, ``to_k`` and ``to_v`` read one LayerNorm output).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from ..device import is_plain
from ..switch import Switch

#: ``torch.mm(a, b, out_dtype=torch.float32)`` exists (torch >= 2.8; CUDA, fp16/bf16 inputs): the learned halves'
#: gradients then come out of the GEMM in fp32, without a bf16 result and a cast kernel.
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def _factors(a, b, c, d, up_scale: float, down_scale: float, dtype: torch.dtype):
    """``W_up = [A; s_u·B]`` (m × r) and ``W_down = [C, s_d·D]`` (r × n) in ``dtype``."""
    up = torch.cat([a, b * up_scale if up_scale != 1.0 else b], dim=0).to(dtype)
    down = torch.cat([c, d * down_scale if down_scale != 1.0 else d], dim=1).to(dtype)
    return up, down


def _compute_dtype(x: torch.Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight_dtype


def _low_rank_h(x, a, b, c, d, up_scale: float, down_scale: float, dtype: torch.dtype):
    """The factors in ``dtype``, ``x`` flattened to 2-D in ``dtype`` and ``h = x · W_downᵀ`` (rows × r)."""
    up, down = _factors(a, b, c, d, up_scale, down_scale, dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    return up, down, x2, x2 @ down.T


def _save(ctx, x, x2, a, b, c, d, up_scale: float, down_scale: float, scale: float, route) -> None:
    """What both nodes' backward needs besides the saved tensors: shapes, dtypes, scales and the routing."""
    per_sample = x2.shape[0] // max(x.shape[0], 1) if x.dim() > 1 else 1  # rows of one sample (its tokens)
    ctx.meta = (x.shape, x.dtype, b.dtype, d.dtype, a.shape[0], c.shape[1], up_scale, down_scale, scale)
    ctx.route = route, per_sample


def _backward(ctx, g, x2, h, up, down, need_x: bool, need_b: bool, need_d: bool, base_weight=None):
    """The gradients of ``x``, ``B`` and ``D`` for the output's gradient ``g`` (formulas in the module docstring);
    with ``base_weight`` (``W0`` in the compute dtype) ``x``'s includes the base layer's: ``g · W0 + g_h · W_down``,
    the second product added in the first's epilogue."""
    x_shape, x_dtype, b_dtype, d_dtype, d_out, d_in, up_scale, down_scale, scale = ctx.meta
    with torch.autocast(g.device.type, enabled=False):
        g = g.to(up.dtype)
        g_h = g @ (up * scale if scale != 1.0 else up)  # the gradient of h for scale · g: rows × r
        g_x = g_b = g_d = None
        if need_x:
            g_x = g_h @ down if base_weight is None else (g @ base_weight).addmm_(g_h, down)
            g_x = g_x.to(x_dtype).reshape(x_shape)
        rows_b, rows_d = _rows(*ctx.route)
        if need_b:
            g_b = _weight_grad(g[rows_b, d_out:].T, h[rows_b], b_dtype, up_scale * scale)
        if need_d:
            g_d = _weight_grad(g_h[rows_d].T, x2[rows_d, d_in:], d_dtype, down_scale)
    return g_x, g_b, g_d


class LowRankAdd(torch.autograd.Function):
    """``y + scale · (x · [C, s_d·D]ᵀ) · [A; s_u·B]ᵀ`` with ``y`` 2-D ``(rows, m)``, in place on ``y`` where its dtype
    is the compute dtype (see :func:`low_rank_add`); gradients for ``y``, ``x``, ``B`` and ``D``."""

    @staticmethod
    def forward(ctx, y, x, a, b, c, d, up_scale: float, down_scale: float, scale: float, route):
        dtype = _compute_dtype(x, b.dtype)
        with torch.autocast(x.device.type, enabled=False):
            up, down, x2, h = _low_rank_h(x, a, b, c, d, up_scale, down_scale, dtype)
            if y.dtype == dtype and not torch.compiler.is_compiling():
                # In place: an out-of-place addmm copies y into its result first, as many bytes as a separate add.
                out = y.addmm_(h, up.T, alpha=scale)
                ctx.mark_dirty(y)
            else:  # e.g. a bf16 base layer and an fp32 adapter without autocast: the add in y's dtype, as before
                out = h @ up.T
                out = y + (out * scale if scale != 1.0 else out).to(y.dtype)
        ctx.save_for_backward(x2, h, up, down)
        _save(ctx, x, x2, a, b, c, d, up_scale, down_scale, scale, route)
        return out

    @staticmethod
    def backward(ctx, g):
        need = ctx.needs_input_grad
        g_y = g if need[0] else None
        g_x, g_b, g_d = _backward(ctx, g, *ctx.saved_tensors, need[1], need[3], need[5])
        return g_y, g_x, None, g_b, None, g_d, None, None, None, None


class LinearLowRank(torch.autograd.Function):
    """``x · W0ᵀ (+ bias) + scale · (x · [C, s_d·D]ᵀ) · [A; s_u·B]ᵀ`` as ``(rows, m)`` in the compute dtype: the
    frozen base layer and the adapter in one node (see :func:`linear_low_rank`); gradients for ``x``, ``B`` and
    ``D`` only (``W0`` and its bias are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, c, d, up_scale: float, down_scale: float, scale: float, route):
        dtype = _compute_dtype(x, b.dtype)
        with torch.autocast(x.device.type, enabled=False):
            up, down, x2, h = _low_rank_h(x, a, b, c, d, up_scale, down_scale, dtype)
            # What autocast's F.linear casts (no copy where the weight is in dtype); detached, so that the backward
            # reads the storage of this forward, as F.linear's own node does, even if the parameter's .data moves.
            w0 = weight.detach().to(dtype)
            y = F.linear(x2, w0, None if bias is None else bias.to(dtype))
            out = y.addmm_(h, up.T, alpha=scale)
        ctx.save_for_backward(x2, h, up, down, w0 if ctx.needs_input_grad[0] else None)  # W0: for x's gradient only
        _save(ctx, x, x2, a, b, c, d, up_scale, down_scale, scale, route)
        return out

    @staticmethod
    def backward(ctx, g):
        x2, h, up, down, w0 = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_x, g_b, g_d = _backward(ctx, g, x2, h, up, down, need[0], need[4], need[6], base_weight=w0)
        return g_x, None, None, None, g_b, None, g_d, None, None, None, None


def _weight_grad(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """``scale · a · b`` in ``dtype`` (a learned half's gradient from compute-dtype factors)."""
    if _MM_OUT_DTYPE and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and dtype == torch.float32:
        out = torch.mm(a, b, out_dtype=dtype)
        return out.mul_(scale) if scale != 1.0 else out
    out = a @ b
    return (out * scale if scale != 1.0 else out).to(dtype)


def _rows(route: tuple[int, str] | None, per_sample: int = 1) -> tuple[slice, slice]:
    """Rows whose gradients reach B and D: all, or those of the first ``k`` samples of the batch for the owned half
    and the rest for the other (``per_sample`` rows a sample where the batch and token dimensions are flattened)."""
    if route is None:
        return slice(None), slice(None)
    k, owned = route
    main, aux = slice(0, k * per_sample), slice(k * per_sample, None)
    return (main, aux) if owned == "up" else (aux, main)


def low_rank_add(y, x, a, b, c, d, up_scale=1.0, down_scale=1.0, scale=1.0, route=None) -> torch.Tensor:
    """``y + scale · (x · [C, s_d·D]ᵀ) · [A; s_u·B]ᵀ`` in ``y``'s dtype, shaped ``(*x.shape[:-1], m)``, in one node.

    ``y`` is 2-D ``(rows, m)`` and the caller's own (e.g. the base layer's output on the flattened ``x``): where its
    dtype is the compute dtype the sum is written into it (autograd's version counters would flag any other user
    that saved it). 2-D, so that it is no view: an in-place change of a view inside a Function costs a CopySlices
    node."""
    out = LowRankAdd.apply(y, x, a, b, c, d, float(up_scale), float(down_scale), float(scale), route)
    return out.view(*x.shape[:-1], out.shape[-1])


def linear_low_rank(x, weight, bias, a, b, c, d, up_scale=1.0, down_scale=1.0, scale=1.0, route=None):
    """``F.linear(x, weight, bias) + scale · (x · [C, s_d·D]ᵀ) · [A; s_u·B]ᵀ``, shaped ``(*x.shape[:-1], m)``, in one
    node: a frozen base layer's GEMM inside the adapter's (where :func:`fusable_base` allows it), so the input's
    gradient is one GEMM with the adapter's product added in its epilogue. Computed in the dtype autocast's
    ``F.linear`` would give (the weight and bias cast to it); the forward is the separate nodes' computation."""
    out = LinearLowRank.apply(x, weight, bias, a, b, c, d, float(up_scale), float(down_scale), float(scale), route)
    return out.view(*x.shape[:-1], out.shape[-1])


#: On for a block (``with fused_base():``): :class:`~b4m.adapter.layer.PLPLinear` runs a fusable base layer inside
#: :func:`linear_low_rank`; off (the default), as a node of its own before :func:`low_rank_add`. Kept off: on an
#: H100 (2026-12-07) bench/speed.py's ``stage1/graphs-1x16-fused`` row's gain was within the spread of the repeats,
#: and it changes the input gradient's rounding, so every stored figure would move. Read when a layer runs its
#: forward, so the backward belongs inside the block too: gradient checkpointing runs the forward again there, and a
#: CUDA graph keeps the way it was captured.
fused_base = Switch("fused_base")


def _hooked(layer: nn.Module) -> bool:
    """Hooks would see (or change) the base layer's call, which a node with the base inside makes no call of:
    the layer's own, the global module hooks, or a forward set on the instance (accelerate's hooks)."""
    own = (layer._forward_hooks, layer._forward_pre_hooks, layer._backward_hooks, layer._backward_pre_hooks)
    every = (
        _module._global_forward_hooks,
        _module._global_forward_pre_hooks,
        _module._global_backward_hooks,
        _module._global_backward_pre_hooks,
    )
    return any(own) or any(every) or "forward" in vars(layer)


def fusable_base(layer: nn.Module, x: torch.Tensor, adapter_dtype: torch.dtype = torch.float32) -> bool:
    """``layer`` can run inside :func:`linear_low_rank` for the input ``x`` and an adapter in ``adapter_dtype``
    with the separate nodes' result: it is exactly an ``nn.Linear`` (a subclass may compute otherwise), frozen
    (weight and bias), stored as plain tensors (not 8-bit: :func:`~b4m.device.is_plain`), on ``x``'s device (not
    meta, not offloaded), unhooked, and the dtype ``F.linear`` gives (autocast's, or ``x``'s without autocast) is the
    adapter's compute dtype. An fp64 ``x`` under autocast is not (autocast leaves fp64 alone). Never inside
    torch.compile, which fuses what it can itself."""
    if type(layer) is not nn.Linear or torch.compiler.is_compiling() or _hooked(layer):
        return False
    weight, bias = layer.weight, layer.bias
    tensors = (weight,) if bias is None else (weight, bias)
    if any(t.requires_grad or not is_plain(t) or t.device != x.device for t in tensors) or x.device.type == "meta":
        return False
    if torch.is_autocast_enabled(x.device.type):  # F.linear and the adapter both in autocast's dtype, if it casts
        return all(t.dtype in AUTOCAST_DTYPES for t in (x, *tensors))
    return all(t.dtype == x.dtype for t in tensors) and x.dtype == adapter_dtype  # no cast: x's dtype throughout


def runs_fused(layer: nn.Module, x: torch.Tensor, adapter_dtype: torch.dtype = torch.float32) -> bool:
    """Whether :class:`~b4m.adapter.layer.PLPLinear` runs :func:`linear_low_rank`: :data:`fused_base` is on and
    :func:`fusable_base` allows it."""
    return bool(fused_base) and fusable_base(layer, x, adapter_dtype)


#: The last input cast by :func:`autocast_input`: weak references to the source and the cast, the source's version
#: and the dtype.
_last_cast: tuple | None = None

#: Input and weight dtypes that autocast casts (never fp64).
AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype where autocast would cast it (else ``x``), so that the base layer and the adapter
    use one cast, and layers fed the very same tensor (to_q, to_k and to_v get one LayerNorm output) one between
    them: the last cast is reused while its source is the same object, unmodified (tensor versions count in-place
    changes) and cast to the same dtype. The gradients of the layers sharing it sum in the autocast dtype before the
    one cast back (as if the model ran in that dtype).

    Both references are weak: the cast lives as long as an adapter node saves it for the backward pass (under
    activation checkpointing, which saves nothing, siblings may cast again: slower, not wrong). A strong one would
    keep the last step's autograd graph (its AccumulateGrad nodes) alive into the next step, which breaks the
    capture of a CUDA graph (the nodes remember the stream they were made on)."""
    global _last_cast
    device = x.device.type
    if not torch.is_autocast_enabled(device) or x.dtype not in AUTOCAST_DTYPES:
        return x
    dtype = torch.get_autocast_dtype(device)
    if x.dtype == dtype:
        return x
    if torch.compiler.is_compiling() or x.is_inference():  # no Python state in a traced graph; no version counter
        return x.to(dtype)
    if _last_cast is not None:
        source, version, target, cached = _last_cast
        cast = cached()
        fresh = source() is x and version == x._version and target == dtype
        if fresh and cast is not None and cast.requires_grad == x.requires_grad:
            return cast
    cast = x.to(dtype)
    _last_cast = (weakref.ref(x), x._version, dtype, weakref.ref(cast))
    return cast
