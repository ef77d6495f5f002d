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

:func:`autocast_input` gives the base layer and the adapter one cast of an autocast input, shared by the layers fed
the very same tensor (``to_q``, ``to_k`` and ``to_v`` read one LayerNorm output).
"""

from __future__ import annotations

import weakref

import torch

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


class LowRankAdd(torch.autograd.Function):
    """``y + scale · (x · [C, s_d·D]ᵀ) · [A; s_u·B]ᵀ`` with ``y`` 2-D ``(rows, m)``, in place on ``y`` where its dtype
    is the compute dtype (see :func:`low_rank_add`); gradients for ``y``, ``x``, ``B`` and ``D``."""

    @staticmethod
    def forward(ctx, y, x, a, b, c, d, up_scale: float, down_scale: float, scale: float, route):
        dtype = _compute_dtype(x, b.dtype)
        with torch.autocast(x.device.type, enabled=False):
            up, down = _factors(a, b, c, d, up_scale, down_scale, dtype)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            h = x2 @ down.T  # rows × r
            if y.dtype == dtype and not torch.compiler.is_compiling():
                # In place: an out-of-place addmm copies y into its result first, as many bytes as a separate add.
                out = y.addmm_(h, up.T, alpha=scale)
                ctx.mark_dirty(y)
            else:  # e.g. a bf16 base layer and an fp32 adapter without autocast: the add in y's dtype, as before
                out = h @ up.T
                out = y + (out * scale if scale != 1.0 else out).to(y.dtype)
        ctx.save_for_backward(x2, h, up, down)
        per_sample = x2.shape[0] // max(x.shape[0], 1) if x.dim() > 1 else 1  # rows of one sample (its tokens)
        ctx.meta = (x.shape, x.dtype, b.dtype, d.dtype, a.shape[0], c.shape[1], up_scale, down_scale, scale)
        ctx.route = route, per_sample
        return out

    @staticmethod
    def backward(ctx, g):
        x2, h, up, down = ctx.saved_tensors
        x_shape, x_dtype, b_dtype, d_dtype, d_out, d_in, up_scale, down_scale, scale = ctx.meta
        g_y = g if ctx.needs_input_grad[0] else None
        with torch.autocast(g.device.type, enabled=False):
            g = g.to(up.dtype)
            g_h = g @ (up * scale if scale != 1.0 else up)  # the gradient of h for scale · g: rows × r
            g_x = (g_h @ down).to(x_dtype).reshape(x_shape) if ctx.needs_input_grad[1] else None
            rows_b, rows_d = _rows(*ctx.route)
            g_b = g_d = None
            if ctx.needs_input_grad[3]:
                g_b = _weight_grad(g[rows_b, d_out:].T, h[rows_b], b_dtype, up_scale * scale)
            if ctx.needs_input_grad[5]:
                g_d = _weight_grad(g_h[rows_d].T, x2[rows_d, d_in:], d_dtype, down_scale)
        return g_y, g_x, None, g_b, None, g_d, None, None, None, None


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
