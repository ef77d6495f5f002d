"""The PLP product ``(x · W_downᵀ) · W_upᵀ`` as one autograd node, with optional per-sample gradient routing.

One node instead of five (two concatenations, two matmuls and a scale) keeps the per-layer Python and autograd
overhead low, which dominates SDXL training at small batches (docs/benchmarks.md). Routing is free: the backward
pass sums the learned halves' weight gradients over a subset of the batch instead of running two half-batch paths.

Backward, with ``g`` the gradient of the output, ``h = x · W_downᵀ`` (saved, only ``r`` wide)::

    g_h = g · W_up          g_x = g_h · W_down
    g_B = up_scale · Σ_rows(B)  g[:, d_out:]ᵀ · h        (rows of the batch that train B)
    g_D = down_scale · Σ_rows(D) g_hᵀ · x[:, d_in:]      (rows of the batch that train D)

:class:`LowRankAdd` is the training node :class:`~b4m.plp.PLPLinear` uses: the same product times ``scale``, added to
the base layer's output ``y`` inside the second matmul (``addmm_``), so the add costs no kernel of its own. Its
backward passes ``g`` on to ``y`` and runs the formulas above with ``scale · g`` (the ``scale`` folded into ``W_up``
and the weight-gradient multipliers, small tensors, rather than into ``g``). :class:`LowRankProduct` is the node of
the legacy path (:data:`b4m.plp.FUSED_TRAIN_PATH` off).
"""

from __future__ import annotations

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


class LowRankProduct(torch.autograd.Function):
    """``out = (x · [C, s_d·D]ᵀ) · [A; s_u·B]ᵀ``; gradients only for ``x``, ``B`` and ``D``."""

    @staticmethod
    def forward(ctx, x, a, b, c, d, up_scale: float, down_scale: float, route: tuple[int, str] | None):
        dtype = _compute_dtype(x, b.dtype)
        with torch.autocast(x.device.type, enabled=False):
            up, down = _factors(a, b, c, d, up_scale, down_scale, dtype)
            xc = x.to(dtype)
            h = xc @ down.T  # (..., r)
            out = h @ up.T  # (..., m)
        ctx.save_for_backward(xc, h, up, down)
        ctx.meta = (a.shape[0], c.shape[1], up_scale, down_scale, route, x.dtype, b.dtype, d.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        xc, h, up, down = ctx.saved_tensors
        d_out, d_in, up_scale, down_scale, route, x_dtype, b_dtype, d_dtype = ctx.meta
        with torch.autocast(g.device.type, enabled=False):
            g = g.to(up.dtype)
            g_h = g @ up  # (..., r)
            g_x = (g_h @ down).to(x_dtype) if ctx.needs_input_grad[0] else None
            rows_b, rows_d = _rows(route)
            g_b = g_d = None
            if ctx.needs_input_grad[2]:
                g_rows, h_rows = g[rows_b], h[rows_b]
                g_b = g_rows.reshape(-1, g.shape[-1])[:, d_out:].T @ h_rows.reshape(-1, h.shape[-1])
                g_b = (g_b * up_scale if up_scale != 1.0 else g_b).to(b_dtype)
            if ctx.needs_input_grad[4]:
                gh_rows, x_rows = g_h[rows_d], xc[rows_d]
                g_d = gh_rows.reshape(-1, g_h.shape[-1]).T @ x_rows.reshape(-1, xc.shape[-1])[:, d_in:]
                g_d = (g_d * down_scale if down_scale != 1.0 else g_d).to(d_dtype)
        return g_x, None, g_b, None, g_d, None, None, None


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


def low_rank_product(x, a, b, c, d, up_scale=1.0, down_scale=1.0, route=None) -> torch.Tensor:
    return LowRankProduct.apply(x, a, b, c, d, float(up_scale), float(down_scale), route)


def low_rank_add(y, x, a, b, c, d, up_scale=1.0, down_scale=1.0, scale=1.0, route=None) -> torch.Tensor:
    """``y + scale · low_rank_product(x, …)`` in ``y``'s dtype, shaped ``(*x.shape[:-1], m)``, in one node.

    ``y`` is 2-D ``(rows, m)`` and the caller's own (e.g. the base layer's output on the flattened ``x``): where its
    dtype is the compute dtype the sum is written into it (autograd's version counters would flag any other user
    that saved it). 2-D, so that it is no view: an in-place change of a view inside a Function costs a CopySlices
    node."""
    out = LowRankAdd.apply(y, x, a, b, c, d, float(up_scale), float(down_scale), float(scale), route)
    return out.view(*x.shape[:-1], out.shape[-1])
